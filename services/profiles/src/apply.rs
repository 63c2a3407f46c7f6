//! Applying events and merges to a profile under the definitions in force: traits by
//! strategy, consent, counts, computed traits, noting what changed for segment
//! evaluation. Pure functions of the state, so any replay gives the same result. Above
//! the profile model (`profile.rs`) and the definitions (`catalog.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use tessera_common::config::TraitStrategy;
use tessera_common::records::ResolvedEvent;

use crate::catalog::DefinitionSet;
use crate::computed::ComputedState;
use crate::profile::*;
use crate::segments::Touched;

/// What applying events needs besides the events: the trait strategies and the
/// definitions in force (for computed traits).
#[derive(Debug, Clone, Default)]
pub struct ApplyRules {
    pub strategies: BTreeMap<String, TraitStrategy>,
    pub defs: Arc<DefinitionSet>,
}

impl ApplyRules {
    pub fn strategy(&self, name: &str) -> &TraitStrategy {
        self.strategies
            .get(name)
            .unwrap_or(&TraitStrategy::MostRecent)
    }
}

pub(crate) fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Order of values for max/min: numbers by value, then strings; other kinds rank by type.
pub(crate) fn compare_values(a: &Value, b: &Value) -> std::cmp::Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&y.as_f64().unwrap_or(0.0)),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        _ => rank(a)
            .cmp(&rank(b))
            .then_with(|| a.to_string().cmp(&b.to_string())),
    }
}

/// Whether `new` beats the current value `old` under a strategy (most frequent is
/// decided with the counts, in [`Profile::set_trait`]).
pub(crate) fn beats(strategy: &TraitStrategy, new: &TraitValue, old: &TraitValue) -> bool {
    use std::cmp::Ordering::*;
    let newer = new.newer_than(old);
    match strategy {
        TraitStrategy::MostRecent | TraitStrategy::MostFrequent => newer,
        TraitStrategy::FirstNonEmpty => match (is_empty(&new.value), is_empty(&old.value)) {
            (true, false) => false,
            (false, true) => true,
            // Among non-empty values the earliest; among empty ones the latest.
            (false, false) => !newer,
            (true, true) => newer,
        },
        TraitStrategy::Max => match compare_values(&new.value, &old.value) {
            Greater => true,
            Less => false,
            Equal => newer,
        },
        TraitStrategy::Min => match compare_values(&new.value, &old.value) {
            Less => true,
            Greater => false,
            Equal => newer,
        },
        TraitStrategy::SourcePriority { sources } => {
            let rank = |s: &str| sources.iter().position(|x| x == s).unwrap_or(sources.len());
            match rank(&new.source).cmp(&rank(&old.source)) {
                Less => true,
                Greater => false,
                Equal => newer,
            }
        }
    }
}

impl Profile {
    /// Applies one resolved event. Returns whether an identifier or a trait value changed
    /// (what destinations see).
    pub fn apply(&mut self, r: &ResolvedEvent, rules: &ApplyRules) -> bool {
        let payload = r.payload();
        self.apply_touching(r, &payload, rules, &mut Touched::default())
    }

    /// [`Profile::apply`] with the event's payload already parsed, noting what the event
    /// touched (for segment evaluation).
    pub fn apply_touching(
        &mut self,
        r: &ResolvedEvent,
        payload: &Value,
        rules: &ApplyRules,
        touched: &mut Touched,
    ) -> bool {
        let e = &r.event;
        let identifiers_before = self.identifiers.len();
        self.identifiers.extend(r.identifiers.iter().cloned());
        let mut changed = false;
        let provenance = |v: &Value| TraitValue {
            value: v.clone(),
            event_time: e.event_time,
            message_id: e.message_id.clone(),
            source: e.source.clone(),
        };
        // Traits SDKs put in context on every call, and an identify's own traits.
        let mut trait_sources = vec![&payload["context"]["traits"]];
        if e.kind == "identify" {
            trait_sources.push(&payload["traits"]);
        }
        let mut decisions: Vec<(&str, &Value, &str)> = Vec::new();
        for traits in trait_sources.into_iter().filter_map(Value::as_object) {
            for (k, v) in traits {
                if k == "consent"
                    && let Some(prefs) = v.as_object()
                {
                    decisions.extend(prefs.iter().map(|(p, v)| (p.as_str(), v, "traits.consent")));
                    continue;
                }
                if self.set_trait(k, provenance(v), 1, rules) {
                    changed = true;
                    touched.parts.traits.insert(k.clone());
                }
            }
        }
        if let Some(prefs) = payload["context"]["consent"]["categoryPreferences"].as_object() {
            decisions.extend(
                prefs
                    .iter()
                    .map(|(p, v)| (p.as_str(), v, "context.consent")),
            );
        }
        for (purpose, v, via) in decisions {
            let Some(granted) = v.as_bool() else { continue };
            let c = Consent {
                granted,
                event_time: e.event_time,
                message_id: e.message_id.clone(),
                source: e.source.clone(),
                via: via.to_string(),
            };
            if self.set_consent(purpose, c) {
                changed = true;
                touched.parts.consent.insert(purpose.to_string());
            }
        }
        if e.kind == "track"
            && let Some(name) = &e.event
        {
            *self.event_counts.entry(name.clone()).or_default() += 1;
            touched.parts.events.insert(name.clone());
        }
        for def in &rules.defs.computed {
            self.contribute(
                def,
                e.kind.as_str(),
                e.event.as_deref(),
                e.event_time,
                payload,
            );
        }
        if e.kind == "group" {
            let group = match &payload["groupId"] {
                Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            };
            if let Some(g) = group {
                changed |= self.accounts.insert(g);
            }
        }
        changed |= self.derive_household();
        touched.parts.identifiers |= self.identifiers.len() != identifiers_before;
        self.events_total += 1;
        self.first_seen = self.first_seen.min(e.event_time);
        self.last_seen = self.last_seen.max(e.event_time);
        changed || self.identifiers.len() != identifiers_before
    }

    /// Drops computed traits no longer defined and windowed values that left their
    /// window by `now`, noting in `touched` the ids whose value changed; returns the
    /// next expiry.
    pub fn refresh_computed(
        &mut self,
        defs: &DefinitionSet,
        now: i64,
        touched: &mut Touched,
    ) -> Option<i64> {
        self.computed
            .retain(|id, _| defs.computed_trait(id).is_some());
        let mut next: Option<i64> = None;
        for def in &defs.computed {
            let state = self
                .computed
                .entry(def.id.clone())
                .or_insert_with(|| ComputedState::new(def));
            let (c, n) = state.refresh(def, now, defs.model(&def.id));
            if c {
                touched.parts.computed.insert(def.id.clone());
            }
            next = crate::computed::earliest(next, n);
        }
        next
    }

    /// Offers a value (seen `times` times) to a trait; its strategy decides whether it
    /// wins. Returns whether the trait's value changed.
    pub(crate) fn set_trait(
        &mut self,
        name: &str,
        v: TraitValue,
        times: u64,
        rules: &ApplyRules,
    ) -> bool {
        let strategy = rules.strategy(name);
        let wins = if *strategy == TraitStrategy::MostFrequent {
            let counts = self.trait_counts.entry(name.to_string()).or_default();
            let key = v.value.to_string();
            let f = counts.entry(key.clone()).or_insert_with(|| Frequency {
                count: 0,
                latest: v.clone(),
            });
            f.count += times;
            if v.newer_than(&f.latest) {
                f.latest = v.clone();
            }
            let candidate = (f.count, f.latest.clone());
            if counts.len() > MAX_COUNTED_VALUES {
                let weakest = counts
                    .iter()
                    .filter(|(k, _)| **k != key)
                    .min_by(|a, b| {
                        (a.1.count, a.1.latest.event_time).cmp(&(b.1.count, b.1.latest.event_time))
                    })
                    .map(|(k, _)| k.clone());
                if let Some(k) = weakest {
                    counts.remove(&k);
                }
            }
            let current = self
                .traits
                .get(name)
                .and_then(|t| counts.get(&t.value.to_string()))
                .map(|f| (f.count, f.latest.clone()));
            match current {
                None => true,
                Some((count, latest)) => {
                    candidate.0 > count
                        || (candidate.0 == count && !latest.newer_than(&candidate.1))
                }
            }
            .then_some(candidate.1)
        } else {
            match self.traits.get(name) {
                Some(old) if !beats(strategy, &v, old) => None,
                _ => Some(v),
            }
        };
        match wins {
            Some(v) => {
                let changed = self.traits.get(name).is_none_or(|o| o.value != v.value);
                self.traits.insert(name.to_string(), v);
                changed
            }
            None => false,
        }
    }

    /// Folds another profile's state into this one (after an identity merge).
    /// Memberships are not moved: they are re-evaluated on the merged state. Returns
    /// whether an identifier or a trait value changed.
    pub fn absorb(&mut self, other: &Profile, rules: &ApplyRules) -> bool {
        let identifiers_before = self.identifiers.len();
        self.identifiers.extend(other.identifiers.iter().cloned());
        let mut changed = false;
        for (k, v) in &other.traits {
            match other.trait_counts.get(k) {
                // Most frequent: add the other profile's counts value by value.
                Some(counts) if *rules.strategy(k) == TraitStrategy::MostFrequent => {
                    for f in counts.values() {
                        changed |= self.set_trait(k, f.latest.clone(), f.count, rules);
                    }
                }
                _ => changed |= self.set_trait(k, v.clone(), 1, rules),
            }
        }
        changed |= self.derive_household();
        for (id, w) in &other.pending {
            match self.pending.get(id) {
                Some(mine) if mine.started_at <= w.started_at => {}
                _ => {
                    self.pending.insert(id.clone(), w.clone());
                }
            }
        }
        for (purpose, c) in &other.consent {
            changed |= self.set_consent(purpose, c.clone());
        }
        for (id, theirs) in &other.computed {
            let def = rules.defs.computed_trait(id);
            match (self.computed.get_mut(id), def) {
                (Some(mine), Some(def)) if mine.version == theirs.version => {
                    mine.absorb(def, theirs)
                }
                (None, _) => {
                    self.computed.insert(id.clone(), theirs.clone());
                }
                _ => {}
            }
        }
        for a in &other.accounts {
            changed |= self.accounts.insert(a.clone());
        }
        for (k, n) in &other.event_counts {
            *self.event_counts.entry(k.clone()).or_default() += n;
        }
        self.events_total += other.events_total;
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        if !self.merged_from.contains(&other.id) {
            self.merged_from.push(other.id.clone());
        }
        for m in &other.merged_from {
            if !self.merged_from.contains(m) {
                self.merged_from.push(m.clone());
            }
        }
        changed || self.identifiers.len() != identifiers_before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_common::config::TraitStrategy;
    use tessera_common::records::Identifier;
    use tessera_common::records::IngestedEvent;

    fn ev(mid: &str, kind: &str, name: Option<&str>, t: i64, payload: Value) -> ResolvedEvent {
        ResolvedEvent {
            profile_id: "p".into(),
            identifiers: vec![Identifier {
                kind: "user_id".into(),
                value: "u".into(),
            }],
            event: IngestedEvent {
                message_id: mid.into(),
                source: "web".into(),
                kind: kind.into(),
                user_id: Some("u".into()),
                anonymous_id: None,
                event: name.map(Into::into),
                received_at: t,
                event_time: t,
                payload: payload.to_string(),
            },
        }
    }

    #[test]
    fn traits_resolve_by_event_time_whatever_the_arrival_order() {
        let newer = ev(
            "b",
            "identify",
            None,
            20,
            json!({"traits": {"plan": "pro"}}),
        );
        let older = ev(
            "a",
            "identify",
            None,
            10,
            json!({"traits": {"plan": "free", "name": "Ann"}}),
        );
        let mut p1 = Profile::new("p");
        p1.apply(&newer, &ApplyRules::default());
        p1.apply(&older, &ApplyRules::default());
        let mut p2 = Profile::new("p");
        p2.apply(&older, &ApplyRules::default());
        p2.apply(&newer, &ApplyRules::default());
        assert_eq!(p1, p2);
        assert_eq!(p1.traits["plan"].value, json!("pro"));
        assert_eq!(p1.traits["plan"].message_id, "b", "provenance kept");
        assert_eq!(p1.traits["name"].value, json!("Ann"));
        assert_eq!((p1.first_seen, p1.last_seen), (10, 20));
        // The same value again, newer: no change a destination could see.
        let again = ev(
            "c",
            "identify",
            None,
            30,
            json!({"traits": {"plan": "pro"}}),
        );
        assert!(!p1.apply(&again, &ApplyRules::default()));
        let moved = ev(
            "d",
            "identify",
            None,
            40,
            json!({"traits": {"plan": "team"}}),
        );
        assert!(p1.apply(&moved, &ApplyRules::default()));
    }

    #[test]
    fn counts_and_absorb() {
        let mut p = Profile::new("k");
        for i in 0..5 {
            p.apply(
                &ev(
                    &format!("m{i}"),
                    "track",
                    Some("Order Completed"),
                    i,
                    json!({"properties": {"total": i}}),
                ),
                &ApplyRules::default(),
            );
        }
        assert_eq!(p.event_counts["Order Completed"], 5);
        let mut a = Profile::new("a");
        a.apply(
            &ev("x", "track", Some("Order Completed"), 100, json!({})),
            &ApplyRules::default(),
        );
        p.absorb(&a, &ApplyRules::default());
        assert_eq!(p.event_counts["Order Completed"], 6);
        assert_eq!((p.first_seen, p.last_seen, p.events_total), (0, 100, 6));
        assert_eq!(p.merged_from, vec!["a".to_string()]);
        assert_eq!(p.flat_fields()["user_id"], json!("u"));
    }

    #[test]
    fn group_calls_add_accounts_and_an_address_gives_a_household() {
        let mut a = Profile::new("a");
        assert!(a.apply(
            &ev("g", "group", None, 1, json!({"groupId": "acme"})),
            &ApplyRules::default()
        ));
        a.apply(
            &ev(
                "i",
                "identify",
                None,
                2,
                json!({"traits": {"address": {"street": "12 Oak Street", "postalCode": "90210"}}}),
            ),
            &ApplyRules::default(),
        );
        let mut b = Profile::new("b");
        b.apply(
            &ev(
                "j",
                "identify",
                None,
                3,
                json!({"traits": {"address": {"street": "12 oak st.", "postalCode": "90 210"}}}),
            ),
            &ApplyRules::default(),
        );
        assert_eq!(a.accounts.iter().collect::<Vec<_>>(), vec!["acme"]);
        assert!(a.household.is_some());
        assert_eq!(
            a.household, b.household,
            "the same address, written differently"
        );
        let mut c = Profile::new("c");
        c.apply(
            &ev(
                "k",
                "identify",
                None,
                3,
                json!({"traits": {"address": {"street": "14 Oak St", "postalCode": "90210"}}}),
            ),
            &ApplyRules::default(),
        );
        assert_ne!(a.household, c.household);
    }

    fn identify(mid: &str, t: i64, source: &str, traits: Value) -> ResolvedEvent {
        let mut r = ev(mid, "identify", None, t, json!({ "traits": traits }));
        r.event.source = source.into();
        r
    }

    /// Every strategy picks the same value whatever the arrival order, and says so.
    #[test]
    fn trait_strategies_choose_independently_of_arrival_order() {
        let events = [
            identify(
                "a",
                10,
                "web",
                json!({"ltv": 30, "plan": "pro", "nick": "", "color": "red"}),
            ),
            identify(
                "b",
                20,
                "crm",
                json!({"ltv": 80, "plan": "team", "nick": "Al", "color": "blue"}),
            ),
            identify(
                "c",
                30,
                "web",
                json!({"ltv": 50, "plan": "free", "nick": "Ally", "color": "red"}),
            ),
            identify(
                "d",
                40,
                "app",
                json!({"ltv": 5, "plan": "pro", "nick": null, "color": "blue"}),
            ),
        ];
        let strategies: BTreeMap<String, TraitStrategy> = [
            ("ltv", TraitStrategy::Max),
            ("nick", TraitStrategy::FirstNonEmpty),
            ("color", TraitStrategy::MostFrequent),
            (
                "plan",
                TraitStrategy::SourcePriority {
                    sources: vec!["crm".into(), "web".into()],
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let rules = ApplyRules {
            strategies,
            ..Default::default()
        };
        let orders = [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]];
        let mut results = Vec::new();
        for order in orders {
            let mut p = Profile::new("p");
            for i in order {
                p.apply(&events[i], &rules);
            }
            results.push(p);
        }
        for r in &results[1..] {
            assert_eq!(r.traits, results[0].traits);
        }
        let t = &results[0].traits;
        assert_eq!(t["ltv"].value, json!(80), "max");
        assert_eq!(t["nick"].value, json!("Al"), "first non-empty");
        assert_eq!(t["plan"].value, json!("team"), "the crm's value");
        // red and blue are seen twice each: the more recent sighting (blue, at 40) wins.
        assert_eq!(t["color"].value, json!("blue"));
        assert_eq!(
            t["color"].message_id, "d",
            "provenance of the winning sighting"
        );

        // Merging two halves gives the same as one profile that saw everything.
        let mut left = Profile::new("l");
        left.apply(&events[0], &rules);
        left.apply(&events[2], &rules);
        let mut right = Profile::new("r");
        right.apply(&events[1], &rules);
        right.apply(&events[3], &rules);
        left.absorb(&right, &rules);
        assert_eq!(left.traits, results[0].traits);
        assert_eq!(
            left.trait_counts["color"][&json!("red").to_string()].count,
            2
        );
    }
}
