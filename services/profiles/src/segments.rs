//! Segment definitions: declarative documents (JSON or YAML), validated at load,
//! evaluated on every profile change and when a window edge passes. User-supplied text
//! is data only: there is no expression language. The format:
//!
//! ```json
//! {"id": "active-buyers", "name": "Active buyers",
//!  "condition": {"event_count": {"event": "Order Completed", "min": 2,
//!                "where": [{"property": "total", "gt": 50}], "within": "30d"}}}
//! ```
//!
//! Conditions: `event_count {event, min?, max?, where?, within?}`, `trait {name, <op>}`,
//! `computed {name, <op>}`, `has_identifier: "<kind>"`, `consent: "<purpose>"`,
//! `in_segment: "<segment id>"`, `all: [...]`, `any: [...]`, `not: {...}`. An
//! operator is one of `equals`, `not_equals`, `gt`, `gte`, `lt`, `lte`, `in`, `contains`,
//! `exists` (see [`Test`]). An event count with `where` or `within` is kept as a
//! counter of its own (a computed trait named `_seg_<segment>_<n>`), so that it expires
//! on its window's edge.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::computed::{self, Aggregate, ComputedTrait, Test};
use crate::profile::Profile;

const MAX_DEPTH: usize = 16;
/// The most conditions one `all` or `any` holds.
const MAX_BRANCHES: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub id: String,
    /// Set by the catalog: 1 on creation, one more on each change.
    #[serde(default)]
    pub version: i32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub condition: Condition,
    /// The counters of this segment's windowed or filtered event counts.
    #[serde(skip)]
    pub counters: Vec<ComputedTrait>,
    /// What the condition reads, so that an event re-evaluates only the segments it
    /// can change.
    #[serde(skip)]
    pub inputs: Inputs,
}

/// The parts of a profile a condition reads (or, for [`Touched`], that a change touched).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    pub events: BTreeSet<String>,
    pub traits: BTreeSet<String>,
    pub computed: BTreeSet<String>,
    pub identifiers: bool,
    pub consent: BTreeSet<String>,
    pub segments: BTreeSet<String>,
}

/// What a change touched: everything (a merge, a split, a back-fill), or the parts one
/// event touched.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Touched {
    pub all: bool,
    pub parts: Inputs,
}

impl Touched {
    pub fn all() -> Touched {
        Touched {
            all: true,
            parts: Inputs::default(),
        }
    }

    /// Whether a segment reading `inputs` may have changed (`segments`: the segments
    /// whose membership changed so far in this evaluation).
    pub fn affects(&self, inputs: &Inputs, segments: &BTreeSet<String>) -> bool {
        let meet = |a: &BTreeSet<String>, b: &BTreeSet<String>| a.iter().any(|x| b.contains(x));
        self.all
            || (inputs.identifiers && self.parts.identifiers)
            || meet(&inputs.events, &self.parts.events)
            || meet(&inputs.traits, &self.parts.traits)
            || meet(&inputs.computed, &self.parts.computed)
            || meet(&inputs.consent, &self.parts.consent)
            || meet(&inputs.segments, segments)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    EventCount(EventCount),
    Trait(Test),
    Computed(Test),
    HasIdentifier(String),
    Consent(String),
    InSegment(String),
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventCount {
    pub event: String,
    #[serde(default)]
    pub min: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<Test>,
    /// `30d`, `12h`...: only events within this long before now count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<String>,
    /// The counter (computed trait) kept for a filtered or windowed count.
    #[serde(skip)]
    pub counter: Option<String>,
}

impl Condition {
    pub fn matches(&self, p: &Profile) -> bool {
        match self {
            Condition::EventCount(c) => {
                let n = match &c.counter {
                    Some(id) => p
                        .computed
                        .get(id)
                        .and_then(|s| s.value.as_u64())
                        .unwrap_or(0),
                    None => p.event_counts.get(&c.event).copied().unwrap_or(0),
                };
                n >= c.min && c.max.is_none_or(|m| n <= m)
            }
            Condition::Trait(t) => t.passes(p.traits.get(&t.name).map(|tv| &tv.value)),
            Condition::Computed(t) => t.passes(p.computed.get(&t.name).map(|s| &s.value)),
            Condition::HasIdentifier(kind) => p.identifiers.iter().any(|i| &i.kind == kind),
            Condition::Consent(purpose) => p.consent.get(purpose).is_some_and(|c| c.granted),
            Condition::InSegment(id) => p.segments.contains_key(id),
            Condition::All(cs) => cs.iter().all(|c| c.matches(p)),
            Condition::Any(cs) => cs.iter().any(|c| c.matches(p)),
            Condition::Not(c) => !c.matches(p),
        }
    }

    /// A short reason for a record, naming the condition at the top.
    pub fn describe(&self) -> String {
        match self {
            Condition::EventCount(c) => match &c.within {
                Some(w) => format!("event_count({}) within {w}", c.event),
                None => format!("event_count({})", c.event),
            },
            Condition::Trait(t) => format!("trait({})", t.name),
            Condition::Computed(t) => format!("computed({})", t.name),
            Condition::HasIdentifier(k) => format!("has_identifier({k})"),
            Condition::Consent(k) => format!("consent({k})"),
            Condition::InSegment(k) => format!("in_segment({k})"),
            Condition::All(cs) | Condition::Any(cs) => {
                let word = if matches!(self, Condition::All(_)) {
                    "all"
                } else {
                    "any"
                };
                let parts: Vec<String> = cs.iter().map(Condition::describe).collect();
                format!("{word}({})", parts.join(", "))
            }
            Condition::Not(c) => format!("not({})", c.describe()),
        }
    }

    /// Validates, and turns filtered or windowed counts into counters of `segment`.
    fn compile(
        &mut self,
        segment: &str,
        depth: usize,
        counters: &mut Vec<ComputedTrait>,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("conditions nest deeper than {MAX_DEPTH} levels"));
        }
        match self {
            Condition::EventCount(c) => {
                if c.event.trim().is_empty() {
                    return Err("event_count.event is empty".into());
                }
                if let Some(max) = c.max
                    && max < c.min
                {
                    return Err(format!(
                        "event_count for {:?}: max {max} is below min {}",
                        c.event, c.min
                    ));
                }
                if !c.filter.is_empty() || c.within.is_some() {
                    let mut counter = ComputedTrait {
                        id: format!("_seg_{segment}_{}", counters.len()),
                        version: 1,
                        name: String::new(),
                        description: format!("counter of segment {segment}"),
                        event: Some(c.event.clone()),
                        filter: c.filter.clone(),
                        aggregate: Aggregate::Count,
                        property: None,
                        window: c.within.clone(),
                        window_ms: None,
                        horizon: None,
                        horizon_days: None,
                    };
                    counter
                        .validate()
                        .map_err(|e| format!("event_count for {:?}: {e}", c.event))?;
                    c.counter = Some(counter.id.clone());
                    counters.push(counter);
                }
                Ok(())
            }
            Condition::Trait(t) => t.validate("trait"),
            Condition::Computed(t) => t.validate("computed"),
            Condition::HasIdentifier(k) | Condition::Consent(k) | Condition::InSegment(k)
                if k.trim().is_empty() =>
            {
                Err(format!("{} is empty", self.describe()))
            }
            Condition::HasIdentifier(_) | Condition::Consent(_) => Ok(()),
            Condition::InSegment(k) if k == segment => {
                Err(format!("in_segment({k}) refers to the segment itself"))
            }
            Condition::InSegment(_) => Ok(()),
            Condition::All(cs) | Condition::Any(cs) => {
                if cs.is_empty() || cs.len() > MAX_BRANCHES {
                    return Err(format!("all/any needs 1 to {MAX_BRANCHES} conditions"));
                }
                cs.iter_mut()
                    .try_for_each(|c| c.compile(segment, depth + 1, counters))
            }
            Condition::Not(c) => c.compile(segment, depth + 1, counters),
        }
    }

    fn collect_inputs(&self, into: &mut Inputs) {
        match self {
            Condition::EventCount(c) => match &c.counter {
                Some(id) => {
                    into.computed.insert(id.clone());
                }
                None => {
                    into.events.insert(c.event.clone());
                }
            },
            Condition::Trait(t) => {
                into.traits.insert(t.name.clone());
            }
            Condition::Computed(t) => {
                into.computed.insert(t.name.clone());
            }
            Condition::HasIdentifier(_) => into.identifiers = true,
            Condition::Consent(k) => {
                into.consent.insert(k.clone());
            }
            Condition::InSegment(k) => {
                into.segments.insert(k.clone());
            }
            Condition::All(cs) | Condition::Any(cs) => {
                cs.iter().for_each(|c| c.collect_inputs(into))
            }
            Condition::Not(c) => c.collect_inputs(into),
        }
    }

    /// The segments and the computed traits this condition reads.
    pub fn references<'a>(&'a self, segments: &mut Vec<&'a str>, computed: &mut Vec<&'a str>) {
        match self {
            Condition::InSegment(s) => segments.push(s),
            Condition::Computed(t) => computed.push(&t.name),
            Condition::All(cs) | Condition::Any(cs) => {
                cs.iter().for_each(|c| c.references(segments, computed))
            }
            Condition::Not(c) => c.references(segments, computed),
            _ => {}
        }
    }
}

impl Segment {
    /// Checks the definition and builds its counters.
    pub fn compile(&mut self) -> Result<(), String> {
        if !computed::valid_id(&self.id) {
            return Err(format!(
                "segment id {:?} must be 1 to 100 letters, digits, '-' or '_'",
                self.id
            ));
        }
        let mut counters = Vec::new();
        self.condition
            .compile(&self.id, 0, &mut counters)
            .map_err(|e| format!("segment {}: {e}", self.id))?;
        for c in &mut counters {
            c.version = self.version.max(1);
        }
        self.counters = counters;
        self.inputs = Inputs::default();
        self.condition.collect_inputs(&mut self.inputs);
        Ok(())
    }

    /// Parses (JSON) and compiles one definition; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Segment, String> {
        let mut s: Segment =
            serde_json::from_str(text).map_err(|e| format!("invalid segment definition: {e}"))?;
        s.compile()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_with_clear_messages() {
        let ok = Segment::parse(r#"{"id":"buyers","version":1,"condition":{"event_count":{"event":"Order Completed","min":1}}}"#).unwrap();
        assert_eq!(ok.id, "buyers");
        let cases = [
            (
                r#"{"id":"b","version":1,"condition":{"evil":"rm -rf"}}"#,
                "unknown variant",
            ),
            (
                r#"{"id":"b c","version":1,"condition":{"has_identifier":"email"}}"#,
                "letters, digits",
            ),
            (r#"{"id":"b","condition":{"in_segment":"b"}}"#, "itself"),
            (
                r#"{"id":"b","condition":{"event_count":{"event":"x","within":"5y"}}}"#,
                "unit",
            ),
            (
                r#"{"id":"b","condition":{"trait":{"name":"x","gt":1,"equals":2}}}"#,
                "one operator",
            ),
            (
                r#"{"id":"b","version":1,"condition":{"event_count":{"event":"x","min":3,"max":1}}}"#,
                "below min",
            ),
            (
                r#"{"id":"b","version":1,"condition":{"all":[]}}"#,
                "1 to 64 conditions",
            ),
            (
                r#"{"id":"b","version":1,"condition":{"has_identifier":"email"},"extra":1}"#,
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let err = Segment::parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        // The bounds themselves: 64 conditions and 16 tests pass, one more does not.
        let any = |n: usize| {
            let c = vec![r#"{"consent":"email"}"#; n].join(",");
            format!(r#"{{"id":"b","condition":{{"any":[{c}]}}}}"#)
        };
        let tests = |n: usize| {
            let t = vec![r#"{"name":"total","gt":1}"#; n].join(",");
            format!(r#"{{"id":"b","condition":{{"event_count":{{"event":"x","where":[{t}]}}}}}}"#)
        };
        assert!(Segment::parse(&any(64)).is_ok());
        assert!(Segment::parse(&any(65)).unwrap_err().contains("1 to 64"));
        assert!(Segment::parse(&tests(16)).is_ok());
        assert!(
            Segment::parse(&tests(17))
                .unwrap_err()
                .contains("at most 16 tests")
        );
    }

    #[test]
    fn windowed_counts_become_counters_and_conditions_read_them() {
        let s = Segment::parse(r#"{"id":"active","version":3,"condition":{"all":[
            {"event_count":{"event":"Order Completed","min":2,"where":[{"property":"total","gt":50}],"within":"30d"}},
            {"not":{"event_count":{"event":"Refund","min":1}}},
            {"trait":{"name":"ltv","gte":100}}]}}"#).unwrap();
        assert_eq!(s.counters.len(), 1);
        assert_eq!(s.counters[0].id, "_seg_active_0");
        assert_eq!(s.counters[0].window_ms, Some(30 * 86_400_000));
        assert_eq!(s.counters[0].version, 3);
        let mut p = Profile::new("p");
        p.traits.insert(
            "ltv".into(),
            crate::profile::TraitValue {
                value: serde_json::json!(120),
                event_time: 0,
                message_id: "m".into(),
                source: "s".into(),
            },
        );
        assert!(!s.condition.matches(&p));
        p.computed.insert(
            "_seg_active_0".into(),
            crate::computed::ComputedState {
                value: serde_json::json!(2),
                ..Default::default()
            },
        );
        assert!(s.condition.matches(&p));
        p.event_counts.insert("Refund".into(), 1);
        assert!(!s.condition.matches(&p));
    }
}
