//! Triggers: definitions that fire for a profile
//! - on an event that meets conditions (`when: {event: "Order Completed", where: [...]}`),
//! - on a segment change (`when: {segment: "vip", change: "enter"}`),
//! - or, with `wait`, at a deadline after such a start unless a cancelling event
//!   (`unless: {event: "Order Completed"}`) comes first.
//!
//! A waiting trigger is part of the profile ([`Pending`]): it is saved with it, moves
//! with it when profiles merge and is fired by the profile's durable timer, so deadlines
//! survive restarts. Firing is a pure function of the profile, the cause and the clock's
//! deadline check; the fired record's id derives from the profile, the trigger and the
//! starting cause, so a replay repeats it. Activation (consent, suppressions, frequency
//! caps, payloads) happens downstream, in the activation service.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::computed::{Test, lookup, valid_id, validate_tests};
use crate::profile::{Pending, Profile, Transition};

/// The longest wait: a leap year.
const MAX_WAIT_MS: i64 = 366 * 24 * 3600 * 1000;
/// Event properties kept with a waiting trigger (for the payload) at most this large.
const MAX_KEPT_PROPERTIES: usize = 16 * 1024;

/// An event that starts or cancels a trigger: its name and conditions on its properties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventMatch {
    pub event: String,
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<Test>,
}

impl EventMatch {
    pub fn matches(&self, kind: &str, name: Option<&str>, properties: &Value) -> bool {
        kind == "track"
            && name == Some(self.event.as_str())
            && self
                .filter
                .iter()
                .all(|t| t.passes(lookup(properties, &t.name)))
    }
}

/// What starts a trigger: an event, or a segment's enter or exit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<Test>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    /// `enter` (default) or `exit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    pub id: String,
    /// Set by the catalog.
    #[serde(default)]
    pub version: i32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub when: When,
    /// `30s`, `1h`, `3d`: fire this long after the start instead of at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
    /// With `wait`: an event after the start that cancels the firing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unless: Option<EventMatch>,
    #[serde(skip)]
    pub wait_ms: i64,
}

impl Trigger {
    pub fn validate(&mut self) -> Result<(), String> {
        if !valid_id(&self.id) {
            return Err(format!(
                "trigger id {:?}: use letters, digits, '-' or '_'",
                self.id
            ));
        }
        match (&self.when.event, &self.when.segment) {
            (Some(e), None) if !e.trim().is_empty() => {
                if self.when.change.is_some() {
                    return Err("when: change goes with a segment, not an event".into());
                }
            }
            (None, Some(s)) if !s.trim().is_empty() => {
                if !self.when.filter.is_empty() {
                    return Err("when: where goes with an event, not a segment".into());
                }
                if !matches!(self.when.change.as_deref(), None | Some("enter" | "exit")) {
                    return Err("when: change is enter or exit".into());
                }
            }
            _ => return Err("when: give an event or a segment (one of them)".into()),
        }
        validate_tests(&self.when.filter, "when: where")?;
        self.wait_ms = match &self.wait {
            None => 0,
            Some(w) => {
                let ms = humantime::parse_duration(w)
                    .map_err(|e| format!("wait {w:?}: {e} (write 30s, 15m, 1h or 3d)"))?
                    .as_millis() as i64;
                if !(1000..=MAX_WAIT_MS).contains(&ms) {
                    return Err(format!("wait {w:?} must be between 1s and 366d"));
                }
                ms
            }
        };
        if let Some(u) = &self.unless {
            if self.wait.is_none() {
                return Err("unless needs a wait: only a waiting trigger can be cancelled".into());
            }
            if u.event.trim().is_empty() {
                return Err("unless: the event is empty".into());
            }
            validate_tests(&u.filter, "unless: where")?;
        }
        Ok(())
    }

    /// The segment this trigger reads, if any (it must exist).
    pub fn segment(&self) -> Option<&str> {
        self.when.segment.as_deref()
    }

    fn starts_on(&self, segment: &str, change: Transition) -> bool {
        self.when.segment.as_deref() == Some(segment)
            && self.when.change.as_deref().unwrap_or("enter") == change.as_str()
    }

    pub fn describe(&self) -> String {
        let start = match (&self.when.event, &self.when.segment) {
            (Some(e), _) => format!("event {e}"),
            (_, Some(s)) => format!(
                "segment {s} {}",
                self.when.change.as_deref().unwrap_or("enter")
            ),
            _ => String::new(),
        };
        match (&self.wait, &self.unless) {
            (Some(w), Some(u)) => format!("{start}, then no {} within {w}", u.event),
            (Some(w), None) => format!("{start}, then {w}"),
            _ => start,
        }
    }
}

/// A firing, for the processor to publish with the profile's snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub trigger: String,
    pub version: i32,
    /// The starting cause (part of the record id).
    pub cause: String,
    pub event_time: i64,
    pub received_at: i64,
    pub event: String,
    pub properties: Value,
    pub reason: String,
}

/// What happened to a profile, as triggers see it.
pub struct Step<'a> {
    /// A track or other call: kind, name, properties, event time, message id, received at.
    pub event: Option<EventSeen<'a>>,
    /// Segment enters and exits of this change: (segment, `enter`|`exit`).
    pub segment_changes: Vec<(&'a str, Transition)>,
    /// The cause's id, event time and ingest time (for segment starts).
    pub cause: &'a str,
    pub cause_time: i64,
    pub received_at: i64,
    /// Wall clock: waiting triggers due by now fire.
    pub now: i64,
}

pub struct EventSeen<'a> {
    pub kind: &'a str,
    pub name: Option<&'a str>,
    pub properties: &'a Value,
    pub event_time: i64,
    pub message_id: &'a str,
}

/// Outcome counts, for metrics.
#[derive(Debug, Default, PartialEq)]
pub struct Counts {
    pub started: u64,
    pub cancelled: u64,
}

/// Applies one change to a profile's triggers: cancels, starts, immediate firings and
/// due deadlines. Waiting triggers whose definition is gone are dropped.
pub fn step(triggers: &[Trigger], p: &mut Profile, s: &Step<'_>, fired: &mut Vec<Fired>) -> Counts {
    let mut counts = Counts::default();
    let by_id: BTreeMap<&str, &Trigger> = triggers.iter().map(|t| (t.id.as_str(), t)).collect();
    p.pending.retain(|id, _| by_id.contains_key(id.as_str()));
    if let Some(e) = &s.event {
        // Cancel first: an event that both cancels and restarts a trigger starts anew.
        p.pending.retain(|id, w| {
            let cancels = by_id[id.as_str()].unless.as_ref().is_some_and(|u| {
                e.event_time >= w.started_at && u.matches(e.kind, e.name, e.properties)
            });
            counts.cancelled += cancels as u64;
            !cancels
        });
        for t in triggers {
            let Some(name) = &t.when.event else { continue };
            let m = EventMatch {
                event: name.clone(),
                filter: t.when.filter.clone(),
            };
            if !m.matches(e.kind, e.name, e.properties) {
                continue;
            }
            let reason = format!("{}: {}", t.describe(), name);
            start(
                t,
                p,
                Start {
                    at: e.event_time,
                    cause: e.message_id,
                    received_at: s.received_at,
                    event: name,
                    properties: e.properties,
                    reason,
                },
                fired,
                &mut counts,
            );
        }
    }
    for (segment, change) in &s.segment_changes {
        for t in triggers.iter().filter(|t| t.starts_on(segment, *change)) {
            let reason = format!("segment {segment} {}", change.as_str());
            start(
                t,
                p,
                Start {
                    at: s.cause_time,
                    cause: s.cause,
                    received_at: s.received_at,
                    event: "",
                    properties: &Value::Null,
                    reason,
                },
                fired,
                &mut counts,
            );
        }
    }
    let due: Vec<String> = p
        .pending
        .iter()
        .filter(|(_, w)| w.due <= s.now)
        .map(|(id, _)| id.clone())
        .collect();
    for id in due {
        let w = p.pending.remove(&id).expect("listed above");
        let t = by_id[id.as_str()];
        fired.push(Fired {
            trigger: id,
            version: t.version,
            cause: w.cause,
            event_time: w.due,
            received_at: w.due,
            event: w.event,
            properties: w.properties,
            reason: format!("{}: deadline reached", t.describe()),
        });
    }
    counts
}

struct Start<'a> {
    at: i64,
    cause: &'a str,
    received_at: i64,
    event: &'a str,
    properties: &'a Value,
    reason: String,
}

fn start(t: &Trigger, p: &mut Profile, s: Start<'_>, fired: &mut Vec<Fired>, counts: &mut Counts) {
    if t.wait.is_none() {
        fired.push(Fired {
            trigger: t.id.clone(),
            version: t.version,
            cause: s.cause.to_string(),
            event_time: s.at,
            received_at: s.received_at,
            event: s.event.to_string(),
            properties: s.properties.clone(),
            reason: s.reason,
        });
        return;
    }
    // A trigger already waiting keeps its first deadline.
    if p.pending.contains_key(&t.id) {
        return;
    }
    let properties = if s.properties.to_string().len() <= MAX_KEPT_PROPERTIES {
        s.properties.clone()
    } else {
        Value::Null
    };
    p.pending.insert(
        t.id.clone(),
        Pending {
            version: t.version,
            started_at: s.at,
            due: s.at.saturating_add(t.wait_ms),
            cause: s.cause.to_string(),
            event: s.event.to_string(),
            properties,
        },
    );
    counts.started += 1;
}

/// The earliest deadline of the profile's waiting triggers.
pub fn next_due(p: &Profile) -> Option<i64> {
    p.pending.values().map(|w| w.due).min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn trigger(doc: Value) -> Trigger {
        let mut t: Trigger = serde_json::from_value(doc).unwrap();
        t.version = 1;
        t.validate().unwrap();
        t
    }

    fn cart() -> Trigger {
        trigger(
            json!({"id": "abandoned-cart", "when": {"event": "Cart Viewed"},
            "wait": "1h", "unless": {"event": "Order Completed"}}),
        )
    }

    fn seen<'a>(name: &'a str, props: &'a Value, t: i64, mid: &'a str) -> Step<'a> {
        Step {
            event: Some(EventSeen {
                kind: "track",
                name: Some(name),
                properties: props,
                event_time: t,
                message_id: mid,
            }),
            segment_changes: vec![],
            cause: mid,
            cause_time: t,
            received_at: t,
            now: t,
        }
    }

    fn tick(now: i64) -> Step<'static> {
        Step {
            event: None,
            segment_changes: vec![],
            cause: "timer",
            cause_time: now,
            received_at: now,
            now,
        }
    }

    const HOUR: i64 = 3_600_000;

    #[test]
    fn a_waiting_trigger_fires_at_its_deadline_once() {
        let ts = [cart()];
        let mut p = Profile::new("p");
        let props = json!({"cart_id": "c1"});
        let mut fired = Vec::new();
        let c = step(
            &ts,
            &mut p,
            &seen("Cart Viewed", &props, 1000, "m1"),
            &mut fired,
        );
        assert_eq!(c.started, 1);
        assert!(fired.is_empty());
        assert_eq!(next_due(&p), Some(1000 + HOUR));
        // A second view does not move the deadline.
        step(
            &ts,
            &mut p,
            &seen("Cart Viewed", &props, 5000, "m2"),
            &mut fired,
        );
        assert_eq!(next_due(&p), Some(1000 + HOUR));
        step(&ts, &mut p, &tick(1000 + HOUR - 1), &mut fired);
        assert!(fired.is_empty());
        step(&ts, &mut p, &tick(1000 + HOUR), &mut fired);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].event_time, 1000 + HOUR);
        assert_eq!(fired[0].cause, "m1");
        assert_eq!(fired[0].properties["cart_id"], "c1");
        assert!(p.pending.is_empty());
        step(&ts, &mut p, &tick(1000 + 2 * HOUR), &mut fired);
        assert_eq!(fired.len(), 1, "fired once");
    }

    #[test]
    fn a_cancelling_event_after_the_start_cancels_and_one_before_does_not() {
        let ts = [cart()];
        let mut p = Profile::new("p");
        let props = json!({});
        let mut fired = Vec::new();
        step(
            &ts,
            &mut p,
            &seen("Cart Viewed", &props, 1000, "m1"),
            &mut fired,
        );
        // An order placed before the cart view (arriving late) cancels nothing.
        let c = step(
            &ts,
            &mut p,
            &seen("Order Completed", &props, 500, "m0"),
            &mut fired,
        );
        assert_eq!(c.cancelled, 0);
        let c = step(
            &ts,
            &mut p,
            &seen("Order Completed", &props, 2000, "m2"),
            &mut fired,
        );
        assert_eq!(c.cancelled, 1);
        step(&ts, &mut p, &tick(10 * HOUR), &mut fired);
        assert!(fired.is_empty());
    }

    #[test]
    fn event_conditions_and_segment_changes_fire_at_once() {
        let big = trigger(json!({"id": "big-order",
            "when": {"event": "Order Completed", "where": [{"property": "total", "gt": 100}]}}));
        let vip = trigger(json!({"id": "welcome-vip", "when": {"segment": "vip"}}));
        let ts = [big, vip];
        let mut p = Profile::new("p");
        let mut fired = Vec::new();
        let small = json!({"total": 50});
        step(
            &ts,
            &mut p,
            &seen("Order Completed", &small, 1, "m1"),
            &mut fired,
        );
        assert!(fired.is_empty());
        let large = json!({"total": 150});
        step(
            &ts,
            &mut p,
            &seen("Order Completed", &large, 2, "m2"),
            &mut fired,
        );
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].trigger, "big-order");
        let mut s = tick(3);
        s.segment_changes = vec![("vip", Transition::Exit)];
        step(&ts, &mut p, &s, &mut fired);
        assert_eq!(fired.len(), 1, "an exit does not start an enter trigger");
        s.segment_changes = vec![("vip", Transition::Enter)];
        step(&ts, &mut p, &s, &mut fired);
        assert_eq!(fired.len(), 2);
        assert_eq!(fired[1].trigger, "welcome-vip");
    }

    #[test]
    fn a_waiting_trigger_whose_definition_went_is_dropped() {
        let mut p = Profile::new("p");
        let mut fired = Vec::new();
        step(
            &[cart()],
            &mut p,
            &seen("Cart Viewed", &json!({}), 1, "m1"),
            &mut fired,
        );
        step(&[], &mut p, &tick(10 * HOUR), &mut fired);
        assert!(fired.is_empty() && p.pending.is_empty());
    }

    #[test]
    fn bad_definitions_are_refused_with_a_reason() {
        let bad = |doc: Value| {
            let mut t: Trigger = serde_json::from_value(doc).unwrap();
            t.validate().unwrap_err()
        };
        assert!(bad(json!({"id": "x", "when": {}})).contains("event or a segment"));
        assert!(
            bad(json!({"id": "x", "when": {"event": "A"}, "unless": {"event": "B"}}))
                .contains("needs a wait")
        );
        assert!(bad(json!({"id": "x", "when": {"event": "A"}, "wait": "soon"})).contains("wait"));
        assert!(bad(json!({"id": "x", "when": {"event": "A"}, "wait": "10ms"})).contains("1s"));
        assert!(
            bad(json!({"id": "x", "when": {"segment": "s", "change": "stay"}}))
                .contains("enter or exit")
        );
    }
}
