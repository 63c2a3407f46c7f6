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

/// Notes that an event of `profile` came in under the ingest subject `subject`.
pub fn note_subject(txn: &mut Txn<'_>, profile: &str, subject: &str) {
    txn.put(
        format!("{}{subject}", subjects_prefix(profile)).into_bytes(),
        Vec::new(),
    );
}

/// What erasing a person removed from the graph (counts and ids, never values).
#[derive(Debug, Default, PartialEq, Serialize)]
pub struct Erased {
    pub profile_id: String,
    /// Profiles merged into it over time.
    pub merged_profiles: Vec<String>,
    pub identifiers: usize,
    pub facts: usize,
    pub merges: usize,
    pub fuzzy_records: usize,
    pub separations: usize,
    /// The ingest subjects of its events.
    #[serde(skip)]
    pub subjects: Vec<String>,
    /// Its identifiers, for the suppression that may follow.
    #[serde(skip)]
    pub erased_identifiers: Vec<Identifier>,
    /// Its fuzzy records' keys, for the matcher's log.
    #[serde(skip)]
    pub fuzzy_keys: Vec<String>,
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

/// Clusters of identifiers being built by the greedy rule, in memory.
#[derive(Default)]
struct Clusters {
    of: HashMap<Identifier, usize>,
    sets: Vec<Cluster>,
}

#[derive(Clone)]
struct Cluster {
    alive: bool,
    ids: BTreeSet<(usize, Identifier)>,
    anchor: ((usize, i64, String), Identifier),
    max_order: Option<Order>,
    separations: BTreeSet<String>,
    detached: bool,
}

struct Context<'a> {
    rules: &'a Rules,
    separations: &'a BTreeMap<String, Separation>,
    detached: &'a BTreeSet<Identifier>,
}

impl Clusters {
    fn cluster_of(&mut self, ctx: &Context<'_>, i: &Identifier, first: (i64, String)) -> usize {
        if let Some(c) = self.of.get(i) {
            return *c;
        }
        let prio = ctx.rules.priority(&i.kind);
        let separations = ctx
            .separations
            .values()
            .filter(|s| s.left.contains(i) || s.right.contains(i))
            .map(|s| s.id.clone())
            .collect();
        // At least its first sighting: the fast path must never see a fact older than an
        // identifier's first sighting as in order (one-identifier events are not facts).
        let max_order = (first.0 != i64::MAX).then(|| Order {
            t: first.0,
            msg: first.1.clone(),
            rank: 0,
            key: String::new(),
        });
        self.sets.push(Cluster {
            alive: true,
            ids: BTreeSet::from([(prio, i.clone())]),
            anchor: ((prio, first.0, first.1), i.clone()),
            max_order,
            separations,
            detached: ctx.detached.contains(i),
        });
        self.of.insert(i.clone(), self.sets.len() - 1);
        self.sets.len() - 1
    }

    /// Whether `members` may join. A limit bounds what a link adds: the joined profile
    /// may hold no more values of a kind than the limit, or than one member already
    /// holds (a profile past its limit through deduplication). A fuzzy link may join
    /// values of a `dedupe` kind beyond it.
    fn allowed(&self, ctx: &Context<'_>, members: &[usize], fuzzy: bool) -> bool {
        let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
        for &c in members {
            let mut own: HashMap<&str, usize> = HashMap::new();
            for (_, i) in &self.sets[c].ids {
                *own.entry(i.kind.as_str()).or_default() += 1;
            }
            for (kind, n) in own {
                let (total, most) = counts.entry(kind).or_default();
                *total += n;
                *most = (*most).max(n);
            }
        }
        for (kind, (total, most)) in counts {
            if total > ctx.rules.limit(kind).max(most) && !(fuzzy && ctx.rules.dedupes(kind)) {
                return false;
            }
        }
        let seps: BTreeSet<&String> = members
            .iter()
            .flat_map(|&c| self.sets[c].separations.iter())
            .collect();
        for s in seps {
            let Some(sep) = ctx.separations.get(s) else {
                continue;
            };
            let has = |side: &[Identifier]| {
                members.iter().any(|&c| {
                    side.iter()
                        .any(|i| self.sets[c].ids.iter().any(|(_, x)| x == i))
                })
            };
            if has(&sep.left) && has(&sep.right) {
                return false;
            }
        }
        true
    }

    /// Applies one fact; `first` gives an identifier's first-seen time for anchors.
    fn step(
        &mut self,
        ctx: &Context<'_>,
        fact: &Fact,
        first: &dyn Fn(&Identifier) -> (i64, String),
    ) {
        for i in &fact.ids {
            self.cluster_of(ctx, i, first(i));
        }
        let mut linking: Vec<&Identifier> = fact
            .ids
            .iter()
            .filter(|i| !ctx.detached.contains(*i))
            .collect();
        while linking.len() > 1 {
            let mut members: Vec<usize> = linking.iter().map(|i| self.of[*i]).collect();
            members.sort_unstable();
            members.dedup();
            if self.allowed(ctx, &members, fact.rule.is_some()) {
                self.union(&members);
                break;
            }
            linking.pop();
        }
        for i in &fact.ids {
            let root = self.of[i];
            let m = &mut self.sets[root].max_order;
            if m.as_ref().is_none_or(|m| *m < fact.order) {
                *m = Some(fact.order.clone());
            }
        }
    }

    fn union(&mut self, members: &[usize]) {
        let Some((&into, rest)) = members.split_first() else {
            return;
        };
        for &c in rest {
            let placeholder = self.sets[into].anchor.clone();
            let taken = std::mem::replace(
                &mut self.sets[c],
                Cluster {
                    alive: false,
                    ids: BTreeSet::new(),
                    anchor: placeholder,
                    max_order: None,
                    separations: BTreeSet::new(),
                    detached: false,
                },
            );
            for (_, i) in &taken.ids {
                self.of.insert(i.clone(), into);
            }
            let target = &mut self.sets[into];
            target.ids.extend(taken.ids);
            target.separations.extend(taken.separations);
            if taken.anchor < target.anchor {
                target.anchor = taken.anchor;
            }
            if taken.max_order > target.max_order {
                target.max_order = taken.max_order;
            }
        }
    }

    fn nodes(&self) -> Vec<Node> {
        self.sets
            .iter()
            .filter(|c| c.alive)
            .map(|c| Node {
                id: profile_id_of(&c.anchor.1),
                anchor: c.anchor.1.clone(),
                anchor_order: c.anchor.0.clone(),
                identifiers: c.ids.iter().map(|(_, i)| i.clone()).collect(),
                max_order: c.max_order.clone().unwrap_or(Order {
                    t: i64::MIN,
                    msg: String::new(),
                    rank: 0,
                    key: String::new(),
                }),
                separations: c.separations.iter().cloned().collect(),
                detached: c.detached,
            })
            .collect()
    }

    fn add_node(&mut self, ctx: &Context<'_>, n: &Node) {
        let idx = self.sets.len();
        self.sets.push(Cluster {
            alive: true,
            ids: n
                .identifiers
                .iter()
                .map(|i| (ctx.rules.priority(&i.kind), i.clone()))
                .collect(),
            anchor: (n.anchor_order.clone(), n.anchor.clone()),
            max_order: Some(n.max_order.clone()),
            separations: n.separations.iter().cloned().collect(),
            detached: n.detached,
        });
        for i in &n.identifiers {
            self.of.insert(i.clone(), idx);
        }
    }
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
        let node_ids: Vec<Identifier> = nodes
            .iter()
            .flat_map(|n| n.identifiers.iter().cloned())
            .collect();
        let separations = if nodes.iter().any(|n| !n.separations.is_empty()) {
            self.load_separations(txn, &node_ids)?
        } else {
            BTreeMap::new()
        };
        let detached: BTreeSet<Identifier> = nodes
            .iter()
            .filter(|n| n.detached)
            .map(|n| n.anchor.clone())
            .collect();
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

    /// Recomputes the connected part of the graph around `start` from its facts.
    pub fn recompute(
        &self,
        txn: &mut Txn<'_>,
        start: &[Identifier],
        cause: &Fact,
    ) -> Result<Changes> {
        let mut facts: BTreeMap<String, Fact> = BTreeMap::new();
        let mut ids: BTreeSet<Identifier> = start.iter().cloned().collect();
        let mut queue: Vec<Identifier> = start.to_vec();
        while let Some(i) = queue.pop() {
            let prefix = if_prefix(&i);
            for (k, _) in txn.scan(prefix.as_bytes(), self.max_component_facts + 1)? {
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if facts.contains_key(&key) {
                    continue;
                }
                let Some(f) = txn.get_json::<Fact>(&fact_key(&key))? else {
                    continue;
                };
                for x in &f.ids {
                    if ids.insert(x.clone()) {
                        queue.push(x.clone());
                    }
                }
                facts.insert(key, f);
            }
            // Identifiers of the same profile belong to the part even when the facts
            // that linked them are gone from view (nothing is ever deleted, but be safe).
            if let Some(p) = lookup(txn, &i)?
                && let Some(n) = txn.get_json::<Node>(&node_key(&p))?
            {
                for x in n.identifiers {
                    if ids.insert(x.clone()) {
                        queue.push(x);
                    }
                }
            }
            // An event in a too-large part is applied in arrival order; a command (no
            // identifiers of its own: an un-merge, a detach) is rare and always recomputes.
            if facts.len() > self.max_component_facts && !cause.ids.is_empty() {
                let mut nodes = Vec::new();
                for i in &cause.ids {
                    if let Some(p) = lookup(txn, i)?
                        && !nodes.iter().any(|n: &Node| n.id == p)
                        && let Some(n) = txn.get_json::<Node>(&node_key(&p))?
                    {
                        nodes.push(n);
                    }
                }
                let mut c = self.apply_in_order(txn, cause, nodes)?;
                c.too_large += 1;
                return Ok(c);
            }
        }
        let ids: Vec<Identifier> = ids.into_iter().collect();
        let separations = self.load_separations(txn, &ids)?;
        let mut detached = BTreeSet::new();
        let mut old = BTreeMap::new();
        for i in &ids {
            if txn.get(&detached_key(i))?.is_some() {
                detached.insert(i.clone());
            }
            if let Some(p) = lookup(txn, i)? {
                old.insert(i.clone(), p);
            }
        }
        let ctx = Context {
            rules: self.rules,
            separations: &separations,
            detached: &detached,
        };
        let mut sorted: Vec<&Fact> = facts.values().collect();
        sorted.sort_by(|a, b| a.order.cmp(&b.order));
        // First sightings come from `seen/`: they include the one-identifier events,
        // which are not stored as facts.
        let mut first_seen: HashMap<&Identifier, (i64, String)> = HashMap::new();
        for i in &ids {
            if let Some(s) = seen(txn, i)? {
                first_seen.insert(i, (s.event_time, s.message_id));
            }
        }
        for f in &sorted {
            for i in &f.ids {
                first_seen
                    .entry(i)
                    .or_insert_with(|| (f.order.t, f.order.msg.clone()));
            }
        }
        let mut clusters = Clusters::default();
        let first = |i: &Identifier| {
            first_seen
                .get(i)
                .cloned()
                .unwrap_or((i64::MAX, String::new()))
        };
        for f in &sorted {
            clusters.step(&ctx, f, &first);
        }
        for i in &ids {
            clusters.cluster_of(&ctx, i, first(i));
        }
        let mut changes = self.write(txn, &old, clusters.nodes(), cause)?;
        changes.recomputed += 1;
        Ok(changes)
    }

    /// Stores new nodes and assignments; reports merges and splits against `old`.
    fn write(
        &self,
        txn: &mut Txn<'_>,
        old: &BTreeMap<Identifier, String>,
        nodes: Vec<Node>,
        cause: &Fact,
    ) -> Result<Changes> {
        let mut changes = Changes::default();
        let mut new_of: BTreeMap<&Identifier, &str> = BTreeMap::new();
        for n in &nodes {
            for i in &n.identifiers {
                new_of.insert(i, &n.id);
            }
        }
        // Old profiles and where their identifiers went.
        let mut old_profiles: BTreeMap<&str, BTreeMap<&str, Vec<&Identifier>>> = BTreeMap::new();
        for (i, p) in old {
            let to = new_of.get(i).copied().unwrap_or(p.as_str());
            old_profiles
                .entry(p.as_str())
                .or_default()
                .entry(to)
                .or_default()
                .push(i);
        }
        let old_nodes: BTreeMap<&str, Option<Node>> = old_profiles
            .keys()
            .map(|p| Ok((*p, txn.get_json::<Node>(&node_key(p))?)))
            .collect::<Result<_>>()?;
        let new_ids: BTreeSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        for (p, targets) in &old_profiles {
            let survives = new_ids.contains(p);
            if targets.len() == 1 && !survives {
                let survivor = *targets.keys().next().expect("one target");
                let merged_ids: Vec<Identifier> = old_nodes[p]
                    .as_ref()
                    .map(|n| n.identifiers.clone())
                    .unwrap_or_default();
                let survivor_ids: Vec<Identifier> = nodes
                    .iter()
                    .find(|n| n.id == survivor)
                    .map(|n| {
                        n.identifiers
                            .iter()
                            .filter(|i| !merged_ids.contains(i))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                self.record_merge(
                    txn,
                    p,
                    survivor,
                    merged_ids,
                    survivor_ids,
                    cause,
                    &mut changes,
                )?;
            } else if targets.len() > 1 || (!survives && !targets.is_empty()) {
                let mut assignments: Vec<(Identifier, String)> = targets
                    .iter()
                    .flat_map(|(to, ids)| ids.iter().map(|i| ((*i).clone(), to.to_string())))
                    .collect();
                assignments.sort();
                if !survives {
                    // Late lookups of the old id follow its anchor.
                    if let Some(n) = &old_nodes[p]
                        && let Some(to) = new_of.get(&n.anchor)
                    {
                        txn.put(merged_key(p), to.as_bytes().to_vec());
                    }
                }
                changes.splits.push(Split {
                    profile: p.to_string(),
                    assignments,
                });
            }
            if !survives {
                txn.delete(node_key(p));
            }
        }
        let existed: BTreeSet<&str> = old.values().map(String::as_str).collect();
        for n in &nodes {
            if !existed.contains(n.id.as_str()) {
                changes.created += 1;
                txn.delete(merged_key(&n.id));
            }
            for i in &n.identifiers {
                if old.get(i).map(String::as_str) != Some(n.id.as_str()) {
                    txn.put(id_key(i), n.id.as_bytes().to_vec());
                }
            }
            txn.put_json(node_key(&n.id), n)?;
        }
        Ok(changes)
    }

    #[allow(clippy::too_many_arguments)]
    fn record_merge(
        &self,
        txn: &mut Txn<'_>,
        merged: &str,
        survivor: &str,
        merged_identifiers: Vec<Identifier>,
        survivor_identifiers: Vec<Identifier>,
        cause: &Fact,
        changes: &mut Changes,
    ) -> Result<()> {
        let merge_id = deterministic_id("merge", &[survivor, merged, &cause.order.msg, &cause.key]);
        txn.put(merged_key(merged), survivor.as_bytes().to_vec());
        let info = MergeInfo {
            merge_id: merge_id.clone(),
            survivor: survivor.to_string(),
            merged: merged.to_string(),
            survivor_identifiers,
            merged_identifiers,
            cause_message_id: cause.order.msg.clone(),
            rule: cause.rule.clone(),
            score: cause.score,
            explain: cause.explain.clone(),
            event_time: cause.order.t,
            undone: false,
        };
        txn.put_json(merge_info_key(&merge_id), &info)?;
        txn.put(
            format!("{}{merge_id}", history_prefix(survivor)).into_bytes(),
            Vec::new(),
        );
        changes.merges.push(ProfileMerge {
            merge_id,
            survivor: survivor.to_string(),
            merged: merged.to_string(),
            cause_message_id: cause.order.msg.clone(),
            event_time: cause.order.t,
            received_at: self.received_at,
            rule: cause.rule.clone(),
            score: cause.score,
        });
        Ok(())
    }

    /// Undoes a merge: from now on no profile holds identifiers of both sides, and the
    /// part of the graph around them is recomputed. The sides come with the command
    /// (so a replay that reads the command before the events works the same), else from
    /// the stored merge. `None` when neither knows them.
    pub fn unmerge(
        &self,
        txn: &mut Txn<'_>,
        merge_id: &str,
        sides: (&[Identifier], &[Identifier]),
        at: (i64, &str),
    ) -> Result<Option<Changes>> {
        let info = txn.get_json::<MergeInfo>(&merge_info_key(merge_id))?;
        let (left, right) = match (&info, sides) {
            (_, (l, r)) if !l.is_empty() && !r.is_empty() => (l.to_vec(), r.to_vec()),
            (Some(i), _) => (i.survivor_identifiers.clone(), i.merged_identifiers.clone()),
            (None, _) => return Ok(None),
        };
        if let Some(mut i) = info {
            i.undone = true;
            txn.put_json(merge_info_key(merge_id), &i)?;
        }
        let sep = Separation {
            id: deterministic_id("separation", &[merge_id]),
            left,
            right,
        };
        if txn.get(&sep_key(&sep.id))?.is_some() {
            return Ok(Some(Changes::default()));
        }
        for i in sep.left.iter().chain(&sep.right) {
            txn.put(
                format!("{}{}", sepidx_prefix(i), sep.id).into_bytes(),
                Vec::new(),
            );
        }
        txn.put_json(sep_key(&sep.id), &sep)?;
        let start: Vec<Identifier> = sep.left.iter().chain(&sep.right).cloned().collect();
        let cause = Fact::new(self.rules, &[], at.0, at.1, "unmerge", None);
        Ok(Some(self.recompute(txn, &start, &cause)?))
    }

    /// Erases a person: the profile `profile` (or the one it was merged into), every
    /// identifier, sighting, fact, fuzzy record, merge, separation side and ingest
    /// subject of it and of the profiles it absorbed. `None` when there is no such
    /// profile. Facts shared with identifiers of other profiles go too.
    pub fn erase(&self, txn: &mut Txn<'_>, profile: &str) -> Result<Option<Erased>> {
        let live = live_profile(txn, profile)?;
        let Some(node) = txn.get_json::<Node>(&node_key(&live))? else {
            return Ok(None);
        };
        let mut e = Erased {
            profile_id: live.clone(),
            identifiers: node.identifiers.len(),
            ..Default::default()
        };
        // The profiles it absorbed, through the merge history.
        let mut queue = vec![live.clone()];
        let mut profiles = Vec::new();
        while let Some(p) = queue.pop() {
            let prefix = history_prefix(&p);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                let merge_id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if let Some(m) = txn.get_json::<MergeInfo>(&merge_info_key(&merge_id))? {
                    if !profiles.contains(&m.merged) && m.merged != live {
                        queue.push(m.merged.clone());
                    }
                    txn.delete(merge_info_key(&merge_id));
                    e.merges += 1;
                }
                txn.delete(k);
            }
            if p != live {
                txn.delete(merged_key(&p));
                txn.delete(node_key(&p));
                e.merged_profiles.push(p.clone());
            }
            profiles.push(p);
        }
        for p in &profiles {
            let prefix = subjects_prefix(p);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                e.subjects
                    .push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
                txn.delete(k);
            }
        }
        for i in &node.identifiers {
            txn.delete(id_key(i));
            txn.delete(seen_key(i));
            txn.delete(detached_key(i));
            let prefix = if_prefix(i);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if let Some(f) = txn.get_json::<Fact>(&fact_key(&key))? {
                    for j in &f.ids {
                        txn.delete(format!("{}{key}", if_prefix(j)).into_bytes());
                    }
                    txn.delete(fact_key(&key));
                    e.facts += 1;
                }
                txn.delete(k);
            }
            let prefix = sepidx_prefix(i);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if let Some(mut sep) = txn.get_json::<Separation>(&sep_key(&id))? {
                    sep.left.retain(|x| !node.identifiers.contains(x));
                    sep.right.retain(|x| !node.identifiers.contains(x));
                    if sep.left.is_empty() || sep.right.is_empty() {
                        // Nothing left to keep apart.
                        for x in sep.left.iter().chain(&sep.right) {
                            txn.delete(format!("{}{id}", sepidx_prefix(x)).into_bytes());
                        }
                        txn.delete(sep_key(&id));
                    } else {
                        txn.put_json(sep_key(&id), &sep)?;
                    }
                    e.separations += 1;
                }
                txn.delete(k);
            }
            let records = crate::fuzzy::erase(txn, self.rules.fuzzy.as_ref(), i)?;
            e.fuzzy_records += records.len();
            e.fuzzy_keys.extend(records);
        }
        txn.delete(node_key(&live));
        e.erased_identifiers = node.identifiers;
        Ok(Some(e))
    }

    /// Takes an identifier out of its profile: it never links to anything again.
    pub fn detach(&self, txn: &mut Txn<'_>, i: &Identifier, at: (i64, &str)) -> Result<Changes> {
        txn.put(detached_key(i), Vec::new());
        let cause = Fact::new(self.rules, &[], at.0, at.1, "detach", None);
        self.recompute(txn, std::slice::from_ref(i), &cause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_common::store::{MemStore, Store};

    fn rules() -> Rules {
        Rules::parse(crate::rules::DEFAULT_RULES, "test").unwrap()
    }
    fn id(kind: &str, value: &str) -> Identifier {
        Identifier {
            kind: kind.into(),
            value: value.into(),
        }
    }

    fn add(s: &MemStore, r: &Rules, ids: &[Identifier], t: i64, msg: &str) -> Changes {
        let g = Graph::new(r, 1);
        let mut txn = Txn::new(s);
        let c = g
            .add_fact(&mut txn, Fact::new(r, ids, t, msg, "src", None))
            .unwrap();
        s.write(txn.into_batch()).unwrap();
        c
    }
    fn profile(s: &MemStore, i: &Identifier) -> String {
        lookup(&Txn::new(s), i).unwrap().unwrap()
    }

    #[test]
    fn erasing_a_person_leaves_no_key_or_value_of_theirs_and_spares_others() {
        let (s, r) = (MemStore::default(), rules());
        let (anon, user, email) = (
            id("anonymous_id", "ann-device"),
            id("user_id", "ann-user"),
            id("email", "ann@mail.test"),
        );
        add(&s, &r, std::slice::from_ref(&anon), 1, "m1");
        add(&s, &r, &[user.clone(), email.clone()], 2, "m2");
        add(&s, &r, &[anon.clone(), user.clone()], 3, "m3");
        let bob = id("user_id", "bob-user");
        add(
            &s,
            &r,
            &[bob.clone(), id("email", "bob@mail.test")],
            4,
            "m4",
        );
        let ann = profile(&s, &email);
        let mut txn = Txn::new(&s);
        note_subject(&mut txn, &ann, "subject-of-ann-device");
        let erased = Graph::new(&r, 1).erase(&mut txn, &ann).unwrap().unwrap();
        s.write(txn.into_batch()).unwrap();
        assert_eq!(erased.identifiers, 3);
        assert_eq!(
            erased.merged_profiles.len(),
            1,
            "the anonymous profile merged into hers"
        );
        assert_eq!(erased.subjects, vec!["subject-of-ann-device".to_string()]);
        let hashes: Vec<String> = [&anon, &user, &email]
            .iter()
            .map(|i| ident_hash(i))
            .collect();
        for (k, v) in s.scan_prefix(b"", usize::MAX).unwrap() {
            let (k, v) = (String::from_utf8_lossy(&k), String::from_utf8_lossy(&v));
            for needle in ["ann-", "ann@"]
                .iter()
                .map(|x| x.to_string())
                .chain(hashes.clone())
            {
                assert!(!k.contains(&needle) && !v.contains(&needle), "{k} = {v}");
            }
            assert!(!k.contains(&ann), "{k}");
        }
        assert!(lookup(&Txn::new(&s), &email).unwrap().is_none());
        assert!(
            lookup(&Txn::new(&s), &bob).unwrap().is_some(),
            "bob is untouched"
        );
        assert_eq!(
            Graph::new(&r, 1).erase(&mut Txn::new(&s), &ann).unwrap(),
            None
        );
    }

    #[test]
    fn anonymous_then_known_merges_into_the_known_profile() {
        let r = rules();
        let s = MemStore::default();
        let anon = id("anonymous_id", "a1");
        let user = id("user_id", "u1");
        let c = add(&s, &r, std::slice::from_ref(&anon), 1, "m1");
        assert_eq!(c.created, 1);
        add(&s, &r, std::slice::from_ref(&user), 2, "m2");
        assert_ne!(profile(&s, &anon), profile(&s, &user));
        let before = profile(&s, &user);
        let c = add(&s, &r, &[user.clone(), anon.clone()], 3, "m3");
        assert_eq!(c.merges.len(), 1);
        assert_eq!(c.merges[0].survivor, before, "the known profile survives");
        assert_eq!(profile(&s, &user), before);
        assert_eq!(
            live_profile(&Txn::new(&s), &c.merges[0].merged).unwrap(),
            before
        );
        // The same event again changes nothing.
        assert_eq!(add(&s, &r, &[user, anon], 3, "m3"), Changes::default());
    }

    #[test]
    fn a_shared_device_never_merges_two_known_people() {
        let r = rules();
        let s = MemStore::default();
        let device = id("anonymous_id", "kiosk");
        add(&s, &r, &[id("user_id", "alice"), device.clone()], 1, "m1");
        let c = add(&s, &r, &[id("user_id", "bob"), device.clone()], 2, "m2");
        assert!(c.merges.is_empty());
        assert_ne!(
            profile(&s, &id("user_id", "alice")),
            profile(&s, &id("user_id", "bob"))
        );
        assert_eq!(profile(&s, &device), profile(&s, &id("user_id", "alice")));
    }

    #[test]
    fn a_late_event_recomputes_to_the_same_graph_as_in_order() {
        let r = rules();
        let events = [
            (
                vec![id("user_id", "alice"), id("anonymous_id", "d")],
                1,
                "m1",
            ),
            (vec![id("user_id", "bob"), id("anonymous_id", "d")], 2, "m2"),
            (
                vec![id("anonymous_id", "d"), id("email", "x@y.io")],
                3,
                "m3",
            ),
        ];
        let in_order = MemStore::default();
        for (ids, t, m) in &events {
            add(&in_order, &r, ids, *t, m);
        }
        let late = MemStore::default();
        let mut recomputed = 0;
        for (ids, t, m) in events.iter().rev() {
            recomputed += add(&late, &r, ids, *t, m).recomputed;
        }
        assert!(recomputed > 0);
        for i in [
            id("user_id", "alice"),
            id("user_id", "bob"),
            id("anonymous_id", "d"),
            id("email", "x@y.io"),
        ] {
            assert_eq!(profile(&in_order, &i), profile(&late, &i), "{i:?}");
        }
        assert_eq!(
            profile(&late, &id("anonymous_id", "d")),
            profile(&late, &id("user_id", "alice")),
            "alice used the device first"
        );
    }

    #[test]
    fn a_late_link_older_than_a_lone_sighting_gives_the_in_order_graph() {
        // One-identifier events are not stored as facts; a link older than an
        // identifier's recorded first sighting must still be applied as late.
        let r = rules();
        let (a, b) = (id("anonymous_id", "a"), id("anonymous_id", "b"));
        let events: [(&[Identifier], i64, &str); 3] = [
            (std::slice::from_ref(&a), 100, "m100"),
            (std::slice::from_ref(&a), 50, "m50"),
            (&[a.clone(), b.clone()], 30, "m30"),
        ];
        let late = MemStore::default();
        for (ids, t, m) in &events {
            add(&late, &r, ids, *t, m);
        }
        let in_order = MemStore::default();
        for (ids, t, m) in events.iter().rev() {
            add(&in_order, &r, ids, *t, m);
        }
        for i in [&a, &b] {
            assert_eq!(profile(&late, i), profile(&in_order, i));
        }
        let first = seen(&Txn::new(&late), &a).unwrap().unwrap();
        assert_eq!(first.event_time, 30);
    }

    #[test]
    fn unmerge_separates_and_keeps_them_apart() {
        let r = rules();
        let s = MemStore::default();
        let a = id("email", "shared@family.org");
        let b = id("crm_id", "c-1");
        add(&s, &r, std::slice::from_ref(&a), 1, "m1");
        add(&s, &r, std::slice::from_ref(&b), 2, "m2");
        let c = add(&s, &r, &[a.clone(), b.clone()], 3, "m3");
        let merge_id = c.merges[0].merge_id.clone();
        let g = Graph::new(&r, 1);
        let mut txn = Txn::new(&s);
        let c = g
            .unmerge(&mut txn, &merge_id, (&[], &[]), (4, "cmd"))
            .unwrap()
            .unwrap();
        s.write(txn.into_batch()).unwrap();
        assert_eq!(c.splits.len(), 1);
        assert_ne!(profile(&s, &a), profile(&s, &b));
        // The linking event again, or a new one, does not join them.
        add(&s, &r, &[a.clone(), b.clone()], 5, "m5");
        assert_ne!(profile(&s, &a), profile(&s, &b));

        // A replay that reads the command before the events: the separation holds from
        // the start and the graph ends the same.
        let replay = MemStore::default();
        let mut txn = Txn::new(&replay);
        let c = g
            .unmerge(
                &mut txn,
                &merge_id,
                (std::slice::from_ref(&a), std::slice::from_ref(&b)),
                (4, "cmd"),
            )
            .unwrap();
        assert!(c.is_some());
        replay.write(txn.into_batch()).unwrap();
        add(&replay, &r, std::slice::from_ref(&a), 1, "m1");
        add(&replay, &r, std::slice::from_ref(&b), 2, "m2");
        add(&replay, &r, &[a.clone(), b.clone()], 3, "m3");
        add(&replay, &r, &[a.clone(), b.clone()], 5, "m5");
        assert_eq!(profile(&replay, &a), profile(&s, &a));
        assert_eq!(profile(&replay, &b), profile(&s, &b));
    }

    #[test]
    fn a_detached_identifier_stands_alone() {
        let r = rules();
        let s = MemStore::default();
        let u = id("user_id", "u");
        let e = id("email", "info@shop.io");
        add(&s, &r, &[u.clone(), e.clone()], 1, "m1");
        let g = Graph::new(&r, 1);
        let mut txn = Txn::new(&s);
        let c = g.detach(&mut txn, &e, (2, "cmd")).unwrap();
        s.write(txn.into_batch()).unwrap();
        assert_eq!(c.splits.len(), 1);
        assert_ne!(profile(&s, &u), profile(&s, &e));
        add(&s, &r, &[id("user_id", "v"), e.clone()], 3, "m3");
        assert_ne!(profile(&s, &id("user_id", "v")), profile(&s, &e));

        // A part too large to recompute for a late event is still recomputed for a
        // command.
        let big = MemStore::default();
        let k = id("device_id", "kiosk");
        for n in 0..5 {
            add(
                &big,
                &r,
                &[id("anonymous_id", &format!("a{n}")), k.clone()],
                n,
                &format!("k{n}"),
            );
        }
        let mut g = Graph::new(&r, 1);
        g.max_component_facts = 2;
        let mut txn = Txn::new(&big);
        let c = g.detach(&mut txn, &k, (9, "cmd")).unwrap();
        big.write(txn.into_batch()).unwrap();
        assert_eq!((c.recomputed, c.too_large), (1, 0));
        assert_ne!(profile(&big, &k), profile(&big, &id("anonymous_id", "a0")));
    }
}
