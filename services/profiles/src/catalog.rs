//! The definitions catalog: segments and computed traits, versioned, kept on the
//! compacted `profiles.definitions` topic (one partition, key `<kind>/<id>`). Every
//! profiles instance reads the whole topic ([`tessera_common::table`]); the API and the
//! definition files write to it. A change reaches the processor, which back-fills it
//! over the existing profiles (see `state`).
//!
//! Versions: a definition's first version is 1 and each change adds one; a deleted
//! definition keeps its number, so a re-created one continues it. A file's definition
//! is published when the topic has none of that id or an older version than the file's
//! `version` (default 1): raise it in the file to roll a change out; a change made
//! through the API stays until then.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde_json::Value;
use tracing::warn;

use tessera_common::records::DefinitionChange;

use crate::computed::ComputedTrait;
use crate::predict::ModelHistory;
use crate::segments::Segment;
use crate::triggers::Trigger;

pub const SEGMENT: &str = "segment";
pub const COMPUTED_TRAIT: &str = "computed_trait";
pub const TRIGGER: &str = "trigger";
/// A predictive trait's fitted model versions (`model/<trait id>`), written by the
/// profiles instance that fits it; not a definition a user edits.
pub const MODEL: &str = "model";
/// Limits of a definition's `name` and `description` (they are shown, not evaluated).
const MAX_NAME_CHARS: usize = 200;
const MAX_DESCRIPTION_CHARS: usize = 2000;

// Definitions are few and rarely copied: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Definition {
    Segment(Segment),
    Computed(ComputedTrait),
    Trigger(Trigger),
}

impl Definition {
    pub fn kind(&self) -> &'static str {
        match self {
            Definition::Segment(_) => SEGMENT,
            Definition::Computed(_) => COMPUTED_TRAIT,
            Definition::Trigger(_) => TRIGGER,
        }
    }
    pub fn id(&self) -> &str {
        match self {
            Definition::Segment(s) => &s.id,
            Definition::Computed(c) => &c.id,
            Definition::Trigger(t) => &t.id,
        }
    }
    pub fn version(&self) -> i32 {
        match self {
            Definition::Segment(s) => s.version,
            Definition::Computed(c) => c.version,
            Definition::Trigger(t) => t.version,
        }
    }
    fn set_version(&mut self, v: i32) {
        match self {
            Definition::Segment(s) => {
                s.version = v;
                s.counters.iter_mut().for_each(|c| c.version = v);
            }
            Definition::Computed(c) => c.version = v,
            Definition::Trigger(t) => t.version = v,
        }
    }
    pub fn to_json(&self) -> Value {
        match self {
            Definition::Segment(s) => serde_json::to_value(s),
            Definition::Computed(c) => serde_json::to_value(c),
            Definition::Trigger(t) => serde_json::to_value(t),
        }
        .unwrap_or(Value::Null)
    }

    /// Parses a document of `kind` (None: a segment has a `condition`, a computed trait
    /// an `aggregate`, a trigger a `when`), JSON or YAML, and validates it.
    pub fn parse(text: &str, yaml: bool, kind: Option<&str>) -> Result<Definition, String> {
        Definition::from_value(parse_document(text, yaml)?, kind)
    }

    /// The same from a parsed document.
    pub fn from_value(doc: Value, kind: Option<&str>) -> Result<Definition, String> {
        let kind = match kind {
            Some(k) => k,
            None if doc.get("condition").is_some() => SEGMENT,
            None if doc.get("aggregate").is_some() => COMPUTED_TRAIT,
            None if doc.get("when").is_some() => TRIGGER,
            None => {
                return Err(
                    "a definition has a condition (a segment), an aggregate (a computed trait) or a when (a trigger)"
                        .into(),
                );
            }
        };
        let def = match kind {
            SEGMENT => {
                let mut s: Segment = serde_json::from_value(doc)
                    .map_err(|e| format!("invalid segment definition: {e}"))?;
                s.compile()?;
                Definition::Segment(s)
            }
            COMPUTED_TRAIT => {
                let mut c: ComputedTrait = serde_json::from_value(doc)
                    .map_err(|e| format!("invalid computed trait definition: {e}"))?;
                c.validate()?;
                Definition::Computed(c)
            }
            TRIGGER => {
                let mut t: Trigger = serde_json::from_value(doc)
                    .map_err(|e| format!("invalid trigger definition: {e}"))?;
                t.validate()?;
                Definition::Trigger(t)
            }
            other => return Err(format!("unknown definition kind {other:?}")),
        };
        let (name, description) = match &def {
            Definition::Segment(s) => (&s.name, &s.description),
            Definition::Computed(c) => (&c.name, &c.description),
            Definition::Trigger(t) => (&t.name, &t.description),
        };
        if name.chars().count() > MAX_NAME_CHARS {
            return Err(format!("name is longer than {MAX_NAME_CHARS} characters"));
        }
        if description.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(format!(
                "description is longer than {MAX_DESCRIPTION_CHARS} characters"
            ));
        }
        Ok(def)
    }
}

/// A JSON or YAML document (YAML with a bound on what its aliases expand to).
pub fn parse_document(text: &str, yaml: bool) -> Result<Value, String> {
    if yaml {
        crate::yaml::parse(text)
    } else {
        serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))
    }
}

/// The definitions in force: segments in dependency order (a segment after those it
/// refers to), computed traits (the user's and the segments' counters).
#[derive(Debug, Default)]
pub struct DefinitionSet {
    /// Changes with every change of the catalog.
    pub generation: u64,
    pub segments: Vec<Segment>,
    pub computed: Vec<ComputedTrait>,
    pub triggers: Vec<Trigger>,
    /// `<kind>/<id>` → version of every definition in force (counters excluded), and
    /// `model/<id>` → the latest model version of each predictive trait: a new model
    /// re-evaluates every profile, as a changed definition does.
    pub versions: BTreeMap<String, i32>,
    /// The fitted models of the predictive traits, by trait id.
    pub models: BTreeMap<String, ModelHistory>,
    /// Positions in `segments` and `computed` by id.
    segment_at: HashMap<String, usize>,
    computed_at: HashMap<String, usize>,
}

impl DefinitionSet {
    /// Builds the set; a definition that refers to a missing one, or is part of a
    /// cycle, is left out and named in the returned problems.
    pub fn build(defs: Vec<Definition>, generation: u64) -> (DefinitionSet, Vec<String>) {
        let mut problems = Vec::new();
        let mut versions = BTreeMap::new();
        let mut computed = Vec::new();
        let mut triggers = Vec::new();
        let mut segments: BTreeMap<String, Segment> = BTreeMap::new();
        for d in defs {
            versions.insert(format!("{}/{}", d.kind(), d.id()), d.version());
            match d {
                Definition::Computed(c) => computed.push(c),
                Definition::Trigger(t) => triggers.push(t),
                Definition::Segment(s) => {
                    segments.insert(s.id.clone(), s);
                }
            }
        }
        let computed_ids: BTreeSet<String> = computed.iter().map(|c| c.id.clone()).collect();
        // Dependency order (Kahn): a segment is placed once every segment it reads is.
        let mut ordered: Vec<Segment> = Vec::new();
        let mut placed: BTreeSet<String> = BTreeSet::new();
        loop {
            let ready: Vec<String> = segments
                .values()
                .filter(|s| {
                    let (mut segs, mut comps) = (Vec::new(), Vec::new());
                    s.condition.references(&mut segs, &mut comps);
                    segs.iter().all(|x| placed.contains(*x))
                        && comps.iter().all(|x| computed_ids.contains(*x))
                })
                .map(|s| s.id.clone())
                .collect();
            if ready.is_empty() {
                break;
            }
            for id in ready {
                let s = segments.remove(&id).expect("ready segments are present");
                placed.insert(id);
                ordered.push(s);
            }
        }
        for (id, s) in segments {
            let (mut segs, mut comps) = (Vec::new(), Vec::new());
            s.condition.references(&mut segs, &mut comps);
            let missing: Vec<String> = segs
                .iter()
                .filter(|x| !placed.contains(**x))
                .map(|x| format!("segment {x}"))
                .chain(
                    comps
                        .iter()
                        .filter(|x| !computed_ids.contains(**x))
                        .map(|x| format!("computed trait {x}")),
                )
                .collect();
            problems.push(format!(
                "segment {id} refers to {} (missing, or in a cycle)",
                missing.join(", ")
            ));
            versions.remove(&format!("{SEGMENT}/{id}"));
        }
        for s in &ordered {
            computed.extend(s.counters.iter().cloned());
        }
        triggers.retain(|t: &Trigger| match t.segment() {
            Some(seg) if !placed.contains(seg) => {
                problems.push(format!(
                    "trigger {} refers to segment {seg} (missing, or left out)",
                    t.id
                ));
                versions.remove(&format!("{TRIGGER}/{}", t.id));
                false
            }
            _ => true,
        });
        let segment_at = ordered
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let computed_at = computed
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i))
            .collect();
        (
            DefinitionSet {
                generation,
                segments: ordered,
                computed,
                triggers,
                versions,
                models: BTreeMap::new(),
                segment_at,
                computed_at,
            },
            problems,
        )
    }

    pub fn segment(&self, id: &str) -> Option<&Segment> {
        self.segment_at.get(id).map(|i| &self.segments[*i])
    }

    pub fn computed_trait(&self, id: &str) -> Option<&ComputedTrait> {
        self.computed_at.get(id).map(|i| &self.computed[*i])
    }

    /// The fitted versions of a predictive trait's model.
    pub fn model(&self, id: &str) -> Option<&ModelHistory> {
        self.models.get(id)
    }

    /// Installs the models of the predictive traits in force.
    fn with_models(mut self, models: &BTreeMap<String, ModelHistory>) -> DefinitionSet {
        for def in self.computed.iter().filter(|d| d.aggregate.predictive()) {
            let Some(h) = models.get(&def.id) else {
                continue;
            };
            if let Some(latest) = h.latest() {
                let version = i32::try_from(latest.version).unwrap_or(i32::MAX);
                self.versions.insert(format!("{MODEL}/{}", def.id), version);
                self.models.insert(def.id.clone(), h.clone());
            }
        }
        self
    }
}

#[derive(Default)]
struct Inner {
    /// The latest record of each definition, deleted ones included.
    records: BTreeMap<String, DefinitionChange>,
    /// The definitions in force, parsed once when their record arrives.
    live: BTreeMap<String, Definition>,
    /// The latest model record of each predictive trait.
    models: BTreeMap<String, ModelHistory>,
    set: Arc<DefinitionSet>,
}

/// The catalog every part of an instance shares: the table reader fills it, the API
/// and the processor read it.
#[derive(Clone, Default)]
pub struct Catalog {
    inner: Arc<RwLock<Inner>>,
}

fn key(kind: &str, id: &str) -> String {
    format!("{kind}/{id}")
}

impl Catalog {
    pub fn current(&self) -> Arc<DefinitionSet> {
        self.inner.read().expect("catalog lock").set.clone()
    }

    /// The latest record of a definition (deleted ones too).
    pub fn record(&self, kind: &str, id: &str) -> Option<DefinitionChange> {
        self.inner
            .read()
            .expect("catalog lock")
            .records
            .get(&key(kind, id))
            .cloned()
    }

    /// Every definition's latest record.
    pub fn records(&self) -> Vec<DefinitionChange> {
        let inner = self.inner.read().expect("catalog lock");
        inner.records.values().cloned().collect()
    }

    /// The definition a record puts in force (none for a deletion, or a record this
    /// version cannot read, which is logged and left out).
    fn parsed(r: &DefinitionChange) -> Option<Definition> {
        if r.deleted {
            return None;
        }
        match Definition::parse(&r.definition, false, Some(&r.kind)) {
            Ok(mut d) => {
                d.set_version(r.version);
                Some(d)
            }
            Err(e) => {
                warn!(kind = %r.kind, id = %r.id, error = %e, "definition on the topic ignored");
                None
            }
        }
    }

    /// Applies a record read from the topic.
    pub fn apply(&self, rec: DefinitionChange) {
        let mut inner = self.inner.write().expect("catalog lock");
        if rec.kind == MODEL {
            match serde_json::from_str::<ModelHistory>(&rec.definition) {
                Ok(_) if rec.deleted => inner.models.remove(&rec.id),
                Ok(h) => inner.models.insert(rec.id.clone(), h),
                Err(e) => {
                    warn!(id = %rec.id, error = %e, "model on the topic ignored");
                    return;
                }
            };
        } else {
            let k = key(&rec.kind, &rec.id);
            match Self::parsed(&rec) {
                Some(d) => inner.live.insert(k.clone(), d),
                None => inner.live.remove(&k),
            };
            inner.records.insert(k, rec);
        }
        let generation = inner.set.generation + 1;
        let (set, problems) =
            DefinitionSet::build(inner.live.values().cloned().collect(), generation);
        for p in problems {
            warn!(problem = %p, "definition left out");
        }
        inner.set = Arc::new(set.with_models(&inner.models));
    }

    /// The record that publishes a trait's model versions.
    pub fn model_record(id: &str, history: &ModelHistory) -> DefinitionChange {
        DefinitionChange {
            kind: MODEL.to_string(),
            id: id.to_string(),
            version: history
                .latest()
                .map_or(0, |l| i32::try_from(l.version).unwrap_or(i32::MAX)),
            definition: serde_json::to_string(history).unwrap_or_default(),
            deleted: false,
            origin: "fit".to_string(),
            changed_at: tessera_common::now_ms(),
        }
    }

    /// The definitions as they would be with these records applied, or what would be
    /// wrong with them.
    fn set_with(&self, changes: &[DefinitionChange]) -> Result<DefinitionSet, String> {
        let mut live = self.inner.read().expect("catalog lock").live.clone();
        for c in changes {
            let k = key(&c.kind, &c.id);
            match Self::parsed(c) {
                Some(d) => live.insert(k, d),
                None => live.remove(&k),
            };
        }
        let (set, problems) = DefinitionSet::build(live.into_values().collect(), 0);
        match problems.is_empty() {
            true => Ok(set),
            false => Err(problems.join("; ")),
        }
    }

    /// The record that puts `def` in force (or, with `None`, deletes `kind/id`). Its
    /// version is the next of that id, or `at_least` (a file's) if higher.
    fn next_record(
        &self,
        kind: &str,
        id: &str,
        def: Option<&Definition>,
        origin: &str,
        at_least: i32,
    ) -> Result<DefinitionChange, String> {
        let previous = self.record(kind, id);
        if def.is_none() && previous.as_ref().is_none_or(|r| r.deleted) {
            return Err(format!("no {kind} {id}"));
        }
        let version = (previous.as_ref().map_or(0, |r| r.version) + 1).max(at_least);
        let body = match def {
            Some(d) => {
                let mut d = d.clone();
                d.set_version(version);
                d.to_json().to_string()
            }
            None => previous.map(|r| r.definition).unwrap_or_default(),
        };
        Ok(DefinitionChange {
            kind: kind.to_string(),
            id: id.to_string(),
            version,
            definition: body,
            deleted: def.is_none(),
            origin: origin.to_string(),
            changed_at: tessera_common::now_ms(),
        })
    }

    /// The definitions as they would be with `def` in force (for a dry run).
    pub fn with_candidate(&self, def: &Definition) -> Result<DefinitionSet, String> {
        let rec = self.next_record(def.kind(), def.id(), Some(def), "dry-run", 1)?;
        self.set_with(&[rec])
    }

    /// The record for a change through the API, checked against the other definitions
    /// (a segment may not lose a segment or computed trait it reads).
    pub fn propose(
        &self,
        kind: &str,
        id: &str,
        def: Option<&Definition>,
        origin: &str,
    ) -> Result<DefinitionChange, String> {
        let rec = self.next_record(kind, id, def, origin, 1)?;
        self.set_with(std::slice::from_ref(&rec))?;
        Ok(rec)
    }
}

/// Every definition file in `dir` (`*.json`, `*.yaml`, `*.yml`; none when `dir` is
/// empty). All or nothing: one bad file refuses the set, naming the file.
pub fn load_dir(dir: &Path) -> Result<Vec<Definition>, String> {
    if dir.as_os_str().is_empty() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read definitions folder {}: {e}", dir.display()))?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "json" || x == "yaml" || x == "yml")
        })
        .collect();
    files.sort();
    let mut out: Vec<Definition> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let yaml = f.extension().is_some_and(|x| x != "json");
        let mut def =
            Definition::parse(&text, yaml, None).map_err(|e| format!("{}: {e}", f.display()))?;
        if def.version() < 1 {
            def.set_version(1);
        }
        if out
            .iter()
            .any(|d| d.kind() == def.kind() && d.id() == def.id())
        {
            return Err(format!(
                "{}: {} {} is defined twice",
                f.display(),
                def.kind(),
                def.id()
            ));
        }
        out.push(def);
    }
    let (_, problems) = DefinitionSet::build(out.clone(), 0);
    if !problems.is_empty() {
        return Err(format!("{}: {}", dir.display(), problems.join("; ")));
    }
    Ok(out)
}

/// The records that bring the files' definitions onto the topic: those the topic lacks
/// or holds in an older version than the file's.
pub fn file_changes(
    catalog: &Catalog,
    files: &[Definition],
) -> Result<Vec<DefinitionChange>, String> {
    let mut out = Vec::new();
    for d in files {
        let current = catalog.record(d.kind(), d.id());
        if current.is_some_and(|r| r.version >= d.version()) {
            continue;
        }
        out.push(catalog.next_record(d.kind(), d.id(), Some(d), "file", d.version())?);
    }
    catalog.set_with(&out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(id: &str, condition: &str) -> Definition {
        Definition::parse(
            &format!(r#"{{"id":"{id}","condition":{condition}}}"#),
            false,
            None,
        )
        .unwrap()
    }

    #[test]
    fn dependency_order_missing_references_and_cycles() {
        let defs = vec![
            seg(
                "vip",
                r#"{"all":[{"in_segment":"buyers"},{"computed":{"name":"spend","gt":100}}]}"#,
            ),
            seg(
                "buyers",
                r#"{"event_count":{"event":"Order Completed","min":1}}"#,
            ),
            seg("a", r#"{"in_segment":"b"}"#),
            seg("b", r#"{"in_segment":"a"}"#),
            Definition::parse(
                "id: spend\naggregate: sum\nproperty: total\nevent: Order Completed\n",
                true,
                None,
            )
            .unwrap(),
        ];
        let (set, problems) = DefinitionSet::build(defs, 1);
        let order: Vec<&str> = set.segments.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(order, vec!["buyers", "vip"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("segment a refers to segment b"));
        assert_eq!(set.computed.len(), 1);
    }

    #[test]
    fn versions_continue_across_changes_and_deletes_and_references_are_kept() {
        let catalog = Catalog::default();
        let buyers = seg(
            "buyers",
            r#"{"event_count":{"event":"Order Completed","min":1}}"#,
        );
        let r1 = catalog
            .propose(SEGMENT, "buyers", Some(&buyers), "api")
            .unwrap();
        assert_eq!(r1.version, 1);
        catalog.apply(r1);
        let vip = seg("vip", r#"{"in_segment":"buyers"}"#);
        catalog.apply(catalog.propose(SEGMENT, "vip", Some(&vip), "api").unwrap());
        let err = catalog.propose(SEGMENT, "buyers", None, "api").unwrap_err();
        assert!(
            err.contains("segment vip refers to segment buyers"),
            "{err}"
        );
        let r2 = catalog
            .propose(SEGMENT, "buyers", Some(&buyers), "api")
            .unwrap();
        assert_eq!(r2.version, 2);
        catalog.apply(r2);
        assert_eq!(catalog.current().segment("buyers").unwrap().version, 2);
        catalog.apply(catalog.propose(SEGMENT, "vip", None, "api").unwrap());
        let del = catalog.propose(SEGMENT, "buyers", None, "api").unwrap();
        assert!(del.deleted);
        catalog.apply(del);
        assert!(catalog.current().segment("buyers").is_none());
        let again = catalog
            .propose(SEGMENT, "buyers", Some(&buyers), "api")
            .unwrap();
        assert_eq!(
            again.version, 4,
            "a re-created definition continues the numbering"
        );
        // A file of version 1 is not published over the topic's newer version.
        catalog.apply(again);
        let file = seg(
            "buyers",
            r#"{"event_count":{"event":"Order Completed","min":1}}"#,
        );
        assert!(file_changes(&catalog, &[file]).unwrap().is_empty());
    }

    #[test]
    fn names_and_descriptions_are_bounded() {
        let doc = |name: usize, description: usize| {
            serde_json::json!({"id": "s", "name": "n".repeat(name), "description": "é".repeat(description),
                   "condition": {"has_identifier": "email"}})
        };
        assert!(Definition::from_value(doc(200, 2000), Some(SEGMENT)).is_ok());
        let e = Definition::from_value(doc(201, 0), Some(SEGMENT)).unwrap_err();
        assert!(e.contains("name is longer than 200"), "{e}");
        let e = Definition::from_value(doc(0, 2001), Some(SEGMENT)).unwrap_err();
        assert!(e.contains("description is longer than 2000"), "{e}");
    }

    #[test]
    fn example_definitions_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/definitions");
        let defs = load_dir(&dir).unwrap();
        assert!(defs.iter().any(|d| d.id() == "buyers"));
        assert!(defs.iter().any(|d| d.kind() == COMPUTED_TRAIT));
    }
}
