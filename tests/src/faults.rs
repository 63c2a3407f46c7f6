//! A deterministic input and the comparisons of fault tests: the same input goes through
//! a fault-free platform and a faulted one, and profiles (by a hash of their state) and
//! activations (by id) must come out the same.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use tessera_common::records::Activation;

use crate::{WRITE_KEY, bootstrap, http, read_timed_from, wait_profile};

pub const USERS: usize = 30;
pub const ROUNDS: usize = 8;
pub const CHUNK: usize = 6;

/// Deterministic input: per user an anonymous visit, then an identify that joins it to
/// the user, then orders and carts with fixed message ids and event times.
pub fn input(run: &str, t0: i64) -> Vec<Vec<Value>> {
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
pub async fn deliver(ingest: &str, batch: &[Value]) -> u32 {
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
pub fn canonical(p: &Value) -> Value {
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

pub fn hash(v: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// Every user's profile, once it holds all of that user's events.
pub async fn profiles_of(profiles: &str, run: &str) -> BTreeMap<String, Value> {
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
/// Activation ids per destination read from the brokers at `bootstrap`, and the number
/// of records read: with `expect`, until those ids are all there (up to 60 s); without,
/// what arrives within 4 s.
pub async fn activations(
    bootstrap: &str,
    topics: &tessera_common::topics::Topics,
    expect: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> (BTreeMap<String, BTreeSet<String>>, usize) {
    let mut ids = BTreeMap::new();
    let mut records = 0;
    for d in ["email-demo", "google-audience", "cart-email"] {
        let want = expect.map(|e| e.get(d).cloned().unwrap_or_default());
        let raw = read_timed_from(
            bootstrap,
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
            .map(|(r, _)| Activation::decode(r).unwrap().activation_id)
            .collect();
        ids.insert(d.to_string(), set);
    }
    (ids, records)
}

/// The input of a run named `tag…`, and what it gives on a platform that runs undisturbed
/// (in-process): every user's profile and the activation ids per destination.
pub struct FaultFree {
    pub run: String,
    pub chunks: Vec<Vec<Value>>,
    pub profiles: BTreeMap<String, Value>,
    pub activation_ids: BTreeMap<String, BTreeSet<String>>,
}

pub async fn fault_free_run(tag: &str) -> FaultFree {
    tessera_common::telemetry::init();
    let run = format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    // Event times two hours back: every window holds the same in both runs, and each
    // abandoned cart (a 1 h wait) is already due when it arrives, so it fires at once in
    // both runs instead of at a wall-clock moment between them.
    let t0 = chrono::Utc::now().timestamp_millis() - 2 * 3_600_000;
    let chunks = input(&run, t0);
    let clean = crate::Platform::start().await;
    for c in &chunks {
        deliver(&clean.ingest, c).await;
    }
    let profiles = profiles_of(&clean.profiles, &run).await;
    // Every profile is complete; activation follows within milliseconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (activation_ids, _) = activations(crate::bootstrap(), &clean.topics(), None).await;
    clean.stop().await;
    FaultFree {
        run,
        chunks,
        profiles,
        activation_ids,
    }
}

/// A second instance of `service` beside the one `cfg` runs: its own state folder
/// (under `dir/second`), listen address and static member name. Its configuration and
/// folder.
pub fn second_instance(
    cfg: &tessera_common::config::Config,
    dir: &std::path::Path,
    service: &str,
    listen: String,
) -> (tessera_common::config::Config, std::path::PathBuf) {
    let second_dir = dir.join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let mut c = cfg.clone();
    c.kafka.group_instance_id = Some("pod-1".into());
    let state_dir = second_dir.join(service);
    match service {
        "identity" => (c.identity.state_dir, c.identity.http_listen) = (state_dir, listen),
        "profiles" => (c.profiles.state_dir, c.profiles.http_listen) = (state_dir, listen),
        "activation" => (c.activation.state_dir, c.activation.http_listen) = (state_dir, listen),
        other => panic!("{other} keeps no state"),
    }
    (c, second_dir)
}

/// Asserts that every profile equals the fault-free run's.
pub fn assert_same_profiles(expected: &BTreeMap<String, Value>, got: &BTreeMap<String, Value>) {
    let differ: Vec<String> = expected
        .iter()
        .filter(|(user, want)| got[*user] != **want)
        .map(|(user, want)| format!("{user}:\n want {want}\n  got {}", got[user]))
        .collect();
    assert!(
        differ.is_empty(),
        "profiles differ from the fault-free run:\n{}",
        differ.join("\n")
    );
}

/// Asserts that the run configured by `cfg` produced the fault-free run's activations,
/// by id; returns them and the number of records read.
pub async fn assert_same_activations(
    cfg: &tessera_common::config::Config,
    clean: &BTreeMap<String, BTreeSet<String>>,
) -> (BTreeMap<String, BTreeSet<String>>, usize) {
    let topics = tessera_common::topics::Topics::new(&cfg.topics);
    let (ids, records) = activations(bootstrap(), &topics, Some(clean)).await;
    assert_eq!(
        &ids, clean,
        "the same activations, by id, as the fault-free run"
    );
    (ids, records)
}
