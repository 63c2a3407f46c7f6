//! An event applied to its profile: de-duplication, traits and computed traits,
//! segments evaluated on what changed, triggers, and the membership records emitted.

use super::*;

/// Keeps the household and account member indexes in step with a profile.
pub(crate) fn index_groups(
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

/// Why a profile is being re-evaluated: the first word of a membership change's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    Event,
    Merge,
    Split,
    /// A timer: a window's edge or a pending trigger's deadline.
    Window,
    /// A back-fill after a definition changed; it starts no segment trigger.
    Definition,
    /// A segment's size estimated before it is saved (nothing is written or sent).
    DryRun,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::Event => "event",
            Why::Merge => "merge",
            Why::Split => "split",
            Why::Window => "window",
            Why::Definition => "definition",
            Why::DryRun => "dry run",
        }
    }
}

/// What caused a change, for deterministic record ids, reasons and timing.
pub(crate) struct Cause<'a> {
    pub(crate) id: &'a str,
    pub(crate) why: Why,
    pub(crate) event_time: i64,
    pub(crate) received_at: i64,
    /// The event being applied, with its parsed payload (event triggers start and
    /// cancel on it).
    pub(crate) event: Option<(&'a ResolvedEvent, &'a serde_json::Value)>,
}

/// What downstream activation needs of a profile at a change: its fields (traits and
/// identifiers), consent decisions and segments, as the records carry them.
pub(crate) struct Snapshot {
    pub(crate) traits: String,
    pub(crate) consent: String,
    pub(crate) segments: Vec<String>,
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

/// One membership change, with its reason (`<why>: <condition>`).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub segment: String,
    pub version: i32,
    pub transition: Transition,
    pub reason: String,
}

impl Change {
    pub(crate) fn new(
        segment: &str,
        version: i32,
        transition: Transition,
        reason: String,
    ) -> Change {
        Change {
            segment: segment.to_string(),
            version,
            transition,
            reason,
        }
    }
}

/// Evaluates every segment in dependency order (so `in_segment` sees this evaluation's
/// result) and updates the profile's memberships; returns the enters and exits, each
/// with its reason (`<why>: <condition>`). Memberships of segments no longer defined end.
pub fn transitions(
    defs: &DefinitionSet,
    p: &mut Profile,
    at: i64,
    why: Why,
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
                let reason = format!("{}: {}", why.as_str(), seg.condition.describe());
                changes.push(Change::new(&seg.id, seg.version, Transition::Enter, reason));
                moved.insert(seg.id.clone());
            }
            (Some(_), false) => {
                p.segments.remove(&seg.id);
                let reason = format!("{}: {}", why.as_str(), seg.condition.describe());
                changes.push(Change::new(&seg.id, seg.version, Transition::Exit, reason));
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
        changes.push(Change::new(
            &id,
            version,
            Transition::Exit,
            "definition removed".into(),
        ));
    }
    changes
}

impl ProfilesProcessor {
    pub(crate) fn seen_before(
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

    /// Loads (or starts) a profile, changes it, indexes new identifiers, re-evaluates
    /// segments and saves it.
    pub(crate) fn update(
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
        let next = crate::computed::earliest(next_edge, triggers::next_due(&p));
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
    pub(crate) fn run_triggers(
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
            Why::Definition => Vec::new(),
            _ => changes
                .iter()
                .filter(|c| c.transition != Transition::Update)
                .map(|c| (c.segment.as_str(), c.transition))
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

    pub(crate) fn count_profiles(&self, txn: &mut Txn<'_>, id: &str, delta: i64) -> Result<()> {
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

    /// Enter and exit records for membership changes; with `fields_changed`, an
    /// `update` record for each segment the profile stays in, so destinations keep
    /// current identifiers and traits.
    pub(crate) fn evaluate(
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
                if !changes.iter().any(|c| &c.segment == id) {
                    changes.push(Change::new(
                        id,
                        m.version,
                        Transition::Update,
                        "profile fields changed".into(),
                    ));
                }
            }
        }
        self.emit(txn, p, &changes, cause, out)?;
        Ok(changes)
    }

    pub(crate) fn emit(
        &self,
        txn: &mut Txn<'_>,
        p: &Profile,
        changes: &[Change],
        cause: &Cause<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let snap = Snapshot::of(p)?;
        for c in changes {
            let (segment, version, change) = (&c.segment, &c.version, c.transition.as_str());
            let delta = match c.transition {
                Transition::Enter => 1,
                Transition::Exit => -1,
                Transition::Update => 0,
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
                reason: c.reason.clone(),
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

    pub(crate) fn on_event(
        &self,
        r: ResolvedEvent,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
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
            why: Why::Event,
            event_time: e.event_time,
            received_at: e.received_at,
            event: Some((&r, &payload)),
        };
        let live = live_id(|k| txn.get(k), &r.profile_id)?;
        if live != r.profile_id {
            // The profile was merged away while this event was in flight.
            let mut alone = Profile::new(&r.profile_id);
            alone.apply(&r, &self.rules);
            out.push(self.transfer(&live, &alone, vec![r.clone()], false, 0, &cause)?);
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
}
