//! The profile: identifiers, traits (latest by event time, with provenance), event
//! counts, first/last seen, a bounded recent-events timeline and segment memberships.
//! Applying an event and merging two profiles are pure functions of the state, so any
//! replay gives the same result.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use tessera_common::ids::deterministic_id;
use tessera_common::records::{Identifier, ResolvedEvent};
use tessera_common::text;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitValue {
    pub value: Value,
    pub event_time: i64,
    pub message_id: String,
    pub source: String,
}

impl TraitValue {
    /// Latest by event time; ties by message id, so the order of arrival never matters.
    fn newer_than(&self, other: &TraitValue) -> bool {
        (self.event_time, &self.message_id) > (other.event_time, &other.message_id)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSummary {
    pub message_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub event: Option<String>,
    pub event_time: i64,
    pub received_at: i64,
    pub source: String,
    pub properties: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Membership {
    pub version: i32,
    pub entered_at: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub id: String,
    pub identifiers: BTreeSet<Identifier>,
    pub traits: BTreeMap<String, TraitValue>,
    /// Track events by name.
    pub event_counts: BTreeMap<String, u64>,
    pub events_total: u64,
    pub first_seen: i64,
    pub last_seen: i64,
    /// Newest first, at most the configured number.
    pub recent_events: Vec<EventSummary>,
    pub segments: BTreeMap<String, Membership>,
    /// Profiles merged into this one.
    pub merged_from: Vec<String>,
    /// Accounts (Segment `group` calls) the person belongs to.
    #[serde(default)]
    pub accounts: BTreeSet<String>,
    /// The household: everyone whose `address` trait normalises to the same street and
    /// postcode (or city).
    #[serde(default)]
    pub household: Option<String>,
}

impl Profile {
    pub fn new(id: &str) -> Profile {
        Profile {
            id: id.to_string(),
            first_seen: i64::MAX,
            last_seen: i64::MIN,
            ..Default::default()
        }
    }

    /// Applies one resolved event. Returns whether an identifier or a trait value changed
    /// (what destinations see).
    pub fn apply(&mut self, r: &ResolvedEvent, recent_limit: usize) -> bool {
        let e = &r.event;
        let identifiers_before = self.identifiers.len();
        self.identifiers.extend(r.identifiers.iter().cloned());
        let mut changed = false;
        let payload: Value = serde_json::from_str(&e.payload).unwrap_or(Value::Null);
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
        for traits in trait_sources.into_iter().filter_map(Value::as_object) {
            for (k, v) in traits {
                changed |= self.set_trait(k, provenance(v));
            }
        }
        if e.kind == "track"
            && let Some(name) = &e.event
        {
            *self.event_counts.entry(name.clone()).or_default() += 1;
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
        self.events_total += 1;
        self.first_seen = self.first_seen.min(e.event_time);
        self.last_seen = self.last_seen.max(e.event_time);
        let properties = match &payload["properties"] {
            Value::Object(m) => Value::Object(m.clone()),
            _ => Value::Object(Map::new()),
        };
        self.push_recent(
            EventSummary {
                message_id: e.message_id.clone(),
                kind: e.kind.clone(),
                event: e.event.clone(),
                event_time: e.event_time,
                received_at: e.received_at,
                source: e.source.clone(),
                properties,
            },
            recent_limit,
        );
        changed || self.identifiers.len() != identifiers_before
    }

    /// Sets the household from the `address` trait; returns whether it changed.
    fn derive_household(&mut self) -> bool {
        let address = self.traits.get("address").map(|t| &t.value);
        let household = address.and_then(|a| {
            let street = a["street"].as_str().map(text::normalise_address)?;
            let area = a["postalCode"]
                .as_str()
                .or(a["postal_code"].as_str())
                .map(text::normalise_postcode)
                .filter(|p| !p.is_empty())
                .or_else(|| a["city"].as_str().map(|c| text::fold(c, false)))?;
            (!street.is_empty() && !area.is_empty())
                .then(|| deterministic_id("household", &[&street, &area]))
        });
        if household != self.household {
            self.household = household;
            true
        } else {
            false
        }
    }

    /// Keeps the newer value; returns whether the trait's value changed.
    fn set_trait(&mut self, name: &str, v: TraitValue) -> bool {
        match self.traits.get(name) {
            Some(old) if !v.newer_than(old) => false,
            old => {
                let changed = old.is_none_or(|o| o.value != v.value);
                self.traits.insert(name.to_string(), v);
                changed
            }
        }
    }

    fn push_recent(&mut self, s: EventSummary, limit: usize) {
        if self
            .recent_events
            .iter()
            .any(|x| x.message_id == s.message_id)
        {
            return;
        }
        self.recent_events.push(s);
        self.recent_events
            .sort_by(|a, b| (b.event_time, &b.message_id).cmp(&(a.event_time, &a.message_id)));
        self.recent_events.truncate(limit);
    }

    /// Folds another profile's state into this one (after an identity merge).
    /// Memberships are not moved: they are re-evaluated on the merged state. Returns
    /// whether an identifier or a trait value changed.
    pub fn absorb(&mut self, other: &Profile, recent_limit: usize) -> bool {
        let identifiers_before = self.identifiers.len();
        self.identifiers.extend(other.identifiers.iter().cloned());
        let mut changed = false;
        for (k, v) in &other.traits {
            changed |= self.set_trait(k, v.clone());
        }
        changed |= self.derive_household();
        for a in &other.accounts {
            changed |= self.accounts.insert(a.clone());
        }
        for (k, n) in &other.event_counts {
            *self.event_counts.entry(k.clone()).or_default() += n;
        }
        self.events_total += other.events_total;
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        for s in &other.recent_events {
            self.push_recent(s.clone(), recent_limit);
        }
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

    /// Identifiers and trait values flat, for destination payloads:
    /// `{"user_id": ..., "email": ..., "<trait>": ...}`. Identifier kinds win over traits of
    /// the same name; with several values of a kind, the smallest.
    pub fn flat_fields(&self) -> Map<String, Value> {
        let mut m: Map<String, Value> = self
            .traits
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        for i in self.identifiers.iter().rev() {
            m.insert(i.kind.clone(), Value::String(i.value.clone()));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
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
        p1.apply(&newer, 10);
        p1.apply(&older, 10);
        let mut p2 = Profile::new("p");
        p2.apply(&older, 10);
        p2.apply(&newer, 10);
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
        assert!(!p1.apply(&again, 10));
        let moved = ev(
            "d",
            "identify",
            None,
            40,
            json!({"traits": {"plan": "team"}}),
        );
        assert!(p1.apply(&moved, 10));
    }

    #[test]
    fn counts_timeline_and_absorb() {
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
                3,
            );
        }
        assert_eq!(p.event_counts["Order Completed"], 5);
        assert_eq!(p.recent_events.len(), 3, "bounded timeline");
        assert_eq!(p.recent_events[0].message_id, "m4", "newest first");
        let mut a = Profile::new("a");
        a.apply(
            &ev("x", "track", Some("Order Completed"), 100, json!({})),
            3,
        );
        p.absorb(&a, 3);
        assert_eq!(p.event_counts["Order Completed"], 6);
        assert_eq!(p.recent_events[0].message_id, "x");
        assert_eq!(p.merged_from, vec!["a".to_string()]);
        assert_eq!(p.flat_fields()["user_id"], json!("u"));
    }

    #[test]
    fn group_calls_add_accounts_and_an_address_gives_a_household() {
        let mut a = Profile::new("a");
        assert!(a.apply(&ev("g", "group", None, 1, json!({"groupId": "acme"})), 3));
        a.apply(
            &ev(
                "i",
                "identify",
                None,
                2,
                json!({"traits": {"address": {"street": "12 Oak Street", "postalCode": "90210"}}}),
            ),
            3,
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
            3,
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
            3,
        );
        assert_ne!(a.household, c.household);
    }
}
