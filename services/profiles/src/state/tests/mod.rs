//! The profiles processor, record by record on the in-memory store; merges, splits and
//! transfers in `merges.rs`.

use super::*;
use std::sync::atomic::{AtomicI64, Ordering};
use tessera_common::config::Config;
use tessera_common::records::{Identifier, IngestedEvent};
use tessera_common::store::MemStore;

use crate::catalog::Definition;

pub(super) static CLOCK: AtomicI64 = AtomicI64::new(100);
/// Tests that set the clock hold this, so they do not move each other's time.
static CLOCK_HELD: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(super) fn hold_clock() -> std::sync::MutexGuard<'static, ()> {
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

pub(super) fn processor_with(docs: &[&str]) -> ProfilesProcessor {
    let cfg = Config::demo();
    let catalog = Catalog::default();
    define(&catalog, docs);
    ProfilesProcessor {
        inputs: Input::routes(&Topics::new(&cfg.topics)),
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
        fitting: Fitting::new((&cfg.profiles).into()),
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

pub(super) fn step(p: &mut ProfilesProcessor, s: &MemStore, m: &Message) -> Vec<Output> {
    let mut out = Vec::new();
    let mut txn = Txn::new(s);
    p.process(m, &mut txn, &mut out).unwrap();
    s.write(txn.into_batch()).unwrap();
    out
}

pub(super) fn load(s: &MemStore, id: &str) -> Option<Profile> {
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
        serde_json::from_str(&PrivacyReport::from_avro(&report.payload).unwrap().detail).unwrap();
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

pub(super) fn tick_at(p: &mut ProfilesProcessor, s: &MemStore, now: i64) -> Vec<Output> {
    CLOCK.store(now, Ordering::SeqCst);
    let mut out = Vec::new();
    let mut txn = Txn::new(s);
    p.tick(now, &mut txn, &mut out).unwrap();
    s.write(txn.into_batch()).unwrap();
    out
}

pub(super) fn changes(out: &[Output]) -> Vec<(String, String, String)> {
    out.iter()
        .filter(|o| o.topic == "tessera.segments.membership")
        .map(|o| {
            let m = MembershipChange::from_avro(&o.payload).unwrap();
            (m.segment_id, m.change, m.reason)
        })
        .collect()
}

pub(super) fn order(profile: &str, mid: &str, t: i64, total: i64) -> Message {
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
    let job: Backfill = serde_json::from_slice(&s.get(META_BACKFILL).unwrap().unwrap()).unwrap();
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
                r.event.payload = serde_json::json!({"properties": {"total": rnd(80)}}).to_string();
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
        let missed = transitions(&p.rules.defs, &mut stored, 0, Why::DryRun, &Touched::all());
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

/// A tick reads due timers and expired de-duplication entries in pages that grow from a
/// few rows (it read a thousand timers per partition and 10,000 entries every 250 ms,
/// due or not): every one due is still handled in one tick, over many pages, and
/// nothing not due is.
#[test]
fn a_tick_handles_every_due_timer_and_expired_entry_across_pages() {
    let _clock = hold_clock();
    let (hour, t0) = (3_600_000, 1_000_000);
    CLOCK.store(t0, Ordering::SeqCst);
    let mut p = processor_with(&[
        r#"{"id":"recent","condition":{"event_count":{"event":"Order Completed","min":1,"within":"1h"}}}"#,
    ]);
    let s = MemStore::default();
    let people = 300;
    for i in 0..people {
        step(
            &mut p,
            &s,
            &order(&format!("p{i}"), &format!("m{i}"), t0, 10),
        );
    }
    // One later order: its timer and its entry are not due at the tick.
    step(&mut p, &s, &order("late", "m-late", t0 + hour, 10));
    assert!(changes(&tick_at(&mut p, &s, t0 + hour - 1)).is_empty());
    let out = tick_at(&mut p, &s, t0 + hour);
    let exits = changes(&out).iter().filter(|c| c.1 == "exit").count();
    assert_eq!(exits, people, "every due timer fired in one tick");
    for i in 0..people {
        assert!(s.get(&seen_key(&format!("m{i}"))).unwrap().is_none());
    }
    assert!(
        s.get(&seen_key("m-late")).unwrap().is_some(),
        "not expired yet"
    );
    assert!(load(&s, "late").unwrap().segments.contains_key("recent"));
}

mod merges;
