//! Ingest end to end, on a real broker: every class of bad input with its status and
//! reason, retried batches, the raw topic, and brokers that do not acknowledge (a 503 with
//! `Retry-After`, nothing acknowledged lost).

use std::time::Duration;

use serde_json::{Value, json};

use tessera_common::records::{AvroRecord, DeadLetter};
use tessera_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_input_class_gets_its_status_and_reason() {
    let p = Platform::start().await;
    let client = http();
    let url = |path: &str| format!("{}{}", p.ingest, path);
    let send = |path: &'static str,
                key: Option<&'static str>,
                headers: Vec<(&'static str, &'static str)>,
                body: Vec<u8>| {
        let mut req = client.post(url(path)).body(body);
        if let Some(k) = key {
            req = req.basic_auth(k, Some(""));
        }
        for (h, v) in headers {
            req = req.header(h, v);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").is_some();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, body, retry_after)
        }
    };
    let j = |v: Value| v.to_string().into_bytes();
    let deep = (0..40).fold(json!(1), |acc, _| json!({"a": acc}));
    let bomb = gzip(&vec![b' '; 5_000_000]);
    let too_many: Vec<Value> = (0..2501)
        .map(|i| json!({"type": "track", "userId": "u", "event": format!("e{i}")}))
        .collect();
    // (name, path, write key, headers, body, expected status, expected error code)
    type Case = (
        &'static str,
        &'static str,
        Option<&'static str>,
        Vec<(&'static str, &'static str)>,
        Vec<u8>,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "unknown key",
            "/v1/track",
            Some("nope"),
            vec![],
            j(json!({"userId": "u", "event": "e"})),
            401,
            "unauthorized",
        ),
        (
            "no key",
            "/v1/track",
            None,
            vec![],
            j(json!({"userId": "u", "event": "e"})),
            401,
            "unauthorized",
        ),
        (
            "invalid JSON",
            "/v1/track",
            Some(WRITE_KEY),
            vec![],
            b"{not json".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "not an object",
            "/v1/track",
            Some(WRITE_KEY),
            vec![],
            j(json!([1, 2])),
            400,
            "not_an_object",
        ),
        (
            "no identity",
            "/v1/track",
            Some(WRITE_KEY),
            vec![],
            j(json!({"event": "e"})),
            400,
            "missing_identity",
        ),
        (
            "track without event",
            "/v1/track",
            Some(WRITE_KEY),
            vec![],
            j(json!({"userId": "u"})),
            400,
            "missing_event",
        ),
        (
            "alias without previousId",
            "/v1/alias",
            Some(WRITE_KEY),
            vec![],
            j(json!({"userId": "u"})),
            400,
            "missing_previous_id",
        ),
        (
            "group without groupId",
            "/v1/group",
            Some(WRITE_KEY),
            vec![],
            j(json!({"userId": "u"})),
            400,
            "missing_group_id",
        ),
        (
            "bad timestamp",
            "/v1/identify",
            Some(WRITE_KEY),
            vec![],
            j(json!({"userId": "u", "timestamp": "soon"})),
            400,
            "invalid_field",
        ),
        (
            "too deep",
            "/v1/identify",
            Some(WRITE_KEY),
            vec![],
            j(json!({"userId": "u", "traits": deep})),
            400,
            "too_deep",
        ),
        (
            "string too long",
            "/v1/identify",
            Some(WRITE_KEY),
            vec![],
            j(json!({"userId": "u", "traits": {"x": "y".repeat(17_000)}})),
            400,
            "string_too_long",
        ),
        (
            "event over 32 KB",
            "/v1/identify",
            Some(WRITE_KEY),
            vec![],
            j(
                json!({"userId": "u", "traits": (0..3000).map(|i| (format!("k{i}"), json!("0123456789"))).collect::<serde_json::Map<_, _>>()}),
            ),
            413,
            "event_too_large",
        ),
        (
            "request over 500 KB",
            "/v1/batch",
            Some(WRITE_KEY),
            vec![],
            vec![b' '; 600_000],
            413,
            "request_too_large",
        ),
        (
            "gzip bomb",
            "/v1/batch",
            Some(WRITE_KEY),
            vec![("Content-Encoding", "gzip")],
            bomb,
            413,
            "request_too_large",
        ),
        (
            "broken gzip",
            "/v1/batch",
            Some(WRITE_KEY),
            vec![("Content-Encoding", "gzip")],
            b"\x1f\x8b garbage".to_vec(),
            400,
            "invalid_gzip",
        ),
        (
            "unknown encoding",
            "/v1/batch",
            Some(WRITE_KEY),
            vec![("Content-Encoding", "br")],
            j(json!({"batch": []})),
            415,
            "unsupported_encoding",
        ),
        (
            "over 2,500 events",
            "/v1/batch",
            Some(WRITE_KEY),
            vec![],
            j(json!({"batch": too_many})),
            413,
            "batch_too_large",
        ),
        (
            "batch not an array",
            "/v1/batch",
            Some(WRITE_KEY),
            vec![],
            j(json!({"batch": {}})),
            400,
            "invalid_batch",
        ),
        (
            "unknown endpoint",
            "/v1/explode",
            Some(WRITE_KEY),
            vec![],
            j(json!({})),
            404,
            "unknown_endpoint",
        ),
    ];
    for (name, path, key, headers, body, status, code) in cases {
        let (got, answer, _) = send(path, key, headers, body).await;
        assert_eq!(got, status, "{name}: {answer}");
        assert_eq!(answer["error"], code, "{name}: {answer}");
        assert!(
            answer["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{name} has a reason: {answer}"
        );
    }
    // Wrong method and unknown paths are JSON refusals too.
    let r = client.get(url("/v1/track")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
    let r = client.get(url("/nowhere")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");
    // A browser SDK's CORS preflight is answered for any origin.
    let preflight = client
        .request(reqwest::Method::OPTIONS, url("/v1/batch"))
        .header("Origin", "https://shop.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "content-type,authorization",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    // The write key may also come in the body.
    let (status, _, _) = send(
        "/v1/track",
        None,
        vec![],
        j(json!({"writeKey": WRITE_KEY, "userId": "u", "event": "e"})),
    )
    .await;
    assert_eq!(status, 200);

    // A mixed batch: valid events accepted, each invalid one dead-lettered with its reason.
    let user = uid("mixed");
    let batch = json!({"batch": [
        {"type": "track", "userId": user, "event": "Good"},
        {"type": "track", "userId": user},
        {"type": "alias", "userId": user},
        {"type": "identify", "userId": user, "traits": {"n": 1}},
    ]});
    let (status, answer, _) = send("/v1/batch", Some(WRITE_KEY), vec![], j(batch)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 2);
    let rejected: Vec<(u64, String)> = answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        vec![
            (1, "missing_event".to_string()),
            (2, "missing_previous_id".to_string())
        ]
    );
    let dead = read_topic(&p.topics().deadletter(), Duration::from_secs(30), |rs| {
        rs.iter()
            .filter_map(|r| DeadLetter::from_avro(r).ok())
            .filter(|d| String::from_utf8_lossy(&d.original).contains(&user))
            .count()
            >= 2
    })
    .await;
    let mine: Vec<DeadLetter> = dead
        .iter()
        .filter_map(|r| DeadLetter::from_avro(r).ok())
        .filter(|d| String::from_utf8_lossy(&d.original).contains(&user))
        .collect();
    assert_eq!(mine.len(), 2);
    assert_eq!(mine[0].batch_index, Some(1));
    assert!(
        mine[0].reason.starts_with("missing_event"),
        "{}",
        mine[0].reason
    );
    assert_eq!(mine[0].source.as_deref(), Some("test"));
    p.wait_profile("user_id", &user, "the two valid events", |v| {
        v["events_total"] == 2
    })
    .await;

    // Rejections are counted by reason in the metrics.
    let metrics = metrics_text(&p.ingest).await;
    assert!(
        metrics.contains(
            r#"tessera_ingest_events_rejected_total{origin="http",reason="missing_event"}"#
        ),
        "{metrics}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_batch_with_the_same_message_ids_counts_once() {
    let p = Platform::start().await;
    let user = uid("dup");
    let batch = json!({"batch": (0..5).map(|i| json!({
        "type": "track", "userId": user, "event": "Order Completed", "messageId": format!("{user}-m{i}")
    })).collect::<Vec<_>>()});
    for _ in 0..3 {
        let (status, answer) = post(&p.ingest, "/v1/batch", &batch).await;
        assert_eq!(status, 200, "{answer}");
    }
    // One more distinct event, sent last: once it shows, every earlier copy was handled.
    let (status, _) = post(
        &p.ingest,
        "/v1/track",
        &json!({"userId": user, "event": "Marker", "messageId": format!("{user}-last")}),
    )
    .await;
    assert_eq!(status, 200);
    let profile = p
        .wait_profile("user_id", &user, "the marker", |v| {
            v["event_counts"]["Marker"] == 1
        })
        .await;
    assert_eq!(
        profile["event_counts"]["Order Completed"], 5,
        "15 deliveries of 5 messages count 5: {profile}"
    );
    assert_eq!(profile["events_total"], 6);
    let metrics = metrics_text(&p.profiles).await;
    assert!(
        metrics.contains(r#"tessera_profiles_duplicates_dropped_total{kind="event"} 10"#),
        "{metrics}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_kafka_topic_accepts_segment_json_and_dead_letters_the_rest() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p = Platform::start().await;
    let producer: FutureProducer = kafka_client();
    let raw = p.topics().raw();
    let user = uid("raw");
    let good = json!({"type": "track", "userId": user, "event": "Order Completed", "properties": {"total": 3}}).to_string();
    let garbage = format!("not json for {user}");
    let invalid = json!({"type": "track", "userId": user}).to_string();
    for payload in [&good, &garbage, &invalid] {
        producer
            .send(
                FutureRecord::<(), _>::to(&raw).payload(payload.as_bytes()),
                Duration::from_secs(5),
            )
            .await
            .expect("produce to raw");
    }
    p.wait_profile("user_id", &user, "the raw event", |v| {
        v["event_counts"]["Order Completed"] == 1
    })
    .await;
    let dead = read_topic(&p.topics().deadletter(), Duration::from_secs(30), |rs| {
        rs.len() >= 2
    })
    .await;
    let dead: Vec<DeadLetter> = dead
        .iter()
        .map(|r| DeadLetter::from_avro(r).unwrap())
        .collect();
    let g = dead
        .iter()
        .find(|d| d.original == garbage.as_bytes())
        .expect("garbage dead-lettered with its bytes");
    assert!(g.reason.starts_with("invalid_json"));
    assert_eq!(g.origin, "kafka");
    assert_eq!(g.input_topic.as_deref(), Some(raw.as_str()));
    let i = dead
        .iter()
        .find(|d| d.original == invalid.as_bytes())
        .expect("invalid dead-lettered");
    assert!(i.reason.starts_with("missing_event"), "{}", i.reason);
    p.stop().await;
}

/// With no broker to acknowledge, ingest never answers 200: it answers 503 with
/// Retry-After, and says it is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_answers_503_with_retry_after_when_kafka_does_not_acknowledge() {
    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cfg.kafka.bootstrap = dead.to_string(); // nothing listens there once the socket is dropped
    cfg.kafka.message_timeout_ms = 1500;
    cfg.topics.create = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(tessera_ingest::run_with_listener(
        cfg,
        listener,
        stop.clone(),
    ));
    let r = eventually("ingest answers", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            http()
                .post(format!("{url}/v1/track"))
                .basic_auth(WRITE_KEY, Some(""))
                .json(&json!({"userId": "u", "event": "e"}))
                .send()
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unavailable");
    let ready = http().get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready without a broker");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("stops")
        .unwrap()
        .unwrap();
}

/// A real broker outage under load: a dedicated Apache Kafka is stopped while events
/// keep coming and started again on the same data. Ingest answers 503 with Retry-After
/// while it is down, never 200; every event it did answer 200 for reaches its profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_answers_503_and_loses_nothing_acknowledged() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let kafka_dir = tempfile::tempdir().unwrap();
    let kafka = |action: &str| {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(repo_root().join("deploy/kafka.sh"))
            .arg(action)
            .arg("--data")
            .arg(kafka_dir.path());
        if action == "start" {
            cmd.args(["--watch-pid", &std::process::id().to_string()]);
        }
        let out = cmd.output().expect("kafka.sh runs");
        assert!(
            out.status.success(),
            "kafka.sh {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let broker = kafka("start");
    let p = Platform::start_with(|c| {
        c.kafka.bootstrap = broker.clone();
        c.kafka.message_timeout_ms = 3000;
        c.topics.partitions = 2;
    })
    .await;

    let run = uid("outage");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused: Arc<Mutex<Vec<(u16, bool)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn({
        let (ingest, run, acked, refused, stop) = (
            p.ingest.clone(),
            run.clone(),
            acked.clone(),
            refused.clone(),
            stop.clone(),
        );
        async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let user = format!("{run}-u{i}");
                let r = http()
                    .post(format!("{ingest}/v1/track"))
                    .basic_auth(WRITE_KEY, Some(""))
                    .json(&json!({"userId": user, "event": "Order Completed"}))
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    200 => acked.lock().unwrap().push(user),
                    s => refused
                        .lock()
                        .unwrap()
                        .push((s, r.headers().contains_key("retry-after"))),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka("stop");
    eventually(
        "a refusal while the broker is down",
        Duration::from_secs(30),
        || {
            let refused = refused.clone();
            async move { (!refused.lock().unwrap().is_empty()).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked_before_restart = acked.lock().unwrap().len();
    assert_eq!(
        kafka("start"),
        broker,
        "the broker comes back on its address"
    );
    eventually(
        "acknowledgements again after the restart",
        Duration::from_secs(60),
        || {
            let acked = acked.clone();
            async move { (acked.lock().unwrap().len() > acked_before_restart + 20).then_some(()) }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    sender.await.unwrap();

    let refused = refused.lock().unwrap().clone();
    assert!(
        refused.iter().all(|(s, retry)| *s == 503 && *retry),
        "only 503 with Retry-After: {refused:?}"
    );
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "outage test: {} events answered 200, {} answered 503",
        acked.len(),
        refused.len()
    );
    for user in &acked {
        p.wait_profile("user_id", user, "the acknowledged event", |v| {
            v["events_total"] == 1
        })
        .await;
    }
    p.stop().await;
    kafka("stop");
}
