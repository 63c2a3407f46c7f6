//! The profiles processor: applies resolved events, merges and transfers to profiles in
//! RocksDB, evaluates segments on every change and emits membership changes.
//!
//! Keys: `p/<id>` profile JSON; `redirect/<id>` → survivor of a merge; `idx/<identifier
//! hash>` → profile id (for lookups); `segsize/<segment>` → member count; `sm/<segment>/<id>`
//! → entry time (the members); `tm/<due>/<id>` → a profile's timer (its next window
//! edge); `seen/<id>` and `seenexp/<expiry>/<id>` → de-duplication of message, merge and
//! transfer ids within the window; `meta/applied` → the definition versions in force,
//! `meta/backfill` → the back-fill in progress, `meta/profiles` → the profile count.
//!
//! Definitions change at run time (see `catalog`): the processor notices a new catalog
//! generation, records the versions it now applies and starts a back-fill, a pass over
//! every profile on the tick that rebuilds stale computed traits from the kept history
//! and re-evaluates the segments, emitting enter and exit records.
//!
//! Merges across partitions: a merge record arrives keyed by the merged profile, where
//! its state lives. That state leaves as a transfer keyed by the survivor and is
//! absorbed there; the merged id becomes a redirect, and events still in flight for it
//! are forwarded the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use tracing::debug;

use tessera_common::admin::Admin;
use tessera_common::ids::deterministic_id;
use tessera_common::records::{
    AvroRecord, Identifier, MembershipChange, PrivacyAction, ProfileMerge, ProfileSplit,
    ProfileTransfer, ResolvedEvent, TriggerFired,
};
use tessera_common::runner::{self, Message, Output, Ownership, Processor};
use tessera_common::store::{Store, Txn};
use tessera_common::topics::Topics;
use tessera_common::{Error, Result};

use crate::catalog::{Catalog, DefinitionSet};
use crate::profile::{ApplyRules, Membership, Profile};
use crate::segments::Touched;
use crate::triggers;

pub fn profile_key(id: &str) -> Vec<u8> {
    format!("p/{id}").into_bytes()
}
pub(crate) fn redirect_key(id: &str) -> Vec<u8> {
    format!("redirect/{id}").into_bytes()
}
/// By the identifier's hash, never its value: a value in a key would outlive the
/// person's erasure in RocksDB's MANIFEST (it keeps every table file's first and last key).
pub fn index_key(kind: &str, value: &str) -> Vec<u8> {
    format!(
        "idx/{}",
        tessera_common::suppressions::identifier_hash(kind, value)
    )
    .into_bytes()
}
/// A segment's members in one partition (the API adds up the partitions it serves).
pub fn segment_size_key(segment: &str, partition: i32) -> Vec<u8> {
    format!("segsize/{segment}/{partition:05}").into_bytes()
}
/// Profiles in one partition.
pub fn profiles_count_key(partition: i32) -> Vec<u8> {
    format!("meta/profiles/{partition:05}").into_bytes()
}
/// Members of a segment: `sm/<segment>/<profile>` → entry time.
pub fn member_key_prefix(segment: &str) -> String {
    format!("sm/{segment}/")
}
/// A profile's next window edge or trigger, under its partition: an instance fires the
/// timers of the partitions it serves, and those a moved partition left here wait for
/// it to come back (by then replaying its records has brought them up to date).
fn timer_key(partition: i32, due: i64, id: &str) -> Vec<u8> {
    format!("{}{:020}/{id}", timer_prefix(partition), due.max(0)).into_bytes()
}
fn timer_prefix(partition: i32) -> String {
    format!("tm/{partition:05}/")
}
pub const META_BACKFILL: &[u8] = b"meta/backfill";
const META_APPLIED: &[u8] = b"meta/applied";
/// Timers and back-fill take at most this long of each tick (every 250 ms), so live
/// events keep flowing while a million timers fire or a back-fill runs; what is left
/// waits for the next tick. Due timers go first.
const TICK_BUDGET: Duration = Duration::from_millis(100);
/// Timers read per scan, profiles per back-fill chunk.
const TIMERS_PER_SCAN: usize = 1000;
const BACKFILL_CHUNK: usize = 200;

/// A pass over every profile after definitions changed.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Backfill {
    pub id: String,
    /// `<kind>/<id> v<version>` (or `deleted`) of each change it brings in.
    pub definitions: Vec<String>,
    /// The last profile id done.
    pub cursor: Option<String>,
    pub scanned: u64,
    /// Profiles when it started.
    pub total: u64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}
/// Events of a profile in event-time order (the sign bit flipped so that the decimal
/// order is the numeric order).
fn log_key(profile: &str, t: i64, msg: &str) -> Vec<u8> {
    format!("log/{profile}/{:020}/{msg}", (t ^ i64::MIN) as u64).into_bytes()
}
fn log_prefix(profile: &str) -> String {
    format!("log/{profile}/")
}
fn log_count_key(profile: &str) -> Vec<u8> {
    format!("logn/{profile}").into_bytes()
}
/// Members of a household (`hh`) or an account (`acct`): `<kind>/<hash>/<profile>`.
pub fn member_prefix(kind: &str, group: &str) -> String {
    format!("{kind}/{}/", deterministic_id(kind, &[group]))
}
fn seen_key(id: &str) -> Vec<u8> {
    format!("seen/{id}").into_bytes()
}
const SEEN_EXP_PREFIX: &str = "seenexp/";

/// Follows merge redirects to the live profile id (bounded: chains are short).
pub fn live_id(get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>>, id: &str) -> Result<String> {
    let mut cur = id.to_string();
    for _ in 0..32 {
        match get(&redirect_key(&cur))? {
            Some(next) => cur = String::from_utf8_lossy(&next).into_owned(),
            None => return Ok(cur),
        }
    }
    Err(Error::Invalid(format!(
        "redirect chain from profile {id} is too long"
    )))
}

/// Which profiles this instance acts on. Every input of profiles is keyed by profile id
/// and has as many partitions as `events.resolved`; the range assignor gives an
/// instance the same partition numbers of each. So a profile belongs to the partition
/// its id hashes to ([`tessera_common::kafka::partition_of`]), and this instance owns
/// it while it owns that partition of `events.resolved`.
#[derive(Clone)]
pub struct Placement {
    pub topic: String,
    pub partitions: i32,
    /// `None`: one instance that owns everything (unit tests, tools).
    pub ownership: Option<Ownership>,
}

impl Placement {
    /// A single instance that owns every profile.
    pub fn everything() -> Placement {
        Placement {
            topic: String::new(),
            partitions: 1,
            ownership: None,
        }
    }

    pub fn partition(&self, id: &str) -> i32 {
        tessera_common::kafka::partition_of(id.as_bytes(), self.partitions)
    }

    /// Whether this instance owns the profile's partition (assigned, maybe rebuilding).
    pub fn owns(&self, id: &str) -> bool {
        self.ownership
            .as_ref()
            .is_none_or(|o| o.owns(&self.topic, self.partition(id)))
    }

    /// The partitions this instance serves: assigned and caught up.
    pub fn serving(&self) -> Vec<i32> {
        match &self.ownership {
            None => (0..self.partitions).collect(),
            Some(o) => o.serving(&self.topic),
        }
    }

    /// Whether the profile's partition is served here (its state is current).
    pub fn serves(&self, id: &str) -> bool {
        self.ownership
            .as_ref()
            .is_none_or(|o| o.serves(&self.topic, self.partition(id)))
    }
}

/// The sum of a per-partition counter over `partitions`.
pub fn sum_partitions(
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>>,
    partitions: &[i32],
    key: impl Fn(i32) -> Vec<u8>,
) -> Result<i64> {
    let mut total = 0;
    for p in partitions {
        if let Some(v) = get(&key(*p))? {
            total += serde_json::from_slice::<i64>(&v)?;
        }
    }
    Ok(total)
}

#[derive(Clone)]
pub struct ProfilesMetrics {
    pub applied: IntCounter,
    pub timers: IntCounter,
    pub backfilled: IntCounter,
    pub splits: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub membership: IntCounterVec,
    pub triggers: IntCounterVec,
    pub event_latency: Histogram,
    pub erased_dropped: IntCounter,
}

impl ProfilesMetrics {
    pub fn new(admin: &Admin) -> Self {
        ProfilesMetrics {
            erased_dropped: admin.register(
                &IntCounter::new(
                    "tessera_profiles_erased_records_dropped_total",
                    "Records about an erased person that were sent before the erasure and \
                     arrived after it, dropped",
                )
                .unwrap(),
            ),
            splits: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_profiles_splits_total",
                        "Profiles re-derived after an identity split; complete=false when \
                         the profile had more events than its kept history",
                    ),
                    &["complete"],
                )
                .unwrap(),
            ),
            applied: admin.register(
                &IntCounter::new(
                    "tessera_profiles_events_applied_total",
                    "Events applied to a profile",
                )
                .unwrap(),
            ),
            timers: admin.register(
                &IntCounter::new(
                    "tessera_profiles_timers_fired_total",
                    "Profiles re-evaluated because a windowed value left its window",
                )
                .unwrap(),
            ),
            backfilled: admin.register(
                &IntCounter::new(
                    "tessera_profiles_backfilled_profiles_total",
                    "Profiles re-evaluated by a back-fill after a definition change",
                )
                .unwrap(),
            ),
            duplicates: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_profiles_duplicates_dropped_total",
                        "Records dropped as already seen within the window",
                    ),
                    &["kind"],
                )
                .unwrap(),
            ),
            membership: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_profiles_membership_changes_total",
                        "Segment enter/exit records emitted",
                    ),
                    &["segment", "change"],
                )
                .unwrap(),
            ),
            triggers: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_profiles_triggers_total",
                        "Trigger outcomes: started (waiting), cancelled, fired",
                    ),
                    &["trigger", "outcome"],
                )
                .unwrap(),
            ),
            event_latency: admin.register(
                &Histogram::with_opts(
                    HistogramOpts::new(
                        "tessera_profiles_event_latency_seconds",
                        "From ingest accepting an event to its profile update",
                    )
                    .buckets(vec![
                        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                    ]),
                )
                .unwrap(),
            ),
        }
    }
}

pub struct ProfilesProcessor {
    pub topics: Topics,
    /// Definitions as the table reader last saw them; installed into `rules.defs`.
    pub catalog: Catalog,
    /// Timeline length, trait strategies and the definitions in force.
    pub rules: ApplyRules,
    /// Whether `rules.defs` was checked against the stored versions since start.
    pub synced: bool,
    /// The wall clock (windows are relative to it); a fixed one in tests.
    pub clock: fn() -> i64,
    /// Events kept per profile to re-derive it after a split.
    pub history_limit: usize,
    pub dedup_window_ms: i64,
    pub metrics: ProfilesMetrics,
    /// Profiles changed by the batch, announced to live readers after commit.
    pub changes: crate::live::Changes,
    /// Which profiles are this instance's to act on.
    pub placement: Placement,
}

/// A profile's state on the transfer topic, with its kept events.
#[derive(serde::Serialize, serde::Deserialize)]
struct Moved {
    #[serde(flatten)]
    profile: Profile,
    #[serde(default)]
    history: Vec<ResolvedEvent>,
    /// Set by a split: the survivor id is live again (its redirect goes).
    #[serde(default)]
    revive: bool,
}

/// Keeps the household and account member indexes in step with a profile.
fn index_groups(
    txn: &mut Txn<'_>,
    id: &str,
    before: (Option<String>, BTreeSet<String>),
    p: &Profile,
) {
    let (household, accounts) = before;
    if household != p.household {
        if let Some(h) = household {
            txn.delete(format!("{}{id}", member_prefix("hh", &h)).into_bytes());
        }
        if let Some(h) = &p.household {
            txn.put(
                format!("{}{id}", member_prefix("hh", h)).into_bytes(),
                Vec::new(),
            );
        }
    }
    for a in accounts.difference(&p.accounts) {
        txn.delete(format!("{}{id}", member_prefix("acct", a)).into_bytes());
    }
    for a in p.accounts.difference(&accounts) {
        txn.put(
            format!("{}{id}", member_prefix("acct", a)).into_bytes(),
            Vec::new(),
        );
    }
}

/// What caused a change, for deterministic record ids, reasons and timing.
struct Cause<'a> {
    id: &'a str,
    /// `event`, `merge`, `split`, `window` (a timer), `definition` (a back-fill).
    why: &'static str,
    event_time: i64,
    received_at: i64,
    /// The event being applied, with its parsed payload (event triggers start and
    /// cancel on it).
    event: Option<(&'a ResolvedEvent, &'a serde_json::Value)>,
}

/// Rebuilds, from the kept history, each computed trait the profile lacks or holds for
/// another version of its definition (a definition added or changed since). A profile
/// with more events than it keeps gets values from the kept ones.
fn ensure_computed(
    txn: &Txn<'_>,
    p: &mut Profile,
    defs: &DefinitionSet,
    history_limit: usize,
) -> Result<()> {
    if p.events_total == 0 {
        return Ok(());
    }
    let stale: Vec<_> = defs
        .computed
        .iter()
        .filter(|d| p.computed.get(&d.id).is_none_or(|s| s.version != d.version))
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    let events = read_log(txn, &p.id, history_limit)?;
    for def in stale {
        p.recompute(def, &events);
    }
    Ok(())
}

/// A profile's newest kept events, newest first (its timeline).
pub fn recent_events(store: &dyn Store, id: &str, limit: usize) -> Result<Vec<ResolvedEvent>> {
    store
        .scan_last(log_prefix(id).as_bytes(), limit)?
        .iter()
        .map(|(_, v)| ResolvedEvent::from_avro(v))
        .collect()
}

/// A profile's kept history, oldest first.
fn read_log(txn: &Txn<'_>, id: &str, history_limit: usize) -> Result<Vec<ResolvedEvent>> {
    txn.scan(log_prefix(id).as_bytes(), history_limit + 16)?
        .iter()
        .map(|(_, v)| ResolvedEvent::from_avro(v))
        .collect()
}

/// How many profiles a candidate segment would hold now, without changing anything:
/// each profile is evaluated with the candidate's definitions (computed traits the
/// profiles lack are derived from their kept history).
#[derive(Debug, serde::Serialize)]
pub struct DryRun {
    /// Members among the profiles scanned.
    pub size: u64,
    pub scanned: u64,
    /// Profiles on this instance.
    pub total: u64,
    /// Up to ten members.
    pub sample: Vec<String>,
}

/// Evaluates `segment` of `defs` on the stored profiles, at most `limit` of them (in key
/// order: profile ids are hashes, so the first ones are a fair sample).
pub fn dry_run(
    store: &dyn Store,
    defs: &DefinitionSet,
    segment: &str,
    history_limit: usize,
    now: i64,
    limit: Option<u64>,
    placement: &Placement,
) -> Result<DryRun> {
    let txn = Txn::new(store);
    let serving = placement.serving();
    let mut res = DryRun {
        size: 0,
        scanned: 0,
        total: sum_partitions(|k| store.get(k), &serving, profiles_count_key)? as u64,
        sample: Vec::new(),
    };
    let mut start = b"p/".to_vec();
    loop {
        let rows = store.scan_from(b"p/", &start, 1000)?;
        for (k, v) in &rows {
            if limit.is_some_and(|l| res.scanned >= l) {
                return Ok(res);
            }
            start = k.clone();
            start.push(0);
            if !serving.contains(&placement.partition(&String::from_utf8_lossy(&k[2..]))) {
                continue;
            }
            let mut p: Profile = serde_json::from_slice(v)?;
            ensure_computed(&txn, &mut p, defs, history_limit)?;
            p.refresh_computed(defs, now, &mut Touched::default());
            transitions(defs, &mut p, now, "dry run", &Touched::all());
            res.scanned += 1;
            if p.segments.contains_key(segment) {
                res.size += 1;
                if res.sample.len() < 10 {
                    res.sample.push(p.id.clone());
                }
            }
        }
        if rows.len() < 1000 {
            return Ok(res);
        }
    }
}

/// What downstream activation needs of a profile at a change: its fields (traits and
/// identifiers), consent decisions and segments, as the records carry them.
struct Snapshot {
    traits: String,
    consent: String,
    segments: Vec<String>,
}

impl Snapshot {
    fn of(p: &Profile) -> Result<Snapshot> {
        Ok(Snapshot {
            traits: serde_json::to_string(&p.flat_fields())?,
            consent: serde_json::to_string(&p.consent)?,
            segments: p.segments.keys().cloned().collect(),
        })
    }
}

/// One membership change: segment, version, `enter`/`exit`/`update`, reason.
pub type Change = (String, i32, &'static str, String);

/// Evaluates every segment in dependency order (so `in_segment` sees this evaluation's
/// result) and updates the profile's memberships; returns the enters and exits, each
/// with its reason (`<why>: <condition>`). Memberships of segments no longer defined end.
pub fn transitions(
    defs: &DefinitionSet,
    p: &mut Profile,
    at: i64,
    why: &str,
    touched: &Touched,
) -> Vec<Change> {
    let mut changes: Vec<Change> = Vec::new();
    // Segments whose membership changed in this pass (for `in_segment` readers).
    let mut moved: BTreeSet<String> = BTreeSet::new();
    for seg in &defs.segments {
        if !touched.affects(&seg.inputs, &moved) {
            continue;
        }
        let now_in = seg.condition.matches(p);
        match (p.segments.get(&seg.id).cloned(), now_in) {
            (None, true) => {
                p.segments.insert(
                    seg.id.clone(),
                    Membership {
                        version: seg.version,
                        entered_at: at,
                    },
                );
                let reason = format!("{why}: {}", seg.condition.describe());
                changes.push((seg.id.clone(), seg.version, "enter", reason));
                moved.insert(seg.id.clone());
            }
            (Some(_), false) => {
                p.segments.remove(&seg.id);
                let reason = format!("{why}: {}", seg.condition.describe());
                changes.push((seg.id.clone(), seg.version, "exit", reason));
                moved.insert(seg.id.clone());
            }
            (Some(m), true) if m.version != seg.version => {
                p.segments.insert(
                    seg.id.clone(),
                    Membership {
                        version: seg.version,
                        entered_at: m.entered_at,
                    },
                );
            }
            _ => {}
        }
    }
    if !touched.all {
        return changes;
    }
    let gone: Vec<(String, i32)> = p
        .segments
        .iter()
        .filter(|(id, _)| defs.segment(id).is_none())
        .map(|(id, m)| (id.clone(), m.version))
        .collect();
    for (id, version) in gone {
        p.segments.remove(&id);
        changes.push((id, version, "exit", "definition removed".into()));
    }
    changes
}

impl ProfilesProcessor {
    fn seen_before(
        &self,
        txn: &mut Txn<'_>,
        id: &str,
        received_at: i64,
        kind: &str,
    ) -> Result<bool> {
        if txn.get(&seen_key(id))?.is_some() {
            self.metrics.duplicates.with_label_values(&[kind]).inc();
            return Ok(true);
        }
        let expiry = received_at.saturating_add(self.dedup_window_ms);
        txn.put(seen_key(id), expiry.to_be_bytes().to_vec());
        txn.put(
            format!("{SEEN_EXP_PREFIX}{expiry:020}/{id}").into_bytes(),
            Vec::new(),
        );
        Ok(false)
    }

    fn transfer(
        &self,
        survivor: &str,
        state: &Profile,
        history: Vec<ResolvedEvent>,
        revive: bool,
        cause: &Cause<'_>,
    ) -> Result<Output> {
        let moved = Moved {
            profile: state.clone(),
            history,
            revive,
        };
        let t = ProfileTransfer {
            transfer_id: deterministic_id("transfer", &[survivor, &state.id, cause.id]),
            survivor: survivor.to_string(),
            from_profile: state.id.clone(),
            state: serde_json::to_string(&moved)?,
            received_at: cause.received_at,
        };
        Ok(Output::sealed(
            self.topics.transfers(),
            survivor.as_bytes().to_vec(),
            t.to_avro()?,
            survivor,
        ))
    }

    /// Loads (or starts) a profile, changes it, indexes new identifiers, re-evaluates
    /// segments and saves it.
    fn update(
        &self,
        txn: &mut Txn<'_>,
        id: &str,
        cause: &Cause<'_>,
        out: &mut Vec<Output>,
        change: impl FnOnce(&mut Profile, &mut Touched) -> bool,
    ) -> Result<()> {
        let (mut p, created) = match txn.get_json::<Profile>(&profile_key(id))? {
            Some(p) => (p, false),
            None => {
                self.count_profiles(txn, id, 1)?;
                (Profile::new(id), true)
            }
        };
        ensure_computed(txn, &mut p, &self.rules.defs, self.history_limit)?;
        let identifiers_before = p.identifiers.len();
        let groups_before = (p.household.clone(), p.accounts.clone());
        // A new profile is evaluated against every segment (a "not" may hold at once).
        let mut touched = Touched {
            all: created,
            ..Default::default()
        };
        let fields_changed = change(&mut p, &mut touched);
        // Windows are evaluated at the record's time, never earlier than the profile was
        // last evaluated at: a replay evaluates the same as the original run.
        let now = cause.received_at.max(p.evaluated_at);
        p.evaluated_at = now;
        let next_edge = p.refresh_computed(&self.rules.defs, now, &mut touched);
        if p.identifiers.len() != identifiers_before {
            // Rare (a new identifier or a merge): (re)index them all, idempotently.
            for i in &p.identifiers {
                txn.put(index_key(&i.kind, &i.value), id.as_bytes().to_vec());
            }
        }
        index_groups(txn, id, groups_before, &p);
        let changes = self.evaluate(txn, &mut p, fields_changed, &touched, cause, out)?;
        self.run_triggers(&mut p, cause, &changes, now, out)?;
        let next = match (next_edge, triggers::next_due(&p)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if next != p.timer {
            let partition = self.placement.partition(id);
            if let Some(old) = p.timer {
                txn.delete(timer_key(partition, old, id));
            }
            if let Some(due) = next {
                txn.put(timer_key(partition, due, id), Vec::new());
            }
            p.timer = next;
        }
        self.changes.touch(id);
        txn.put_json(profile_key(id), &p)
    }

    /// Starts, cancels and fires the profile's triggers for this change; each firing
    /// goes to `profiles.triggers` with the profile as it is now. A back-fill starts
    /// nothing: a new definition does not fire for the people it finds.
    fn run_triggers(
        &self,
        p: &mut Profile,
        cause: &Cause<'_>,
        changes: &[Change],
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let defs = &self.rules.defs;
        if defs.triggers.is_empty() && p.pending.is_empty() {
            return Ok(());
        }
        let event = cause.event.map(|(r, payload)| triggers::EventSeen {
            kind: &r.event.kind,
            name: r.event.event.as_deref(),
            properties: &payload["properties"],
            event_time: r.event.event_time,
            message_id: &r.event.message_id,
        });
        let segment_changes = match cause.why {
            "definition" => Vec::new(),
            _ => changes
                .iter()
                .filter(|c| c.2 != "update")
                .map(|c| (c.0.as_str(), c.2))
                .collect(),
        };
        let step = triggers::Step {
            event,
            segment_changes,
            cause: cause.id,
            cause_time: cause.event_time,
            received_at: cause.received_at,
            now,
        };
        let mut fired = Vec::new();
        let before: BTreeSet<String> = p.pending.keys().cloned().collect();
        let counts = triggers::step(&defs.triggers, p, &step, &mut fired);
        if counts.started + counts.cancelled > 0 {
            for id in p.pending.keys().filter(|k| !before.contains(*k)) {
                self.metrics
                    .triggers
                    .with_label_values(&[id, "started"])
                    .inc();
            }
            self.metrics
                .triggers
                .with_label_values(&["*", "cancelled"])
                .inc_by(counts.cancelled);
        }
        if fired.is_empty() {
            return Ok(());
        }
        let snap = Snapshot::of(p)?;
        for f in fired {
            self.metrics
                .triggers
                .with_label_values(&[f.trigger.as_str(), "fired"])
                .inc();
            let rec = TriggerFired {
                record_id: deterministic_id(
                    "trigger",
                    &[&p.id, &f.trigger, &f.version.to_string(), &f.cause],
                ),
                profile_id: p.id.clone(),
                trigger_id: f.trigger,
                trigger_version: f.version,
                reason: f.reason,
                event_time: f.event_time,
                received_at: f.received_at,
                event: f.event,
                properties: f.properties.to_string(),
                traits: snap.traits.clone(),
                consent: snap.consent.clone(),
                segments: snap.segments.clone(),
            };
            out.push(Output::sealed(
                self.topics.triggers(),
                p.id.as_bytes().to_vec(),
                rec.to_avro()?,
                &p.id,
            ));
        }
        Ok(())
    }

    fn count_profiles(&self, txn: &mut Txn<'_>, id: &str, delta: i64) -> Result<()> {
        let key = profiles_count_key(self.placement.partition(id));
        let n: i64 = txn.get_json(&key)?.unwrap_or(0);
        txn.put_json(key, &(n + delta).max(0))
    }

    /// Adds `delta` to a segment's size in the profile's partition.
    pub(crate) fn count_member(
        &self,
        txn: &mut Txn<'_>,
        segment: &str,
        id: &str,
        delta: i64,
    ) -> Result<()> {
        let key = segment_size_key(segment, self.placement.partition(id));
        let size: i64 = txn.get_json(&key)?.unwrap_or(0);
        txn.put_json(key, &(size + delta).max(0))
    }

    /// Appends events to a profile's kept history, dropping the oldest beyond the limit.
    fn log_events(&self, txn: &mut Txn<'_>, id: &str, events: &[ResolvedEvent]) -> Result<()> {
        if self.history_limit == 0 || events.is_empty() {
            return Ok(());
        }
        let mut n: u64 = txn.get_json(&log_count_key(id))?.unwrap_or(0);
        // Every event here is new to this profile: messages are de-duplicated before,
        // and a transfer's history comes from another profile.
        for r in events {
            txn.put(
                log_key(id, r.event.event_time, &r.event.message_id),
                r.to_avro()?,
            );
            n += 1;
        }
        if n > self.history_limit as u64 {
            let excess = (n - self.history_limit as u64) as usize;
            for (k, _) in txn.scan(log_prefix(id).as_bytes(), excess)? {
                txn.delete(k);
                n -= 1;
            }
        }
        txn.put_json(log_count_key(id), &n)
    }

    /// Removes and returns a profile's kept history, oldest first.
    fn take_log(&self, txn: &mut Txn<'_>, id: &str) -> Result<Vec<ResolvedEvent>> {
        let out = read_log(txn, id, self.history_limit)?;
        for r in &out {
            txn.delete(log_key(id, r.event.event_time, &r.event.message_id));
        }
        txn.delete(log_count_key(id));
        Ok(out)
    }

    /// Rebuilds a profile from events: what it would be had only these events been its.
    fn rebuild(
        &self,
        id: &str,
        events: &[ResolvedEvent],
        owner: &BTreeMap<Identifier, String>,
    ) -> Profile {
        let mut p = Profile::new(id);
        for r in events {
            p.apply(r, &self.rules);
        }
        p.identifiers
            .retain(|i| owner.get(i).is_none_or(|o| o == id));
        p.identifiers.extend(
            owner
                .iter()
                .filter(|(_, o)| *o == id)
                .map(|(i, _)| i.clone()),
        );
        p
    }

    /// Removes a profile with its group indexes and timer (not its memberships).
    pub(crate) fn forget_profile(&self, txn: &mut Txn<'_>, p: &Profile) -> Result<()> {
        index_groups(
            txn,
            &p.id,
            (p.household.clone(), p.accounts.clone()),
            &Profile::new(&p.id),
        );
        if let Some(due) = p.timer {
            txn.delete(timer_key(self.placement.partition(&p.id), due, &p.id));
        }
        txn.delete(profile_key(&p.id));
        self.changes.touch(&p.id);
        self.count_profiles(txn, &p.id, -1)
    }

    /// A profile's kept history, oldest first.
    pub(crate) fn read_history(&self, txn: &Txn<'_>, id: &str) -> Result<Vec<ResolvedEvent>> {
        read_log(txn, id, self.history_limit)
    }

    /// Removes and returns a profile's kept history.
    pub(crate) fn take_history(&self, txn: &mut Txn<'_>, id: &str) -> Result<Vec<ResolvedEvent>> {
        self.take_log(txn, id)
    }

    /// Drops a message's de-duplication entry; returns whether there was one.
    pub(crate) fn forget_message(&self, txn: &mut Txn<'_>, id: &str) -> Result<bool> {
        let Some(v) = txn.get(&seen_key(id))? else {
            return Ok(false);
        };
        if let Ok(b) = <[u8; 8]>::try_from(v.as_slice()) {
            let expiry = i64::from_be_bytes(b);
            txn.delete(format!("{SEEN_EXP_PREFIX}{expiry:020}/{id}").into_bytes());
        }
        txn.delete(seen_key(id));
        Ok(true)
    }

    /// A profile leaves: its memberships end and its indexes go.
    fn remove(
        &self,
        txn: &mut Txn<'_>,
        p: &Profile,
        reason: &str,
        cause: &Cause<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let exits: Vec<(String, i32, &'static str, String)> = p
            .segments
            .iter()
            .map(|(id, mem)| (id.clone(), mem.version, "exit", reason.to_string()))
            .collect();
        // The records carry the profile as it is after: in no segment.
        let gone = Profile {
            segments: BTreeMap::new(),
            ..p.clone()
        };
        self.emit(txn, &gone, &exits, cause, out)?;
        self.forget_profile(txn, p)
    }

    /// Enter and exit records for membership changes; with `fields_changed`, an
    /// `update` record for each segment the profile stays in, so destinations keep
    /// current identifiers and traits.
    fn evaluate(
        &self,
        txn: &mut Txn<'_>,
        p: &mut Profile,
        fields_changed: bool,
        touched: &Touched,
        cause: &Cause<'_>,
        out: &mut Vec<Output>,
    ) -> Result<Vec<Change>> {
        let mut changes = transitions(&self.rules.defs, p, cause.event_time, cause.why, touched);
        if fields_changed {
            for (id, m) in &p.segments {
                if !changes.iter().any(|c| &c.0 == id) {
                    changes.push((
                        id.clone(),
                        m.version,
                        "update",
                        "profile fields changed".into(),
                    ));
                }
            }
        }
        self.emit(txn, p, &changes, cause, out)?;
        Ok(changes)
    }

    fn emit(
        &self,
        txn: &mut Txn<'_>,
        p: &Profile,
        changes: &[(String, i32, &'static str, String)],
        cause: &Cause<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let snap = Snapshot::of(p)?;
        for (segment, version, change, reason) in changes {
            let delta = match *change {
                "enter" => 1,
                "exit" => -1,
                _ => 0,
            };
            if delta != 0 {
                self.count_member(txn, segment, &p.id, delta)?;
                let member = format!("{}{}", member_key_prefix(segment), p.id).into_bytes();
                if delta > 0 {
                    txn.put(member, cause.event_time.to_string().into_bytes());
                } else {
                    txn.delete(member);
                }
            }
            self.metrics
                .membership
                .with_label_values(&[segment.as_str(), change])
                .inc();
            let rec = MembershipChange {
                record_id: deterministic_id(
                    "membership",
                    &[&p.id, segment, &version.to_string(), change, cause.id],
                ),
                profile_id: p.id.clone(),
                segment_id: segment.clone(),
                segment_version: *version,
                change: change.to_string(),
                reason: reason.clone(),
                event_time: cause.event_time,
                received_at: cause.received_at,
                traits: snap.traits.clone(),
                consent: snap.consent.clone(),
                segments: snap.segments.clone(),
            };
            out.push(Output::sealed(
                self.topics.membership(),
                p.id.as_bytes().to_vec(),
                rec.to_avro()?,
                &p.id,
            ));
        }
        Ok(())
    }

    fn on_event(&self, r: ResolvedEvent, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        let e = &r.event;
        if self.sent_before_erasure(txn, &[&r.profile_id], e.received_at)? {
            return Ok(());
        }
        if self.seen_before(txn, &e.message_id, e.received_at, "event")? {
            debug!(profile = %r.profile_id, "duplicate message dropped");
            return Ok(());
        }
        // Parsed once, for the profile and the triggers.
        let payload = r.payload();
        let cause = Cause {
            id: &e.message_id,
            why: "event",
            event_time: e.event_time,
            received_at: e.received_at,
            event: Some((&r, &payload)),
        };
        let live = live_id(|k| txn.get(k), &r.profile_id)?;
        if live != r.profile_id {
            // The profile was merged away while this event was in flight.
            let mut alone = Profile::new(&r.profile_id);
            alone.apply(&r, &self.rules);
            out.push(self.transfer(&live, &alone, vec![r.clone()], false, &cause)?);
            return Ok(());
        }
        self.update(txn, &live, &cause, out, |p, t| {
            p.apply_touching(&r, &payload, &self.rules, t)
        })?;
        self.log_events(txn, &live, std::slice::from_ref(&r))?;
        self.metrics.applied.inc();
        let latency_ms = (tessera_common::now_ms() - e.received_at).max(0);
        self.metrics
            .event_latency
            .observe(latency_ms as f64 / 1000.0);
        Ok(())
    }

    fn on_merge(&self, m: ProfileMerge, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        if self.sent_before_erasure(txn, &[&m.survivor, &m.merged], m.received_at)?
            || self.seen_before(txn, &m.merge_id, m.received_at, "merge")?
        {
            return Ok(());
        }
        let cause = Cause {
            id: &m.merge_id,
            why: "merge",
            event_time: m.event_time,
            received_at: m.received_at,
            event: None,
        };
        txn.put(redirect_key(&m.merged), m.survivor.as_bytes().to_vec());
        self.changes.touch(&m.merged);
        let Some(mut merged) = txn.get_json::<Profile>(&profile_key(&m.merged))? else {
            return Ok(());
        };
        // The merged profile leaves its segments; the survivor is re-evaluated on arrival.
        self.remove(txn, &merged, "profile merged", &cause, out)?;
        merged.segments.clear();
        // The identifiers are the survivor's now. In the survivor's partition they point
        // to it; in another, the survivor's transfer indexes them where it lives (an
        // index left here would outlive the person's erasure there). An entry that
        // already names another profile (the survivor's own events) is not touched.
        let here = self.placement.partition(&m.merged) == self.placement.partition(&m.survivor);
        for i in &merged.identifiers {
            let key = index_key(&i.kind, &i.value);
            if txn.get(&key)?.is_some_and(|v| v != m.merged.as_bytes()) {
                continue;
            }
            if here {
                txn.put(key, m.survivor.as_bytes().to_vec());
            } else {
                txn.delete(key);
            }
        }
        let history = self.take_log(txn, &m.merged)?;
        out.push(self.transfer(&m.survivor, &merged, history, false, &cause)?);
        Ok(())
    }

    /// A profile's identifiers now belong to several profiles: each is re-derived from
    /// the kept events that belong to it (an event belongs where its highest-priority
    /// identifier went). With more events than the kept history, the profile that keeps
    /// the id keeps its older totals too.
    fn on_split(&self, s: ProfileSplit, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        if self.sent_before_erasure(txn, &[&s.profile_id], s.received_at)?
            || self.seen_before(txn, &s.split_id, s.received_at, "split")?
        {
            return Ok(());
        }
        let cause = Cause {
            id: &s.split_id,
            why: "split",
            event_time: s.event_time,
            received_at: s.received_at,
            event: None,
        };
        let Some(old) = txn.get_json::<Profile>(&profile_key(&s.profile_id))? else {
            return Ok(());
        };
        let owner: BTreeMap<Identifier, String> = s
            .assignments
            .iter()
            .map(|a| {
                (
                    Identifier {
                        kind: a.kind.clone(),
                        value: a.value.clone(),
                    },
                    a.profile_id.clone(),
                )
            })
            .collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for t in owner.values() {
            *counts.entry(t.as_str()).or_default() += 1;
        }
        let survives = counts.contains_key(s.profile_id.as_str());
        let default_target = if survives {
            s.profile_id.clone()
        } else {
            counts
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map_or(s.profile_id.clone(), |(t, _)| t.to_string())
        };
        let history = self.take_log(txn, &s.profile_id)?;
        let complete = history.len() as u64 >= old.events_total;
        self.metrics
            .splits
            .with_label_values(&[if complete { "true" } else { "false" }])
            .inc();
        let mut by_target: BTreeMap<String, Vec<ResolvedEvent>> = BTreeMap::new();
        for t in counts.keys() {
            by_target.entry(t.to_string()).or_default();
        }
        for r in history {
            let t = r
                .identifiers
                .iter()
                .find_map(|i| owner.get(i))
                .cloned()
                .unwrap_or_else(|| default_target.clone());
            by_target.entry(t).or_default().push(r);
        }
        for (t, events) in &by_target {
            if *t == s.profile_id {
                continue;
            }
            let state = if !complete && *t == default_target {
                // The older totals have no events to re-derive them from: they go along.
                let mut all = old.clone();
                all.segments.clear();
                all.identifiers
                    .retain(|i| owner.get(i).is_none_or(|o| o == t));
                all
            } else {
                // Rebuilt for `t` (its identifiers), sent as coming from the split profile.
                let mut r = self.rebuild(t, events, &owner);
                r.id = s.profile_id.clone();
                r
            };
            out.push(self.transfer(t, &state, events.clone(), true, &cause)?);
        }
        if survives {
            let events = by_target.remove(&s.profile_id).unwrap_or_default();
            let rebuilt = complete.then(|| self.rebuild(&s.profile_id, &events, &owner));
            self.update(txn, &s.profile_id, &cause, out, |p, t| {
                *t = Touched::all();
                match rebuilt {
                    Some(mut r) => {
                        r.segments = std::mem::take(&mut p.segments);
                        r.pending = std::mem::take(&mut p.pending);
                        r.merged_from = p.merged_from.clone();
                        *p = r;
                    }
                    None => p
                        .identifiers
                        .retain(|i| owner.get(i).is_none_or(|o| *o == s.profile_id)),
                }
                true
            })?;
            self.log_events(txn, &s.profile_id, &events)?;
        } else {
            self.remove(txn, &old, "profile split", &cause, out)?;
            txn.put(
                redirect_key(&s.profile_id),
                default_target.as_bytes().to_vec(),
            );
        }
        Ok(())
    }

    fn on_transfer(
        &self,
        t: ProfileTransfer,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if self.sent_before_erasure(txn, &[&t.survivor, &t.from_profile], t.received_at)?
            || self.seen_before(txn, &t.transfer_id, t.received_at, "transfer")?
        {
            return Ok(());
        }
        let Moved {
            profile: moved,
            history,
            revive,
        } = serde_json::from_str(&t.state)?;
        let cause = Cause {
            id: &t.transfer_id,
            why: "merge",
            event_time: moved.last_seen.max(0),
            received_at: t.received_at,
            event: None,
        };
        if revive {
            // A split brings a merged-away profile back.
            txn.delete(redirect_key(&t.survivor));
        }
        let live = live_id(|k| txn.get(k), &t.survivor)?;
        if live != t.survivor {
            out.push(self.transfer(&live, &moved, history, false, &cause)?);
            return Ok(());
        }
        self.update(txn, &live, &cause, out, |p, t| {
            *t = Touched::all();
            p.absorb(&moved, &self.rules)
        })?;
        // The moved identifiers find this profile now. The merged side dropped its own
        // entries (or a late event of the merged profile pointed one back to it), so
        // they are written here even when the survivor already had them.
        for i in &moved.identifiers {
            txn.put(index_key(&i.kind, &i.value), live.as_bytes().to_vec());
        }
        self.log_events(txn, &live, &history)
    }
}

impl ProfilesProcessor {
    /// Installs the catalog's definitions if they changed; when the versions in force
    /// differ from those stored, records the new ones and starts (or widens and
    /// restarts) a back-fill.
    fn sync_definitions(&mut self, txn: &mut Txn<'_>) -> Result<()> {
        let current = self.catalog.current();
        if self.synced && current.generation == self.rules.defs.generation {
            return Ok(());
        }
        self.rules.defs = current.clone();
        self.synced = true;
        let applied: BTreeMap<String, i32> = txn.get_json(META_APPLIED)?.unwrap_or_default();
        if applied == current.versions {
            return Ok(());
        }
        let keys: BTreeSet<&String> = applied.keys().chain(current.versions.keys()).collect();
        let changed: Vec<String> = keys
            .into_iter()
            .filter(|k| applied.get(*k) != current.versions.get(*k))
            .map(|k| match current.versions.get(k) {
                Some(v) => format!("{k} v{v}"),
                None => format!("{k} deleted"),
            })
            .collect();
        let mut job = txn
            .get_json::<Backfill>(META_BACKFILL)?
            .filter(|j| j.finished_at.is_none())
            .unwrap_or_default();
        job.definitions.extend(changed);
        let versions = serde_json::to_string(&current.versions)?;
        job.id = deterministic_id("backfill", &[&versions]);
        job.cursor = None;
        job.scanned = 0;
        let every: Vec<i32> = (0..self.placement.partitions).collect();
        job.total = sum_partitions(|k| txn.get(k), &every, profiles_count_key)? as u64;
        job.started_at = (self.clock)();
        job.finished_at = None;
        tracing::info!(definitions = ?job.definitions, profiles = job.total, "definitions changed: back-fill started");
        txn.put_json(META_APPLIED.to_vec(), &current.versions)?;
        txn.put_json(META_BACKFILL.to_vec(), &job)
    }

    /// Re-evaluates profiles whose next window edge has passed.
    fn fire_timers(
        &self,
        now: i64,
        deadline: Instant,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let serving = self.placement.serving();
        // Partitions take turns at going first, so none waits behind another's backlog.
        let first = (now / 250).rem_euclid(serving.len().max(1) as i64) as usize;
        for i in 0..serving.len() {
            let partition = serving[(first + i) % serving.len()];
            if Instant::now() >= deadline {
                break;
            }
            self.fire_partition_timers(partition, now, deadline, txn, out)?;
        }
        Ok(())
    }

    fn fire_partition_timers(
        &self,
        partition: i32,
        now: i64,
        deadline: Instant,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let prefix = timer_prefix(partition);
        // A profile is evaluated at each edge in turn (a firing may set a timer that is
        // due already): what a replay or a late tick gives is what firing on time gave.
        let mut fired = true;
        while fired {
            fired = false;
            for (k, _) in txn.scan(prefix.as_bytes(), TIMERS_PER_SCAN)? {
                if Instant::now() >= deadline {
                    break;
                }
                let rest = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let Some((due, id)) = rest.split_once('/') else {
                    txn.delete(k);
                    continue;
                };
                let due: i64 = due.parse().unwrap_or(0);
                if due > now {
                    break;
                }
                txn.delete(k);
                if txn.get(&profile_key(id))?.is_none() {
                    continue;
                }
                let cause_id = format!("timer/{id}/{due}");
                // Stamped with when it was due, not when it fired: the same in a replay.
                let cause = Cause {
                    id: &cause_id,
                    why: "window",
                    event_time: due,
                    received_at: due,
                    event: None,
                };
                self.metrics.timers.inc();
                fired = true;
                // Only what left a window is re-evaluated.
                self.update(txn, id, &cause, out, |_, _| false)?;
            }
        }
        Ok(())
    }

    /// Moves the back-fill on by chunks of profiles, for a bounded time.
    fn backfill(
        &self,
        now: i64,
        deadline: Instant,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let Some(mut job) = txn
            .get_json::<Backfill>(META_BACKFILL)?
            .filter(|j| j.finished_at.is_none())
        else {
            return Ok(());
        };
        let cause = Cause {
            id: &job.id.clone(),
            why: "definition",
            event_time: job.started_at,
            received_at: job.started_at,
            event: None,
        };
        while Instant::now() < deadline {
            let start = match &job.cursor {
                Some(c) => {
                    let mut k = profile_key(c);
                    k.push(0);
                    k
                }
                None => b"p/".to_vec(),
            };
            let rows = txn.scan_from(b"p/", &start, BACKFILL_CHUNK)?;
            for (k, _) in &rows {
                let id = String::from_utf8_lossy(&k[2..]).into_owned();
                // A profile whose partition moved away is brought up to date too, so it
                // is current if the partition comes back; its records are the new
                // owner's to send.
                let mut elsewhere = Vec::new();
                let sink = if self.placement.owns(&id) {
                    &mut *out
                } else {
                    &mut elsewhere
                };
                self.update(txn, &id, &cause, sink, |_, t| {
                    *t = Touched::all();
                    false
                })?;
                job.scanned += 1;
                job.cursor = Some(id);
            }
            self.metrics.backfilled.inc_by(rows.len() as u64);
            if rows.len() < BACKFILL_CHUNK {
                job.finished_at = Some(now);
                tracing::info!(profiles = job.scanned, "back-fill done");
                break;
            }
        }
        txn.put_json(META_BACKFILL.to_vec(), &job)
    }
}

impl Processor for ProfilesProcessor {
    fn process(&mut self, msg: &Message, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        self.sync_definitions(txn)?;
        let bytes = msg.payload.as_deref().unwrap_or_default();
        let decoded = if msg.topic == self.topics.resolved() {
            ResolvedEvent::from_avro(bytes).map(|r| self.on_event(r, txn, out))
        } else if msg.topic == self.topics.merges() {
            ProfileMerge::from_avro(bytes).map(|m| self.on_merge(m, txn, out))
        } else if msg.topic == self.topics.splits() {
            ProfileSplit::from_avro(bytes).map(|s| self.on_split(s, txn, out))
        } else if msg.topic == self.topics.transfers() {
            ProfileTransfer::from_avro(bytes).map(|t| self.on_transfer(t, txn, out))
        } else if msg.topic == self.topics.privacy_actions() {
            PrivacyAction::from_avro(bytes).map(|a| self.on_privacy(a, txn, out))
        } else {
            Err(Error::Invalid(format!("unexpected topic {}", msg.topic)))
        };
        runner::handled_or_dead_letter(&self.topics.deadletter(), msg, decoded, out)?;
        Ok(())
    }

    /// Fires due timers, moves the back-fill on and forgets de-duplication entries
    /// past their window.
    fn tick(&mut self, now_ms: i64, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        self.sync_definitions(txn)?;
        let deadline = Instant::now() + TICK_BUDGET;
        self.fire_timers(now_ms, deadline, txn, out)?;
        self.backfill(now_ms, deadline, txn, out)?;
        for (k, _) in txn.scan_committed(SEEN_EXP_PREFIX.as_bytes(), 10_000)? {
            let rest = String::from_utf8_lossy(&k[SEEN_EXP_PREFIX.len()..]).into_owned();
            let Some((expiry, id)) = rest.split_once('/') else {
                continue;
            };
            if expiry.parse::<i64>().unwrap_or(i64::MAX) > now_ms {
                break;
            }
            txn.delete(seen_key(id));
            txn.delete(k);
        }
        Ok(())
    }

    fn committed(&mut self) {
        self.changes.committed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use tessera_common::config::Config;
    use tessera_common::records::{Identifier, IngestedEvent};
    use tessera_common::store::MemStore;

    use crate::catalog::Definition;

    static CLOCK: AtomicI64 = AtomicI64::new(100);
    /// Tests that set the clock hold this, so they do not move each other's time.
    static CLOCK_HELD: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn hold_clock() -> std::sync::MutexGuard<'static, ()> {
        CLOCK_HELD.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn test_clock() -> i64 {
        CLOCK.load(Ordering::SeqCst)
    }

    /// Puts definitions (JSON documents) in force through the catalog, as the API does.
    fn define(catalog: &Catalog, docs: &[&str]) {
        for doc in docs {
            let d = Definition::parse(doc, false, None).unwrap();
            let change = catalog.propose(d.kind(), d.id(), Some(&d), "api").unwrap();
            catalog.apply(change);
        }
    }

    fn processor() -> ProfilesProcessor {
        processor_with(&[
            r#"{"id":"buyers","condition":{"event_count":{"event":"Order Completed","min":1}}}"#,
        ])
    }

    fn processor_with(docs: &[&str]) -> ProfilesProcessor {
        let cfg = Config::demo();
        let catalog = Catalog::default();
        define(&catalog, docs);
        ProfilesProcessor {
            topics: Topics::new(&cfg.topics),
            rules: ApplyRules::default(),
            catalog,
            synced: false,
            clock: test_clock,
            history_limit: 100,
            dedup_window_ms: 1000,
            metrics: ProfilesMetrics::new(&Admin::new()),
            changes: Default::default(),
            placement: Placement::everything(),
        }
    }

    fn resolved(profile: &str, mid: &str, name: &str) -> Message {
        let r = ResolvedEvent {
            profile_id: profile.into(),
            identifiers: vec![Identifier {
                kind: "anonymous_id".into(),
                value: format!("anon-{profile}"),
            }],
            event: IngestedEvent {
                message_id: mid.into(),
                source: "s".into(),
                kind: "track".into(),
                user_id: None,
                anonymous_id: Some(format!("anon-{profile}")),
                event: Some(name.into()),
                received_at: 100,
                event_time: 100,
                payload: "{}".into(),
            },
        };
        Message {
            topic: "tessera.events.resolved".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(r.to_avro().unwrap()),
            timestamp_ms: None,
            replayed: false,
        }
    }

    fn step(p: &mut ProfilesProcessor, s: &MemStore, m: &Message) -> Vec<Output> {
        let mut out = Vec::new();
        let mut txn = Txn::new(s);
        p.process(m, &mut txn, &mut out).unwrap();
        s.write(txn.into_batch()).unwrap();
        out
    }

    fn load(s: &MemStore, id: &str) -> Option<Profile> {
        s.get(&profile_key(id))
            .unwrap()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    /// The audit's finding: once a history was full, a batch with several events of one
    /// profile trimmed its own new events and kept old ones (the overlay scan let the
    /// batch's deletes push live rows out of its page).
    #[test]
    fn a_full_history_keeps_the_newest_events_when_a_batch_brings_several() {
        let mut p = processor();
        p.history_limit = 5;
        let s = MemStore::default();
        for n in 0..5 {
            step(&mut p, &s, &resolved("p1", &format!("m{n:02}"), "Viewed"));
        }
        let mut txn = Txn::new(&s);
        let mut out = Vec::new();
        for n in 5..10 {
            let m = resolved("p1", &format!("m{n:02}"), "Viewed");
            p.process(&m, &mut txn, &mut out).unwrap();
        }
        s.write(txn.into_batch()).unwrap();
        let kept: Vec<String> = read_log(&Txn::new(&s), "p1", 100)
            .unwrap()
            .into_iter()
            .map(|r| r.event.message_id)
            .collect();
        assert_eq!(kept, ["m05", "m06", "m07", "m08", "m09"]);
    }

    #[test]
    fn a_delete_erases_the_profile_and_drops_records_sent_before_it() {
        use tessera_common::records::{PrivacyAction, PrivacyReport};
        let mut p = processor();
        let s = MemStore::default();
        step(&mut p, &s, &resolved("p1", "m1", "Order Completed"));
        step(&mut p, &s, &resolved("p2", "m2", "Order Completed"));
        assert!(load(&s, "p1").is_some());
        let delete = PrivacyAction {
            request_id: "r1".into(),
            action: "delete".into(),
            stage: "profiles".into(),
            profile_id: "p1".into(),
            merged_profiles: vec![],
            requested_at: 150,
        };
        let msg = Message {
            topic: "tessera.privacy.actions".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(delete.to_avro().unwrap()),
            timestamp_ms: None,
            replayed: false,
        };
        let out = step(&mut p, &s, &msg);
        assert!(load(&s, "p1").is_none());
        assert!(
            s.get(&seen_key("m1")).unwrap().is_none(),
            "its de-duplication entry"
        );
        assert!(
            s.scan_prefix(b"", usize::MAX)
                .unwrap()
                .iter()
                .all(|(k, _)| !String::from_utf8_lossy(k).contains("/p1")
                    || String::from_utf8_lossy(k).starts_with("erased/")),
            "nothing of p1 but its erasure time"
        );
        let next = out
            .iter()
            .find(|o| o.topic == "tessera.privacy.actions")
            .unwrap();
        assert_eq!(
            PrivacyAction::from_avro(&next.payload).unwrap().stage,
            "activation"
        );
        let report = out
            .iter()
            .find(|o| o.topic == "tessera.privacy.reports")
            .unwrap();
        let detail: serde_json::Value =
            serde_json::from_str(&PrivacyReport::from_avro(&report.payload).unwrap().detail)
                .unwrap();
        assert_eq!(
            (detail["profiles"].as_u64(), detail["events"].as_u64()),
            (Some(1), Some(1))
        );
        // An event sent before the delete (received at 100) and arriving after it does
        // not bring the person back; p2 is untouched.
        step(&mut p, &s, &resolved("p1", "m3", "Order Completed"));
        assert!(load(&s, "p1").is_none());
        assert_eq!(p.metrics.erased_dropped.get(), 1);
        assert!(load(&s, "p2").is_some());
    }

    #[test]
    fn duplicates_count_once_and_segment_entry_is_emitted_once() {
        let mut p = processor();
        let s = MemStore::default();
        let out = step(&mut p, &s, &resolved("a", "m1", "Order Completed"));
        assert_eq!(out.len(), 1);
        let m = MembershipChange::from_avro(&out[0].payload).unwrap();
        assert_eq!(
            (m.segment_id.as_str(), m.change.as_str()),
            ("buyers", "enter")
        );
        assert!(step(&mut p, &s, &resolved("a", "m1", "Order Completed")).is_empty());
        assert_eq!(load(&s, "a").unwrap().event_counts["Order Completed"], 1);
        assert_eq!(
            s.get(&segment_size_key("buyers", 0)).unwrap(),
            Some(b"1".to_vec())
        );
        // After the window the entry is forgotten.
        let mut txn = Txn::new(&s);
        p.tick(100 + 1001, &mut txn, &mut Vec::new()).unwrap();
        s.write(txn.into_batch()).unwrap();
        assert!(s.get(&seen_key("m1")).unwrap().is_none());
    }

    #[test]
    fn merge_moves_state_through_a_transfer_and_redirects_late_events() {
        let mut p = processor();
        let s = MemStore::default();
        step(&mut p, &s, &resolved("anon", "m1", "Order Completed"));
        step(&mut p, &s, &resolved("known", "m2", "Page Viewed"));
        let out = step(&mut p, &s, &merge_of("known", "anon"));
        assert_eq!(
            out.len(),
            2,
            "an exit for the merged profile and a transfer"
        );
        assert_eq!(
            MembershipChange::from_avro(&out[0].payload).unwrap().change,
            "exit"
        );
        assert!(load(&s, "anon").is_none());
        let transfer = transfer_of(&out);
        let out = step(&mut p, &s, &transfer);
        assert_eq!(
            MembershipChange::from_avro(&out[0].payload).unwrap().change,
            "enter"
        );
        let known = load(&s, "known").unwrap();
        assert_eq!(known.events_total, 2);
        assert_eq!(known.merged_from, vec!["anon".to_string()]);
        assert_eq!(
            s.get(&index_key("anonymous_id", "anon-anon")).unwrap(),
            Some(b"known".to_vec())
        );
        // A late event for the merged id is forwarded, not lost.
        let out = step(&mut p, &s, &resolved("anon", "m4", "Order Completed"));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "tessera.profiles.transfers");
        // Replaying the transfer changes nothing.
        assert!(step(&mut p, &s, &transfer).is_empty());
        assert_eq!(load(&s, "known").unwrap().events_total, 2);
    }

    fn merge_of(survivor: &str, merged: &str) -> Message {
        let merge = ProfileMerge {
            merge_id: format!("mg-{merged}"),
            survivor: survivor.into(),
            merged: merged.into(),
            cause_message_id: "m-merge".into(),
            event_time: 200,
            received_at: 200,
            rule: None,
            score: None,
        };
        Message {
            topic: "tessera.identity.merges".into(),
            partition: 0,
            offset: 1,
            key: None,
            payload: Some(merge.to_avro().unwrap()),
            timestamp_ms: None,
            replayed: false,
        }
    }

    fn transfer_of(out: &[Output]) -> Message {
        let t = out
            .iter()
            .find(|o| o.topic == "tessera.profiles.transfers")
            .expect("a transfer");
        Message {
            topic: t.topic.clone(),
            partition: 0,
            offset: 2,
            key: None,
            payload: Some(t.payload.clone()),
            timestamp_ms: None,
            replayed: false,
        }
    }

    /// A processor over 8 partitions that owns `partitions`, and a survivor id whose
    /// partition differs from `anon`'s.
    fn partitioned(partitions: &[i32]) -> (ProfilesProcessor, String) {
        let mut p = processor();
        let ownership = Ownership::default();
        ownership.set_assigned(
            partitions
                .iter()
                .map(|n| ("tessera.events.resolved".to_string(), *n)),
        );
        p.placement = Placement {
            topic: "tessera.events.resolved".into(),
            partitions: 8,
            ownership: Some(ownership),
        };
        let known = (0..)
            .map(|i| format!("known{i}"))
            .find(|k| p.placement.partition(k) != p.placement.partition("anon"))
            .unwrap();
        (p, known)
    }

    /// The merged profile's instance keeps no index of identifiers that went to a
    /// survivor living elsewhere: erasing the survivor there erases them all.
    #[test]
    fn a_merge_across_instances_leaves_no_identifier_index_behind() {
        let (probe, known) = partitioned(&[]);
        let (pa, pk) = (
            probe.placement.partition("anon"),
            probe.placement.partition(&known),
        );
        let (mut a, _) = partitioned(&[pa]);
        let (mut b, _) = partitioned(&[pk]);
        let (sa, sb) = (MemStore::default(), MemStore::default());
        step(&mut a, &sa, &resolved("anon", "m1", "Order Completed"));
        step(&mut b, &sb, &resolved(&known, "m2", "Page Viewed"));
        let out = step(&mut a, &sa, &merge_of(&known, "anon"));
        step(&mut b, &sb, &transfer_of(&out));
        assert!(
            sa.scan_prefix(b"idx/", 10).unwrap().is_empty(),
            "no identifier index stays with the merged profile's instance"
        );
        assert_eq!(
            sb.get(&index_key("anonymous_id", "anon-anon")).unwrap(),
            Some(known.as_bytes().to_vec())
        );
    }

    /// Whatever order the merged profile's event, the survivor's own event carrying the
    /// same identifier, the merge and the transfer arrive in (they come on different
    /// partitions), the identifier ends up finding the survivor.
    #[test]
    fn a_merge_leaves_the_identifier_finding_the_survivor_in_any_order() {
        for merged_first in [true, false] {
            let (mut p, known) = partitioned(&(0..8).collect::<Vec<_>>());
            let s = MemStore::default();
            let ours = survivor_event_with_anon(&known);
            if merged_first {
                step(&mut p, &s, &resolved("anon", "m1", "Order Completed"));
                step(&mut p, &s, &ours);
            } else {
                // The merged profile's event comes late and points the index back to it.
                step(&mut p, &s, &ours);
                step(&mut p, &s, &resolved("anon", "m1", "Order Completed"));
            }
            let out = step(&mut p, &s, &merge_of(&known, "anon"));
            step(&mut p, &s, &transfer_of(&out));
            assert_eq!(
                s.get(&index_key("anonymous_id", "anon-anon")).unwrap(),
                Some(known.as_bytes().to_vec()),
                "the survivor is found by the identifier (merged first: {merged_first})"
            );
        }
    }

    /// The survivor's event that also carries the merged profile's anonymous id.
    fn survivor_event_with_anon(known: &str) -> Message {
        let mut r = ResolvedEvent::from_avro(
            resolved(known, "m2", "Page Viewed")
                .payload
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        r.identifiers.push(Identifier {
            kind: "anonymous_id".into(),
            value: "anon-anon".into(),
        });
        Message {
            payload: Some(r.to_avro().unwrap()),
            ..resolved(known, "m2", "x")
        }
    }

    #[test]
    fn a_split_re_derives_each_profile_from_its_own_events() {
        let mut p = processor();
        let s = MemStore::default();
        step(&mut p, &s, &resolved("p", "m1", "Page Viewed"));
        step(&mut p, &s, &resolved("p", "m2", "Page Viewed"));
        // An event of another person, wrongly merged in: an order and a crm id.
        let mut wrong = ResolvedEvent::from_avro(
            resolved("p", "m3", "Order Completed")
                .payload
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        let crm = Identifier {
            kind: "crm_id".into(),
            value: "c-1".into(),
        };
        wrong.identifiers = vec![crm.clone()];
        let msg = Message {
            payload: Some(wrong.to_avro().unwrap()),
            ..resolved("p", "m3", "x")
        };
        let out = step(&mut p, &s, &msg);
        assert_eq!(
            MembershipChange::from_avro(&out[0].payload).unwrap().change,
            "enter"
        );
        assert_eq!(load(&s, "p").unwrap().events_total, 3);
        let split = ProfileSplit {
            split_id: "sp".into(),
            profile_id: "p".into(),
            assignments: vec![
                tessera_common::records::Assignment {
                    kind: "anonymous_id".into(),
                    value: "anon-p".into(),
                    profile_id: "p".into(),
                },
                tessera_common::records::Assignment {
                    kind: "crm_id".into(),
                    value: "c-1".into(),
                    profile_id: "q".into(),
                },
            ],
            cause: "cmd".into(),
            event_time: 300,
            received_at: 300,
        };
        let sm = Message {
            topic: "tessera.identity.splits".into(),
            payload: Some(split.to_avro().unwrap()),
            ..resolved("p", "-", "x")
        };
        let out = step(&mut p, &s, &sm);
        let kept = load(&s, "p").unwrap();
        assert_eq!(kept.events_total, 2, "the wrong event left");
        assert!(!kept.event_counts.contains_key("Order Completed"));
        assert!(!kept.identifiers.contains(&crm));
        let exit = out
            .iter()
            .find(|o| o.topic == "tessera.segments.membership")
            .expect("an exit");
        assert_eq!(
            MembershipChange::from_avro(&exit.payload).unwrap().change,
            "exit"
        );
        let transfer = out
            .iter()
            .find(|o| o.topic == "tessera.profiles.transfers")
            .expect("a transfer to q");
        let tm = Message {
            topic: "tessera.profiles.transfers".into(),
            payload: Some(transfer.payload.clone()),
            ..resolved("q", "-", "x")
        };
        let out = step(&mut p, &s, &tm);
        let q = load(&s, "q").unwrap();
        assert_eq!(q.events_total, 1);
        assert!(q.identifiers.contains(&crm));
        assert_eq!(
            MembershipChange::from_avro(&out[0].payload).unwrap().change,
            "enter"
        );
        assert_eq!(
            s.get(&index_key("crm_id", "c-1")).unwrap(),
            Some(b"q".to_vec())
        );
    }

    fn tick_at(p: &mut ProfilesProcessor, s: &MemStore, now: i64) -> Vec<Output> {
        CLOCK.store(now, Ordering::SeqCst);
        let mut out = Vec::new();
        let mut txn = Txn::new(s);
        p.tick(now, &mut txn, &mut out).unwrap();
        s.write(txn.into_batch()).unwrap();
        out
    }

    fn changes(out: &[Output]) -> Vec<(String, String, String)> {
        out.iter()
            .filter(|o| o.topic == "tessera.segments.membership")
            .map(|o| {
                let m = MembershipChange::from_avro(&o.payload).unwrap();
                (m.segment_id, m.change, m.reason)
            })
            .collect()
    }

    fn order(profile: &str, mid: &str, t: i64, total: i64) -> Message {
        let mut r = ResolvedEvent::from_avro(
            resolved(profile, mid, "Order Completed")
                .payload
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        r.event.event_time = t;
        r.event.received_at = t;
        r.event.payload = serde_json::json!({"properties": {"total": total}}).to_string();
        Message {
            payload: Some(r.to_avro().unwrap()),
            ..resolved(profile, mid, "x")
        }
    }

    /// With several instances, each fires the timers of the partitions it serves and
    /// counts sizes per partition; a timer a moved partition left behind waits here and
    /// fires when the partition comes back.
    #[test]
    fn timers_and_sizes_follow_the_partitions_this_instance_serves() {
        let _clock = hold_clock();
        let (hour, t0) = (3_600_000, 1_000_000);
        CLOCK.store(t0, Ordering::SeqCst);
        let mut p = processor_with(&[
            r#"{"id":"active","condition":{"event_count":{"event":"Order Completed","min":1,"within":"1h"}}}"#,
        ]);
        let ownership = Ownership::default();
        p.placement = Placement {
            topic: "resolved".into(),
            partitions: 4,
            ownership: Some(ownership.clone()),
        };
        // Two profiles on different partitions.
        let ids: Vec<String> = (0..50).map(|i| format!("prof{i}")).collect();
        let a = ids[0].clone();
        let b = ids
            .iter()
            .find(|i| p.placement.partition(i) != p.placement.partition(&a))
            .unwrap()
            .clone();
        let (pa, pb) = (p.placement.partition(&a), p.placement.partition(&b));
        ownership.set_assigned([("resolved".to_string(), pa), ("resolved".to_string(), pb)]);
        let s = MemStore::default();
        step(&mut p, &s, &order(&a, "m1", t0, 10));
        step(&mut p, &s, &order(&b, "m2", t0, 10));
        assert_eq!(
            s.get(&segment_size_key("active", pa)).unwrap(),
            Some(b"1".to_vec())
        );
        assert_eq!(
            s.get(&segment_size_key("active", pb)).unwrap(),
            Some(b"1".to_vec())
        );
        // The back-fill of the first definitions finishes while both are served.
        assert!(tick_at(&mut p, &s, t0 + 1).is_empty());
        // b's partition moves to another instance: only a's window closes here.
        ownership.set_assigned([("resolved".to_string(), pa)]);
        let out = tick_at(&mut p, &s, t0 + hour);
        let left: Vec<String> = out
            .iter()
            .map(|o| String::from_utf8_lossy(&o.key).into_owned())
            .collect();
        assert_eq!(
            left,
            vec![a.clone()],
            "only the served partition's timer fired"
        );
        assert!(load(&s, &b).unwrap().segments.contains_key("active"));
        // It comes back: the timer left behind fires.
        ownership.set_assigned([("resolved".to_string(), pa), ("resolved".to_string(), pb)]);
        let out = tick_at(&mut p, &s, t0 + hour + 250);
        let left: Vec<String> = out
            .iter()
            .map(|o| String::from_utf8_lossy(&o.key).into_owned())
            .collect();
        assert_eq!(left, vec![b.clone()]);
        assert_eq!(
            s.get(&segment_size_key("active", pb)).unwrap(),
            Some(b"0".to_vec())
        );
    }

    /// A windowed segment is entered on events and left by the timer at the window's
    /// edge, with no event; its complement is entered by the same timer.
    /// The audit's finding: windows were evaluated with the wall clock and timers
    /// stamped with the time they fired, so a replay (a rebuild a day later) gave other
    /// segment changes than the original run. Evaluated at the records' time and at
    /// each edge's, a replay writes the same records.
    #[test]
    fn a_replay_a_day_later_writes_what_the_original_run_wrote() {
        let _clock = hold_clock();
        let (hour, t0) = (3_600_000, 1_000_000);
        let run = |clock: i64| {
            CLOCK.store(clock, Ordering::SeqCst);
            let mut p = processor_with(&[
                r#"{"id":"active","condition":{"event_count":{"event":"Order Completed","min":2,"within":"1h"}}}"#,
                r#"{"id":"spend_1h","event":"Order Completed","aggregate":"sum","property":"total","window":"1h"}"#,
            ]);
            let s = MemStore::default();
            let mut out = step(&mut p, &s, &order("a", "m1", t0, 60));
            out.extend(step(&mut p, &s, &order("a", "m2", t0 + 10, 70)));
            out.extend(step(&mut p, &s, &order("a", "m3", t0 + 3 * hour, 80)));
            out.extend(tick_at(&mut p, &s, clock.max(t0 + 5 * hour)));
            let written: Vec<(String, Vec<u8>, Vec<u8>)> = out
                .into_iter()
                .map(|o| (o.topic, o.key, o.payload))
                .collect();
            (
                written,
                load(&s, "a").unwrap().computed["spend_1h"].value.clone(),
            )
        };
        let original = run(t0);
        let replay = run(t0 + 24 * hour);
        assert!(
            original
                .0
                .iter()
                .any(|(t, _, p)| t == "tessera.segments.membership"
                    && MembershipChange::from_avro(p).unwrap().change == "exit"),
            "the original run entered and left the segment"
        );
        assert_eq!(original.0.len(), replay.0.len());
        for (a, b) in original.0.iter().zip(&replay.0) {
            assert_eq!(a, b, "a record of the replay differs");
        }
        assert_eq!(original.1, replay.1);
    }

    #[test]
    fn a_window_edge_moves_a_profile_without_an_event() {
        let _clock = hold_clock();
        let hour = 3_600_000;
        let t0 = 1_000_000;
        CLOCK.store(t0, Ordering::SeqCst);
        let mut p = processor_with(&[
            r#"{"id":"buyers","condition":{"event_count":{"event":"Order Completed","min":1}}}"#,
            r#"{"id":"active","condition":{"event_count":{"event":"Order Completed","min":2,"where":[{"property":"total","gt":50}],"within":"1h"}}}"#,
            r#"{"id":"lapsed","condition":{"all":[{"in_segment":"buyers"},{"not":{"event_count":{"event":"Order Completed","min":1,"within":"1h"}}}]}}"#,
            r#"{"id":"spend_1h","event":"Order Completed","aggregate":"sum","property":"total","window":"1h"}"#,
        ]);
        let s = MemStore::default();
        step(&mut p, &s, &order("a", "m1", t0, 60));
        step(&mut p, &s, &order("a", "m2", t0 + 10, 20));
        let out = step(&mut p, &s, &order("a", "m3", t0 + 20, 70));
        assert_eq!(
            changes(&out),
            vec![(
                "active".into(),
                "enter".into(),
                "event: event_count(Order Completed) within 1h".into()
            )]
        );
        let a = load(&s, "a").unwrap();
        assert_eq!(a.computed["spend_1h"].value, serde_json::json!(150.0));
        assert_eq!(a.timer, Some(t0 + hour));
        // One millisecond before the edge nothing moves.
        assert!(changes(&tick_at(&mut p, &s, t0 + hour - 1)).is_empty());
        // At the edge the first order leaves: one order over 50 remains.
        let out = tick_at(&mut p, &s, t0 + hour);
        assert_eq!(
            changes(&out),
            vec![(
                "active".into(),
                "exit".into(),
                "window: event_count(Order Completed) within 1h".into()
            )]
        );
        let m = MembershipChange::from_avro(&out[0].payload).unwrap();
        assert_eq!(m.event_time, t0 + hour, "the time of the edge");
        assert_eq!(
            load(&s, "a").unwrap().computed["spend_1h"].value,
            serde_json::json!(90.0)
        );
        // When the last order leaves, the person has lapsed.
        let out = tick_at(&mut p, &s, t0 + 20 + hour);
        assert_eq!(changes(&out)[0].0, "lapsed");
        assert_eq!(changes(&out)[0].1, "enter");
        let a = load(&s, "a").unwrap();
        assert_eq!(a.timer, None, "nothing left to expire");
        assert!(a.segments.contains_key("lapsed") && a.segments.contains_key("buyers"));
        assert_eq!(
            s.scan_prefix(member_key_prefix("lapsed").as_bytes(), 10)
                .unwrap()
                .len(),
            1,
            "the member index follows"
        );
    }

    /// A definition added at run time is back-filled over existing profiles: its
    /// computed trait comes from their kept history, and members enter.
    #[test]
    fn a_new_definition_is_back_filled_from_the_kept_history() {
        let _clock = hold_clock();
        CLOCK.store(1_000, Ordering::SeqCst);
        let mut p = processor();
        let s = MemStore::default();
        for (i, profile) in ["a", "b", "c"].iter().enumerate() {
            for j in 0..=i {
                step(
                    &mut p,
                    &s,
                    &order(profile, &format!("{profile}{j}"), 500, 40),
                );
            }
        }
        tick_at(&mut p, &s, 1_000);
        define(
            &p.catalog,
            &[
                r#"{"id":"orders","event":"Order Completed","aggregate":"count"}"#,
                r#"{"id":"repeat","condition":{"computed":{"name":"orders","gte":2}}}"#,
            ],
        );
        let out = tick_at(&mut p, &s, 2_000);
        let mut entered: Vec<String> = out
            .iter()
            .filter(|o| o.topic == "tessera.segments.membership")
            .map(|o| MembershipChange::from_avro(&o.payload).unwrap())
            .filter(|m| m.change == "enter")
            .map(|m| format!("{}:{}", m.profile_id, m.reason))
            .collect();
        entered.sort();
        assert_eq!(
            entered,
            vec![
                "b:definition: computed(orders)",
                "c:definition: computed(orders)"
            ]
        );
        assert_eq!(
            load(&s, "c").unwrap().computed["orders"].value,
            serde_json::json!(3)
        );
        let job: Backfill =
            serde_json::from_slice(&s.get(META_BACKFILL).unwrap().unwrap()).unwrap();
        assert_eq!((job.scanned, job.total), (3, 3));
        assert!(job.finished_at.is_some());
        // The dry run of a stricter candidate counts without changing anything.
        let candidate = Definition::parse(
            r#"{"id":"loyal","condition":{"computed":{"name":"orders","gte":3}}}"#,
            false,
            None,
        )
        .unwrap();
        let set = p.catalog.with_candidate(&candidate).unwrap();
        let run = |limit| {
            dry_run(
                &s,
                &set,
                "loyal",
                100,
                2_000,
                limit,
                &Placement::everything(),
            )
            .unwrap()
        };
        let r = run(None);
        assert_eq!((r.size, r.scanned, r.total), (1, 3, 3));
        assert_eq!(r.sample, vec!["c".to_string()]);
        // A sample stops after that many profiles (the first in key order).
        let r = run(Some(2));
        assert_eq!((r.size, r.scanned, r.total), (0, 2, 3));
        // Deleting the segment ends its memberships on the next back-fill.
        let del = p.catalog.propose("segment", "repeat", None, "api").unwrap();
        p.catalog.apply(del);
        let out = tick_at(&mut p, &s, 3_000);
        assert_eq!(
            changes(&out)
                .iter()
                .filter(|c| c.1 == "exit" && c.2 == "definition removed")
                .count(),
            2
        );
        assert_eq!(
            s.get(&segment_size_key("repeat", 0)).unwrap(),
            Some(b"0".to_vec())
        );
    }

    /// Re-evaluating only the segments an event touched leaves every profile exactly
    /// where evaluating all segments would: after each event, a full evaluation finds
    /// nothing to change.
    #[test]
    fn evaluating_the_touched_segments_equals_evaluating_all() {
        let _clock = hold_clock();
        CLOCK.store(10_000, Ordering::SeqCst);
        let mut p = processor_with(&[
            r#"{"id":"ct","event":"Order Completed","aggregate":"sum","property":"total"}"#,
            r#"{"id":"buyers","condition":{"event_count":{"event":"Order Completed","min":1}}}"#,
            r#"{"id":"none","condition":{"not":{"event_count":{"event":"Order Completed","min":1}}}}"#,
            r#"{"id":"big","condition":{"computed":{"name":"ct","gt":100}}}"#,
            r#"{"id":"pro","condition":{"trait":{"name":"plan","equals":"pro"}}}"#,
            r#"{"id":"ads","condition":{"all":[{"consent":"Ads"},{"has_identifier":"email"}]}}"#,
            r#"{"id":"pro-buyers","condition":{"all":[{"in_segment":"pro"},{"in_segment":"buyers"}]}}"#,
            r#"{"id":"not-pro","condition":{"not":{"in_segment":"pro"}}}"#,
        ]);
        let s = MemStore::default();
        let mut x: u64 = 42;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for i in 0..300 {
            let profile = format!("p{}", rnd(5));
            let mut r = ResolvedEvent::from_avro(
                resolved(&profile, &format!("m{i}"), "x")
                    .payload
                    .as_ref()
                    .unwrap(),
            )
            .unwrap();
            r.event.event_time = i;
            match rnd(3) {
                0 => {
                    r.event.event = Some("Order Completed".into());
                    r.event.payload =
                        serde_json::json!({"properties": {"total": rnd(80)}}).to_string();
                }
                1 => {
                    r.event.kind = "identify".into();
                    r.event.event = None;
                    let plan = ["pro", "free"][rnd(2) as usize];
                    r.event.payload = serde_json::json!({"traits": {"plan": plan},
                        "context": {"consent": {"categoryPreferences": {"Ads": rnd(2) == 0}}}})
                    .to_string();
                    if rnd(2) == 0 {
                        r.identifiers.push(Identifier {
                            kind: "email".into(),
                            value: format!("{profile}@x.io"),
                        });
                    }
                }
                _ => r.event.event = Some("Page Viewed".into()),
            }
            let msg = Message {
                payload: Some(r.to_avro().unwrap()),
                ..resolved(&profile, "-", "x")
            };
            step(&mut p, &s, &msg);
            let mut stored = load(&s, &profile).unwrap();
            let missed = transitions(&p.rules.defs, &mut stored, 0, "check", &Touched::all());
            assert!(missed.is_empty(), "after event {i}: {missed:?}");
        }
    }

    fn at(profile: &str, mid: &str, name: &str, t: i64) -> Message {
        let m = resolved(profile, mid, name);
        let mut r = ResolvedEvent::from_avro(m.payload.as_ref().unwrap()).unwrap();
        r.event.event_time = t;
        r.event.received_at = t;
        Message {
            payload: Some(r.to_avro().unwrap()),
            ..m
        }
    }

    fn fired(out: &[Output]) -> Vec<TriggerFired> {
        out.iter()
            .filter(|o| o.topic == "tessera.profiles.triggers")
            .map(|o| TriggerFired::from_avro(&o.payload).unwrap())
            .collect()
    }

    #[test]
    fn a_waiting_trigger_fires_from_the_durable_timer_and_a_purchase_cancels_another() {
        let _clock = hold_clock();
        let t0 = 50_000_000;
        let hour = 3_600_000;
        CLOCK.store(t0, Ordering::SeqCst);
        let defs = [
            r#"{"id":"buyers","condition":{"event_count":{"event":"Order Completed","min":1}}}"#,
            r#"{"id":"abandoned-cart","when":{"event":"Cart Viewed"},"wait":"1h","unless":{"event":"Order Completed"}}"#,
            r#"{"id":"first-order","when":{"segment":"buyers"}}"#,
        ];
        let mut p = processor_with(&defs);
        let s = MemStore::default();
        assert!(fired(&step(&mut p, &s, &at("a", "a1", "Cart Viewed", t0))).is_empty());
        step(&mut p, &s, &at("b", "b1", "Cart Viewed", t0));
        // b buys: its cart trigger is cancelled, and entering buyers fires at once.
        let out = step(&mut p, &s, &at("b", "b2", "Order Completed", t0 + 10));
        let now = fired(&out);
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].trigger_id, "first-order");
        assert_eq!(now[0].segments, vec!["buyers".to_string()]);
        assert!(load(&s, "b").unwrap().pending.is_empty());
        assert_eq!(load(&s, "a").unwrap().timer, Some(t0 + hour));
        assert!(fired(&tick_at(&mut p, &s, t0 + hour - 1)).is_empty());
        // A restarted processor over the same state fires it: the timer is durable.
        let mut restarted = processor_with(&defs);
        let out = tick_at(&mut restarted, &s, t0 + hour);
        let due = fired(&out);
        assert_eq!(due.len(), 1, "only a's cart fires");
        assert_eq!(
            (due[0].profile_id.as_str(), due[0].trigger_id.as_str()),
            ("a", "abandoned-cart")
        );
        assert_eq!(due[0].event_time, t0 + hour);
        assert_eq!(due[0].event, "Cart Viewed");
        assert!(fired(&tick_at(&mut restarted, &s, t0 + 2 * hour)).is_empty());
        assert_eq!(load(&s, "a").unwrap().timer, None);
    }
}
