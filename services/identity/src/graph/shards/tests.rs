//! The graph partitioned into shards against one instance's: the same facts, with
//! duplicates, in any order and any interleaving of the shards' messages, end in the
//! same graph on 1, 2 and 4 shards as on one instance.

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
            Carried::Link(_) => unreachable!("one instance has no links"),
        }
        s.write(txn.into_batch()).unwrap();
    }
    (s, reported)
}

/// The shard an event arrives at: `by_device`, as ingest keys it, by its device (the
/// anonymous id) else its user id; otherwise at the owner of its highest-priority
/// identifier, where it is resolved.
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
        for s in 0..n {
            sim.start(s);
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
            Carried::Event(f) => shard.on_event(&mut txn, f).unwrap(),
            Carried::Correct(c) => shard.on_correction(&mut txn, c).unwrap(),
            Carried::Link(l) => shard.on_link(&mut txn, l).unwrap(),
        };
        self.store.write(txn.into_batch()).unwrap();
        self.pending[at as usize].add(h.resolved, h.changes);
        self.forwarded += usize::from(h.forward.is_some());
        let forwarded = h.forward.map(|to| (to, input));
        let sent = h.links.into_iter().map(|(to, l)| (to, Carried::Link(l)));
        for (to, c) in sent.chain(forwarded) {
            assert_ne!(to, at, "a shard never messages itself");
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
    specs
        .iter()
        .enumerate()
        .map(|(n, (person, pick, shared, t))| {
            let ids = world_ids(*person, *pick, *shared);
            Fact::new(rules, &ids, *t, &format!("m{n}"), "src", None)
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
        let differ: Vec<String> = one
            .iter()
            .filter(|(i, v)| got.get(*i) != Some(*v))
            .map(|(i, v)| {
                format!(
                    "{}: {:?} on {} shards, {:?} on one",
                    i.value,
                    got.get(i),
                    n,
                    v
                )
            })
            .collect();
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
    }
    Ok(())
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
}

/// A case the property found (seen failing before each mend): after a shard restarted,
/// an event of its waited on a gathering that no longer reached its identifier (the
/// fact connecting them not yet stored again), and a decision widened by an older copy
/// of a profile outranked the complete one, so an email stayed on its old profile.
#[test]
fn an_event_is_resolved_after_its_shard_crashed_mid_gathering() {
    let specs = [
        (2, 24, 0, 34),
        (1, 6, 0, 0),
        (1, 1, 0, 0),
        (2, 7, 0, 0),
        (1, 20, 0, 0),
        (1, 10, 1, 0),
        (1, 8, 0, 0),
        (2, 4, 0, 0),
        (3, 1, 0, 0),
        (1, 4, 2, 0),
        (0, 6, 0, 0),
        (0, 21, 0, 0),
        (1, 11, 0, 0),
        (3, 1, 0, 0),
        (2, 11, 0, 0),
        (1, 7, 0, 0),
        (3, 1, 0, 0),
        (1, 4, 0, 0),
        (1, 8, 0, 0),
        (1, 1, 0, 0),
        (0, 6, 0, 0),
    ];
    check(&specs, 6261033593323271166, &[], 1, false).unwrap();
}

/// A case the property found with the stale-decision rule off (it fails so, seen): a
/// shard applied a decision that missed a fact it held, and no later gathering
/// corrected it.
#[test]
fn a_decision_that_missed_a_fact_held_by_an_owner_is_gathered_again() {
    let specs = [
        (0, 1, 0, 0),
        (2, 1, 0, 0),
        (0, 1, 0, 0),
        (3, 7, 0, 17),
        (3, 9, 0, 0),
        (0, 7, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 21, 0, 0),
        (0, 7, 0, 0),
        (1, 1, 0, 0),
        (3, 8, 1, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
    ];
    check(&specs, 3464800567115381520, &[0, 0], 0, false).unwrap();
}

/// A case the property found once it checked what went downstream (seen failing
/// before the mend, without any crash): a shard resolved events on a profile that a
/// decision put its identifiers on, while the profile's anchor's owner had already
/// taken a newer decision and never held the anchor there. Only the anchor's owner
/// reported changes, so nobody reported that profile merged: downstream would have
/// kept it, with its events, for ever.
#[test]
fn a_profile_events_went_out_on_is_reported_merged_by_the_shard_that_used_it() {
    let specs = [
        (0, 1, 0, 0),
        (1, 3, 0, 0),
        (1, 3, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (1, 3, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 15, 0, 0),
        (0, 1, 0, 0),
        (0, 15, 0, 0),
        (0, 1, 0, 0),
        (0, 5, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (1, 3, 1, 0),
        (0, 1, 0, 0),
        (1, 10, 1, 0),
        (1, 2, 1, 0),
        (2, 13, 0, 0),
    ];
    check(&specs, 4709622948836839048, &[], 0, false).unwrap();
}

#[test]
fn a_fact_across_shards_is_decided_by_gathering_and_merges_once() {
    let rules = rules();
    // Find an anonymous id and a user id owned by different shards of two.
    let user = id("user_id", "u-1");
    let anon = (0..100)
        .map(|k| id("anonymous_id", &format!("a-{k}")))
        .find(|a| owner(a, 2) != owner(&user, 2))
        .unwrap();
    let facts = vec![
        Fact::new(&rules, std::slice::from_ref(&anon), 1, "m1", "src", None),
        Fact::new(&rules, std::slice::from_ref(&user), 2, "m2", "src", None),
        Fact::new(&rules, &[user.clone(), anon.clone()], 3, "m3", "src", None),
    ];
    let mut sim = Sim::new(&rules, 2, &events(&facts), 7, true);
    sim.run();
    let p = sim.lookup(&user).unwrap();
    assert_eq!(sim.lookup(&anon), Some(p.clone()));
    assert_eq!(p, profile_id_of(&user), "the user id anchors the profile");
    assert!(sim.links >= 3, "a fact, a question and an answer at least");
    let one = one_instance(&rules, &events(&facts));
    assert_eq!(graph_of_shards(&sim), graph_of_one(&one));
}

/// A merge decided by one shard carries a version above the merge clock of every owner
/// its gathering read: so a later merge of the same profiles (one back into a profile
/// merged away) has a larger version wherever it is decided, which is how profiles
/// knows which is live. Seen failing with the clocks not carried (version 1,000).
#[test]
fn a_merge_decided_by_one_shard_comes_after_the_merges_its_owners_saw() {
    let rules = rules();
    let user = id("user_id", "u-1");
    let anon = (0..100)
        .map(|k| id("anonymous_id", &format!("a-{k}")))
        .find(|a| owner(a, 2) != owner(&user, 2))
        .unwrap();
    let facts = vec![
        Fact::new(&rules, std::slice::from_ref(&anon), 1, "m1", "src", None),
        Fact::new(&rules, std::slice::from_ref(&user), 2, "m2", "src", None),
        Fact::new(&rules, &[user.clone(), anon.clone()], 3, "m3", "src", None),
    ];
    let mut sim = Sim::new(&rules, 2, &events(&facts), 7, true);
    // The anonymous id's owner has decided merges up to 5,000,000.
    let mut txn = Txn::new(&sim.store);
    txn.in_keyspace(&keyspace(owner(&anon, 2)), |t| {
        observe_merge_clock(t, 5_000_000)
    })
    .unwrap();
    sim.store.write(txn.into_batch()).unwrap();
    sim.run();
    let merges: Vec<&(String, i64)> = sim.reported.merged.values().collect();
    assert_eq!(merges.len(), 1, "{merges:?}");
    assert!(merges[0].1 > 5_000_000, "{merges:?}");
}

/// Not a test: what sharding costs on a shop's stream, in memory (`cargo test --release
/// -p tessera-identity --lib shards_cost -- --ignored --nocapture`). 20,000 people with
/// one to three devices each; 15 % identify (device, user id, email), 45 % track with the
/// user id once the device logged in, the rest anonymous; 3 % of events arrive late.
/// Events arrive at their device's shard, as ingest keys them. Prints, for 1, 2 and 4
/// shards: the messages between shards per event, the shares of events forwarded to the
/// owner of their user id and of events that gathered, and the time per event of all
/// shards together (one thread).
#[test]
#[ignore]
fn shards_cost() {
    let rules = rules();
    let people = 20_000u64;
    let events = 200_000u64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut logged_in: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut facts = Vec::new();
    for n in 0..events {
        let p = next() % people;
        let d = next() % (1 + p % 3);
        let anon = id("anonymous_id", &format!("a-{p}-{d}"));
        let user = id("user_id", &format!("u-{p}"));
        let roll = next() % 100;
        let ids = if roll < 15 {
            logged_in.insert((p, d));
            vec![anon, user, id("email", &format!("p{p}@mail.test"))]
        } else if roll < 60 && logged_in.contains(&(p, d)) {
            vec![anon, user]
        } else {
            vec![anon]
        };
        let late = next() % 100 < 3;
        let t = n as i64 - if late { (next() % 5_000) as i64 } else { 0 };
        facts.push(Fact::new(&rules, &ids, t, &format!("m{n}"), "src", None));
    }
    let distinct: BTreeSet<&str> = facts
        .iter()
        .filter(|f| f.ids.len() > 1)
        .map(|f| f.key.as_str())
        .collect();
    println!(
        "{events} events, {} of them with several identifiers, {} distinct such facts",
        facts.iter().filter(|f| f.ids.len() > 1).count(),
        distinct.len()
    );
    for shards in [1u32, 2, 4] {
        let mut sim = Sim::new(&rules, shards, &[], 1, true);
        let started = std::time::Instant::now();
        let mut gathered = 0usize;
        for f in facts.iter().cloned().map(Carried::Event) {
            let at = arrival(&f, shards, true);
            let before = sim.links - sim.forwarded;
            sim.events[at as usize].push_back(f);
            sim.run();
            gathered += usize::from(sim.links - sim.forwarded > before);
        }
        let per_event = started.elapsed().as_secs_f64() * 1e6 / events as f64;
        println!(
            "{shards} shards: {:.2} messages per event, {:.1} % of events forwarded, {:.1} % gathered, {per_event:.1} µs per event",
            sim.links as f64 / events as f64,
            100.0 * sim.forwarded as f64 / events as f64,
            100.0 * gathered as f64 / events as f64,
        );
    }
}

/// A case 1,000 cases of the property found (seen failing before the mend): a decision
/// missed a fact, and the gathering that its staleness joined (one that had read the
/// identifier as it was, through a profile's copy) decided only what its own start's
/// facts connect, so nothing placed the identifier again and a device kept no profile.
#[test]
fn a_stale_identifier_its_covering_gathering_does_not_place_is_gathered_again() {
    let specs = [
        (3, 3, 0, 0),
        (3, 17, 1, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (3, 5, 0, 0),
        (0, 10, 0, 0),
        (0, 21, 0, 0),
        (0, 19, 0, 0),
    ];
    check(&specs, 12640416073686967280, &[], 1, true).unwrap();
}

/// A case 3,000 cases of the property found against a first mend of the one above,
/// which added the stale identifiers to the covering gathering's start (seen failing
/// so): that decision, widened through a copy of a profile older than the facts, took
/// a shared device to the wrong person with a version no complete decision of its
/// smaller part could outrank.
#[test]
fn a_joined_identifier_does_not_widen_the_covering_decision() {
    let specs = [
        (1, 22, 0, 0),
        (0, 9, 0, 0),
        (2, 16, 0, 0),
        (0, 20, 0, 0),
        (3, 4, 1, 0),
        (2, 21, 0, 0),
        (1, 15, 0, 0),
        (1, 16, 2, 0),
        (0, 15, 1, 0),
        (2, 20, 0, 0),
        (0, 8, 0, 0),
        (3, 12, 0, 0),
        (3, 8, 0, 0),
        (0, 8, 0, 0),
    ];
    check(&specs, 2675605035113660702, &[4, 9, 10], 1, true).unwrap();
}

/// A case 3,000 cases of the property found, with a crash (seen failing before the
/// mend): a decision kept a profile for identifiers whose owners skipped it (they held
/// a newer decision), so the shard that moved its own identifiers off that profile
/// took it to live on, nobody held it at the end, and nobody reported it. What leaves a
/// kept profile it did not know of is now reported split off.
#[test]
fn a_profile_kept_only_by_a_decision_its_owners_skip_is_reported() {
    let specs = [
        (1, 27, 2, 0),
        (1, 16, 2, 20),
        (2, 7, 0, 0),
        (2, 14, 0, 0),
        (2, 15, 0, 0),
        (3, 19, 2, 0),
        (0, 23, 0, 0),
        (0, 9, 0, 0),
        (3, 8, 1, 0),
        (2, 15, 0, 0),
        (0, 11, 0, 0),
        (0, 4, 0, 0),
        (1, 16, 1, 0),
        (0, 1, 0, 0),
        (0, 12, 1, 0),
        (0, 1, 0, 0),
        (1, 14, 1, 1),
        (3, 27, 1, 0),
    ];
    check(&specs, 4193996545047964788, &[12, 1, 11, 2, 17], 1, true).unwrap();
}

/// A case 3,000 cases of the property found without any crash: late events move a
/// part's anchor away and back, so X is reported merged into Y and later Y into X, and
/// an event that went out on Y ends on X (split at the end). Following the merges as
/// profiles did then looped; merges now carry versions and a cycle ends at its oldest
/// merge's profile, in profiles and in this check (seen failing before the versions).
#[test]
fn an_event_on_a_profile_merged_away_and_back_is_followed_to_where_it_lives() {
    let specs = [
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (2, 16, 2, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (1, 3, 2, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 6, 0, 1),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 21, 0, 0),
        (0, 28, 2, 1),
        (0, 21, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (1, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (1, 9, 0, 0),
    ];
    check(&specs, 16912361263159680940, &[12, 0, 0], 0, false).unwrap();
}

/// An un-merge naming an identifier no event carried (here the family email): one
/// instance gives it a profile of its own, with the separation.
#[test]
fn an_unmerge_naming_an_identifier_never_seen_places_it_as_one_instance_does() {
    let specs = [
        (0, 1, 0, 0),
        (1, 4, 0, 0),
        (0, 3, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 11, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (2, 17, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (0, 18, 1, 0),
    ];
    check_with(
        &specs,
        &[(1, 1, 5)],
        10098161647709116162,
        &[0, 0, 0, 0, 0],
        0,
        false,
    )
    .unwrap();
}
