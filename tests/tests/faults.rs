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
    let FaultFree {
        run,
        chunks,
        profiles: expected,
        activation_ids: clean_ids,
    } = fault_free_run("f").await;

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
    assert_same_profiles(&expected, &profiles_of(&profiles, &run).await);
    let (ids, records) = assert_same_activations(&cfg, &clean_ids).await;
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

/// Activation scaled out and in under load: a second instance joins mid-stream (the
/// group moves half the partitions to it; it rebuilds their state by replaying them),
/// then the first is killed (its partitions move to the second after the session
/// timeout). The activations are the fault-free run's, by id, plus repeats of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn activation_partitions_move_with_their_state_when_instances_come_and_go() {
    let FaultFree {
        run,
        chunks,
        activation_ids: clean_ids,
        ..
    } = fault_free_run("s").await;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let ingest = urls[0].clone();
    let listen = free_listen();
    let second_url = format!("http://{listen}");
    let (second_cfg, second_dir) = second_instance(&cfg, dir.path(), "activation", listen);

    let third = chunks.len() / 3;
    let started = Instant::now();
    let (mut second, mut killed_at) = (None, None);
    for (i, c) in chunks.iter().enumerate() {
        if i == third {
            second = Some(ServiceProcess::start(
                "activation",
                &second_cfg,
                &second_dir,
            ));
            wait_ready(&second_url, Duration::from_secs(60)).await;
        }
        if i == 2 * third {
            services.get_mut("activation").unwrap().kill9();
            killed_at = Some(chrono::Utc::now());
        }
        deliver(&ingest, c).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let sent_in = started.elapsed();
    let (ids, records) = assert_same_activations(&cfg, &clean_ids).await;
    let second = second.expect("the second instance ran");
    let log = second.log();
    assert!(
        log.contains("replaying to rebuild state"),
        "the second instance rebuilt the partitions it was given"
    );
    assert!(
        log.matches("partitions assigned").count() >= 2,
        "the second instance got partitions when it joined and again when the first died"
    );
    let distinct: usize = ids.values().map(BTreeSet::len).sum();
    let takeover = second.last_assigned().zip(killed_at).map(|(a, k)| a - k);
    eprintln!(
        "scale run: {} events in {:.1} s; activation scaled 1 → 2 → 1; {distinct} activations, \
         {records} records ({} repeated with the same id); the second took the first's \
         partitions {} ms after the kill",
        USERS * ROUNDS,
        sent_in.as_secs_f64(),
        records - distinct,
        takeover.map_or(-1, |d| d.num_milliseconds()),
    );
    assert!(!log.contains(&run), "the second instance logged a user id");
}

/// Profiles scaled out and in under load, each instance answering the API for every
/// profile (it asks its peer for the partitions it does not serve): a second instance
/// joins mid-stream and rebuilds the partitions it is given by replay; both answer
/// alike; then the first is killed and its partitions move to the second. Every profile
/// ends up identical to the fault-free run's, and so do the activations, by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn profiles_partitions_move_with_their_state_when_instances_come_and_go() {
    let FaultFree {
        run,
        chunks,
        profiles: expected,
        activation_ids: clean_ids,
    } = fault_free_run("m").await;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (first_listen, second_listen) = (free_listen(), free_listen());
    cfg.profiles.http_listen = first_listen.clone();
    cfg.profiles.peers = vec![
        format!("http://{first_listen}"),
        format!("http://{second_listen}"),
    ];
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, first_url) = (urls[0].clone(), urls[2].clone());
    let second_url = format!("http://{second_listen}");
    let (second_cfg, second_dir) = second_instance(&cfg, dir.path(), "profiles", second_listen);

    let third = chunks.len() / 3;
    let started = Instant::now();
    let (mut second, mut killed_at, mut read_latency) = (None, None, None);
    for (i, c) in chunks.iter().enumerate() {
        if i == third {
            second = Some(ServiceProcess::start("profiles", &second_cfg, &second_dir));
            wait_ready(&second_url, Duration::from_secs(60)).await;
        }
        if i == 2 * third {
            // Both serve: each holds some partitions, and both answer alike for all.
            let (a, b) = (serving(&first_url).await, serving(&second_url).await);
            assert!(
                !a.is_empty() && !b.is_empty() && a.is_disjoint(&b) && a.len() + b.len() == 3,
                "the partitions are split between the instances: {a:?} and {b:?}"
            );
            // What was sent has gone through (within milliseconds; 2 s to be sure).
            tokio::time::sleep(Duration::from_secs(2)).await;
            let done = i * CHUNK / USERS;
            let mut ids = Vec::new();
            for u in 0..USERS {
                let user = format!("{run}-u{u}");
                let via_first = wait_profile(&first_url, "user_id", &user, "its events", |v| {
                    v["events_total"].as_u64() >= Some(done.saturating_sub(1) as u64)
                })
                .await;
                let via_second = profile_of(&second_url, &user).await;
                ids.push(via_first["profile_id"].as_str().unwrap().to_string());
                assert_eq!(
                    canonical(&via_first),
                    canonical(&via_second),
                    "both instances answer alike for {user}"
                );
            }
            assert_eq!(
                segment_sizes(&first_url).await,
                segment_sizes(&second_url).await,
                "both instances add up the same segment sizes"
            );
            read_latency = Some(read_times(&[&first_url, &second_url], &ids).await);
            services.get_mut("profiles").unwrap().kill9();
            killed_at = Some(chrono::Utc::now());
        }
        deliver(&ingest, c).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let sent_in = started.elapsed();
    assert_same_profiles(&expected, &profiles_of(&second_url, &run).await);
    let (ids, records) = assert_same_activations(&cfg, &clean_ids).await;
    let second = second.expect("the second instance ran");
    let log = second.log();
    assert!(
        log.contains("replaying to rebuild state"),
        "the second instance rebuilt the partitions it was given"
    );
    let distinct: usize = ids.values().map(BTreeSet::len).sum();
    let takeover = second.last_assigned().zip(killed_at).map(|(a, k)| a - k);
    eprintln!(
        "profiles scale run: {} events in {:.1} s; profiles scaled 1 → 2 → 1; {USERS} profiles \
         identical to the fault-free run; {distinct} activations, {records} records ({} \
         repeated with the same id); the second took the first's partitions {} ms after the kill",
        USERS * ROUNDS,
        sent_in.as_secs_f64(),
        records - distinct,
        takeover.map_or(-1, |d| d.num_milliseconds()),
    );
    let (local, gathered) = read_latency.expect("measured with two instances");
    eprintln!(
        "profiles scale run: GET /v1/profiles/{{id}} (debug build, loopback) from the instance \
         that has the profile p50 {:?} p99 {:?}; through either instance, asking both, p50 \
         {:?} p99 {:?}",
        local.0, local.1, gathered.0, gathered.1
    );
    assert!(!log.contains(&run), "the second instance logged a user id");
}

/// p50 and p99 of profile reads: answered locally by the instance that has the profile
/// (`x-tessera-local`), and through each instance, which asks both.
async fn read_times(
    bases: &[&str],
    ids: &[String],
) -> ((Duration, Duration), (Duration, Duration)) {
    let (mut local, mut gathered) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        for id in ids {
            for base in bases {
                let url = format!("{base}/v1/profiles/{id}");
                let t = Instant::now();
                let r = http().get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200, "{base} answers for every profile");
                r.bytes().await.unwrap();
                gathered.push(t.elapsed());
                let t = Instant::now();
                let r = http()
                    .get(&url)
                    .header("x-tessera-local", "1")
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                r.bytes().await.unwrap();
                if status == 200 {
                    local.push(t.elapsed());
                }
            }
        }
    }
    let quantiles = |mut v: Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    (quantiles(local), quantiles(gathered))
}

/// The partitions a profiles instance serves (its answer to a local request).
async fn serving(base: &str) -> BTreeSet<i32> {
    let r = http()
        .get(format!("{base}/v1/segments"))
        .header("x-tessera-local", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["x-tessera-serving"]
        .to_str()
        .unwrap()
        .split(',')
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A user's profile as an instance answers (retrying while partitions move).
async fn profile_of(base: &str, user: &str) -> serde_json::Value {
    wait_profile(base, "user_id", user, "an answer", |_| true).await
}

async fn segment_sizes(base: &str) -> Vec<(String, u64)> {
    let v: serde_json::Value = http()
        .get(format!("{base}/v1/segments"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Identity's graph spans every partition, so it runs as its group's only consumer. A
/// second instance that joins anyway (a scaled compose file, a copied deployment) does
/// not split the graph: both hold their partitions paused, unready, and say why; when
/// the second leaves, the first takes every partition and the event sent meanwhile
/// goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_identity_instance_holds_both_still_and_nothing_is_lost() {
    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, identity, profiles) = (urls[0].clone(), urls[1].clone(), urls[2].clone());
    let listen = free_listen();
    let second_url = format!("http://{listen}");
    let (second_cfg, second_dir) = second_instance(&cfg, dir.path(), "identity", listen);
    let mut second = ServiceProcess::start("identity", &second_cfg, &second_dir);

    let held = "must be its group's only consumer";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(services["identity"].log().contains(held) && second.log().contains(held)) {
        assert!(
            Instant::now() < deadline,
            "both instances noticed the shared group"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for base in [&identity, &second_url] {
        let r = http().get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503, "{base} is not ready while it holds still");
        let paused = metrics_text(base).await;
        assert!(
            paused
                .lines()
                .any(|l| l.starts_with("tessera_identity_paused_partitions ") && !l.ends_with(" 0")),
            "the held partitions are counted:\n{paused}"
        );
    }
    let user = uid("solo");
    deliver(
        &ingest,
        &[
            serde_json::json!({"type": "identify", "userId": user, "messageId": uid("m"),
            "traits": {"plan": "pro"}}),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = http()
        .get(format!("{profiles}/v1/profiles/lookup"))
        .query(&[("type", "user_id"), ("value", user.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "no instance resolved the event while both held"
    );

    second.kill9();
    let p = wait_profile(
        &profiles,
        "user_id",
        &user,
        "the event sent meanwhile",
        |v| v["traits"]["plan"] == "pro",
    )
    .await;
    assert_eq!(p["events_total"], 1, "resolved once");
    wait_ready(&identity, Duration::from_secs(30)).await;
    assert!(
        metrics_text(&identity)
            .await
            .contains("tessera_identity_paused_partitions 0"),
        "nothing is held any more"
    );
}
