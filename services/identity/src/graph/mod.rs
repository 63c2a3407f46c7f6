//! The identity graph, kept in the state store.
//!
//! Every event contributes a **fact**: the set of identifiers it carries (plus fuzzy facts
//! linking two records that match). A fact's order is the earliest (event time, message
//! id) of the events that carried it. The graph is, by definition, what applying all
//! facts in that order with the greedy rule below gives, so it depends on the set of
//! events only, never on the order they arrive in, nor on duplicates:
//!
//! - a fact's identifiers join one profile unless that would break a rule: a per-type
//!   limit (at most one `user_id`, ...) or an un-merge's separation. Then its
//!   lowest-priority identifier is dropped and the rest retried (Segment's rule); a
//!   dropped identifier stays where it is (or alone);
//! - a detached identifier never links to anything;
//! - a profile's id comes from its **anchor**: its highest-priority identifier (the
//!   first seen of them, then the smallest). When profiles merge, the one with the
//!   higher-priority identifier survives (a known user's), then the older one; a
//!   known person's profile id follows from their user id.
//!
//! A one-identifier event links nothing: it only creates its identifier's profile or
//! moves the identifier's first sighting (`seen/`) earlier, and is not stored as a fact.
//!
//! In the usual case an event is newer than everything in the profiles it touches, and
//! applying its fact to those profiles is the same as recomputing: that is the fast path.
//! Otherwise (a late event, an un-merge) the connected part of the graph is recomputed
//! from its facts, and what changed goes out as merges and splits.
//!
//! Keys (`<h>` is a hash of an identifier, so values may hold any character):
//! `id/<h>` → profile id; `seen/<h>` → [`Seen`];
//! `fact/<key>` → [`Fact`]; `if/<h>/<fact key>` → facts of an identifier;
//! `pr/<profile>` → [`Node`]; `mergedinto/<profile>` → survivor;
//! `merge/<merge id>` → [`MergeInfo`]; `mh/<survivor>/<merge id>` → merge history;
//! `sep/<id>` → [`Separation`]; `sepidx/<h>/<id>`; `detached/<h>`;
//! `sj/<profile>/<subject>`: the ingest subjects (Kafka keys of `events.ingested`) of a
//! profile's events, whose keys an erasure destroys.
//!
//! Here: the graph's types, keys and fast path; `clusters.rs` the union under the
//! rules, `recompute.rs` recomputing and writing a part of the graph, `corrections.rs`
//! un-merge, detach and erasure; tests in `tests.rs`.

mod clusters;
mod corrections;
mod recompute;
pub mod shards;

use clusters::*;
use corrections::ERASE_SOURCE;
pub use corrections::Erased;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use tessera_common::Result;
use tessera_common::ids::deterministic_id;
use tessera_common::records::{Identifier, ProfileMerge};
use tessera_common::store::Txn;

use crate::fuzzy::model::Explanation;
use crate::rules::Rules;

/// Where a fact sits in the canonical order: event time, message id, deterministic
/// facts before fuzzy ones of the same event, then the fact key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Order {
    pub t: i64,
    pub msg: String,
    pub rank: u8,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    pub key: String,
    /// In priority order.
    pub ids: Vec<Identifier>,
    pub order: Order,
    pub source: String,
    /// The fuzzy rule (or "score") that linked the records; `None` for an event's own
    /// identifiers.
    pub rule: Option<String>,
    pub score: Option<f64>,
    /// Why the model linked the records: each field's level and weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Explanation>,
}

impl Fact {
    pub fn new(
        rules: &Rules,
        ids: &[Identifier],
        t: i64,
        msg: &str,
        source: &str,
        fuzzy: Option<(String, f64)>,
    ) -> Fact {
        let mut ids = ids.to_vec();
        ids.sort_by(|a, b| {
            (rules.priority(&a.kind), &a.value).cmp(&(rules.priority(&b.kind), &b.value))
        });
        ids.dedup();
        let parts: Vec<&str> = ids
            .iter()
            .flat_map(|i| [i.kind.as_str(), i.value.as_str()])
            .collect();
        let key = deterministic_id("fact", &parts);
        let (rule, score) = match fuzzy {
            Some((r, s)) => (Some(r), Some(s)),
            None => (None, None),
        };
        Fact {
            order: Order {
                t,
                msg: msg.to_string(),
                rank: u8::from(rule.is_some()),
                key: key.clone(),
            },
            key,
            ids,
            source: source.to_string(),
            rule,
            score,
            explain: None,
        }
    }
}

/// When and where an identifier was first seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    pub event_time: i64,
    pub message_id: String,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub anchor: Identifier,
    /// The anchor's sort key: priority, first seen.
    pub anchor_order: (usize, i64, String),
    /// In priority order.
    pub identifiers: Vec<Identifier>,
    /// The latest fact that touched this profile.
    pub max_order: Order,
    /// Separations (un-merges) that involve one of its identifiers.
    #[serde(default)]
    pub separations: Vec<String>,
    /// A detached identifier's own profile.
    #[serde(default)]
    pub detached: bool,
}

/// A merge, kept so it can be undone and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeInfo {
    pub merge_id: String,
    pub survivor: String,
    pub merged: String,
    pub survivor_identifiers: Vec<Identifier>,
    pub merged_identifiers: Vec<Identifier>,
    pub cause_message_id: String,
    pub rule: Option<String>,
    pub score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Explanation>,
    pub event_time: i64,
    #[serde(default)]
    pub undone: bool,
}

/// An un-merge: no profile may hold identifiers of both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Separation {
    pub id: String,
    pub left: Vec<Identifier>,
    pub right: Vec<Identifier>,
    /// The merge it undoes: on shards, each one that keeps the merge's record marks it
    /// undone when the separation reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<String>,
}

/// A profile whose identifiers now belong to several profiles.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub profile: String,
    pub assignments: Vec<(Identifier, String)>,
}

/// What applying facts changed.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub merges: Vec<ProfileMerge>,
    pub splits: Vec<Split>,
    pub created: usize,
    /// Late facts that recomputed part of the graph.
    pub recomputed: usize,
    /// Parts too large to recompute: the fact was applied in arrival order.
    pub too_large: usize,
}

impl Changes {
    pub fn extend(&mut self, o: Changes) {
        self.merges.extend(o.merges);
        self.splits.extend(o.splits);
        self.created += o.created;
        self.recomputed += o.recomputed;
        self.too_large += o.too_large;
    }
}

pub fn ident_hash(i: &Identifier) -> String {
    tessera_common::suppressions::identifier_hash(&i.kind, &i.value)
}
// Keys name identifiers by hash, never by value: RocksDB keeps the smallest and largest
// key of every table file in its MANIFEST, whose history compaction does not rewrite, so
// a value in a key would outlive the person's erasure there.
fn id_key(i: &Identifier) -> Vec<u8> {
    format!("id/{}", ident_hash(i)).into_bytes()
}
fn seen_key(i: &Identifier) -> Vec<u8> {
    format!("seen/{}", ident_hash(i)).into_bytes()
}
fn fact_key(key: &str) -> Vec<u8> {
    format!("fact/{key}").into_bytes()
}
fn if_prefix(i: &Identifier) -> String {
    format!("if/{}/", ident_hash(i))
}
pub fn node_key(profile: &str) -> Vec<u8> {
    format!("pr/{profile}").into_bytes()
}
pub fn merged_key(profile: &str) -> Vec<u8> {
    format!("mergedinto/{profile}").into_bytes()
}
pub fn merge_info_key(merge_id: &str) -> Vec<u8> {
    format!("merge/{merge_id}").into_bytes()
}
pub fn history_prefix(survivor: &str) -> String {
    format!("mh/{survivor}/")
}
/// A merge record by an identifier it names, so that an erasure finds every record
/// naming the person, those kept with another profile too (a merge later split).
fn merge_ref_prefix(i: &Identifier) -> String {
    format!("mref/{}/", ident_hash(i))
}

/// Stores a merge's record with its history entry and its references by identifier.
pub(crate) fn keep_merge(txn: &mut Txn<'_>, info: &MergeInfo) -> Result<()> {
    txn.put_json(merge_info_key(&info.merge_id), info)?;
    txn.put(
        format!("{}{}", history_prefix(&info.survivor), info.merge_id).into_bytes(),
        Vec::new(),
    );
    for i in info
        .survivor_identifiers
        .iter()
        .chain(&info.merged_identifiers)
    {
        txn.put(
            format!("{}{}", merge_ref_prefix(i), info.merge_id).into_bytes(),
            Vec::new(),
        );
    }
    Ok(())
}

/// Removes a merge's record with its history entry and its references.
pub(crate) fn forget_merge(txn: &mut Txn<'_>, info: &MergeInfo) {
    txn.delete(merge_info_key(&info.merge_id));
    txn.delete(format!("{}{}", history_prefix(&info.survivor), info.merge_id).into_bytes());
    for i in info
        .survivor_identifiers
        .iter()
        .chain(&info.merged_identifiers)
    {
        txn.delete(format!("{}{}", merge_ref_prefix(i), info.merge_id).into_bytes());
    }
}

/// The records of the merges that name `i` (see [`keep_merge`]).
pub(crate) fn merges_naming(txn: &Txn<'_>, i: &Identifier) -> Result<Vec<MergeInfo>> {
    let prefix = merge_ref_prefix(i);
    let mut out = Vec::new();
    for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
        let merge_id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        if let Some(m) = txn.get_json::<MergeInfo>(&merge_info_key(&merge_id))? {
            out.push(m);
        }
    }
    Ok(out)
}

const SEP_PREFIX: &[u8] = b"sep/";
fn sep_key(id: &str) -> Vec<u8> {
    format!("sep/{id}").into_bytes()
}
fn sepidx_prefix(i: &Identifier) -> String {
    format!("sepidx/{}/", ident_hash(i))
}
fn detached_key(i: &Identifier) -> Vec<u8> {
    format!("detached/{}", ident_hash(i)).into_bytes()
}

fn subjects_prefix(profile: &str) -> String {
    format!("sj/{profile}/")
}

/// Notes that an event of `profile` came in under the ingest subject `subject`. Most
/// events come under a subject already noted: reading the key costs less than writing
/// it again (a memtable insert, the write-ahead log, compaction of the copies).
pub fn note_subject(txn: &mut Txn<'_>, profile: &str, subject: &str) -> Result<()> {
    let key = format!("{}{subject}", subjects_prefix(profile)).into_bytes();
    if txn.get(&key)?.is_none() {
        txn.put(key, Vec::new());
    }
    Ok(())
}

pub fn profile_id_of(anchor: &Identifier) -> String {
    deterministic_id("profile", &[&anchor.kind, &anchor.value])
}

/// The profile an identifier belongs to now.
pub fn lookup(txn: &Txn<'_>, i: &Identifier) -> Result<Option<String>> {
    Ok(txn
        .get(&id_key(i))?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

pub fn seen(txn: &Txn<'_>, i: &Identifier) -> Result<Option<Seen>> {
    txn.get_json(&seen_key(i))
}

/// Records a sighting of an identifier by a fact; returns whether it is now the first.
fn note_sighting(txn: &mut Txn<'_>, i: &Identifier, fact: &Fact) -> Result<bool> {
    let earlier = seen(txn, i)?
        .is_none_or(|s| (fact.order.t, &fact.order.msg) < (s.event_time, &s.message_id));
    if earlier {
        txn.put_json(
            seen_key(i),
            &Seen {
                event_time: fact.order.t,
                message_id: fact.order.msg.clone(),
                source: fact.source.clone(),
            },
        )?;
    }
    Ok(earlier)
}

const MERGE_CLOCK: &[u8] = b"mergeclock";

/// The version of the last merge decided here (see [`next_merge_version`]).
pub(crate) fn merge_clock(txn: &Txn<'_>) -> Result<i64> {
    Ok(txn
        .get(MERGE_CLOCK)?
        .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0))
}

/// Raises the merge clock to `v`: a merge decided here later carries a larger version
/// than one decided elsewhere that this store has seen (a shard applying another's
/// decision).
pub(crate) fn observe_merge_clock(txn: &mut Txn<'_>, v: i64) -> Result<()> {
    if v > merge_clock(txn)? {
        txn.put(MERGE_CLOCK.to_vec(), v.to_string().into_bytes());
    }
    Ok(())
}

/// The version a merge decided now carries: one more than the last merge's, and at least
/// the input's `received_at` in microseconds, so a store rebuilt from a topic whose
/// oldest records are gone still stamps new merges above those sent before. Profiles
/// reads a profile merged away and later merged back into as live by these versions.
pub(crate) fn next_merge_version(txn: &mut Txn<'_>, received_at: i64) -> Result<i64> {
    let v = (merge_clock(txn)? + 1).max(received_at.saturating_mul(1000));
    txn.put(MERGE_CLOCK.to_vec(), v.to_string().into_bytes());
    Ok(v)
}

/// Follows merges to the live profile id.
pub fn live_profile(txn: &Txn<'_>, id: &str) -> Result<String> {
    let mut cur = id.to_string();
    for _ in 0..64 {
        match txn.get(&merged_key(&cur))? {
            Some(next) => cur = String::from_utf8_lossy(&next).into_owned(),
            None => break,
        }
    }
    Ok(cur)
}

/// The graph over a transaction: applies facts and commands.
pub struct Graph<'r> {
    pub rules: &'r Rules,
    /// The most facts a recomputation may load; a larger part is updated in arrival order.
    pub max_component_facts: usize,
    /// The time of the input record being applied (its `received_at`, a command's
    /// `requested_at`): what merges are stamped with, so a replay writes the same.
    pub received_at: i64,
}

impl<'r> Graph<'r> {
    pub fn new(rules: &'r Rules, received_at: i64) -> Self {
        Graph {
            rules,
            max_component_facts: 20_000,
            received_at,
        }
    }

    /// Records a fact and brings the graph up to date with it.
    pub fn add_fact(&self, txn: &mut Txn<'_>, fact: Fact) -> Result<Changes> {
        if fact.ids.is_empty() {
            return Ok(Changes::default());
        }
        if fact.ids.len() == 1 && fact.rule.is_none() {
            return self.add_single(txn, fact);
        }
        let stored: Option<Fact> = txn.get_json(&fact_key(&fact.key))?;
        if let Some(old) = &stored
            && old.order <= fact.order
        {
            return Ok(Changes::default()); // already applied
        }
        txn.put_json(fact_key(&fact.key), &fact)?;
        // The profiles the fact touches; the fast path applies when none has seen a
        // later fact.
        let mut nodes: Vec<Node> = Vec::new();
        let mut known: Vec<bool> = Vec::with_capacity(fact.ids.len());
        for i in &fact.ids {
            let p = lookup(txn, i)?;
            known.push(p.is_some());
            if let Some(p) = p
                && !nodes.iter().any(|n| n.id == p)
                && let Some(n) = txn.get_json::<Node>(&node_key(&p))?
            {
                nodes.push(n);
            }
        }
        let in_order = stored.is_none() && nodes.iter().all(|n| n.max_order <= fact.order);
        for (i, known) in fact.ids.iter().zip(known) {
            if stored.is_none() {
                txn.put(
                    format!("{}{}", if_prefix(i), fact.key).into_bytes(),
                    Vec::new(),
                );
            }
            // A known identifier in an in-order fact was seen before (its profile's
            // facts are all earlier): only new ones, or a late fact, can be first.
            if known && in_order {
                continue;
            }
            note_sighting(txn, i, &fact)?;
        }
        if in_order {
            return self.apply_in_order(txn, &fact, nodes);
        }
        self.recompute(txn, &fact.ids, &fact)
    }

    /// A fact with one identifier links nothing: it creates the identifier's profile or
    /// moves its first sighting earlier, which can change its profile's anchor (then the
    /// part is recomputed). It is not stored as a fact: half of all events (anonymous
    /// browsing, a known device alone) take this path.
    fn add_single(&self, txn: &mut Txn<'_>, fact: Fact) -> Result<Changes> {
        let i = &fact.ids[0];
        let earlier = note_sighting(txn, i, &fact)?;
        match lookup(txn, i)? {
            None => self.apply_in_order(txn, &fact, Vec::new()),
            Some(_) if earlier => self.recompute(txn, std::slice::from_ref(i), &fact),
            Some(_) => Ok(Changes::default()),
        }
    }

    fn load_separations(
        &self,
        txn: &Txn<'_>,
        ids: &[Identifier],
    ) -> Result<BTreeMap<String, Separation>> {
        let mut out = BTreeMap::new();
        for i in ids {
            for (k, _) in txn.scan(sepidx_prefix(i).as_bytes(), 10_000)? {
                let id = String::from_utf8_lossy(&k[sepidx_prefix(i).len()..]).into_owned();
                if let std::collections::btree_map::Entry::Vacant(e) = out.entry(id.clone())
                    && let Some(s) = txn.get_json::<Separation>(&sep_key(&id))?
                {
                    e.insert(s);
                }
            }
        }
        Ok(out)
    }

    fn apply_in_order(&self, txn: &mut Txn<'_>, fact: &Fact, nodes: Vec<Node>) -> Result<Changes> {
        let mut node_ids: Vec<Identifier> = nodes
            .iter()
            .flat_map(|n| n.identifiers.iter().cloned())
            .collect();
        let mut detached: BTreeSet<Identifier> = nodes
            .iter()
            .filter(|n| n.detached)
            .map(|n| n.anchor.clone())
            .collect();
        // An identifier new to the graph may have been named by a command before any
        // event carried it: an un-merge's side, a detach.
        let mut separated = nodes.iter().any(|n| !n.separations.is_empty());
        for i in fact
            .ids
            .iter()
            .filter(|i| !node_ids.contains(i))
            .cloned()
            .collect::<Vec<_>>()
        {
            separated |= !txn.scan(sepidx_prefix(&i).as_bytes(), 1)?.is_empty();
            if txn.get(&detached_key(&i))?.is_some() {
                detached.insert(i.clone());
            }
            node_ids.push(i);
        }
        let separations = if separated {
            self.load_separations(txn, &node_ids)?
        } else {
            BTreeMap::new()
        };
        let ctx = Context {
            rules: self.rules,
            separations: &separations,
            detached: &detached,
        };
        let mut clusters = Clusters::default();
        for n in &nodes {
            clusters.add_node(&ctx, n);
        }
        let first = |_: &Identifier| (fact.order.t, fact.order.msg.clone());
        clusters.step(&ctx, fact, &first);
        let old: BTreeMap<Identifier, String> = nodes
            .iter()
            .flat_map(|n| n.identifiers.iter().map(|i| (i.clone(), n.id.clone())))
            .collect();
        self.write(txn, &old, clusters.nodes(), fact)
    }
}

#[cfg(test)]
mod tests;
