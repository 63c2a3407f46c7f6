//! The profile: identifiers, traits (by strategy, with provenance), event counts,
//! computed traits, consent, first/last seen and segment memberships. The timeline is
//! not here: it is read from the kept history (`state`), so a profile stays small
//! however active the person is.
//! The model only: applying events and merges to it is `apply.rs`, above the
//! definitions, and segments and triggers read it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use tessera_common::ids::deterministic_id;
use tessera_common::records::{Identifier, ResolvedEvent};
use tessera_common::text;

use crate::computed::{ComputedState, ComputedTrait};

/// A started trigger waiting for its deadline, kept in the profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub version: i32,
    pub started_at: i64,
    pub due: i64,
    /// What started it (a message id, or a segment change's cause).
    pub cause: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub properties: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitValue {
    pub value: Value,
    pub event_time: i64,
    pub message_id: String,
    pub source: String,
}

impl TraitValue {
    /// Latest by event time; ties by message id, so the order of arrival never matters.
    pub(crate) fn newer_than(&self, other: &TraitValue) -> bool {
        (self.event_time, &self.message_id) > (other.event_time, &other.message_id)
    }
}

/// A value's count and latest sighting, for the most-frequent strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frequency {
    pub count: u64,
    pub latest: TraitValue,
}

/// At most this many distinct values are counted per most-frequent trait; beyond it the
/// least frequent are forgotten (the winner is then approximate).
pub(crate) const MAX_COUNTED_VALUES: usize = 100;

/// A consent decision for a purpose (`marketing`) or a purpose on a channel
/// (`marketing.email`): the latest by event time, with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Consent {
    pub granted: bool,
    pub event_time: i64,
    pub message_id: String,
    /// The ingest source of the event.
    pub source: String,
    /// `context.consent` (Segment's `categoryPreferences`) or `traits.consent`.
    #[serde(default)]
    pub via: String,
}

/// How a profile's membership in a segment moved. The records carry it as text
/// ([`Transition::as_str`]); a trigger's `when.change` names `enter` or `exit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Enter,
    Exit,
    /// Still a member, but the profile's fields changed (activation re-sends them).
    Update,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Enter => "enter",
            Transition::Exit => "exit",
            Transition::Update => "update",
        }
    }
}

/// Stored as `[version, entered_at]`: a profile holds many, and is read on every event.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "(i32, i64)", into = "(i32, i64)")]
pub struct Membership {
    pub version: i32,
    pub entered_at: i64,
}

impl From<(i32, i64)> for Membership {
    fn from((version, entered_at): (i32, i64)) -> Self {
        Membership {
            version,
            entered_at,
        }
    }
}

impl From<Membership> for (i32, i64) {
    fn from(m: Membership) -> Self {
        (m.version, m.entered_at)
    }
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
    /// Value counts of the traits whose strategy is most frequent, keyed by the value's
    /// JSON.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trait_counts: BTreeMap<String, BTreeMap<String, Frequency>>,
    /// Computed traits (and segment counters) by id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub computed: BTreeMap<String, ComputedState>,
    /// Consent by purpose.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consent: BTreeMap<String, Consent>,
    /// Triggers waiting for their deadline, by trigger id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pending: BTreeMap<String, Pending>,
    /// When the next windowed value leaves its window or the next waiting trigger is
    /// due (the profile's timer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<i64>,
    /// The record time windows were last evaluated at (they never go back in time).
    #[serde(default)]
    pub evaluated_at: i64,
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

    /// Records a consent answer if it is the latest; returns whether the answer changed.
    pub(crate) fn set_consent(&mut self, purpose: &str, c: Consent) -> bool {
        match self.consent.get(purpose) {
            Some(old) if (old.event_time, &old.message_id) >= (c.event_time, &c.message_id) => {
                false
            }
            old => {
                let changed = old.is_none_or(|o| o.granted != c.granted);
                self.consent.insert(purpose.to_string(), c);
                changed
            }
        }
    }

    /// Adds an event's contribution to a computed trait (a state of another version
    /// is left to be rebuilt).
    pub(crate) fn contribute(
        &mut self,
        def: &ComputedTrait,
        kind: &str,
        event: Option<&str>,
        t: i64,
        payload: &Value,
    ) {
        let Some(v) = def.contribution(kind, event, &payload["properties"]) else {
            return;
        };
        let state = self
            .computed
            .entry(def.id.clone())
            .or_insert_with(|| ComputedState::new(def));
        if state.version == def.version {
            state.add(def, t, v);
        }
    }

    /// Builds a computed trait afresh from events (a new or changed definition).
    pub fn recompute(&mut self, def: &ComputedTrait, events: &[ResolvedEvent]) {
        self.computed
            .insert(def.id.clone(), ComputedState::new(def));
        for r in events {
            let payload = r.payload();
            let e = &r.event;
            self.contribute(def, &e.kind, e.event.as_deref(), e.event_time, &payload);
        }
    }

    /// Sets the household from the `address` trait; returns whether it changed.
    pub(crate) fn derive_household(&mut self) -> bool {
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
