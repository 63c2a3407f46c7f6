//! The graph partitioned by identifier: each of `n` shards owns the identifiers that
//! hash to it, and shards talk only through [`Link`] messages (in the service, records
//! of `identity.links` keyed to the owner's partition). Built and proven in memory here
//! (`tests/`; gathering in `gather.rs`, deciding and applying in `decide.rs`); not
//! yet wired into the service (issue 22).
//!
//! **What a shard holds**, in its own keyspace of its instance's store ([`keyspace`]:
//! an instance holds several shards, one per partition). For each identifier it owns:
//! its facts (`fact/`, `if/`), its first sighting (`seen/`), its profile (`id/`) and a
//! copy of that profile's node (`pr/`), and two counters: `gen/<h>`, bumped whenever
//! something the graph is computed from changes for it (a new fact, an earlier
//! sighting), and `ver/<h>`, the version of the last decision applied to it.
//!
//! **How a fact is applied.** An event is resolved by the shard of its highest-priority
//! identifier; one that arrives elsewhere (ingest keys events by userId, else device)
//! is forwarded there whole ([`Handled::forward`]). If every identifier the fact needs
//! is owned there (its identifiers and, for a fact in order, the members of the
//! profiles it touches; for a late fact, its whole connected part), the shard applies
//! it as one instance does ([`Graph::add_fact`]). Otherwise the shard stores what it
//! owns of the fact, sends the fact to the owners of its other identifiers, and
//! **gathers** the connected part: it asks each owner for everything about its
//! identifiers ([`Entry`]), follows the facts to identifiers not yet gathered, and when
//! nothing is left unanswered recomputes the part with the graph's own rules
//! ([`Graph::recompute`] on a scratch store). The result, a [`Decision`], goes to every
//! owner of the part.
//!
//! **The invariants that make it converge.**
//! 1. The graph is a function of the set of facts and sightings (graph/mod.rs), so a
//!    decision computed from a part's complete inputs is the one instance's result.
//! 2. An owner applies a decision only if it saw every input the owner holds for the
//!    owner's identifiers (`gen` no higher than the decision's); otherwise it gathers the
//!    part again itself (or joins a gathering of its own still running that read those
//!    identifiers as they are now). A fact sent to an owner reaches it before the
//!    sender's question about it (one producer, one partition: Kafka keeps the order).
//! 3. Inputs only grow, so a decision's version (the sum of the `gen`s it saw) is
//!    largest for a complete gathering, and an identifier never takes a decision older
//!    than the one it holds. The last gathering started after the last input reads every
//!    input; the owner that holds an input a decision lacks starts one. So once inputs
//!    stop, every identifier ends on a complete decision: the graph of one instance.
//!
//! In between, a reader may see an identifier on a decision made without a fact still
//! in flight, as one instance shows a late event's part before its recomputation.
//!
//! **Corrections** ([`Correction`]: un-merge, detach) are inputs too: the owner of the
//! first identifier stores what it owns (a separation, a detached flag) and sends a
//! separation to the other sides' owners ([`Link::Separate`]), each bumping its
//! identifiers' `gen`; then it gathers the part around them. A gathering follows an
//! un-merge's sides as it follows facts, and its decision places them all, as one
//! instance's un-merge does.
//!
//! **Erasure** (`erase.rs`, [`Correction::Erase`]) removes inputs, which invariant 3
//! does not allow for: a decision's version therefore starts with the number of
//! erasures its part went through, so the decisions after an erasure outrank those
//! before it. Each shard names what it removed ([`Handled::erased`]): the profiles it
//! knew of the person and the ingest subjects of the events their identifiers
//! resolved there (noted with the identifier, at its owner), whose keys the service
//! destroys; it sends the same to the shard that gathered the erasure, which reports
//! the request once every shard has answered ([`Handled::report`]).
//!
//! **A shard that stops** goes back to its last commit and consumes again what it had
//! consumed since (the runner's contract); what it sent meanwhile stays sent. Every
//! message may so arrive twice: a fact stored twice is stored once, a decision applied
//! twice changes nothing the second time, and an answer to a gathering the restart
//! undid reaches none (a gathering's id holds the epoch). A gathering is state in
//! the store, so it resumes with its shard. Two more things keep rule 3 true across a
//! restart: a `gen` carries the shard's epoch in its high half, so one counted again
//! after a restart is higher than any sent before it ([`Shard::start`] raises and
//! stores the epoch, committed before the shard handles anything); and a decision
//! recomputes only what the gathered facts connect (a profile's copy may be older than
//! the facts), so no decision holds more than a complete one.
//!
//! **What goes downstream.** An event goes out on its identifier's profile as its owner
//! holds it. So a shard that moves one of its identifiers off a profile reports what
//! became of that profile (merged, split), from the decision's changes or, for a profile
//! the decision's gathering did not see, from where the decision puts its members:
//! otherwise a profile that events went out on could vanish unreported. Several shards
//! may report one change; they report the same record (its id comes from the
//! decision), which downstream applies once. A merge's version comes from the merge
//! clock of the shard that decides it; answers ([`Link::Tell`]) and decisions carry
//! their sender's clock and raise the receiver's, so a later merge of the same profiles
//! (one back into a profile merged away) has a larger version wherever it is decided,
//! which is how profiles knows which of them is live.

mod decide;
mod erase;
mod gather;
#[cfg(test)]
mod tests;

use super::*;
pub use erase::{ErasedHere, Erasure, ErasureReport};
use erase::{GEN_FLOOR, merged_from_prefix};

/// Which of `n` shards owns an identifier.
pub fn owner(i: &Identifier, n: u32) -> u32 {
    let h = ident_hash(i);
    let head = u32::from_str_radix(h.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    head % n.max(1)
}

/// An identifier's `gen`: its counter, but never below the shard's erasure floor, so a
/// decision gathered before an erasure is stale for every identifier it erased here
/// (an erased identifier has no counter left, and a decision would otherwise place it
/// again) and for any seen again after it.
fn generation(txn: &Txn<'_>, i: &Identifier) -> Result<u64> {
    Ok(get_num::<u64>(txn, &gen_key(i))?.max(get_num(txn, GEN_FLOOR)?))
}

fn gen_key(i: &Identifier) -> Vec<u8> {
    format!("gen/{}", ident_hash(i)).into_bytes()
}
fn ver_key(i: &Identifier) -> Vec<u8> {
    format!("ver/{}", ident_hash(i)).into_bytes()
}
/// How many erasures changed the part an identifier is in (as far as the decisions it
/// took know): a decision's version starts with the largest its gathering read, so a
/// part recomputed after an erasure (fewer inputs, a smaller sum of `gen`s) outranks
/// every decision made before it.
fn vep_key(i: &Identifier) -> Vec<u8> {
    format!("vep/{}", ident_hash(i)).into_bytes()
}
/// The latest gathering of this shard that read an identifier, and the `gen` it read;
/// removed when that gathering ends.
fn gat_key(i: &Identifier) -> Vec<u8> {
    format!("gat/{}", ident_hash(i)).into_bytes()
}
/// The ingest subjects of the events an identifier was the highest-priority one of
/// (on shards an event's subject is noted with the identifier that resolves it, at its
/// owner, not under a profile another shard may hold).
fn identifier_subjects_prefix(i: &Identifier) -> String {
    format!("sji/{}/", ident_hash(i))
}
fn note_identifier_subject(txn: &mut Txn<'_>, i: &Identifier, subject: &str) -> Result<()> {
    let key = format!("{}{subject}", identifier_subjects_prefix(i)).into_bytes();
    if txn.get(&key)?.is_none() {
        txn.put(key, Vec::new());
    }
    Ok(())
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
    /// The answer, with the owner's merge clock.
    Tell {
        gathering: String,
        entries: Vec<Entry>,
        #[serde(default)]
        clock: i64,
    },
    /// A recomputed part, for every owner of its identifiers.
    Decide(Decision),
    /// An un-merge's separation, for the owner of some of its identifiers.
    Separate(Separation),
    /// A person erased, for every shard (the one that gathered it too).
    Erase(Erasure),
    /// What one shard removed of an erased person, for the shard that gathered the
    /// erasure: it reports the request once every shard has answered.
    Erased(ErasedHere),
}

/// A correction (graph/corrections.rs), handled at the owner of its first identifier as
/// a new input: the owners of its identifiers store it, and the part around them is
/// gathered and decided as for a fact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Correction {
    /// Un-merge: no profile holds identifiers of both sides from now on. The sides come
    /// with the command (a shard holds a merge's record only if it reported it).
    Unmerge {
        merge_id: String,
        left: Vec<Identifier>,
        right: Vec<Identifier>,
        at: (i64, String),
    },
    /// An identifier taken out of its profile: it never links to anything again.
    Detach { id: Identifier, at: (i64, String) },
    /// The person whose identifier this is erased (a privacy request's delete).
    Erase { id: Identifier, request: String },
}

impl Correction {
    /// The identifier whose owner handles it.
    pub fn first(&self) -> Option<&Identifier> {
        match self {
            Correction::Unmerge { left, right, .. } => left.first().or(right.first()),
            Correction::Detach { id, .. } | Correction::Erase { id, .. } => Some(id),
        }
    }
}

/// What an owner holds about one of its identifiers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: Identifier,
    pub generation: u64,
    /// Erasures its part went through (see `vep_key`).
    #[serde(default)]
    pub erasures: u64,
    pub seen: Option<Seen>,
    pub detached: bool,
    pub facts: Vec<Fact>,
    pub separations: Vec<Separation>,
    pub profile: Option<String>,
    pub node: Option<Node>,
}

/// An identifier a decision places.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placed {
    pub id: Identifier,
    /// Its `gen` as the gathering saw it.
    pub generation: u64,
    pub profile: String,
    /// The version of its component in the decision: the erasures it went through
    /// (high bits), then the sum of its identifiers' `gen`s. A component's inputs only
    /// grow between erasures, so a later decision of it has a larger version. Versions
    /// are per component, not per decision: a decision that spans several parts (after
    /// an erasure) would otherwise outrank a later decision of one of them.
    pub version: u128,
}

/// A part of the graph recomputed from the inputs a gathering saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The fact whose gathering made it: what merges name as their cause.
    pub cause: Fact,
    /// Each identifier of the part: the `gen` seen, its profile now, its version.
    pub placed: Vec<Placed>,
    pub nodes: Vec<Node>,
    /// Profiles of the part that no longer exist.
    pub gone: Vec<String>,
    /// Merges and splits (profile, where its identifiers went) of the part's profiles.
    pub merges: Vec<ProfileMerge>,
    pub splits: Vec<(String, Vec<(Identifier, String)>)>,
    /// The profile each merged-away profile now follows (`mergedinto/`).
    pub merged_into: Vec<(String, String)>,
    pub merge_infos: Vec<MergeInfo>,
    /// The gatherer's merge clock after deciding: owners that apply it raise theirs, so
    /// a later merge of the part carries a larger version wherever it is decided.
    #[serde(default)]
    pub clock: i64,
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
    /// Identifiers a decision found stale that joined this gathering, which had read
    /// them as they are ([`Shard::gather_again`]).
    #[serde(default)]
    joined: Vec<Identifier>,
    /// The largest merge clock of the owners that answered.
    #[serde(default)]
    clock: i64,
    /// Gathered to erase this profile's person, not to decide.
    #[serde(default)]
    erase: Option<String>,
}

/// What handling one input gave.
#[derive(Debug, Default)]
pub struct Handled {
    /// Messages for other shards (or this one), by shard.
    pub links: Vec<(u32, Link)>,
    /// Events resolved: message id and profile.
    pub resolved: Vec<(String, String)>,
    pub changes: Changes,
    /// The shard an event arrived at does not own its highest-priority identifier: the
    /// event goes whole to this shard, which resolves it.
    pub forward: Option<u32>,
    /// What this shard removed of an erased person: the service destroys the keys of
    /// these subjects and profiles (each shard its own; destroying a key twice is
    /// destroying it once).
    pub erased: Option<ErasedHere>,
    /// An erasure done on every shard, at the shard that gathered it.
    pub report: Option<ErasureReport>,
}

/// Where shard `me` keeps its state in its instance's store: an instance holds several
/// shards (a partition each) in one store, and each shard's keys are its own (its copies
/// of profiles are not another shard's).
pub fn keyspace(me: u32) -> Vec<u8> {
    format!("shard/{me}/").into_bytes()
}
const EPOCH: &[u8] = b"epoch";

/// One shard of the graph, in its keyspace of its instance's store.
pub struct Shard<'r> {
    pub graph: Graph<'r>,
    pub me: u32,
    pub n: u32,
    /// How many times this shard started; raised and committed at each start.
    pub epoch: u64,
}

impl<'r> Shard<'r> {
    /// Shard `me` of `n`, at the epoch its last start stored.
    pub fn open(graph: Graph<'r>, me: u32, n: u32, txn: &mut Txn<'_>) -> Result<Self> {
        let epoch = txn.in_keyspace(&keyspace(me), |t| get_num::<u64>(t, EPOCH))?;
        Ok(Shard {
            graph,
            me,
            n,
            epoch,
        })
    }

    /// Shard `me` of `n` starting (a restart, or its partition assigned here): its epoch
    /// is raised, and the caller commits that before the shard handles anything. Every
    /// `gen` the shard counts from then on is higher than any it sent before.
    pub fn start(graph: Graph<'r>, me: u32, n: u32, txn: &mut Txn<'_>) -> Result<Self> {
        let epoch = txn.in_keyspace(&keyspace(me), |t| {
            let e = get_num::<u64>(t, EPOCH)? + 1;
            t.put(EPOCH.to_vec(), e.to_string().into_bytes());
            Ok::<_, tessera_common::Error>(e)
        })?;
        Ok(Shard {
            graph,
            me,
            n,
            epoch,
        })
    }

    /// An event that arrived at this shard (its partition), with its ingest subject
    /// (its record's key). It is resolved by the owner of its highest-priority
    /// identifier: if that is another shard, [`Handled::forward`] names it, and the
    /// event goes there whole. The owner notes the subject under that identifier: an
    /// erasure of the person it belongs to destroys the subject's key.
    pub fn on_event(
        &self,
        txn: &mut Txn<'_>,
        fact: Fact,
        subject: Option<&str>,
    ) -> Result<Handled> {
        let Some(top) = fact.ids.first().cloned() else {
            return Ok(Handled::default());
        };
        if !self.owns(&top) {
            return Ok(Handled {
                forward: Some(owner(&top, self.n)),
                ..Handled::default()
            });
        }
        txn.in_keyspace(&keyspace(self.me), |t| {
            if let Some(s) = subject {
                note_identifier_subject(t, &top, s)?;
            }
            self.resolve(t, fact)
        })
    }

    /// A correction that arrived at this shard; one whose first identifier another
    /// shard owns goes there whole ([`Handled::forward`]).
    pub fn on_correction(&self, txn: &mut Txn<'_>, c: Correction) -> Result<Handled> {
        let Some(first) = c.first() else {
            return Ok(Handled::default());
        };
        if !self.owns(first) {
            return Ok(Handled {
                forward: Some(owner(first, self.n)),
                ..Handled::default()
            });
        }
        txn.in_keyspace(&keyspace(self.me), |t| self.correct(t, c))
    }

    /// A message from a shard.
    pub fn on_link(&self, txn: &mut Txn<'_>, link: Link) -> Result<Handled> {
        txn.in_keyspace(&keyspace(self.me), |t| self.on_link_here(t, link))
    }
}

impl Shard<'_> {
    fn owns(&self, i: &Identifier) -> bool {
        owner(i, self.n) == self.me
    }

    /// A `gen` only grows, across restarts too: a shard that restarts goes back to its
    /// last commit, and a `gen` it had sent since would otherwise be counted again to a
    /// different value. So the high half is the shard's epoch (how often it started).
    fn bump(&self, txn: &mut Txn<'_>, i: &Identifier) -> Result<()> {
        let cur = generation(txn, i)?;
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
    fn resolve(&self, txn: &mut Txn<'_>, fact: Fact) -> Result<Handled> {
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
            // A known fact stored again with an earlier order changes no index here,
            // and needs no bump: a gathering places an identifier only through a fact
            // that reaches it, which its owner holds, so a part any gathering read
            // crosses shards and takes the gathering path below.
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

    /// Stores what this shard owns of a separation; bumps the `gen` of each owned
    /// identifier it is new to.
    fn store_separation(&self, txn: &mut Txn<'_>, sep: &Separation) -> Result<()> {
        // The merge's record, where this shard keeps it (it reported the merge: it owns
        // an identifier of the merged side, so the separation reaches it).
        if let Some(m) = &sep.merge
            && let Some(mut info) = txn.get_json::<MergeInfo>(&merge_info_key(m))?
            && !info.undone
        {
            info.undone = true;
            txn.put_json(merge_info_key(m), &info)?;
        }
        let mine: Vec<&Identifier> = sep
            .left
            .iter()
            .chain(&sep.right)
            .filter(|i| self.owns(i))
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        txn.put_json(sep_key(&sep.id), sep)?;
        for i in mine {
            let k = format!("{}{}", sepidx_prefix(i), sep.id).into_bytes();
            if txn.get(&k)?.is_none() {
                txn.put(k, Vec::new());
                self.bump(txn, i)?;
            }
        }
        Ok(())
    }

    /// A correction at the owner of its first identifier: stored as an input where its
    /// identifiers are owned, and the part around them gathered.
    fn correct(&self, txn: &mut Txn<'_>, c: Correction) -> Result<Handled> {
        let mut out = Handled::default();
        let (start, cause) = match c {
            Correction::Unmerge {
                merge_id,
                left,
                right,
                at,
            } => {
                let sep = Separation {
                    id: deterministic_id("separation", &[&merge_id]),
                    left,
                    right,
                    merge: Some(merge_id),
                };
                self.store_separation(txn, &sep)?;
                let ids: Vec<Identifier> = sep.left.iter().chain(&sep.right).cloned().collect();
                let mut others: BTreeSet<u32> = ids.iter().map(|i| owner(i, self.n)).collect();
                others.remove(&self.me);
                for o in others {
                    out.links.push((o, Link::Separate(sep.clone())));
                }
                (
                    ids,
                    Fact::new(self.graph.rules, &[], at.0, &at.1, "unmerge", None),
                )
            }
            Correction::Erase { id, request } => {
                self.start_erasure(txn, id, &request, &mut out)?;
                return Ok(out);
            }
            Correction::Detach { id, at } => {
                if txn.get(&detached_key(&id))?.is_none() {
                    txn.put(detached_key(&id), Vec::new());
                    self.bump(txn, &id)?;
                }
                (
                    vec![id],
                    Fact::new(self.graph.rules, &[], at.0, &at.1, "detach", None),
                )
            }
        };
        self.gather(txn, start, cause, Vec::new(), &mut out)?;
        Ok(out)
    }

    fn on_link_here(&self, txn: &mut Txn<'_>, link: Link) -> Result<Handled> {
        let mut out = Handled::default();
        match link {
            Link::Fact(f) => self.store_owned(txn, &f)?,
            Link::Separate(sep) => self.store_separation(txn, &sep)?,
            Link::Erase(e) => self.on_erasure(txn, &e, &mut out)?,
            Link::Erased(piece) => self.on_erased(txn, piece, &mut out)?,
            Link::Ask {
                gathering,
                from,
                ids,
            } => {
                let entries = self.closure(txn, &ids)?;
                let clock = merge_clock(txn)?;
                out.links.push((
                    from,
                    Link::Tell {
                        gathering,
                        entries,
                        clock,
                    },
                ));
            }
            Link::Tell {
                gathering,
                entries,
                clock,
            } => {
                let Some(mut g) = txn.get_json::<Gathering>(&gathering_key(&gathering))? else {
                    return Ok(out); // answered twice (a replay): already decided
                };
                g.clock = g.clock.max(clock);
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
}
