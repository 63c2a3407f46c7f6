//! Privacy end to end: export, suppression and the keys that seal personal data. Real
//! broker, the services as processes.

use std::time::Duration;

use serde_json::json;

use tessera_common::records::{Activation, AvroRecord};
use tessera_common::topics::Topics;
use tessera_tests::*;

/// Export returns what every service holds; suppression stops collection (ingest drops
/// the person's events) and activation (the person leaves audiences), and unsuppress
/// lifts it; each request is in the audit trail with who asked and no personal value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_returns_everything_and_suppression_stops_ingest_and_activation() {
    let p = Platform::start().await;
    let run = uid("dsar");
    let (ann, bob) = (format!("{run}-ann"), format!("{run}-bob"));
    let email = format!("{ann}@example.com");
    for u in [&ann, &bob] {
        send_ok(&p.ingest, "/v1/identify", json!({"userId": u, "traits": {"email": format!("{u}@example.com"), "first_name": "Ann"}})).await;
        send_ok(
            &p.ingest,
            "/v1/track",
            json!({"userId": u, "event": "Order Completed", "properties": {"total": 12}}),
        )
        .await;
    }
    let profile = p
        .wait_profile("user_id", &ann, "ann in buyers", |v| {
            v.to_string().contains("buyers")
        })
        .await;
    let ann_id = profile["profile_id"].as_str().unwrap().to_string();
    let email_topic = p.topics().activation("email-demo");
    let has = |action: &'static str, id: String| {
        move |rs: &[Vec<u8>]| {
            rs.iter().any(|r| {
                Activation::decode(r).is_ok_and(|a| a.profile_id == id && a.action == action)
            })
        }
    };
    read_topic(
        &email_topic,
        Duration::from_secs(60),
        has("add", ann_id.clone()),
    )
    .await;

    // Export: the graph, the profile with its events, what destinations received.
    let (status, r) = privacy_request(
        &p.identity,
        &json!({"action": "export", "identifier": {"type": "user_id", "value": ann}}),
    )
    .await;
    assert_eq!(status, 202, "{r}");
    let export = privacy_finished(&p.identity, r["request_id"].as_str().unwrap()).await;
    assert_eq!(export["status"], "done", "{export}");
    let data = &export["data"];
    assert!(
        data["graph"]["identifiers"].to_string().contains(&email),
        "{export}"
    );
    assert_eq!(
        data["profile"]["traits"]["email"]["value"],
        email.as_str(),
        "{export}"
    );
    assert_eq!(data["events"].as_array().map(Vec::len), Some(2), "{export}");
    assert_eq!(
        data["audiences"][0]["destination"], "email-demo",
        "{export}"
    );
    assert_eq!(
        data["audiences"][0]["last_sent"]["email"],
        email.as_str(),
        "{export}"
    );
    let pii = export["classification"]["pii"].to_string();
    assert!(
        pii.contains("\"email\"") && pii.contains("\"first_name\""),
        "{export}"
    );
    let (status, nobody) = privacy_request(&p.identity, &json!({"action": "export", "identifier": {"type": "email", "value": "nobody@example.com"}})).await;
    assert_eq!(status, 202);
    assert_eq!(
        privacy_finished(&p.identity, nobody["request_id"].as_str().unwrap()).await["status"],
        "not_found"
    );

    // Suppress: the audience loses her at once, ingest drops her events.
    let (_, r) = privacy_request(
        &p.identity,
        &json!({"action": "suppress", "identifier": {"type": "email", "value": email}}),
    )
    .await;
    let done = privacy_finished(&p.identity, r["request_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "done", "{done}");
    read_topic(
        &email_topic,
        Duration::from_secs(60),
        has("remove", ann_id.clone()),
    )
    .await;
    let events_before = profile["events_total"].as_u64().unwrap();
    send_ok(
        &p.ingest,
        "/v1/track",
        json!({"userId": ann, "event": "Viewed"}),
    )
    .await;
    send_ok(
        &p.ingest,
        "/v1/track",
        json!({"userId": bob, "event": "Viewed"}),
    )
    .await;
    p.wait_profile("user_id", &bob, "bob's marker event", |v| {
        v["events_total"].as_u64() >= Some(3)
    })
    .await;
    let now = p.wait_profile("user_id", &ann, "ann", |_| true).await;
    assert_eq!(
        now["events_total"].as_u64(),
        Some(events_before),
        "a suppressed person's event is not collected"
    );
    let m = metrics_text(&p.ingest).await;
    assert!(
        m.contains(r#"tessera_ingest_events_dropped_total{origin="http",reason="suppressed"} 1"#),
        "{m}"
    );

    // Unsuppress: collected again.
    let (_, r) = privacy_request(
        &p.identity,
        &json!({"action": "unsuppress", "identifier": {"type": "user_id", "value": ann}}),
    )
    .await;
    let done = privacy_finished(&p.identity, r["request_id"].as_str().unwrap()).await;
    assert_eq!(
        done["steps"]["identity"]["detail"]["unsuppressed_identifiers"]
            .as_u64()
            .map(|n| n >= 2),
        Some(true),
        "{done}"
    );
    send_ok(
        &p.ingest,
        "/v1/track",
        json!({"userId": ann, "event": "Viewed"}),
    )
    .await;
    p.wait_profile("user_id", &ann, "ann's event after unsuppress", |v| {
        v["events_total"].as_u64() == Some(events_before + 1)
    })
    .await;

    // The audit trail names who asked, never the email.
    let audit = read_topic(&p.topics().audit(), Duration::from_secs(30), |rs| {
        rs.iter().filter(|r| contains(r, b"privacy.")).count() >= 4
    })
    .await;
    let privacy_entries: Vec<_> = audit
        .iter()
        .filter_map(|r| tessera_common::records::AuditEntry::from_avro(r).ok())
        .filter(|e| e.action.starts_with("privacy."))
        .collect();
    assert_eq!(privacy_entries.len(), 4, "{privacy_entries:?}");
    assert!(
        privacy_entries
            .iter()
            .all(|e| e.who == "tests-dpo" && !e.detail.contains(&email))
    );
    p.stop().await;
}

/// The audit's finding: the subject keys sit on one topic, and a pre-created keys topic
/// with `delete` retention loses them silently (every record then looked erased). A
/// service refuses to start on such a topic and says what to change; on a compacted one
/// it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keys_topic_that_would_lose_keys_is_refused_at_start() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let keys = Topics::new(&config.topics).keys();
    let admin: AdminClient<DefaultClientContext> = kafka_client();
    let created = admin
        .create_topics(
            &[NewTopic::new(&keys, 1, TopicReplication::Fixed(1))
                .set("cleanup.policy", "delete")
                .set("retention.ms", "3600000")],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(created[0].is_ok(), "{created:?}");
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        tessera_activation::run(config.clone(), tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("it refuses at once")
    .expect_err("a keys topic with delete retention is refused");
    let err = err.to_string();
    assert!(
        err.contains(&keys) && err.contains("cleanup.policy"),
        "{err}"
    );
    // The same where the topics are someone else's to create (topics.create = false).
    let mut theirs = config.clone();
    theirs.topics.create = false;
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        tessera_activation::run(theirs, tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("it refuses at once")
    .expect_err("refused with topics.create = false too")
    .to_string();
    assert!(err.contains("cleanup.policy"), "{err}");

    // Made compacted, as the refusal says, the service starts.
    admin
        .alter_configs(
            &[
                rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&keys))
                    .set("cleanup.policy", "compact"),
            ],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(tessera_activation::run(config, shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!running.is_finished(), "it runs: {:?}", running.await);
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// The audit's finding: losing the keys topic's records made every record sealed with a
/// lost key look erased: counted as shredded, skipped, its offset moved on, the data
/// gone without a word. Now a key that is missing (never erased) holds the service,
/// unready, with `tessera_<service>_missing_key_hold` at 1, and the service goes on by
/// itself once the keys are restored to the topic, as the runbook says to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_whose_key_the_topic_lost_holds_the_service_until_the_key_is_back() {
    use rdkafka::Message as _;
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Offset, TopicPartitionList};

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, identity, profiles) = (urls[0].clone(), urls[1].clone(), urls[2].clone());
    let topics = Topics::new(&cfg.topics);
    // Profiles is away while the person's first event goes through identity.
    services.get_mut("profiles").unwrap().kill9();
    let user = uid("lostkey");
    send_ok(
        &ingest,
        "/v1/identify",
        json!({"userId": user, "traits": {"plan": "gold"}}),
    )
    .await;
    eventually(
        "identity to resolve the event",
        Duration::from_secs(60),
        || {
            let url = format!("{identity}/v1/identity/lookup?type=user_id&value={user}");
            async move {
                let r = http().get(&url).send().await.ok()?;
                (r.status() == 200).then_some(())
            }
        },
    )
    .await;

    // The keys topic loses every record; a copy of them is kept.
    let keys = topics.keys();
    let reader: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", uid("keys-backup"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (_, high) = reader
        .fetch_watermarks(&keys, 0, Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&keys, 0, Offset::Beginning)
        .unwrap();
    reader.assign(&tpl).unwrap();
    let mut backup = Vec::new();
    while (backup.len() as i64) < high {
        if let Some(Ok(m)) = reader.poll(Duration::from_secs(5)) {
            backup.push((m.key().unwrap().to_vec(), m.payload().map(<[u8]>::to_vec)));
        }
    }
    // (A compacted topic takes no DeleteRecords: it is lost whole, deleted by mistake.)
    drop(reader);
    let admin: AdminClient<DefaultClientContext> = kafka_client();
    let deleted = admin
        .delete_topics(&[&keys], &AdminOptions::new())
        .await
        .unwrap();
    assert!(deleted[0].is_ok(), "{deleted:?}");
    eventually("the keys topic to be gone", Duration::from_secs(60), || {
        let (prefix, keys) = (cfg.topics.prefix.clone(), keys.clone());
        async move { (!platform_topics(&prefix).contains(&keys)).then_some(()) }
    })
    .await;

    // Profiles comes back (re-creating the keys topic, empty), reads no key, and holds at
    // the person's event.
    services.get_mut("profiles").unwrap().restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = match http().get(format!("{profiles}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text
            .lines()
            .any(|l| l == "tessera_profiles_missing_key_hold 1")
        {
            break;
        }
        if std::time::Instant::now() > deadline {
            // What it did instead: its warnings and what it counted.
            let log = services["profiles"].log();
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            let counted: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.contains("consumed") || l.contains("shredded") || l.contains("missing")
                })
                .collect();
            panic!(
                "profiles never held on the missing key; warnings:\n{}\nmetrics:\n{}",
                notable.join("\n"),
                counted.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = http()
        .get(format!("{profiles}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503, "unready while it holds");
    let metrics = metrics_text(&profiles).await;
    assert!(
        !metrics.contains("tessera_profiles_shredded_records_total{"),
        "nothing taken for erased:\n{metrics}"
    );
    assert!(
        services["profiles"]
            .log()
            .contains("keys topic lost records"),
        "it says why"
    );

    // The keys are restored from the copy: profiles goes on by itself, nothing lost.
    let producer: FutureProducer = kafka_client();
    for (k, v) in &backup {
        let mut r = FutureRecord::to(&keys).key(k);
        if let Some(v) = v {
            r = r.payload(v);
        }
        producer.send(r, Duration::from_secs(10)).await.unwrap();
    }
    let profile = wait_profile(&profiles, "user_id", &user, "the person's profile", |p| {
        p["traits"]["plan"] == "gold"
    })
    .await;
    assert_eq!(profile["events_total"], 1, "{profile}");
    let metrics = metrics_text(&profiles).await;
    assert!(
        metrics.contains("tessera_profiles_missing_key_hold 0"),
        "{metrics}"
    );
    for (_, svc) in services.iter_mut() {
        svc.kill9();
    }
}
/// Every id derived from personal data is keyed with the deployment's pseudonym secret: a
/// service started with another one would name every person differently (her keys, her
/// profile, her erasure). The first service records the secret's fingerprint on the keys
/// topic; a service with another secret then refuses to start, saying why, and one with
/// the same secret starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_with_another_pseudonym_secret_refuses_to_start() {
    use std::process::Command;
    use std::sync::Arc;
    use tessera_common::kafka::Producer;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tessera_common::kafka::ensure_topics(
        &cfg.kafka,
        &cfg.topics,
        &tessera_common::service::shared_topics(&Topics::new(&cfg.topics)),
    )
    .await
    .unwrap();
    let producer = Arc::new(Producer::new(&cfg.kafka, "first-service").unwrap());
    let store = std::sync::Arc::new(tessera_common::store::MemStore::default());
    tessera_common::service::follow_keys(&cfg, "first", producer, store, &shutdown)
        .await
        .expect("the first service records the deployment's secret");
    shutdown.cancel();

    cfg.activation.http_listen = free_listen();
    let run = |secret: &str, name: &str| {
        let mut c = cfg.clone();
        c.privacy.pseudonym_secret = secret.into();
        c.activation.state_dir = dir.path().join(name);
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, toml::to_string(&c).unwrap()).unwrap();
        let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
        Command::new(binary("tessera-activation"))
            .arg("--config")
            .arg(&file)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut other = run("another-pseudonym-secret-0123456789abcdef", "other");
    let status = tokio::task::spawn_blocking(move || other.wait().unwrap())
        .await
        .unwrap();
    let stderr = std::fs::read_to_string(dir.path().join("other.log")).unwrap();
    assert!(!status.success(), "it started: {stderr}");
    assert!(
        stderr.contains("privacy.pseudonym_secret is not the one this deployment"),
        "{stderr}"
    );

    let mut same = run(PSEUDONYM_SECRET, "same");
    wait_ready(
        &format!("http://{}", cfg.activation.http_listen),
        Duration::from_secs(60),
    )
    .await;
    same.kill().unwrap();
    same.wait().unwrap();
}
