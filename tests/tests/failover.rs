//! Broker failover: on a three-node Apache Kafka cluster (replication factor 3, min ISR
//! 2), the broker leading the first partition of `events.ingested` is killed with
//! SIGKILL in the middle of the input. Compared with a fault-free run on the same cluster:
//! nothing acknowledged is lost, every profile is identical, and activations are the same
//! by id (repeats carry their original's id).

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use tessera_tests::faults::*;
use tessera_tests::*;

/// Starts the cluster (stopped when this test process exits); returns its bootstrap list.
fn cluster(dir: &std::path::Path) -> String {
    let out = Command::new("bash")
        .arg(repo_root().join("deploy/kafka.sh"))
        .args(["cluster", "--nodes", "3", "--data"])
        .arg(dir)
        .args(["--watch-pid", &std::process::id().to_string()])
        .stderr(Stdio::inherit())
        .output()
        .expect("running deploy/kafka.sh cluster");
    assert!(out.status.success(), "the cluster did not start");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string()
}

/// The broker id leading partition 0 of `topic`.
fn leader_of(bootstrap: &str, topic: &str) -> i32 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    md.topics()[0].partitions()[0].leader()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_killed_under_load_loses_nothing_and_changes_nothing() {
    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let brokers = cluster(dir.path());
    let on_cluster = |c: &mut tessera_common::config::Config| {
        c.kafka.bootstrap = brokers.clone();
        c.topics.replication_factor = 3;
    };
    let run = format!("fo{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let t0 = chrono::Utc::now().timestamp_millis() - 2 * 3_600_000;
    let chunks = input(&run, t0);

    let clean = Platform::start_with(on_cluster).await;
    for c in &chunks {
        deliver(&clean.ingest, c).await;
    }
    let expected = profiles_of(&clean.profiles, &run).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (clean_ids, _) = activations(&brokers, &clean.topics(), None).await;
    clean.stop().await;

    let p = Platform::start_with(on_cluster).await;
    let leader = leader_of(&brokers, &p.topics().ingested());
    let node = dir.path().join(format!("node-{leader}"));
    let mut retries = 0;
    let mut pause = Duration::ZERO;
    let mut killed_at = None;
    for (i, c) in chunks.iter().enumerate() {
        if i == chunks.len() / 2 {
            let pid = std::fs::read_to_string(node.join("kafka.pid")).unwrap();
            Command::new("kill")
                .args(["-9", pid.trim()])
                .status()
                .unwrap();
            killed_at = Some(i);
        }
        let started = Instant::now();
        retries += deliver(&p.ingest, c).await;
        if killed_at.is_some() {
            pause = pause.max(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = profiles_of(&p.profiles, &run).await;
    let differ: Vec<&String> = expected
        .iter()
        .filter(|(u, want)| got[*u] != **want)
        .map(|(u, _)| u)
        .collect();
    assert!(
        differ.is_empty(),
        "profiles differ after the failover: {differ:?}"
    );
    let (ids, records) = activations(&brokers, &p.topics(), Some(&clean_ids)).await;
    assert_eq!(ids, clean_ids, "the same activations, by id");
    let distinct: usize = ids.values().map(BTreeSet::len).sum();
    eprintln!(
        "failover: broker {leader} (leader of events.ingested/0) killed after {} of {} batches; \
         longest request after the kill {:?} ({retries} client retries); {} profiles identical; \
         {distinct} activations, {records} records ({} repeated with the same id)",
        chunks.len() / 2,
        chunks.len(),
        pause,
        expected.len(),
        records - distinct,
    );
    p.stop().await;
}
