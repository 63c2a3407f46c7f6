//! The graph partitioned into shards against one instance's: the same facts, with
//! duplicates, and corrections, in any order and any interleaving of the shards'
//! messages, end in the same graph on 1, 2 and 4 shards as on one instance. Here the
//! simulation and the property; the cases it found in `cases.rs`, the cost in `cost.rs`.

use std::collections::VecDeque;

use proptest::prelude::*;
use tessera_common::store::{MemStore, Store};

use super::*;
use crate::graph::tests::{id, rules};

const PEOPLE: usize = 4;

/// A small world: four people, each with a user id, three devices, an email and a CRM
/// id; a kiosk device and a family email shared by all. An event carries some of one
/// person's identifiers.
fn world_ids(person: usize, pick: u8, shared: u8) -> Vec<Identifier> {
    let mut ids = Vec::new();
    if pick & 1 != 0 {
        ids.push(id("user_id", &format!("user-{person}")));
    }
    if pick & 2 != 0 {
        ids.push(id("anonymous_id", &format!("anon-{person}-{}", pick % 3)));
    }
    if pick & 4 != 0 {
        ids.push(id("email", &format!("p{person}@mail.test")));
    }
    if pick & 8 != 0 {
        ids.push(id("crm_id", &format!("crm-{person}")));
    }
    if pick & 16 != 0 {
        ids.push(id(
            "anonymous_id",
            &format!("anon-{person}-{}", (pick / 3) % 3),
        ));
    }
    match shared {
        1 => ids.push(id("anonymous_id", "kiosk")),
        2 => ids.push(id("email", "family@home.test")),
        _ => {}
    }
    ids
}

fn all_ids() -> Vec<Identifier> {
    let mut out = vec![id("anonymous_id", "kiosk"), id("email", "family@home.test")];
    for p in 0..PEOPLE {
        out.push(id("user_id", &format!("user-{p}")));
        out.push(id("email", &format!("p{p}@mail.test")));
        out.push(id("crm_id", &format!("crm-{p}")));
        for k in 0..3 {
            out.push(id("anonymous_id", &format!("anon-{p}-{k}")));
        }
    }
    out
}

/// One instance: every input applied in arrival order to one store.
fn one_instance(rules: &Rules, inputs: &[Carried]) -> MemStore {
    one_instance_reporting(rules, inputs).0
}

/// An event's ingest subject, as ingest keys it: its user id, else its device, else its
/// first identifier (a keyed hash, as ingest's is: it names nobody).
fn subject_of(f: &Fact) -> String {
    let by = |kind: &str| f.ids.iter().find(|i| i.kind == kind);
    let i = by("user_id")
        .or_else(|| by("anonymous_id"))
        .unwrap_or(&f.ids[0]);
    deterministic_id("subject", &[&i.value])
}

/// Each event's fact.
fn events(facts: &[Fact]) -> Vec<Carried> {
    facts.iter().cloned().map(Carried::Event).collect()
}

/// What went downstream: each event's profile, the merges (merged → survivor and the
/// merge's version; the latest per merged profile) and the profiles split.
#[derive(Default)]
struct Reported {
    resolved: Vec<(String, String)>,
    merged: BTreeMap<String, (String, i64)>,
    split: BTreeSet<String>,
    /// The subjects and profiles whose keys erasures destroyed, and their reports.
    destroyed: BTreeSet<String>,
    reports: Vec<ErasureReport>,
}

impl Reported {
    fn add(&mut self, resolved: Vec<(String, String)>, changes: Changes) {
        self.resolved.extend(resolved);
        for m in changes.merges {
            self.merge(m.merged, (m.survivor, m.version));
        }
        self.split
            .extend(changes.splits.into_iter().map(|s| s.profile));
    }

    fn merge(&mut self, merged: String, to: (String, i64)) {
        let e = self.merged.entry(merged).or_insert_with(|| to.clone());
        if to.1 > e.1 {
            *e = to;
        }
    }

    fn absorb(&mut self, other: Reported) {
        self.resolved.extend(other.resolved);
        for (merged, to) in other.merged {
            self.merge(merged, to);
        }
        self.split.extend(other.split);
        self.destroyed.extend(other.destroyed);
        self.reports.extend(other.reports);
    }

    /// An event that went out on a profile that at the end neither exists, nor was
    /// reported merged (at last into one that exists) or split: downstream would keep a
    /// profile identity forgot. Merges are followed as profiles follows them: a cycle
    /// (merged away, later merged back into) ends at its oldest merge's profile.
    fn orphan(&self, graph: &Graphed) -> Option<String> {
        let live: BTreeSet<&String> = graph.values().flatten().map(|(p, _, _)| p).collect();
        self.resolved.iter().find_map(|(msg, p)| {
            let mut path: Vec<(&String, i64)> = Vec::new();
            let mut at = p;
            while let Some((to, version)) = self.merged.get(at).filter(|_| !live.contains(at)) {
                path.push((at, *version));
                if let Some(k) = path.iter().position(|(x, _)| *x == to) {
                    at = path[k..]
                        .iter()
                        .min_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)))
                        .expect("a cycle has a merge")
                        .0;
                    break;
                }
                at = to;
            }
            (!live.contains(at) && !self.split.contains(at))
                .then(|| format!("event {msg} went out on {p}, forgotten at the end"))
        })
    }
}

fn one_instance_reporting(rules: &Rules, inputs: &[Carried]) -> (MemStore, Reported) {
    let s = MemStore::default();
    let mut reported = Reported::default();
    for input in inputs {
        let mut txn = Txn::new(&s);
        let g = Graph::new(rules, 1);
        match input {
            Carried::Event(f) => {
                let changes = g.add_fact(&mut txn, f.clone()).unwrap();
                let p = lookup(&txn, &f.ids[0]).unwrap().unwrap();
                reported.add(vec![(f.order.msg.clone(), p)], changes);
            }
            Carried::Correct(Correction::Unmerge {
                merge_id,
                left,
                right,
                at,
            }) => {
                let at = (at.0, at.1.as_str());
                let changes = g.unmerge(&mut txn, merge_id, (left, right), at).unwrap();
                reported.add(Vec::new(), changes.expect("the sides are given"));
            }
            Carried::Correct(Correction::Detach { id, at }) => {
                let changes = g.detach(&mut txn, id, (at.0, at.1.as_str())).unwrap();
                reported.add(Vec::new(), changes);
            }
            Carried::Correct(Correction::Erase { id, .. }) => {
                if let Some(p) = lookup(&txn, id).unwrap() {
                    let p = live_profile(&txn, &p).unwrap();
                    g.erase(&mut txn, &p).unwrap();
                }
            }
            Carried::Link(_) => unreachable!("one instance has no links"),
        }
        s.write(txn.into_batch()).unwrap();
    }
    (s, reported)
}

/// The shard an event arrives at: `by_device`, by its device (the anonymous id) else
/// its user id, which forwards more events than ingest's keying (user id, else device)
/// does; otherwise at the owner of its highest-priority identifier, where it is
/// resolved.
fn arrival(input: &Carried, n: u32, by_device: bool) -> u32 {
    match input {
        Carried::Event(f) => {
            let device = f.ids.iter().find(|i| i.kind == "anonymous_id");
            owner(device.filter(|_| by_device).unwrap_or(&f.ids[0]), n)
        }
        // Commands are keyed by their first identifier.
        Carried::Correct(c) => c.first().map_or(0, |i| owner(i, n)),
        Carried::Link(_) => unreachable!("links are not inputs"),
    }
}

/// What a shard consumes: an event or a correction (its inputs, and forwarded to the
/// owner of their identifier), or a link.
#[derive(Clone, Serialize, Deserialize)]
enum Carried {
    Event(Fact),
    Correct(Correction),
    Link(Link),
}

/// `n` shards in one instance's store (a keyspace each), exchanging serialised links
/// through one FIFO channel per pair of shards (a producer and a partition: Kafka keeps
/// their order), the channels and the shards' event queues drained in an order drawn
/// from `seed`.
struct Sim<'r> {
    rules: &'r Rules,
    n: u32,
    store: MemStore,
    events: Vec<VecDeque<Carried>>,
    channels: BTreeMap<(u32, u32), VecDeque<Vec<u8>>>,
    /// What every shard sent downstream and then committed, and what each sent since its
    /// last commit. A crash before the commit re-processes those inputs, which may
    /// resolve an event again on another profile: the first one went out but is not
    /// checked, as one instance's would not be (at least once, without transactions).
    reported: Reported,
    pending: Vec<Reported>,
    /// Messages between shards, and how many of them were forwarded events.
    links: usize,
    forwarded: usize,
    state: u64,
    mode: u64,
    /// What each shard consumed since its last commit, and its state at that commit: a
    /// crash restores the state and consumes those inputs again (the runner's contract).
    consumed: Vec<Vec<Consumed>>,
    committed: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    crashes: usize,
    max_crashes: usize,
}

#[derive(Clone)]
enum Consumed {
    Input(Box<Carried>),
    Link((u32, u32), Vec<u8>),
}

impl<'r> Sim<'r> {
    fn new(rules: &'r Rules, n: u32, inputs: &[Carried], seed: u64, by_device: bool) -> Self {
        let mut events = vec![VecDeque::new(); n as usize];
        for input in inputs {
            events[arrival(input, n, by_device) as usize].push_back(input.clone());
        }
        let sim = Sim {
            rules,
            n,
            store: MemStore::default(),
            events,
            channels: BTreeMap::new(),
            reported: Reported::default(),
            pending: (0..n).map(|_| Reported::default()).collect(),
            links: 0,
            forwarded: 0,
            state: seed | 1,
            mode: seed >> 32,
            consumed: vec![Vec::new(); n as usize],
            committed: vec![Vec::new(); n as usize],
            crashes: 0,
            max_crashes: 0,
        };
        let mut sim = sim;
        for s in 0..n {
            sim.start(s);
            // The start is committed before the shard handles anything (the runner's
            // contract): a crash goes back to it, not to before it.
            sim.committed[s as usize] = sim.store.scan_prefix(&keyspace(s), usize::MAX).unwrap();
        }
        sim
    }

    fn start(&self, s: u32) {
        let mut txn = Txn::new(&self.store);
        Shard::start(Graph::new(self.rules, 1), s, self.n, &mut txn).unwrap();
        self.store.write(txn.into_batch()).unwrap();
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn handle(&mut self, at: u32, input: Carried) {
        let mut txn = Txn::new(&self.store);
        let shard = Shard::open(Graph::new(self.rules, 1), at, self.n, &mut txn).unwrap();
        let h = match input.clone() {
            Carried::Event(f) => {
                let subject = subject_of(&f);
                shard.on_event(&mut txn, f, Some(&subject)).unwrap()
            }
            Carried::Correct(c) => shard.on_correction(&mut txn, c).unwrap(),
            Carried::Link(l) => shard.on_link(&mut txn, l).unwrap(),
        };
        self.store.write(txn.into_batch()).unwrap();
        let pending = &mut self.pending[at as usize];
        pending.add(h.resolved, h.changes);
        if let Some(e) = h.erased {
            pending.destroyed.extend(e.subjects);
            pending.destroyed.extend(e.profiles);
        }
        pending.reports.extend(h.report);
        self.forwarded += usize::from(h.forward.is_some());
        let forwarded = h.forward.map(|to| (to, input));
        let sent = h.links.into_iter().map(|(to, l)| (to, Carried::Link(l)));
        for (to, c) in sent.chain(forwarded) {
            // Only an erasure goes to its own shard (through its partition).
            assert!(
                to != at || matches!(c, Carried::Link(Link::Erase(_))),
                "a shard never messages itself otherwise"
            );
            self.links += 1;
            self.channels
                .entry((at, to))
                .or_default()
                .push_back(serde_json::to_vec(&c).unwrap());
        }
    }

    /// Runs until every queue is empty.
    fn run(&mut self) {
        for _ in 0..1_000_000 {
            let mut sources: Vec<(u32, Option<(u32, u32)>)> = Vec::new();
            for (s, q) in self.events.iter().enumerate() {
                if !q.is_empty() {
                    sources.push((s as u32, None));
                }
            }
            for (k, q) in &self.channels {
                if !q.is_empty() {
                    sources.push((k.1, Some(*k)));
                }
            }
            if sources.is_empty() {
                for s in 0..self.n as usize {
                    self.commit(s);
                }
                return;
            }
            // A third of the runs take events first while any is left, so that
            // gatherings overlap as much as they can; a third hold back what is sent to
            // one shard while anything else can go, so that its answers and decisions
            // come late; the rest pick any queue.
            let eligible: Vec<usize> = match self.mode % 3 {
                0 if sources[0].1.is_none() => (0..sources.len())
                    .filter(|&k| sources[k].1.is_none())
                    .collect(),
                1 => {
                    let slow = (self.mode / 3 % u64::from(self.n)) as u32;
                    let k: Vec<usize> = (0..sources.len())
                        .filter(|&k| sources[k].1.is_none() || sources[k].0 != slow)
                        .collect();
                    if k.is_empty() {
                        (0..sources.len()).collect()
                    } else {
                        k
                    }
                }
                _ => (0..sources.len()).collect(),
            };
            let pick = eligible[(self.next() % eligible.len() as u64) as usize];
            match sources[pick] {
                (s, None) => {
                    let input = self.events[s as usize].pop_front().unwrap();
                    self.consumed[s as usize].push(Consumed::Input(Box::new(input.clone())));
                    self.handle(s, input);
                }
                (s, Some(k)) => {
                    let bytes = self.channels.get_mut(&k).unwrap().pop_front().unwrap();
                    self.consumed[s as usize].push(Consumed::Link(k, bytes.clone()));
                    self.handle(s, serde_json::from_slice(&bytes).unwrap());
                }
            }
            if self.max_crashes == 0 {
                continue;
            }
            let (roll, s) = (self.next() % 64, (self.next() % u64::from(self.n)) as usize);
            if roll < 8 {
                self.commit(s);
            } else if roll == 8 && self.crashes < self.max_crashes {
                self.crash(s);
            }
        }
        panic!("the shards kept messaging each other");
    }

    fn commit(&mut self, s: usize) {
        if self.max_crashes > 0 {
            // The state a crash goes back to (only a run with crashes needs it).
            let space = keyspace(s as u32);
            self.committed[s] = self.store.scan_prefix(&space, usize::MAX).unwrap();
        }
        self.consumed[s].clear();
        let p = std::mem::take(&mut self.pending[s]);
        self.reported.absorb(p);
    }

    /// The shard stops: its state goes back to its last commit and what it consumed
    /// since is consumed again. What it sent meanwhile stays sent.
    fn crash(&mut self, s: usize) {
        self.crashes += 1;
        self.pending[s] = Reported::default();
        let mut batch = tessera_common::store::WriteBatch::default();
        for (k, _) in self
            .store
            .scan_prefix(&keyspace(s as u32), usize::MAX)
            .unwrap()
        {
            batch.delete(k);
        }
        for (k, v) in &self.committed[s] {
            batch.put(k.clone(), v.clone());
        }
        self.store.write(batch).unwrap();
        self.start(s as u32);
        for c in std::mem::take(&mut self.consumed[s]).into_iter().rev() {
            match c {
                Consumed::Input(input) => self.events[s].push_front(*input),
                Consumed::Link(k, bytes) => self.channels.entry(k).or_default().push_front(bytes),
            }
        }
    }

    /// An identifier's profile and that profile's node, as its owner holds them.
    fn owned(&self, i: &Identifier) -> Option<(String, Option<Node>)> {
        let mut txn = Txn::new(&self.store);
        txn.in_keyspace(&keyspace(owner(i, self.n)), |t| {
            let p = lookup(t, i).unwrap()?;
            let n = t.get_json(&node_key(&p)).unwrap();
            Some((p, n))
        })
    }

    /// What a shard keeps only while it works: gatherings in progress (`ga/`), the
    /// marks of what they read (`gat/`), the pieces of an erasure not yet reported
    /// (`erp/`). Once every message is handled, nothing.
    fn in_progress(&self) -> Vec<String> {
        (0..self.n)
            .flat_map(|s| {
                let space = keyspace(s);
                self.store
                    .scan_prefix(&space, usize::MAX)
                    .unwrap()
                    .into_iter()
                    .map(move |(k, _)| String::from_utf8_lossy(&k[space.len()..]).into_owned())
            })
            .filter(|k| ["ga/", "gat/", "erp/"].iter().any(|p| k.starts_with(p)))
            .collect()
    }

    fn lookup(&self, i: &Identifier) -> Option<String> {
        self.owned(i).map(|(p, _)| p)
    }

    fn node(&self, i: &Identifier) -> Option<Node> {
        self.owned(i)?.1
    }
}

/// Each identifier's profile and its profile's members and anchor.
type Graphed = BTreeMap<Identifier, Option<(String, Vec<Identifier>, Identifier)>>;

fn graph_of_one(s: &MemStore) -> Graphed {
    let txn = Txn::new(s);
    all_ids()
        .into_iter()
        .map(|i| {
            let v = lookup(&txn, &i).unwrap().map(|p| {
                let n: Node = txn.get_json(&node_key(&p)).unwrap().unwrap();
                (p, n.identifiers, n.anchor)
            });
            (i, v)
        })
        .collect()
}

fn graph_of_shards(sim: &Sim<'_>) -> Graphed {
    all_ids()
        .into_iter()
        .map(|i| {
            let v = sim.lookup(&i).map(|p| {
                let n = sim.node(&i).expect("the owner holds its profile's node");
                (p, n.identifiers, n.anchor)
            });
            (i, v)
        })
        .collect()
}

fn facts_of(rules: &Rules, specs: &[(usize, u8, u8, i64)]) -> Vec<Fact> {
    facts_named(rules, specs, "m")
}

/// Facts whose message ids are `tag` and their position.
fn facts_named(rules: &Rules, specs: &[(usize, u8, u8, i64)], tag: &str) -> Vec<Fact> {
    specs
        .iter()
        .enumerate()
        .map(|(n, (person, pick, shared, t))| {
            let ids = world_ids(*person, *pick, *shared);
            Fact::new(rules, &ids, *t, &format!("{tag}{n}"), "src", None)
        })
        .collect()
}

/// Corrections from their specs: (0, a, _) detaches identifier `a` of [`all_ids`],
/// (1, a, b) un-merges `a` from `b`.
fn corrections_of(specs: &[(u8, usize, usize)]) -> Vec<Carried> {
    let ids = all_ids();
    specs
        .iter()
        .enumerate()
        .filter_map(|(k, (kind, a, b))| {
            let at = (45, format!("c{k}"));
            let (a, b) = (ids[a % ids.len()].clone(), ids[b % ids.len()].clone());
            let c = match kind {
                0 => Correction::Detach { id: a, at },
                _ if a != b => Correction::Unmerge {
                    merge_id: format!("mg-{k}"),
                    left: vec![a],
                    right: vec![b],
                    at,
                },
                _ => return None,
            };
            Some(Carried::Correct(c))
        })
        .collect()
}

/// The inputs with the duplicates at `dups` (positions in `inputs`), in an order drawn
/// from `seed`.
fn shuffled(inputs: &[Carried], seed: u64, dups: &[usize]) -> Vec<Carried> {
    let mut out = inputs.to_vec();
    for &d in dups {
        out.push(inputs[d].clone());
    }
    let mut state = seed | 1;
    for i in (1..out.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.swap(i, (state % (i as u64 + 1)) as usize);
    }
    out
}

/// One case of the property: the graph of `n` shards for 1, 2 and 4 against one
/// instance's, every event resolved, and no event left downstream on a profile that
/// ends neither existing nor reported merged or split (checked on one instance's stream
/// too). Events arrive `by_device` (as ingest keys them) or at their owner.
fn check(
    specs: &[(usize, u8, u8, i64)],
    seed: u64,
    dups: &[usize],
    crashes: usize,
    by_device: bool,
) -> Result<(), TestCaseError> {
    check_with(specs, &[], seed, dups, crashes, by_device)
}

/// [`check`] with corrections ([`corrections_of`]) among the inputs.
fn check_with(
    specs: &[(usize, u8, u8, i64)],
    corrections: &[(u8, usize, usize)],
    seed: u64,
    dups: &[usize],
    crashes: usize,
    by_device: bool,
) -> Result<(), TestCaseError> {
    let rules = rules();
    let mut inputs = events(&facts_of(&rules, specs));
    inputs.extend(corrections_of(corrections));
    let arrived = shuffled(&inputs, seed, dups);
    let (store, reported) = one_instance_reporting(&rules, &arrived);
    prop_assert_eq!(reported.orphan(&graph_of_one(&store)), None, "one instance");
    let one = graph_of_one(&one_instance(&rules, &inputs));
    for n in [1u32, 2, 4] {
        let mut sim = Sim::new(&rules, n, &arrived, seed ^ u64::from(n), by_device);
        sim.max_crashes = crashes;
        sim.run();
        let got = graph_of_shards(&sim);
        let differ = differences(&got, &one, &format!("on {n} shards"), "on one");
        prop_assert!(differ.is_empty(), "{}", differ.join("\n"));
        let resolved: BTreeSet<&String> = sim.reported.resolved.iter().map(|(m, _)| m).collect();
        let sent: BTreeSet<&String> = arrived
            .iter()
            .filter_map(|i| match i {
                Carried::Event(f) => Some(&f.order.msg),
                _ => None,
            })
            .collect();
        prop_assert_eq!(resolved, sent, "every event is resolved");
        if let Some(o) = sim.reported.orphan(&got) {
            prop_assert!(false, "on {} shards: {}", n, o);
        }
        if n == 1 {
            prop_assert_eq!(sim.links, 0);
        }
        let marks = sim.in_progress();
        prop_assert!(marks.is_empty(), "on {} shards, once quiet: {:?}", n, marks);
    }
    Ok(())
}

/// The erasure property's case: the inputs as in [`check_with`], once every shard is
/// done with them the person of identifier `erase` ([`all_ids`]) is erased, and once
/// that is done the events `after` arrive; shards may crash throughout. The graph at the end is one instance's (the
/// same three steps in order), and when the erasure is done no shard holds a key or
/// value of the person's identifiers (their hashes, their values).
fn check_erasure(
    specs: &[(usize, u8, u8, i64)],
    corrections: &[(u8, usize, usize)],
    seed: u64,
    erase: usize,
    after: &[(usize, u8, u8, i64)],
    crashes: usize,
    by_device: bool,
) -> Result<(), TestCaseError> {
    let rules = rules();
    let mut inputs = events(&facts_of(&rules, specs));
    inputs.extend(corrections_of(corrections));
    let arrived = shuffled(&inputs, seed, &[]);
    let all = all_ids();
    let target = all[erase % all.len()].clone();
    let before = one_instance(&rules, &inputs);
    let person: Vec<Identifier> = graph_of_one(&before)
        .remove(&target)
        .flatten()
        .map(|(_, members, _)| members)
        .unwrap_or_default();
    let erased_profile = lookup(&Txn::new(&before), &target).unwrap();
    // The subjects of the events whose highest-priority identifier was the person's.
    let subjects: BTreeSet<String> = arrived
        .iter()
        .filter_map(|c| match c {
            Carried::Event(f) if person.contains(&f.ids[0]) => Some(subject_of(f)),
            _ => None,
        })
        .collect();
    let erasure = Carried::Correct(Correction::Erase {
        id: target,
        request: "r1".into(),
    });
    let later = events(&facts_named(&rules, after, "n"));
    // One instance, the inputs in the order they arrived, then the erasure.
    let mut sequence = arrived.clone();
    sequence.push(erasure.clone());
    let erased_one = one_instance(&rules, &sequence);
    let left = leftovers(&erased_one, &person);
    prop_assert!(left.is_empty(), "one instance keeps {:?}", left);
    if corrections.is_empty() {
        // One instance's graph after the erasure is the graph of the events without
        // the person's: an event they shared with others leaves a sighting of each of
        // the others, and no link.
        let kept: Vec<Carried> = arrived
            .iter()
            .flat_map(|c| match c {
                Carried::Event(f) if f.ids.iter().any(|i| person.contains(i)) => f
                    .ids
                    .iter()
                    .filter(|i| !person.contains(i))
                    .map(|i| {
                        let alone = std::slice::from_ref(i);
                        Carried::Event(Fact::new(
                            &rules,
                            alone,
                            f.order.t,
                            &f.order.msg,
                            "src",
                            None,
                        ))
                    })
                    .collect(),
                other => vec![other.clone()],
            })
            .collect();
        let mut rebuilt = graph_of_one(&one_instance(&rules, &kept));
        let mut now = graph_of_one(&erased_one);
        for i in &person {
            rebuilt.remove(i);
            now.remove(i);
        }
        let differ = differences(&now, &rebuilt, "after the erasure", "rebuilt");
        prop_assert!(differ.is_empty(), "one instance: {}", differ.join("\n"));
    }
    let mut sequence = inputs.clone();
    sequence.push(erasure.clone());
    sequence.extend(later.iter().cloned());
    let one = graph_of_one(&one_instance(&rules, &sequence));
    for n in [1u32, 2, 4] {
        let mut sim = Sim::new(&rules, n, &arrived, seed ^ u64::from(n), by_device);
        sim.max_crashes = crashes;
        sim.run();
        sim.events[arrival(&erasure, n, by_device) as usize].push_back(erasure.clone());
        sim.run();
        let left = leftovers(&sim.store, &person);
        prop_assert!(left.is_empty(), "{} shards keep {:?}", n, left);
        // One report, naming every subject of the person's events: each shard destroyed
        // the keys of those it held.
        let reports: Vec<&ErasureReport> = sim.reported.reports.iter().collect();
        match &erased_profile {
            None => prop_assert!(reports.is_empty(), "nobody to erase: {:?}", reports),
            Some(profile) => {
                prop_assert!(!reports.is_empty(), "on {} shards: no report", n);
                prop_assert!(reports.iter().all(|r| *r == reports[0]), "{:?}", reports);
                let r = reports[0];
                prop_assert_eq!(&r.profile, profile);
                prop_assert_eq!(r.identifiers, person.len());
                prop_assert_eq!(&r.subjects, &subjects, "on {} shards", n);
                let missed: Vec<&String> = subjects
                    .iter()
                    .chain([profile])
                    .chain(&r.merged_profiles)
                    .filter(|s| !sim.reported.destroyed.contains(*s))
                    .collect();
                prop_assert!(missed.is_empty(), "keys not destroyed: {:?}", missed);
            }
        }
        for e in &later {
            sim.events[arrival(e, n, by_device) as usize].push_back(e.clone());
        }
        sim.run();
        let got = graph_of_shards(&sim);
        let differ = differences(&got, &one, &format!("on {n} shards"), "on one");
        prop_assert!(differ.is_empty(), "{}", differ.join("\n"));
        let marks = sim.in_progress();
        prop_assert!(marks.is_empty(), "on {} shards, once quiet: {:?}", n, marks);
    }
    Ok(())
}

/// Each identifier whose profile differs between two graphs, with both.
fn differences(got: &Graphed, want: &Graphed, got_is: &str, want_is: &str) -> Vec<String> {
    want.iter()
        .filter(|(i, v)| got.get(*i) != Some(*v))
        .map(|(i, v)| format!("{}: {:?} {got_is}, {:?} {want_is}", i.value, got.get(i), v))
        .collect()
}

/// The keys and values in `store` that hold an identifier of `person` (its hash, or its
/// value).
fn leftovers(store: &MemStore, person: &[Identifier]) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in store.scan_prefix(b"", usize::MAX).unwrap() {
        let (k, v) = (String::from_utf8_lossy(&k), String::from_utf8_lossy(&v));
        for i in person {
            if k.contains(&ident_hash(i)) || k.contains(&i.value) || v.contains(&i.value) {
                out.push(format!("{k} ({})", i.value));
            }
        }
    }
    out
}

/// A case of the property: the events' specs, the arrival seed, the duplicates
/// (positions), how many crashes, whether events arrive by device, and corrections.
type Case = (
    Vec<(usize, u8, u8, i64)>,
    u64,
    Vec<usize>,
    usize,
    bool,
    Vec<(u8, usize, usize)>,
);

fn cases() -> impl Strategy<Value = Case> {
    let spec = (
        0usize..PEOPLE,
        1u8..32,
        prop::sample::select(vec![0u8, 0, 1, 2]),
        0i64..40,
    );
    (
        prop::collection::vec(spec, 8..36),
        any::<u64>(),
        prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        0usize..4,
        any::<bool>(),
        prop::collection::vec((0u8..2, 0usize..64, 0usize..64), 0..3),
    )
        .prop_map(|(specs, seed, dups, crashes, by_device, corrections)| {
            let dups = dups.iter().map(|d| d.index(specs.len())).collect();
            (specs, seed, dups, crashes, by_device, corrections)
        })
}

/// Events that arrive after an erasure.
fn later_events() -> impl Strategy<Value = Vec<(usize, u8, u8, i64)>> {
    prop::collection::vec(
        (
            0usize..PEOPLE,
            1u8..32,
            prop::sample::select(vec![0u8, 0, 1, 2]),
            0i64..40,
        ),
        0..8,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The property: any set of events with duplicates, and un-merges and
    /// detaches, in any arrival order, gives the same graph on 1, 2 and 4 shards as on
    /// one instance (profile ids, members, anchors), every event is resolved, and none
    /// is left downstream on a profile that ends neither existing nor reported merged or
    /// split, when shards stop and consume again what they had not committed.
    #[test]
    fn shards_end_in_the_graph_of_one_instance(
        (specs, seed, dups, crashes, by_device, corrections) in cases()
    ) {
        check_with(&specs, &corrections, seed, &dups, crashes, by_device)?;
    }

    /// A person erased once every shard is done with the events: no shard keeps a key
    /// or value of their identifiers, and the graph then, and after more events, is one
    /// instance's. Without crashes here; with them below.
    #[test]
    fn an_erasure_leaves_the_shards_as_one_instance(
        (specs, seed, _dups, _crashes, by_device, corrections) in cases(),
        erase in 0usize..64,
        after in later_events(),
    ) {
        check_erasure(&specs, &corrections, seed, erase, &after, 0, by_device)?;
    }

    /// The same with shards that crash (the cases it found and mended are in
    /// `cases.rs`; 3,000 release cases pass since versions are per component).
    #[test]
    fn an_erasure_with_crashes_leaves_the_shards_as_one_instance(
        (specs, seed, _dups, crashes, by_device, corrections) in cases(),
        erase in 0usize..64,
        after in later_events(),
    ) {
        check_erasure(&specs, &corrections, seed, erase, &after, crashes, by_device)?;
    }
}

mod cases;
mod cost;
