//! The same input through a fault-free platform and through one whose four services are
//! killed with SIGKILL in turn under load: every profile ends up identical (compared by
//! a hash of its state), no accepted event is lost or counted twice, and the faulted
//! run's activations are the fault-free run's (same ids), plus repeats of them.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tessera_tests::faults::*;
use tessera_tests::*;

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
    let (clean_ids, _) = activations(bootstrap(), &clean.topics(), None).await;
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
    let (ids, records) = activations(bootstrap(), &topics, Some(&clean_ids)).await;
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
