//! Segment definitions: declarative JSON documents, validated at load, evaluated on
//! every profile change. User-supplied text is data only: there is no expression
//! language. The format (see `deploy/definitions/segments/*.json`):
//!
//! ```json
//! {"id": "buyers", "version": 1, "name": "Buyers",
//!  "condition": {"event_count": {"event": "Order Completed", "min": 1}}}
//! ```
//!
//! Conditions: `{"event_count": {"event", "min", "max"?}}`,
//! `{"trait": {"name", "equals"? | "exists"?}}`, `{"has_identifier": "<kind>"}`,
//! `{"all": [...]}`, `{"any": [...]}`, `{"not": {...}}`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::profile::Profile;

const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub id: String,
    pub version: i32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub condition: Condition,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    EventCount(EventCount),
    Trait(TraitCondition),
    HasIdentifier(String),
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
    #[serde(default)]
    pub max: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraitCondition {
    pub name: String,
    #[serde(default)]
    pub equals: Option<Value>,
    #[serde(default)]
    pub exists: Option<bool>,
}

impl Condition {
    pub fn matches(&self, p: &Profile) -> bool {
        match self {
            Condition::EventCount(c) => {
                let n = p.event_counts.get(&c.event).copied().unwrap_or(0);
                n >= c.min && c.max.is_none_or(|m| n <= m)
            }
            Condition::Trait(t) => {
                let v = p
                    .traits
                    .get(&t.name)
                    .map(|tv| &tv.value)
                    .filter(|v| !v.is_null());
                match (&t.equals, t.exists) {
                    (Some(want), _) => v == Some(want),
                    (None, Some(exists)) => v.is_some() == exists,
                    (None, None) => v.is_some(),
                }
            }
            Condition::HasIdentifier(kind) => p.identifiers.iter().any(|i| &i.kind == kind),
            Condition::All(cs) => cs.iter().all(|c| c.matches(p)),
            Condition::Any(cs) => cs.iter().any(|c| c.matches(p)),
            Condition::Not(c) => !c.matches(p),
        }
    }

    /// A short reason for a record, naming the kind of condition at the top.
    pub fn describe(&self) -> String {
        match self {
            Condition::EventCount(c) => format!("event_count({})", c.event),
            Condition::Trait(t) => format!("trait({})", t.name),
            Condition::HasIdentifier(k) => format!("has_identifier({k})"),
            Condition::All(_) => "all".into(),
            Condition::Any(_) => "any".into(),
            Condition::Not(_) => "not".into(),
        }
    }

    fn validate(&self, depth: usize) -> Result<(), String> {
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
                Ok(())
            }
            Condition::Trait(t) if t.name.trim().is_empty() => Err("trait.name is empty".into()),
            Condition::Trait(t) if t.equals.is_some() && t.exists.is_some() => Err(format!(
                "trait {:?}: give equals or exists, not both",
                t.name
            )),
            Condition::Trait(_) => Ok(()),
            Condition::HasIdentifier(k) if k.trim().is_empty() => {
                Err("has_identifier is empty".into())
            }
            Condition::HasIdentifier(_) => Ok(()),
            Condition::All(cs) | Condition::Any(cs) => {
                if cs.is_empty() {
                    return Err("all/any needs at least one condition".into());
                }
                cs.iter().try_for_each(|c| c.validate(depth + 1))
            }
            Condition::Not(c) => c.validate(depth + 1),
        }
    }
}

impl Segment {
    /// Parses and validates one definition; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Segment, String> {
        let s: Segment =
            serde_json::from_str(text).map_err(|e| format!("invalid segment definition: {e}"))?;
        if s.id.is_empty()
            || !s
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "segment id {:?} must be letters, digits, '-' or '_'",
                s.id
            ));
        }
        if s.version < 1 {
            return Err(format!("segment {}: version must be >= 1", s.id));
        }
        s.condition
            .validate(0)
            .map_err(|e| format!("segment {}: {e}", s.id))?;
        Ok(s)
    }
}

/// Loads every `*.json` in `dir` (none when `dir` is empty). All or nothing: one bad
/// file refuses the whole set, naming the file.
pub fn load_dir(dir: &Path) -> Result<Vec<Segment>, String> {
    if dir.as_os_str().is_empty() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read definitions folder {}: {e}", dir.display()))?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out: Vec<Segment> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let seg = Segment::parse(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        if out.iter().any(|s| s.id == seg.id) {
            return Err(format!(
                "{}: segment id {} is defined twice",
                f.display(),
                seg.id
            ));
        }
        out.push(seg);
    }
    Ok(out)
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
                "must be letters",
            ),
            (
                r#"{"id":"b","version":0,"condition":{"has_identifier":"email"}}"#,
                "version",
            ),
            (
                r#"{"id":"b","version":1,"condition":{"event_count":{"event":"x","min":3,"max":1}}}"#,
                "below min",
            ),
            (
                r#"{"id":"b","version":1,"condition":{"all":[]}}"#,
                "at least one",
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
    }

    #[test]
    fn example_definitions_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/definitions/segments");
        let segs = load_dir(&dir).unwrap();
        assert!(segs.iter().any(|s| s.id == "buyers"));
    }
}
