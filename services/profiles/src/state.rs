//! The profiles processor: applies resolved events, merges and transfers to profiles in
//! RocksDB, evaluates segments on every change and emits membership changes.
//!
//! Keys: `p/<id>` profile JSON; `redirect/<id>` → survivor of a merge; `idx/<kind>/<value>`
//! → profile id (for lookups); `segsize/<segment>` → member count; `seen/<id>` and
//! `seenexp/<expiry>/<id>` → de-duplication of message, merge and transfer ids within
//! the window.
//!
//! Merges across partitions: a merge record arrives keyed by the merged profile, where
//! its state lives. That state leaves as a transfer keyed by the survivor and is
//! absorbed there; the merged id becomes a redirect, and events still in flight for it
//! are forwarded the same way.

use std::sync::Arc;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use tracing::{debug, warn};

use tessera_common::admin::Admin;
use tessera_common::ids::deterministic_id;
use tessera_common::records::{
    AvroRecord, MembershipChange, ProfileMerge, ProfileTransfer, ResolvedEvent,
};
use tessera_common::runner::{self, Message, Output, Processor};
use tessera_common::store::{Store, Txn};
use tessera_common::topics::Topics;
use tessera_common::{Error, Result};

use crate::profile::{Membership, Profile};
use crate::segments::Segment;

pub fn profile_key(id: &str) -> Vec<u8> {
    format!("p/{id}").into_bytes()
}
fn redirect_key(id: &str) -> Vec<u8> {
    format!("redirect/{id}").into_bytes()
}
pub fn index_key(kind: &str, value: &str) -> Vec<u8> {
    format!("idx/{kind}/{value}").into_bytes()
}
pub fn segment_size_key(segment: &str) -> Vec<u8> {
    format!("segsize/{segment}").into_bytes()
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

#[derive(Clone)]
pub struct ProfilesMetrics {
    pub applied: IntCounter,
    pub duplicates: IntCounterVec,
    pub membership: IntCounterVec,
    pub event_latency: Histogram,
    pub state_bytes: IntGauge,
}

impl ProfilesMetrics {
    pub fn new(admin: &Admin) -> Self {
        ProfilesMetrics {
            applied: admin.register(
                &IntCounter::new(
                    "tessera_profiles_events_applied_total",
                    "Events applied to a profile",
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
            state_bytes: admin.register(
                &IntGauge::new(
                    "tessera_profiles_state_size_bytes",
                    "RocksDB live SST bytes",
                )
                .unwrap(),
            ),
        }
    }
}

pub struct ProfilesProcessor {
    pub topics: Topics,
    pub segments: Arc<Vec<Segment>>,
    pub recent_limit: usize,
    pub dedup_window_ms: i64,
    pub metrics: ProfilesMetrics,
    pub store_for_size: Option<Arc<dyn Store>>,
}

/// What caused a change, for deterministic record ids and timing.
struct Cause<'a> {
    id: &'a str,
    event_time: i64,
    received_at: i64,
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

    fn transfer(&self, survivor: &str, state: &Profile, cause: &Cause<'_>) -> Result<Output> {
        let t = ProfileTransfer {
            transfer_id: deterministic_id("transfer", &[survivor, &state.id, cause.id]),
            survivor: survivor.to_string(),
            from_profile: state.id.clone(),
            state: serde_json::to_string(state)?,
            received_at: cause.received_at,
        };
        Ok(Output {
            topic: self.topics.transfers(),
            key: survivor.as_bytes().to_vec(),
            payload: t.to_avro()?,
        })
    }

    /// Loads (or starts) a profile, changes it, indexes new identifiers, re-evaluates
    /// segments and saves it.
    fn update(
        &self,
        txn: &mut Txn<'_>,
        id: &str,
        cause: &Cause<'_>,
        out: &mut Vec<Output>,
        change: impl FnOnce(&mut Profile) -> bool,
    ) -> Result<()> {
        let mut p = txn
            .get_json::<Profile>(&profile_key(id))?
            .unwrap_or_else(|| Profile::new(id));
        let identifiers_before = p.identifiers.len();
        let fields_changed = change(&mut p);
        if p.identifiers.len() != identifiers_before {
            // Rare (a new identifier or a merge): (re)index them all, idempotently.
            for i in &p.identifiers {
                txn.put(index_key(&i.kind, &i.value), id.as_bytes().to_vec());
            }
        }
        self.evaluate(txn, &mut p, fields_changed, cause, out)?;
        txn.put_json(profile_key(id), &p)
    }

    /// Enter and exit records for membership changes; with `fields_changed`, an
    /// `update` record for each segment the profile stays in, so destinations keep
    /// current identifiers and traits.
    fn evaluate(
        &self,
        txn: &mut Txn<'_>,
        p: &mut Profile,
        fields_changed: bool,
        cause: &Cause<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let mut changes: Vec<(String, i32, &'static str, String)> = Vec::new();
        for seg in self.segments.iter() {
            let now_in = seg.condition.matches(p);
            match (p.segments.get(&seg.id).cloned(), now_in) {
                (None, true) => {
                    p.segments.insert(
                        seg.id.clone(),
                        Membership {
                            version: seg.version,
                            entered_at: cause.event_time,
                        },
                    );
                    changes.push((
                        seg.id.clone(),
                        seg.version,
                        "enter",
                        seg.condition.describe(),
                    ));
                }
                (Some(_), false) => {
                    p.segments.remove(&seg.id);
                    changes.push((
                        seg.id.clone(),
                        seg.version,
                        "exit",
                        seg.condition.describe(),
                    ));
                }
                (Some(m), true) => {
                    if m.version != seg.version {
                        p.segments.insert(
                            seg.id.clone(),
                            Membership {
                                version: seg.version,
                                entered_at: m.entered_at,
                            },
                        );
                    }
                    if fields_changed {
                        changes.push((
                            seg.id.clone(),
                            seg.version,
                            "update",
                            "profile fields changed".into(),
                        ));
                    }
                }
                (None, false) => {}
            }
        }
        // Memberships of segments that are no longer defined end.
        let gone: Vec<(String, i32)> = p
            .segments
            .iter()
            .filter(|(id, _)| !self.segments.iter().any(|s| &s.id == *id))
            .map(|(id, m)| (id.clone(), m.version))
            .collect();
        for (id, version) in gone {
            p.segments.remove(&id);
            changes.push((id, version, "exit", "definition removed".into()));
        }
        self.emit(txn, p, &changes, cause, out)
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
        let fields = serde_json::to_string(&p.flat_fields())?;
        for (segment, version, change, reason) in changes {
            let delta = match *change {
                "enter" => 1,
                "exit" => -1,
                _ => 0,
            };
            if delta != 0 {
                let size_key = segment_size_key(segment);
                let size: i64 = txn.get_json(&size_key)?.unwrap_or(0);
                txn.put_json(size_key, &(size + delta).max(0))?;
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
                traits: fields.clone(),
            };
            out.push(Output {
                topic: self.topics.membership(),
                key: p.id.as_bytes().to_vec(),
                payload: rec.to_avro()?,
            });
        }
        Ok(())
    }

    fn on_event(&self, r: ResolvedEvent, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        let e = &r.event;
        if self.seen_before(txn, &e.message_id, e.received_at, "event")? {
            debug!(profile = %r.profile_id, "duplicate message dropped");
            return Ok(());
        }
        let cause = Cause {
            id: &e.message_id,
            event_time: e.event_time,
            received_at: e.received_at,
        };
        let live = live_id(|k| txn.get(k), &r.profile_id)?;
        if live != r.profile_id {
            // The profile was merged away while this event was in flight.
            let mut alone = Profile::new(&r.profile_id);
            alone.apply(&r, self.recent_limit);
            out.push(self.transfer(&live, &alone, &cause)?);
            return Ok(());
        }
        self.update(txn, &live, &cause, out, |p| p.apply(&r, self.recent_limit))?;
        self.metrics.applied.inc();
        let latency_ms = (tessera_common::now_ms() - e.received_at).max(0);
        self.metrics
            .event_latency
            .observe(latency_ms as f64 / 1000.0);
        Ok(())
    }

    fn on_merge(&self, m: ProfileMerge, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        if self.seen_before(txn, &m.merge_id, m.received_at, "merge")? {
            return Ok(());
        }
        let cause = Cause {
            id: &m.merge_id,
            event_time: m.event_time,
            received_at: m.received_at,
        };
        txn.put(redirect_key(&m.merged), m.survivor.as_bytes().to_vec());
        let Some(mut merged) = txn.get_json::<Profile>(&profile_key(&m.merged))? else {
            return Ok(());
        };
        // The merged profile leaves its segments; the survivor is re-evaluated on arrival.
        let exits: Vec<(String, i32, &'static str, String)> = merged
            .segments
            .iter()
            .map(|(id, mem)| {
                (
                    id.clone(),
                    mem.version,
                    "exit",
                    "profile merged".to_string(),
                )
            })
            .collect();
        self.emit(txn, &merged, &exits, &cause, out)?;
        merged.segments.clear();
        for i in &merged.identifiers {
            txn.put(index_key(&i.kind, &i.value), m.survivor.as_bytes().to_vec());
        }
        txn.delete(profile_key(&m.merged));
        out.push(self.transfer(&m.survivor, &merged, &cause)?);
        Ok(())
    }

    fn on_transfer(
        &self,
        t: ProfileTransfer,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if self.seen_before(txn, &t.transfer_id, t.received_at, "transfer")? {
            return Ok(());
        }
        let moved: Profile = serde_json::from_str(&t.state)?;
        let cause = Cause {
            id: &t.transfer_id,
            event_time: moved.last_seen.max(0),
            received_at: t.received_at,
        };
        let live = live_id(|k| txn.get(k), &t.survivor)?;
        if live != t.survivor {
            out.push(self.transfer(&live, &moved, &cause)?);
            return Ok(());
        }
        self.update(txn, &live, &cause, out, |p| {
            p.absorb(&moved, self.recent_limit)
        })
    }
}

impl Processor for ProfilesProcessor {
    fn process(&mut self, msg: &Message, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        let bytes = msg.payload.as_deref().unwrap_or_default();
        let decoded = if msg.topic == self.topics.resolved() {
            ResolvedEvent::from_avro(bytes).map(|r| self.on_event(r, txn, out))
        } else if msg.topic == self.topics.merges() {
            ProfileMerge::from_avro(bytes).map(|m| self.on_merge(m, txn, out))
        } else if msg.topic == self.topics.transfers() {
            ProfileTransfer::from_avro(bytes).map(|t| self.on_transfer(t, txn, out))
        } else {
            Err(Error::Invalid(format!("unexpected topic {}", msg.topic)))
        };
        match decoded {
            Ok(applied) => applied,
            Err(e) => {
                warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, error = %e, "undecodable record, dead-lettered");
                out.push(runner::dead_letter(
                    &self.topics.deadletter(),
                    msg,
                    &e.to_string(),
                )?);
                Ok(())
            }
        }
    }

    /// Forgets de-duplication entries past their window.
    fn tick(&mut self, now_ms: i64, txn: &mut Txn<'_>, _out: &mut Vec<Output>) -> Result<()> {
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
        if let Some(store) = &self.store_for_size {
            self.metrics.state_bytes.set(store.size_bytes() as i64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_common::config::Config;
    use tessera_common::records::{Identifier, IngestedEvent};
    use tessera_common::store::MemStore;

    fn processor() -> ProfilesProcessor {
        let cfg = Config::load_without_env(None).unwrap();
        let buyers = Segment::parse(r#"{"id":"buyers","version":1,"condition":{"event_count":{"event":"Order Completed","min":1}}}"#).unwrap();
        ProfilesProcessor {
            topics: Topics::new(&cfg.topics),
            segments: Arc::new(vec![buyers]),
            recent_limit: 10,
            dedup_window_ms: 1000,
            metrics: ProfilesMetrics::new(&Admin::new()),
            store_for_size: None,
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
            s.get(&segment_size_key("buyers")).unwrap(),
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
        let merge = ProfileMerge {
            merge_id: "mg".into(),
            survivor: "known".into(),
            merged: "anon".into(),
            cause_message_id: "m3".into(),
            event_time: 200,
            received_at: 200,
            rule: None,
            score: None,
        };
        let mm = Message {
            topic: "tessera.identity.merges".into(),
            partition: 0,
            offset: 1,
            key: None,
            payload: Some(merge.to_avro().unwrap()),
            timestamp_ms: None,
        };
        let out = step(&mut p, &s, &mm);
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
        let transfer = Message {
            topic: "tessera.profiles.transfers".into(),
            partition: 0,
            offset: 2,
            key: None,
            payload: Some(out[1].payload.clone()),
            timestamp_ms: None,
        };
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
}
