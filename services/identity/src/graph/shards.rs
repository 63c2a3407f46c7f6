//! The graph partitioned by identifier: each of `n` shards owns the identifiers that hash
//! to it, and shards talk only through [`Link`] messages (in the service, records of
//! `identity.links` keyed to the owner's partition). Built and proven in memory here
//! (`shards_tests.rs`); not yet wired into the service (issue 22).
//!
//! **What a shard holds.** For each identifier it owns: its facts (`fact/`, `if/`), its
//! first sighting (`seen/`), its profile (`id/`) and a copy of that profile's node
//! (`pr/`), and two counters: `gen/<h>`, bumped whenever something the graph is computed
//! from changes for it (a new fact, an earlier sighting), and `ver/<h>`, the version of
//! the last decision applied to it.
//!
//! **How a fact is applied.** An event goes to the shard of its highest-priority
//! identifier. If every identifier the fact needs is owned there (its identifiers and,
//! for a fact in order, the members of the profiles it touches; for a late fact, its
//! whole connected part), the shard applies it as one instance does ([`Graph::add_fact`]).
//! Otherwise the shard stores what it owns of the fact, sends the fact to the owners of
//! its other identifiers, and **gathers** the connected part: it asks each owner for
//! everything about its identifiers ([`Entry`]), follows the facts to identifiers not yet
//! gathered, and when nothing is left unanswered recomputes the part with the graph's own
//! rules ([`Graph::recompute`] on a scratch store). The result, a [`Decision`], goes to
//! every owner of the part.
//!
//! **The invariants that make it converge.**
//! 1. The graph is a function of the set of facts and sightings (graph/mod.rs), so a
//!    decision computed from a part's complete inputs is the one instance's result.
//! 2. An owner applies a decision only if it saw every input the owner holds for the
//!    owner's identifiers (`gen` no higher than the decision's); otherwise it gathers the
//!    part again itself. A fact sent to an owner reaches it before the sender's question
//!    about it (one producer, one partition: Kafka keeps the order).
//! 3. Inputs only grow, so a decision's version (the sum of the `gen`s it saw) is largest
//!    for a complete gathering, and an identifier never takes a decision older than the
//!    one it holds. The last gathering started after the last input reads every input;
//!    the owner that holds an input a decision lacks starts one. So once inputs stop, every
//!    identifier ends on a complete decision: the graph of one instance.
//!
//! In between, a reader may see an identifier on a decision made without a fact still in
//! flight, as one instance shows a late event's part before its recomputation.
//!
//! **A shard that stops** goes back to its last commit and consumes again what it had
//! consumed since (the runner's contract); what it sent meanwhile stays sent. Every
//! message may so arrive twice, and an answer may reach a later gathering that took the
//! same id: a fact stored twice is stored once, a decision applied twice changes nothing
//! the second time, and an answer older than the gathering it reaches can only make that
//! gathering's decision stale, which rule 2 catches. A gathering is state in the store,
//! so it resumes with its shard. Two more things keep rule 3 true across a restart: a
//! `gen` carries the shard's epoch in its high half, so one counted again after a
//! restart is higher than any sent before it; and a decision recomputes only what the
//! gathered facts connect (a profile's copy may be older than the facts), so no decision
//! holds more than a complete one.
//!
//! Changes (merges, splits) of a decision are reported once: by the owner of the old
//! profile's anchor, when it applies the decision to an anchor still on that profile.

use tessera_common::store::MemStore;

use super::*;

/// Which of `n` shards owns an identifier.
pub fn owner(i: &Identifier, n: u32) -> u32 {
    let h = ident_hash(i);
    let head = u32::from_str_radix(h.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    head % n.max(1)
}

fn gen_key(i: &Identifier) -> Vec<u8> {
    format!("gen/{}", ident_hash(i)).into_bytes()
}
fn ver_key(i: &Identifier) -> Vec<u8> {
    format!("ver/{}", ident_hash(i)).into_bytes()
}
/// The latest gathering of this shard that read an identifier, and the `gen` it read.
fn gat_key(i: &Identifier) -> Vec<u8> {
    format!("gat/{}", ident_hash(i)).into_bytes()
}
fn gathering_key(id: &str) -> Vec<u8> {
    format!("ga/{id}").into_bytes()
}
const GATHER_SEQ: &[u8] = b"gaseq";

/// A counter kept as decimal text; 0 when absent.
fn get_num<T: std::str::FromStr + Default>(txn: &Txn<'_>, key: &[u8]) -> Result<T> {
    Ok(txn
        .get(key)?
        .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or_default())
}

/// A message between shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Link {
    /// A fact, for the owner of some of its identifiers.
    Fact(Fact),
    /// Everything about these identifiers, for gathering `gathering` of shard `from`.
    Ask {
        gathering: String,
        from: u32,
        ids: Vec<Identifier>,
    },
    /// The answer.
    Tell {
        gathering: String,
        entries: Vec<Entry>,
    },
    /// A recomputed part, for every owner of its identifiers.
    Decide(Decision),
}

/// What an owner holds about one of its identifiers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: Identifier,
    pub generation: u64,
    pub seen: Option<Seen>,
    pub detached: bool,
    pub facts: Vec<Fact>,
    pub separations: Vec<Separation>,
    pub profile: Option<String>,
    pub node: Option<Node>,
}

/// A part of the graph recomputed from the inputs a gathering saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The fact whose gathering made it: what merges name as their cause.
    pub cause: Fact,
    pub version: u128,
    /// Each identifier of the part: the `gen` seen and its profile now.
    pub placed: Vec<(Identifier, u64, String)>,
    pub nodes: Vec<Node>,
    /// Profiles of the part that no longer exist.
    pub gone: Vec<String>,
    pub changes: Vec<Change>,
    /// The profile each merged-away profile now follows (`mergedinto/`).
    pub merged_into: Vec<(String, String)>,
    pub merge_infos: Vec<MergeInfo>,
}

/// A merge or split of `was`, reported by the owner of `anchor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub anchor: Identifier,
    pub was: String,
    pub merge: Option<ProfileMerge>,
    pub split: Option<(String, Vec<(Identifier, String)>)>,
}

/// A gathering in progress, kept in the gatherer's store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Gathering {
    cause: Option<Fact>,
    start: Vec<Identifier>,
    entries: Vec<Entry>,
    /// Identifiers asked for and not answered yet.
    asked: Vec<Identifier>,
    /// Message ids of events waiting for this gathering's decision, with the identifier
    /// whose profile they take.
    waiting: Vec<(String, Identifier)>,
}

/// What handling one input gave.
#[derive(Debug, Default)]
pub struct Handled {
    /// Messages for other shards (or this one), by shard.
    pub links: Vec<(u32, Link)>,
    /// Events resolved: message id and profile.
    pub resolved: Vec<(String, String)>,
    pub changes: Changes,
}

/// One shard of the graph, over its own store.
pub struct Shard<'r> {
    pub graph: Graph<'r>,
    pub me: u32,
    pub n: u32,
    /// How many times this shard started before; stored and committed at each start.
    pub epoch: u64,
}

impl Shard<'_> {
    fn owns(&self, i: &Identifier) -> bool {
        owner(i, self.n) == self.me
    }

    /// A `gen` only grows, across restarts too: a shard that restarts goes back to its
    /// last commit, and a `gen` it had sent since would otherwise be counted again to a
    /// different value. So the high half is the shard's epoch (how often it started).
    fn bump(&self, txn: &mut Txn<'_>, i: &Identifier) -> Result<()> {
        let cur = get_num::<u64>(txn, &gen_key(i))?;
        let g = if cur >> 32 < self.epoch {
            (self.epoch << 32) | 1
        } else {
            cur + 1
        };
        txn.put(gen_key(i), g.to_string().into_bytes());
        Ok(())
    }

    /// Stores what this shard owns of `fact`: the fact, its index entries and sightings;
    /// bumps the `gen` of each owned identifier whose inputs changed.
    fn store_owned(&self, txn: &mut Txn<'_>, fact: &Fact) -> Result<()> {
        let multi = fact.ids.len() > 1 || fact.rule.is_some();
        let new_fact = multi
            && txn
                .get_json::<Fact>(&fact_key(&fact.key))?
                .is_none_or(|old| fact.order < old.order);
        if new_fact {
            txn.put_json(fact_key(&fact.key), fact)?;
        }
        for i in fact.ids.iter().filter(|i| self.owns(i)) {
            let mut changed = note_sighting(txn, i, fact)?;
            if new_fact {
                let k = format!("{}{}", if_prefix(i), fact.key).into_bytes();
                if txn.get(&k)?.is_none() {
                    txn.put(k, Vec::new());
                }
                changed = true;
            }
            if changed {
                self.bump(txn, i)?;
            }
        }
        Ok(())
    }

    /// Whether applying `fact` needs identifiers owned elsewhere: its own, the members of
    /// the profiles it touches or, for a late fact, anything in its connected part.
    fn needs_others(&self, txn: &Txn<'_>, fact: &Fact) -> Result<bool> {
        if fact.ids.iter().any(|i| !self.owns(i)) {
            return Ok(true);
        }
        let mut late = false;
        let mut any_facts = false;
        for i in &fact.ids {
            if let Some(p) = lookup(txn, i)?
                && let Some(n) = txn.get_json::<Node>(&node_key(&p))?
            {
                if n.identifiers.iter().any(|x| !self.owns(x)) {
                    return Ok(true);
                }
                late |= n.max_order > fact.order;
            }
            let has_facts = !txn.scan(if_prefix(i).as_bytes(), 1)?.is_empty();
            // Facts but no profile: a decision about it is on its way.
            late |= has_facts && lookup(txn, i)?.is_none();
            any_facts |= has_facts;
        }
        let stored = txn.get_json::<Fact>(&fact_key(&fact.key))?;
        late |= stored.is_some_and(|s| s.order > fact.order);
        // A one-identifier event on an identifier that has facts but no profile yet
        // (their decision is on its way) or moving a sighting earlier recomputes too.
        if fact.ids.len() == 1 {
            let i = &fact.ids[0];
            let earlier = seen(txn, i)?
                .is_none_or(|s| (fact.order.t, &fact.order.msg) < (s.event_time, &s.message_id));
            late |= any_facts && (earlier || lookup(txn, i)?.is_none());
        }
        if !late {
            return Ok(false);
        }
        // The connected part, as a recomputation would load it.
        let mut ids: BTreeSet<Identifier> = fact.ids.iter().cloned().collect();
        let mut queue: Vec<Identifier> = fact.ids.clone();
        while let Some(i) = queue.pop() {
            if !self.owns(&i) {
                return Ok(true);
            }
            let prefix = if_prefix(&i);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if let Some(f) = txn.get_json::<Fact>(&fact_key(&key))? {
                    for x in f.ids {
                        if ids.insert(x.clone()) {
                            queue.push(x);
                        }
                    }
                }
            }
        }
        Ok(false)
    }

    /// An event's fact, at the shard of its highest-priority identifier.
    pub fn on_event(&self, txn: &mut Txn<'_>, fact: Fact) -> Result<Handled> {
        let mut out = Handled::default();
        let Some(top) = fact.ids.first().cloned() else {
            return Ok(out);
        };
        // A fact stored already, no later than this one, was applied or is being
        // decided: the event takes its identifier's profile (the usual case: a known
        // device of a known user).
        if (fact.ids.len() > 1 || fact.rule.is_some())
            && let Some(stored) = txn.get_json::<Fact>(&fact_key(&fact.key))?
            && stored.order <= fact.order
            && let Some(p) = lookup(txn, &top)?
        {
            out.resolved.push((fact.order.msg.clone(), p));
            return Ok(out);
        }
        if !self.needs_others(txn, &fact)? {
            // As one instance does; then the counters of what changed.
            let before: Vec<(Option<Seen>, bool)> = fact
                .ids
                .iter()
                .map(|i| {
                    let k = format!("{}{}", if_prefix(i), fact.key).into_bytes();
                    Ok((seen(txn, i)?, txn.get(&k)?.is_some()))
                })
                .collect::<Result<_>>()?;
            out.changes = self.graph.add_fact(txn, fact.clone())?;
            for (i, (s, indexed)) in fact.ids.iter().zip(before) {
                let k = format!("{}{}", if_prefix(i), fact.key).into_bytes();
                if seen(txn, i)? != s || txn.get(&k)?.is_some() != indexed {
                    self.bump(txn, i)?;
                }
            }
            let Some(p) = lookup(txn, &top)? else {
                return Err(tessera_common::Error::Internal(format!(
                    "event {} has no profile after it was applied",
                    fact.order.msg
                )));
            };
            out.resolved.push((fact.order.msg.clone(), p));
            return Ok(out);
        }
        self.store_owned(txn, &fact)?;
        let mut others: BTreeSet<u32> = fact.ids.iter().map(|i| owner(i, self.n)).collect();
        others.remove(&self.me);
        for o in others {
            out.links.push((o, Link::Fact(fact.clone())));
        }
        let waiting = vec![(fact.order.msg.clone(), top)];
        self.gather(txn, fact.ids.clone(), fact, waiting, &mut out)?;
        Ok(out)
    }

    /// A message from a shard.
    pub fn on_link(&self, txn: &mut Txn<'_>, link: Link) -> Result<Handled> {
        let mut out = Handled::default();
        match link {
            Link::Fact(f) => self.store_owned(txn, &f)?,
            Link::Ask {
                gathering,
                from,
                ids,
            } => {
                let entries = self.closure(txn, &ids)?;
                out.links.push((from, Link::Tell { gathering, entries }));
            }
            Link::Tell { gathering, entries } => {
                let Some(mut g) = txn.get_json::<Gathering>(&gathering_key(&gathering))? else {
                    return Ok(out); // answered twice (a replay): already decided
                };
                for e in entries {
                    g.asked.retain(|i| i != &e.id);
                    if !g.entries.iter().any(|x| x.id == e.id) {
                        g.entries.push(e);
                    }
                }
                self.follow(txn, &gathering, g, &mut out)?;
            }
            Link::Decide(d) => {
                let stale = self.apply(txn, &d, &mut out)?;
                if !stale.is_empty() {
                    self.gather_again(txn, stale, d.cause, Vec::new(), &mut out)?;
                }
            }
        }
        Ok(out)
    }

    /// Everything this shard holds about one of its identifiers.
    fn entry(&self, txn: &Txn<'_>, i: &Identifier) -> Result<Entry> {
        let prefix = if_prefix(i);
        let mut facts = Vec::new();
        for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
            let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let Some(f) = txn.get_json::<Fact>(&fact_key(&key))? {
                facts.push(f);
            }
        }
        let separations = self
            .graph
            .load_separations(txn, std::slice::from_ref(i))?
            .into_values()
            .collect();
        let profile = lookup(txn, i)?;
        let node = match &profile {
            Some(p) => txn.get_json::<Node>(&node_key(p))?,
            None => None,
        };
        Ok(Entry {
            id: i.clone(),
            generation: get_num::<u64>(txn, &gen_key(i))?,
            seen: seen(txn, i)?,
            detached: txn.get(&detached_key(i))?.is_some(),
            facts,
            separations,
            profile,
            node,
        })
    }

    /// The entries of `ids` and of every identifier of this shard connected to them
    /// through this shard's facts and profiles: one answer per shard crossed, not one per
    /// step of the part.
    fn closure(&self, txn: &Txn<'_>, ids: &[Identifier]) -> Result<Vec<Entry>> {
        let mut done: BTreeSet<Identifier> = BTreeSet::new();
        let mut queue: Vec<Identifier> = ids.to_vec();
        let mut out = Vec::new();
        while let Some(i) = queue.pop() {
            if !self.owns(&i) || !done.insert(i.clone()) {
                continue;
            }
            let e = self.entry(txn, &i)?;
            queue.extend(e.facts.iter().flat_map(|f| f.ids.iter().cloned()));
            if let Some(n) = &e.node {
                queue.extend(n.identifiers.iter().cloned());
            }
            out.push(e);
        }
        Ok(out)
    }

    /// Gathers a part again after a decision missed inputs held here, unless a gathering
    /// of this shard still in progress read each of those identifiers as it is now (its
    /// decision will hold them). Waiting events join that gathering.
    fn gather_again(
        &self,
        txn: &mut Txn<'_>,
        stale: Vec<Identifier>,
        cause: Fact,
        waiting: Vec<(String, Identifier)>,
        out: &mut Handled,
    ) -> Result<()> {
        let mut covering: Option<String> = None;
        for i in &stale {
            let current = get_num::<u64>(txn, &gen_key(i))?;
            let read = txn
                .get(&gat_key(i))?
                .map(|v| String::from_utf8_lossy(&v).into_owned());
            let by = read.and_then(|r| {
                let (id, g) = r.split_once(' ')?;
                (g.parse::<u64>().ok()? == current).then(|| id.to_string())
            });
            match by {
                Some(id) if txn.get(&gathering_key(&id))?.is_some() => {
                    covering.get_or_insert(id);
                }
                _ => return self.gather(txn, stale, cause, waiting, out),
            }
        }
        let id = covering.expect("stale is not empty");
        if !waiting.is_empty() {
            let mut g: Gathering = txn.get_json(&gathering_key(&id))?.expect("in progress");
            g.waiting.extend(waiting);
            txn.put_json(gathering_key(&id), &g)?;
        }
        Ok(())
    }

    /// Starts gathering the part around `start`.
    fn gather(
        &self,
        txn: &mut Txn<'_>,
        start: Vec<Identifier>,
        cause: Fact,
        waiting: Vec<(String, Identifier)>,
        out: &mut Handled,
    ) -> Result<()> {
        let seq = get_num::<u64>(txn, GATHER_SEQ)? + 1;
        txn.put(GATHER_SEQ.to_vec(), seq.to_string().into_bytes());
        let id = format!("{}-{seq}", self.me);
        let g = Gathering {
            cause: Some(cause),
            start,
            waiting,
            ..Gathering::default()
        };
        self.follow(txn, &id, g, out)
    }

    /// Reads or asks for the identifiers the gathering reached and has not got yet;
    /// decides once nothing is unanswered.
    fn follow(
        &self,
        txn: &mut Txn<'_>,
        id: &str,
        mut g: Gathering,
        out: &mut Handled,
    ) -> Result<()> {
        loop {
            let have: BTreeSet<&Identifier> = g.entries.iter().map(|e| &e.id).collect();
            let mut reached: BTreeSet<Identifier> = g.start.iter().cloned().collect();
            for e in &g.entries {
                reached.extend(e.facts.iter().flat_map(|f| f.ids.iter().cloned()));
                if let Some(n) = &e.node {
                    reached.extend(n.identifiers.iter().cloned());
                }
            }
            let new: Vec<Identifier> = reached
                .into_iter()
                .filter(|i| !have.contains(i) && !g.asked.contains(i))
                .collect();
            if new.is_empty() {
                break;
            }
            let mut ask: BTreeMap<u32, Vec<Identifier>> = BTreeMap::new();
            let mut local = Vec::new();
            for i in new {
                if self.owns(&i) {
                    let e = self.entry(txn, &i)?;
                    txn.put(gat_key(&i), format!("{id} {}", e.generation).into_bytes());
                    local.push(e);
                } else {
                    ask.entry(owner(&i, self.n)).or_default().push(i);
                }
            }
            for (o, ids) in ask {
                g.asked.extend(ids.iter().cloned());
                out.links.push((
                    o,
                    Link::Ask {
                        gathering: id.to_string(),
                        from: self.me,
                        ids,
                    },
                ));
            }
            g.entries.extend(local);
        }
        if !g.asked.is_empty() {
            txn.put_json(gathering_key(id), &g)?;
            return Ok(());
        }
        txn.delete(gathering_key(id));
        let d = self.decide(&g)?;
        let mut owners: BTreeSet<u32> = d.placed.iter().map(|(i, _, _)| owner(i, self.n)).collect();
        owners.remove(&self.me);
        for o in owners {
            out.links.push((o, Link::Decide(d.clone())));
        }
        let stale = self.apply(txn, &d, out)?;
        // The waiting events take their identifier's profile as it is now here. One
        // whose identifier has none yet waits for the gathering that follows: the one
        // this decision's staleness starts or joins, or one from its identifier (it
        // joined a gathering that no longer reaches it: a shard restarted in between
        // and had not yet stored again the fact that connected them).
        let mut still = Vec::new();
        for (msg, i) in g.waiting {
            match lookup(txn, &i)? {
                Some(p) => out.resolved.push((msg, p)),
                None => still.push((msg, i)),
            }
        }
        if !stale.is_empty() {
            self.gather_again(txn, stale, d.cause.clone(), still, out)?;
        } else if !still.is_empty() {
            let start = still.iter().map(|(_, i)| i.clone()).collect();
            self.gather(txn, start, d.cause.clone(), still, out)?;
        }
        Ok(())
    }

    /// Recomputes the gathered part with the graph's rules, on a scratch store.
    fn decide(&self, g: &Gathering) -> Result<Decision> {
        // The part: what the gathered facts connect to the start. Only it goes on the
        // scratch store, and the profiles' copies only with its identifiers: a copy older
        // than the facts (a shard restarted and has not stored a fact again yet) must not
        // pull in identifiers no gathered fact connects, or a decision could hold more
        // than a complete one and outrank it.
        let mut facts: BTreeMap<&str, &Fact> = BTreeMap::new();
        let mut of: HashMap<&Identifier, Vec<&Fact>> = HashMap::new();
        for f in g.entries.iter().flat_map(|e| &e.facts) {
            if facts.insert(&f.key, f).is_none() {
                for i in &f.ids {
                    of.entry(i).or_default().push(f);
                }
            }
        }
        let mut part: BTreeSet<&Identifier> = g.start.iter().collect();
        let mut queue: Vec<&Identifier> = g.start.iter().collect();
        while let Some(i) = queue.pop() {
            for f in of.get(i).into_iter().flatten() {
                for x in &f.ids {
                    if part.insert(x) {
                        queue.push(x);
                    }
                }
            }
        }
        let scratch = MemStore::default();
        let mut t = Txn::new(&scratch);
        for f in facts.values() {
            if f.ids.iter().any(|i| part.contains(i)) {
                t.put_json(fact_key(&f.key), *f)?;
                for i in &f.ids {
                    t.put(
                        format!("{}{}", if_prefix(i), f.key).into_bytes(),
                        Vec::new(),
                    );
                }
            }
        }
        for e in g.entries.iter().filter(|e| part.contains(&e.id)) {
            if let Some(s) = &e.seen {
                t.put_json(seen_key(&e.id), s)?;
            }
            if e.detached {
                t.put(detached_key(&e.id), Vec::new());
            }
            for s in &e.separations {
                t.put_json(sep_key(&s.id), s)?;
                t.put(
                    format!("{}{}", sepidx_prefix(&e.id), s.id).into_bytes(),
                    Vec::new(),
                );
            }
            if let Some(p) = &e.profile {
                t.put(id_key(&e.id), p.as_bytes().to_vec());
            }
            if let Some(n) = &e.node {
                let mut n = n.clone();
                n.identifiers.retain(|i| part.contains(i));
                t.put_json(node_key(&n.id), &n)?;
            }
        }
        let graph = Graph {
            rules: self.graph.rules,
            max_component_facts: 1_000_000,
            received_at: self.graph.received_at,
        };
        let cause = g.cause.clone().expect("a gathering has a cause");
        let old: BTreeMap<Identifier, String> = g
            .entries
            .iter()
            .filter_map(|e| Some((e.id.clone(), e.profile.clone()?)))
            .collect();
        let old_nodes: BTreeMap<String, Node> = g
            .entries
            .iter()
            .filter_map(|e| e.node.clone())
            .map(|n| (n.id.clone(), n))
            .collect();
        let changes = graph.recompute(&mut t, &g.start, &cause)?;
        let mut placed = Vec::new();
        let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
        // An entry is part of the decision if the recomputation placed it. One gathered
        // through a copy of a profile older than the facts seen is not, when no fact seen
        // connects it: it keeps what it has.
        let mut version: u128 = 0;
        for e in &g.entries {
            let Some(p) = lookup(&t, &e.id)? else {
                continue;
            };
            let Some(n) = t.get_json::<Node>(&node_key(&p))? else {
                continue;
            };
            if !n.identifiers.contains(&e.id) {
                continue;
            }
            nodes.entry(p.clone()).or_insert(n);
            placed.push((e.id.clone(), e.generation, p));
            version += u128::from(e.generation);
        }
        let gone: Vec<String> = old
            .iter()
            .filter(|(i, _)| placed.iter().any(|(x, _, _)| x == *i))
            .map(|(_, p)| p)
            .filter(|p| !nodes.contains_key(*p))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let anchor_of = |p: &str| old_nodes.get(p).map(|n| n.anchor.clone());
        let mut out_changes = Vec::new();
        for m in changes.merges {
            if let Some(anchor) = anchor_of(&m.merged) {
                out_changes.push(Change {
                    anchor,
                    was: m.merged.clone(),
                    merge: Some(m),
                    split: None,
                });
            }
        }
        for s in changes.splits {
            if let Some(anchor) = anchor_of(&s.profile) {
                out_changes.push(Change {
                    anchor,
                    was: s.profile.clone(),
                    merge: None,
                    split: Some((s.profile, s.assignments)),
                });
            }
        }
        let mut merged_into = Vec::new();
        for p in &gone {
            if let Some(to) = t.get(&merged_key(p))? {
                merged_into.push((p.clone(), String::from_utf8_lossy(&to).into_owned()));
            }
        }
        let mut merge_infos = Vec::new();
        for c in &out_changes {
            if let Some(m) = &c.merge
                && let Some(info) = t.get_json::<MergeInfo>(&merge_info_key(&m.merge_id))?
            {
                merge_infos.push(info);
            }
        }
        Ok(Decision {
            cause,
            version,
            placed,
            nodes: nodes.into_values().collect(),
            gone,
            changes: out_changes,
            merged_into,
            merge_infos,
        })
    }

    /// Applies a decision to this shard's identifiers. A decision that missed an input
    /// held here is not applied: the identifiers whose inputs it missed are returned, to
    /// be gathered again.
    fn apply(&self, txn: &mut Txn<'_>, d: &Decision, out: &mut Handled) -> Result<Vec<Identifier>> {
        let mine: Vec<&(Identifier, u64, String)> =
            d.placed.iter().filter(|(i, _, _)| self.owns(i)).collect();
        let mut stale = Vec::new();
        for (i, seen_gen, _) in &mine {
            if get_num::<u64>(txn, &gen_key(i))? > *seen_gen {
                stale.push(i.clone());
            }
        }
        if !stale.is_empty() {
            return Ok(stale);
        }
        let nodes: BTreeMap<&str, &Node> = d.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
        let mut before: BTreeMap<&Identifier, Option<String>> = BTreeMap::new();
        for (i, _, p) in &mine {
            if d.version < get_num::<u128>(txn, &ver_key(i))? {
                continue;
            }
            before.insert(i, lookup(txn, i)?);
            txn.put(id_key(i), p.as_bytes().to_vec());
            txn.put(ver_key(i), d.version.to_string().into_bytes());
            if let Some(n) = nodes.get(p.as_str()) {
                txn.put_json(node_key(p), *n)?;
            }
        }
        if before.is_empty() {
            return Ok(stale);
        }
        // A profile gone from the part loses its copy here once none of this shard's
        // identifiers is on it (one skipped above, on a newer decision, may still be).
        for p in &d.gone {
            if let Some(n) = txn.get_json::<Node>(&node_key(p))? {
                let mut kept = false;
                for i in n.identifiers.iter().filter(|i| self.owns(i)) {
                    kept |= lookup(txn, i)?.as_deref() == Some(p.as_str());
                }
                if !kept {
                    txn.delete(node_key(p));
                }
            }
        }
        for c in &d.changes {
            if before.get(&c.anchor) != Some(&Some(c.was.clone())) {
                continue;
            }
            if let Some(m) = &c.merge {
                // Its `mergedinto/` comes with the decision's `merged_into` below.
                if let Some(info) = d.merge_infos.iter().find(|x| x.merge_id == m.merge_id) {
                    txn.put_json(merge_info_key(&m.merge_id), info)?;
                    txn.put(
                        format!("{}{}", history_prefix(&m.survivor), m.merge_id).into_bytes(),
                        Vec::new(),
                    );
                }
                out.changes.merges.push(m.clone());
            }
            if let Some((profile, assignments)) = &c.split {
                out.changes.splits.push(Split {
                    profile: profile.clone(),
                    assignments: assignments.clone(),
                });
            }
        }
        for (p, to) in &d.merged_into {
            txn.put(merged_key(p), to.as_bytes().to_vec());
        }
        Ok(stale)
    }
}
