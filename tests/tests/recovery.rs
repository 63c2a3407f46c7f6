//! Crashes and rebuilds end to end, on a real broker with the services as processes or
//! in-process: SIGKILL mid-stream, the runner's state and offsets across a crash, a state
//! behind the retention, a lost state rebuilt by replay, a state restored from an older
//! copy.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};

use tessera_common::records::{Activation, AvroRecord, DeadLetter};
use tessera_tests::*;

/// Identity and profiles, run as real processes, are killed with SIGKILL in the middle
/// of a stream and restarted: every accepted event is counted exactly once, and each
/// activation a replay repeats carries the same activation_id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_killed_with_sigkill_mid_stream_lose_and_double_count_nothing() {
    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, profiles) = (urls[0].clone(), urls[2].clone());

    const USERS: usize = 40;
    const PER_USER: usize = 12;
    const CHUNK: usize = 10;
    let run = uid("kill");
    // 48 requests, 150 ms apart (about 7 s); the stateful services are killed at fixed
    // points of the stream, so each kill lands while events are still flowing.
    let kills = [(12, "profiles"), (24, "identity"), (36, "activation")];
    let mut request = 0;
    let mut sent_at_kill = Vec::new();
    for round in 0..PER_USER {
        for chunk in (0..USERS).collect::<Vec<_>>().chunks(CHUNK) {
            if let Some((_, name)) = kills.iter().find(|(at, _)| *at == request) {
                sent_at_kill.push((name.to_string(), request * CHUNK));
                services.get_mut(name).unwrap().restart();
            }
            let batch: Vec<Value> = chunk
                .iter()
                .map(|u| json!({"type": "track", "userId": format!("{run}-u{u}"), "event": "Order Completed",
                                 "messageId": format!("{run}-u{u}-r{round}"), "properties": {"round": round},
                                 "context": {"traits": {"email": format!("{run}-u{u}@example.com")}}}))
                .collect();
            // Ingest stays up, so every request is answered 200.
            let (status, answer) = post(&ingest, "/v1/batch", &json!({"batch": batch})).await;
            assert_eq!(status, 200, "{answer}");
            request += 1;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    assert_eq!(request * CHUNK, USERS * PER_USER);
    assert_eq!(sent_at_kill.len(), 3, "every kill happened mid-stream");

    for u in 0..USERS {
        let user = format!("{run}-u{u}");
        let profile = wait_profile(
            &profiles,
            "user_id",
            &user,
            "every event exactly once",
            |v| v["event_counts"]["Order Completed"].as_u64() >= Some(PER_USER as u64),
        )
        .await;
        assert_eq!(
            profile["event_counts"]["Order Completed"], PER_USER,
            "no double count for {user}: {profile}"
        );
        assert_eq!(profile["events_total"], PER_USER);
    }
    // Activations: one logical `add` per profile; any repeat has the same id.
    let topic = tessera_common::topics::Topics::new(&cfg.topics).activation("email-demo");
    let records = read_topic(&topic, Duration::from_secs(60), |rs| {
        rs.iter()
            .filter_map(|r| Activation::decode(r).ok())
            .map(|a| a.profile_id)
            .collect::<HashSet<_>>()
            .len()
            >= USERS
    })
    .await;
    let mut ids_by_profile: HashMap<String, HashSet<String>> = HashMap::new();
    for a in records.iter().filter_map(|r| Activation::decode(r).ok()) {
        ids_by_profile
            .entry(a.profile_id)
            .or_default()
            .insert(a.activation_id);
    }
    assert_eq!(ids_by_profile.len(), USERS, "one profile per user");
    for (profile, ids) in ids_by_profile {
        assert_eq!(
            ids.len(),
            1,
            "profile {profile} got different activation ids: {ids:?}"
        );
    }
    let duplicates = records.len() - USERS;
    eprintln!(
        "sigkill test: kills after {sent_at_kill:?} events sent; {} activation records for {USERS} adds ({duplicates} replayed duplicates, same ids)",
        records.len()
    );
    for name in ["profiles", "identity", "activation"] {
        eprintln!(
            "sigkill test: {name} restart to partitions assigned: {:?}",
            services[name].recovery()
        );
        let log = services[name].log();
        assert_eq!(
            log.matches(r#""message":"starting""#).count(),
            2,
            "{name} ran twice: {log}"
        );
        assert!(
            services[name].recovery().is_some(),
            "{name} consumed again after its restart"
        );
        assert!(!log.contains(&run), "{name} logged a user id");
    }
}

/// The runner's own guarantees, with no de-duplication to hide mistakes: a processor
/// that counts records per key fails in the middle of a batch; restarted on the same
/// RocksDB, it resumes from the offsets stored with the state, and every count is exact.
/// A record that makes the processor panic is dead-lettered once, its writes undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runner_commits_state_and_offsets_together_across_a_crash() {
    use std::sync::Arc;

    use rdkafka::producer::{FutureProducer, FutureRecord};
    use tessera_common::kafka::{Producer, TopicKind, ensure_topics};
    use tessera_common::message::{Message, Output};
    use tessera_common::runner::{self, OffsetStorage, Processor, RunnerSpec};
    use tessera_common::store::{RocksStore, SharedStore, Txn};

    /// Counts records per key. Fails (the service cannot go on) at `crash_at` of
    /// partition 0; panics on `POISON` of partition 1 after writing, as a poison record
    /// would on every replay.
    struct Counter {
        crash_at: Option<i64>,
        out_topic: String,
    }
    const POISON: i64 = 3;
    impl Processor for Counter {
        fn process(
            &mut self,
            msg: &Message,
            txn: &mut Txn<'_>,
            out: &mut Vec<Output>,
        ) -> tessera_common::Result<()> {
            if self.crash_at == Some(msg.offset) && msg.partition == 0 {
                return Err(tessera_common::Error::Internal("simulated crash".into()));
            }
            if msg.offset == POISON && msg.partition == 1 {
                txn.put(b"poison/written".to_vec(), b"x".to_vec());
                panic!("poisoned record");
            }
            let key = format!(
                "count/{}",
                String::from_utf8_lossy(msg.key.as_deref().unwrap_or_default())
            );
            let n: u64 = txn.get_json(key.as_bytes())?.unwrap_or(0);
            txn.put_json(key.into_bytes(), &(n + 1))?;
            out.push(Output::plain(
                self.out_topic.clone(),
                msg.key.clone().unwrap_or_default(),
                vec![1],
            ));
            Ok(())
        }
    }

    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let (input, output) = (
        format!("{}runner-in", cfg.topics.prefix),
        format!("{}runner-out", cfg.topics.prefix),
    );
    let dead_letter_topic = format!("{}runner-dead", cfg.topics.prefix);
    ensure_topics(
        &cfg.kafka,
        &cfg.topics,
        &[
            (input.clone(), TopicKind::Events),
            (output.clone(), TopicKind::Events),
            (dead_letter_topic.clone(), TopicKind::Events),
        ],
    )
    .await
    .unwrap();
    let source: FutureProducer = kafka_client();
    const KEYS: usize = 10;
    const PER_KEY: usize = 30;
    for i in 0..KEYS * PER_KEY {
        let key = format!("k{}", i % KEYS);
        source
            .send(
                FutureRecord::to(&input).key(&key).payload("x"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
    let store: SharedStore = Arc::new(RocksStore::open(&dir.path().join("runner")).unwrap());
    let producer = Arc::new(Producer::new(&cfg.kafka, "runner-test").unwrap());
    let spec = || RunnerSpec {
        service: "runnertest",
        group_id: format!("{}runner", cfg.topics.prefix),
        topics: vec![input.clone()],
        offsets: OffsetStorage::State,
        max_batch: 7,
        tick_every: None,
        ready: None,
        dead_letter_topic: dead_letter_topic.clone(),
        vault: None,
        ownership: Default::default(),
        sole_consumer: false,
        skip_missing_keys: false,
    };
    let total = |store: &SharedStore| -> u64 {
        (0..KEYS)
            .map(|k| {
                store
                    .get(format!("count/k{k}").as_bytes())
                    .unwrap()
                    .map_or(0, |b| serde_json::from_slice::<u64>(&b).unwrap())
            })
            .sum()
    };

    // First run: fails when it reaches offset 40 of partition 0.
    let crashed = runner::run(
        &cfg.kafka,
        spec(),
        Counter {
            crash_at: Some(40),
            out_topic: output.clone(),
        },
        store.clone(),
        producer.clone(),
        &prometheus::Registry::new(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    assert!(crashed.is_err(), "the processor failed");
    let before = total(&store);
    assert!(
        before > 0 && before < (KEYS * PER_KEY) as u64,
        "the crash came mid-stream ({before} counted)"
    );

    // Second run on the same store: resumes from the stored offsets.
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let (kafka, spec, store, producer, stop) = (
            cfg.kafka.clone(),
            spec(),
            store.clone(),
            producer.clone(),
            stop.clone(),
        );
        let output = output.clone();
        async move {
            runner::run(
                &kafka,
                spec,
                Counter {
                    crash_at: None,
                    out_topic: output,
                },
                store,
                producer,
                &prometheus::Registry::new(),
                stop,
            )
            .await
        }
    });
    eventually("every record counted", Duration::from_secs(60), || {
        let store = store.clone();
        async move { (total(&store) + 1 >= (KEYS * PER_KEY) as u64).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    // Every record counted exactly once, except the poison record, counted never.
    let counts: Vec<u64> = (0..KEYS)
        .map(|k| {
            serde_json::from_slice(
                &store
                    .get(format!("count/k{k}").as_bytes())
                    .unwrap()
                    .unwrap(),
            )
            .unwrap()
        })
        .collect();
    assert_eq!(
        counts.iter().filter(|n| **n == PER_KEY as u64).count(),
        KEYS - 1,
        "{counts:?}"
    );
    assert_eq!(
        counts.iter().filter(|n| **n == PER_KEY as u64 - 1).count(),
        1,
        "{counts:?}"
    );
    assert_eq!(
        store.get(b"poison/written").unwrap(),
        None,
        "the poison record's writes were undone"
    );
    let dead = read_topic(&dead_letter_topic, Duration::from_secs(30), |rs| {
        !rs.is_empty()
    })
    .await;
    let d = DeadLetter::from_avro(&dead[0]).unwrap();
    assert_eq!((d.input_partition, d.input_offset), (Some(1), Some(POISON)));
    assert!(
        d.reason.contains("processor panicked: poisoned record"),
        "{}",
        d.reason
    );
    // Outputs are at-least-once: everything produced, replays allowed.
    let outputs = read_topic(&output, Duration::from_secs(30), |rs| {
        rs.len() + 1 >= KEYS * PER_KEY
    })
    .await;
    assert!(
        outputs.len() + 1 >= KEYS * PER_KEY,
        "every output was produced"
    );
}

/// A state that resumes below its partition's first offset (retention deleted records
/// it never read: an instance away too long, an old copy of the state restored) says so
/// and counts the records it missed, then goes on from the first offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_behind_the_retention_counts_the_records_it_never_read() {
    use std::sync::Arc;

    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Offset, TopicPartitionList};
    use tessera_common::kafka::{Producer, TopicKind, ensure_topics};
    use tessera_common::message::{Message, Output};
    use tessera_common::runner::{self, Processor, RunnerSpec};
    use tessera_common::store::{RocksStore, SharedStore, Txn};

    struct Count;
    impl Processor for Count {
        fn process(
            &mut self,
            _: &Message,
            txn: &mut Txn<'_>,
            _: &mut Vec<Output>,
        ) -> tessera_common::Result<()> {
            let n: u64 = txn.get_json(b"count")?.unwrap_or(0);
            txn.put_json(b"count".to_vec(), &(n + 1))
        }
    }

    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.topics.partitions = 1;
    let input = format!("{}gap-in", cfg.topics.prefix);
    let topics = tessera_common::topics::Topics::new(&cfg.topics);
    ensure_topics(
        &cfg.kafka,
        &cfg.topics,
        &[
            (input.clone(), TopicKind::Events),
            (topics.deadletter(), TopicKind::Events),
        ],
    )
    .await
    .unwrap();
    let source: FutureProducer = kafka_client();
    let send = |n: usize| {
        let (source, input) = (source.clone(), input.clone());
        async move {
            for _ in 0..n {
                source
                    .send(
                        FutureRecord::to(&input).key("k").payload("x"),
                        Duration::from_secs(5),
                    )
                    .await
                    .unwrap();
            }
        }
    };
    let store: SharedStore = Arc::new(RocksStore::open(&dir.path().join("gap")).unwrap());
    let producer = Arc::new(Producer::new(&cfg.kafka, "gap-test").unwrap());
    let count = |store: &SharedStore| -> u64 {
        store
            .get(b"count")
            .unwrap()
            .map_or(0, |b| serde_json::from_slice(&b).unwrap())
    };
    // Runs the counter until it has counted `want`; returns the runner's metrics.
    let run_until = |want: u64| {
        let (kafka, store, producer) = (cfg.kafka.clone(), store.clone(), producer.clone());
        let spec = RunnerSpec::new("gaptest", &topics, vec![input.clone()]);
        async move {
            let (stop, registry) = (
                tokio_util::sync::CancellationToken::new(),
                prometheus::Registry::new(),
            );
            let task = {
                let (store, stop, registry) = (store.clone(), stop.clone(), registry.clone());
                tokio::spawn(async move {
                    runner::run(&kafka, spec, Count, store, producer, &registry, stop).await
                })
            };
            eventually("counted", Duration::from_secs(60), || {
                let store = store.clone();
                async move { (count(&store) >= want).then_some(()) }
            })
            .await;
            stop.cancel();
            task.await.unwrap().unwrap();
            registry
        }
    };

    send(5).await;
    run_until(5).await;
    // While it is away, 10 more arrive and retention takes the first 7 of them.
    send(10).await;
    let admin: AdminClient<DefaultClientContext> = kafka_client();
    let mut upto = TopicPartitionList::new();
    upto.add_partition_offset(&input, 0, Offset::Offset(12))
        .unwrap();
    admin
        .delete_records(&upto, &AdminOptions::new())
        .await
        .unwrap();
    let registry = run_until(8).await;
    assert_eq!(count(&store), 8, "it went on from the first offset left");
    let gap: f64 = registry
        .gather()
        .iter()
        .filter(|m| m.name() == "tessera_gaptest_retention_gap_records_total")
        .flat_map(|m| m.get_metric().iter().map(|v| v.get_counter().get_value()))
        .sum();
    assert_eq!(gap, 7.0, "the 7 records it never read are counted");
}

/// A new node: profiles loses its RocksDB. Restarted with an empty store, it rebuilds its
/// state by replaying its input from the beginning, reaches exactly the profiles it had,
/// and produces nothing downstream already had (no new activation ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_that_lost_its_state_rebuilds_it_by_replaying_its_input() {
    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, profiles) = (&urls[0], &urls[2]);
    const USERS: usize = 20;
    let run = uid("rebuild");
    for u in 0..USERS {
        let user = format!("{run}-u{u}");
        let batch = json!({"batch": [
            {"type": "track", "anonymousId": format!("{user}-anon"), "event": "Order Completed"},
            {"type": "identify", "userId": user, "anonymousId": format!("{user}-anon"), "traits": {"email": format!("{user}@example.com"), "n": u}},
            {"type": "track", "userId": user, "event": "Order Completed", "properties": {"total": u}},
        ]});
        assert_eq!(post(ingest, "/v1/batch", &batch).await.0, 200);
    }
    let mut before = Vec::new();
    for u in 0..USERS {
        let user = format!("{run}-u{u}");
        before.push(
            wait_profile(profiles, "user_id", &user, "three events", |v| {
                v["events_total"] == 3
            })
            .await,
        );
    }
    let topic = tessera_common::topics::Topics::new(&cfg.topics).activation("email-demo");
    let ids = |records: &[Vec<u8>]| -> HashSet<String> {
        records
            .iter()
            .filter_map(|r| Activation::decode(r).ok())
            .map(|a| a.activation_id)
            .collect()
    };
    // Everything the pipeline produced for these events (it is settled: read to the end).
    tokio::time::sleep(Duration::from_secs(1)).await; // also lets the group commits land
    let records_before = read_topic(&topic, Duration::from_secs(4), |_| false).await;
    let activations_before = ids(&records_before);
    assert!(
        activations_before.len() >= USERS,
        "every user was activated"
    );

    // The node is gone: kill profiles and lose its RocksDB.
    let p = services.get_mut("profiles").unwrap();
    p.kill9();
    std::fs::remove_dir_all(&cfg.profiles.state_dir).unwrap();
    let started = std::time::Instant::now();
    p.restart();
    for (u, old) in before.iter().enumerate() {
        let user = format!("{run}-u{u}");
        let now = wait_profile(profiles, "user_id", &user, "the rebuilt profile", |v| {
            v == old
        })
        .await;
        assert_eq!(&now, old);
    }
    eprintln!(
        "rebuild test: profiles rebuilt {USERS} profiles ({} events) in {:?}",
        USERS * 3,
        started.elapsed()
    );
    let metrics = metrics_text(profiles).await;
    let suppressed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tessera_profiles_rebuild_suppressed_outputs_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        suppressed > 0,
        "the rebuild replayed input without producing it again: {metrics}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Replays are deterministic, so even a repeated record would carry a known id: check
    // the ids and that no record at all was produced again.
    let records_after = read_topic(&topic, Duration::from_secs(4), |_| false).await;
    assert_eq!(
        ids(&records_after),
        activations_before,
        "no new activations from the rebuild"
    );
    assert_eq!(
        records_after.len(),
        records_before.len(),
        "nothing produced again by the rebuild"
    );
}

/// A volume restored from an older copy (a snapshot): profiles resumes at the copy's
/// offsets, replays what came after without producing it again, and reaches the
/// profiles it had before the restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_restored_from_an_older_copy_of_its_state_catches_up_without_producing_again() {
    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, profiles) = (&urls[0], &urls[2]);
    const USERS: usize = 10;
    let run = uid("restore");
    let order = |user: &str, n: usize| {
        json!({"type": "track", "userId": user, "event": "Order Completed",
            "messageId": format!("{user}-o{n}"), "properties": {"total": 10 * n}})
    };
    for u in 0..USERS {
        let user = format!("{run}-u{u}");
        let batch = json!({"batch": [
            {"type": "identify", "userId": user, "traits": {"email": format!("{user}@example.com")}},
            order(&user, 1),
        ]});
        assert_eq!(post(ingest, "/v1/batch", &batch).await.0, 200);
        wait_profile(profiles, "user_id", &user, "two events", |v| {
            v["events_total"] == 2
        })
        .await;
    }
    let topic = tessera_common::topics::Topics::new(&cfg.topics).membership();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_snapshot = read_topic(&topic, Duration::from_secs(4), |_| false)
        .await
        .len();
    // The snapshot: a copy of the stopped pod's volume.
    let p = services.get_mut("profiles").unwrap();
    p.kill9();
    let snapshot = dir.path().join("snapshot");
    copy_dir(&cfg.profiles.state_dir, &snapshot);
    p.restart();
    wait_ready(profiles, Duration::from_secs(60)).await;

    // Life goes on after the snapshot.
    let mut before = Vec::new();
    for u in 0..USERS {
        let user = format!("{run}-u{u}");
        // A trait change sends an update per segment; an order counts.
        let batch = json!({"batch": [
            {"type": "identify", "userId": user, "traits": {"plan": "pro"}},
            order(&user, 2),
        ]});
        assert_eq!(post(ingest, "/v1/batch", &batch).await.0, 200);
        before.push(
            wait_profile(profiles, "user_id", &user, "four events", |v| {
                v["events_total"] == 4
            })
            .await,
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // the group commits land
    let records_before = read_topic(&topic, Duration::from_secs(4), |_| false).await;
    assert!(
        records_before.len() > at_snapshot,
        "what came after the snapshot produced membership records"
    );

    // The volume is restored from the snapshot.
    let p = services.get_mut("profiles").unwrap();
    p.kill9();
    std::fs::remove_dir_all(&cfg.profiles.state_dir).unwrap();
    copy_dir(&snapshot, &cfg.profiles.state_dir);
    p.restart();
    for (u, old) in before.iter().enumerate() {
        let user = format!("{run}-u{u}");
        let now = wait_profile(profiles, "user_id", &user, "the caught-up profile", |v| {
            v == old
        })
        .await;
        assert_eq!(&now, old);
    }
    let metrics = metrics_text(profiles).await;
    assert!(
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("tessera_profiles_rebuild_suppressed_outputs_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0),
        "what came after the snapshot was replayed without producing it again"
    );
    assert!(
        !p.log().contains("deleted by retention"),
        "nothing was missed"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records_after = read_topic(&topic, Duration::from_secs(4), |_| false).await;
    assert_eq!(
        records_after.len(),
        records_before.len(),
        "no membership record produced again by the restore"
    );
}
