//! The same input through a fault-free platform and through one whose four services are
//! killed with SIGKILL in turn under load: every profile ends up identical (compared by
//! a hash of its state), no accepted event is lost or counted twice, and the faulted
//! run's activations are the fault-free run's (same ids), plus repeats of them.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use tessera_common::records::Activation;
use tessera_tests::*;

const USERS: usize = 30;
const ROUNDS: usize = 8;
const CHUNK: usize = 6;

/// Deterministic input: per user an anonymous visit, then an identify that joins it to
/// the user, then orders and carts with fixed message ids and event times.
fn input(run: &str, t0: i64) -> Vec<Vec<Value>> {
    let ts = |i: usize| {
        chrono::DateTime::from_timestamp_millis(t0 + i as i64 * 1000)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let mut events = Vec::new();
    for round in 0..ROUNDS {
        for u in 0..USERS {
            let user = format!("{run}-u{u}");
            let anon = format!("{run}-a{u}");
            let mid = format!("{run}-u{u}-r{round}");
            let e = match round {
                0 => json!({"type": "page", "anonymousId": anon, "name": "Home"}),
                1 => json!({"type": "identify", "userId": user, "anonymousId": anon,
                    "traits": {"email": format!("{user}@example.com"), "first_name": format!("N{u}"), "plan": if u % 3 == 0 {"pro"} else {"free"}},
                    "context": {"consent": {"categoryPreferences": {"Advertising": u % 2 == 0}}}}),
                r if r % 3 == 0 => json!({"type": "track", "userId": user, "event": "Cart Viewed",
                    "properties": {"cart_id": format!("c{u}-{r}")}}),
                r => json!({"type": "track", "userId": user, "event": "Order Completed",
                    "properties": {"total": 20 + (u * 7 + r * 13) % 90}}),
            };
            let mut e = e;
            e["messageId"] = json!(mid);
            e["timestamp"] = json!(ts(round * USERS + u));
            events.push(e);
        }
    }
    events.chunks(CHUNK).map(|c| c.to_vec()).collect()
}

/// Posts a batch until ingest answers 200 (the client's retry: same message ids).
async fn deliver(ingest: &str, batch: &[Value]) -> u32 {
    let body = json!({ "batch": batch });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut retries = 0;
    loop {
        let sent = http()
            .post(format!("{ingest}/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 200 => return retries,
            _ => {
                assert!(Instant::now() < deadline, "ingest did not come back");
                retries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The parts of a profile that must not depend on faults (not receive times).
fn canonical(p: &Value) -> Value {
    let mut c = json!({});
    for k in [
        "profile_id",
        "identifiers",
        "traits",
        "event_counts",
        "events_total",
        "computed_traits",
        "consent",
        "segments",
        "first_seen",
        "last_seen",
        "merged_from",
        "waiting_triggers",
        "accounts",
        "household",
    ] {
        c[k] = p[k].clone();
    }
    c
}

fn hash(v: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// Every user's profile, once it holds all of that user's events.
async fn profiles_of(profiles: &str, run: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for u in 0..USERS {
        let user = format!("{run}-u{u}");
        let p = wait_profile(profiles, "user_id", &user, "all events of the user", |v| {
            v["events_total"].as_u64() >= Some(ROUNDS as u64)
        })
        .await;
        out.insert(user, canonical(&p));
    }
    out
}

/// Activation ids per destination, and the number of records read.
async fn activations(
    topics: &tessera_common::topics::Topics,
    expect: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> (BTreeMap<String, BTreeSet<String>>, usize) {
    let mut ids = BTreeMap::new();
    let mut records = 0;
    for d in ["email-demo", "google-audience", "cart-email"] {
        let want = expect.map(|e| e.get(d).cloned().unwrap_or_default());
        let raw = read_topic(
            &topics.activation(d),
            Duration::from_secs(if want.is_some() { 60 } else { 4 }),
            |rs| {
                let seen: BTreeSet<String> = rs
                    .iter()
                    .map(|r| Activation::decode(r).unwrap().activation_id)
                    .collect();
                want.as_ref().is_some_and(|w| w.is_subset(&seen))
            },
        )
        .await;
        records += raw.len();
        let set: BTreeSet<String> = raw
            .iter()
            .map(|r| Activation::decode(r).unwrap().activation_id)
            .collect();
        ids.insert(d.to_string(), set);
    }
    (ids, records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_with_every_service_killed_in_turn_equals_the_fault_free_run() {
    tessera_common::telemetry::init();
    let run = format!("f{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    // Event times two hours back: every window holds the same in both runs, and each
    // abandoned cart (a 1 h wait) is already due when it arrives, so it fires at once in
    // both runs instead of at a wall-clock moment between them.
    let t0 = chrono::Utc::now().timestamp_millis() - 2 * 3_600_000;
    let chunks = input(&run, t0);

    // The fault-free run, in-process.
    let clean = Platform::start().await;
    for c in &chunks {
        deliver(&clean.ingest, c).await;
    }
    let expected = profiles_of(&clean.profiles, &run).await;
    // Every profile is complete; activation follows within milliseconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (clean_ids, _) = activations(&clean.topics(), None).await;
    clean.stop().await;

    // The faulted run: real processes, each killed once while events flow.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, profiles) = (urls[0].clone(), urls[2].clone());
    let kills = [
        (6, "ingest"),
        (14, "identity"),
        (22, "profiles"),
        (30, "activation"),
    ];
    let started = Instant::now();
    let mut retries = 0;
    for (i, c) in chunks.iter().enumerate() {
        match kills.iter().find(|(at, _)| *at == i) {
            Some((_, "ingest")) => {
                // A request in flight when ingest dies: answered or retried, never lost.
                let (url, batch) = (ingest.clone(), c.clone());
                let inflight = tokio::spawn(async move { deliver(&url, &batch).await });
                tokio::time::sleep(Duration::from_millis(3)).await;
                services.get_mut("ingest").unwrap().restart();
                retries += inflight.await.unwrap();
            }
            Some((_, name)) => {
                // Killed while it processes this batch: its outputs may be produced
                // again after the restart, with the same ids.
                retries += deliver(&ingest, c).await;
                tokio::time::sleep(Duration::from_millis(4)).await;
                services.get_mut(name).unwrap().restart();
            }
            None => retries += deliver(&ingest, c).await,
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let sent_in = started.elapsed();
    let got = profiles_of(&profiles, &run).await;
    let mut differ = Vec::new();
    for (user, want) in &expected {
        if got[user] != *want {
            differ.push(format!("{user}:\n want {want}\n  got {}", got[user]));
        }
    }
    assert!(
        differ.is_empty(),
        "profiles differ from the fault-free run:\n{}",
        differ.join("\n")
    );
    let topics = tessera_common::topics::Topics::new(&cfg.topics);
    let (ids, records) = activations(&topics, Some(&clean_ids)).await;
    assert_eq!(
        ids, clean_ids,
        "the same activations, by id, as the fault-free run"
    );
    let distinct: usize = ids.values().map(BTreeSet::len).sum();
    let combined = expected
        .values()
        .fold(0u64, |h, v| h.rotate_left(5) ^ hash(v));
    eprintln!(
        "fault run: {} events in {:.1} s, {USERS} profiles identical to the fault-free run (combined hash {combined:016x}); \
         {distinct} activations, {records} records ({} repeated with the same id); {retries} client retries",
        USERS * ROUNDS,
        sent_in.as_secs_f64(),
        records - distinct,
    );
    for (_, name) in kills {
        let s = &services[name];
        assert_eq!(
            s.log().matches(r#""message":"starting""#).count(),
            2,
            "{name} ran twice"
        );
        eprintln!("fault run: {name} restart to ready: {:?}", s.recovery());
        assert!(!s.log().contains(&run), "{name} logged a user id");
    }
}
