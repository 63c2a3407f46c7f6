//! End-to-end tests: a real Apache Kafka broker and the real services. Each test starts
//! its own platform under a unique topic prefix, so they run in parallel on one broker.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};

use tessera_common::records::{Activation, AvroRecord, DeadLetter};
use tessera_tests::*;

/// Runs an SDK driver script; it exits non-zero when the SDK reported an error.
async fn run_sdk(mut cmd: tokio::process::Command) {
    let out = cmd.output().await.expect("the SDK driver runs");
    assert!(
        out.status.success(),
        "the SDK reported errors: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn segment_python_sdk_events_reach_the_profile_and_activation() {
    let p = Platform::start().await;
    let python = python_with_segment_sdk();
    let script = repo_root().join("tests/sdk/segment_python.py");
    for use_gzip in ["0", "1"] {
        let (user, anon) = (uid("user"), uid("anon"));
        let email = format!("{}@Example.com", uid("ada"));
        let mut sdk = tokio::process::Command::new(&python);
        sdk.arg(&script)
            .args([p.ingest.as_str(), WRITE_KEY, &user, &anon, &email, use_gzip]);
        run_sdk(sdk).await;

        let profile = p
            .wait_profile("user_id", &user, "all four SDK events", |v| {
                v["events_total"] == 4
            })
            .await;
        assert_eq!(profile["traits"]["first_name"], "Ada");
        assert_eq!(profile["traits"]["plan"], "pro");
        assert_eq!(profile["event_counts"]["Order Completed"], 1);
        assert_eq!(
            profile["event_counts"]["Product Viewed"], 1,
            "the anonymous event was merged in"
        );
        let ids: HashSet<(String, String)> = profile["identifiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["type"].as_str().unwrap().to_string(),
                    i["value"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert!(ids.contains(&("anonymous_id".into(), anon.clone())));
        assert!(
            ids.contains(&("email".into(), email.to_lowercase())),
            "email normalised: {ids:?}"
        );
        assert!(
            profile["segments"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["id"] == "buyers")
        );
        // Every identifier finds the same profile.
        let by_email = p
            .wait_profile("email", &email, "the same profile", |_| true)
            .await;
        assert_eq!(by_email["profile_id"], profile["profile_id"]);
        let by_anon = p
            .wait_profile("anonymous_id", &anon, "the same profile", |_| true)
            .await;
        assert_eq!(by_anon["profile_id"], profile["profile_id"]);
        let by_id: Value = http()
            .get(format!(
                "{}/v1/profiles/{}",
                p.profiles,
                profile["profile_id"].as_str().unwrap()
            ))
            .query(&[("explain", "true")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            by_id["traits"]["plan"]["value"], "pro",
            "explain shows provenance"
        );
        assert_eq!(by_id["traits"]["plan"]["source"], "test");

        // The buyers segment syncs to email-demo: an `add` with the allowed fields only.
        let topic = p.topics().activation("email-demo");
        let pid = profile["profile_id"].as_str().unwrap().to_string();
        // Whichever of track and identify is processed first, the destination ends
        // with an `add` and, if the email came later, an `update` carrying it.
        let want_email = email.to_lowercase();
        let has_email = |a: &Activation| {
            a.profile_id == pid
                && serde_json::from_str::<Value>(&a.payload)
                    .is_ok_and(|f| f["email"] == want_email.as_str())
        };
        let records = read_topic(&topic, Duration::from_secs(30), |rs| {
            rs.iter()
                .filter_map(|r| Activation::decode(r).ok())
                .any(|a| has_email(&a))
        })
        .await;
        let mine: Vec<Activation> = records
            .iter()
            .filter_map(|r| Activation::decode(r).ok())
            .filter(|a| a.profile_id == pid)
            .collect();
        assert_eq!(mine[0].action, "add", "{mine:?}");
        assert_eq!(mine[0].source_id, "buyers");
        assert!(mine[1..].iter().all(|a| a.action == "update"), "{mine:?}");
        let a = mine
            .iter()
            .find(|a| has_email(a))
            .expect("the email reached the destination");
        let fields: Value = serde_json::from_str(&a.payload).unwrap();
        assert_eq!(fields["first_name"], "Ada");
        assert!(
            fields.get("plan").is_none(),
            "only the destination's fields"
        );
    }
    let missing = http()
        .get(format!("{}/v1/profiles/lookup", p.profiles))
        .query(&[("type", "user_id"), ("value", "nobody")])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["error"], "not_found");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rudderstack_node_wire_form_gzip_with_a_form_content_type() {
    let p = Platform::start().await;
    let user = uid("rs");
    // What @rudderstack/rudder-sdk-node sends: a gzip body labelled as a form, the
    // write key as the Basic user name, a batch with sentAt.
    let body = json!({
        "batch": [
            {"type": "identify", "userId": user, "traits": {"email": format!("{user}@x.io")},
             "messageId": uid("m"), "timestamp": "2026-01-01T00:00:00.000Z",
             "context": {"library": {"name": "analytics-node", "version": "2.1.0"}}},
            {"type": "track", "userId": user, "event": "Order Completed", "properties": {"total": 5},
             "messageId": uid("m"), "originalTimestamp": "2026-01-01T00:00:01.000Z"}
        ],
        "sentAt": "2026-01-01T00:00:02.000Z"
    });
    let r = http()
        .post(format!("{}/v1/batch", p.ingest))
        .basic_auth(WRITE_KEY, Some(""))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Content-Encoding", "gzip")
        .body(gzip(body.to_string().as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["accepted"], 2);
    let profile = p
        .wait_profile("user_id", &user, "both events", |v| v["events_total"] == 2)
        .await;
    // Skew-corrected: the client clock was ~ 2026-01-01, the event times land near now.
    let last_seen =
        chrono::DateTime::parse_from_rfc3339(profile["last_seen"].as_str().unwrap()).unwrap();
    let age = chrono::Utc::now().signed_duration_since(last_seen);
    assert!(
        age.num_seconds().abs() < 120,
        "event time corrected for clock skew, got {last_seen}"
    );
    p.stop().await;
}

/// The real RudderStack Node SDK, unmodified: gzip bodies labelled as a form.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rudderstack_node_sdk_events_reach_the_profile() {
    let p = Platform::start().await;
    let sdk = node_with_rudderstack_sdk();
    let user = uid("grace");
    let email = format!("{user}@example.org");
    let mut node = tokio::process::Command::new("node");
    node.arg(repo_root().join("tests/sdk/rudderstack_node.js"))
        .args([p.ingest.as_str(), WRITE_KEY, &user, &email])
        .env("NODE_PATH", sdk.join("node_modules"));
    run_sdk(node).await;
    let profile = p
        .wait_profile("email", &email, "both SDK events", |v| {
            v["events_total"] == 2
        })
        .await;
    assert_eq!(profile["traits"]["first_name"], "Grace");
    assert_eq!(profile["event_counts"]["Order Completed"], 1);
    let metrics = metrics_text(&p.ingest).await;
    assert!(
        metrics.contains(r#"tessera_ingest_http_requests_total{endpoint="batch",status="200"}"#),
        "{metrics}"
    );
    p.stop().await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_readiness_and_metrics_are_served_by_every_service() {
    let p = Platform::start().await;
    for (name, url) in [
        ("ingest", &p.ingest),
        ("identity", &p.identity),
        ("profiles", &p.profiles),
        ("activation", &p.activation),
    ] {
        for path in ["/healthz", "/readyz"] {
            let r = http().get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{name}{path}");
        }
        let r = http().get(format!("{url}/metrics")).send().await.unwrap();
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = r.text().await.unwrap();
        assert!(
            text.contains(&format!("tessera_{name}_")),
            "{name} metrics: {text}"
        );
    }
    let user = uid("metrics");
    post(
        &p.ingest,
        "/v1/track",
        &json!({"userId": user, "event": "Order Completed",
                "context": {"traits": {"email": format!("{user}@example.com")}}}),
    )
    .await;
    p.wait_profile("user_id", &user, "the event", |v| v["events_total"] == 1)
        .await;
    let activation = eventually(
        "an activation latency sample",
        Duration::from_secs(30),
        || async {
            let text = http()
                .get(format!("{}/metrics", p.activation))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains(
                "tessera_activation_event_to_activation_seconds_count{source=\"segment\"} 1",
            )
            .then_some(text)
        },
    )
    .await;
    assert!(activation.contains(r#"tessera_activation_records_total{action="add",destination="email-demo",outcome="sent"} 1"#), "{activation}");
    // Consumer lag comes from librdkafka statistics (every 5 s), per topic and partition.
    // Labels are sorted by name, so the topic label ends the series name.
    let resolved = p.topics().resolved();
    let lag_gauges = eventually(
        "a consumer lag gauge per partition",
        Duration::from_secs(30),
        || {
            let url = format!("{}/metrics", p.profiles);
            let topic_label = format!(r#"topic="{resolved}""#);
            async move {
                let text = http().get(url).send().await.ok()?.text().await.ok()?;
                let gauges: Vec<String> = text
                    .lines()
                    .filter(|l| {
                        l.starts_with("tessera_profiles_consumer_lag_records{")
                            && l.contains(&topic_label)
                    })
                    .map(str::to_string)
                    .collect();
                (gauges.len() == 3).then_some(gauges)
            }
        },
    )
    .await;
    assert!(
        lag_gauges.iter().all(|l| l.ends_with(" 0")),
        "caught up: {lag_gauges:?}"
    );
    // Every stateful service tells the size of its RocksDB state (the runner's gauge).
    for (name, url) in [
        ("identity", &p.identity),
        ("profiles", &p.profiles),
        ("activation", &p.activation),
    ] {
        let text = metrics_text(url).await;
        let series = format!("tessera_{name}_state_size_bytes ");
        assert!(
            text.lines().any(|l| l.starts_with(&series)),
            "{name} has no {series}"
        );
    }
    // Every metric the alert rules and the dashboard name exists (a refusal first, so
    // the rejection counter has a series).
    let (status, _) = post(&p.ingest, "/v1/track", &json!({"userId": "u"})).await;
    assert_eq!(status, 400);
    // ... and a placeholder user id, so the blocked-identifier counter has one too.
    let (status, _) = post(
        &p.ingest,
        "/v1/track",
        &json!({"userId": "undefined", "event": "Page Viewed"}),
    )
    .await;
    assert_eq!(status, 200);
    eventually(
        "a blocked identifier counted",
        Duration::from_secs(30),
        || {
            let url = p.identity.clone();
            async move {
                metrics_text(&url)
                    .await
                    .contains("tessera_identity_blocked_identifiers_total{")
                    .then_some(())
            }
        },
    )
    .await;
    let mut exposed = String::new();
    for url in [&p.ingest, &p.identity, &p.profiles, &p.activation] {
        exposed.push_str(&metrics_text(url).await);
    }
    // The runner's source: runner.rs and its modules (its metrics are in runner/metrics.rs).
    let mut runner_source =
        std::fs::read_to_string(repo_root().join("common/src/runner.rs")).unwrap();
    for f in std::fs::read_dir(repo_root().join("common/src/runner")).unwrap() {
        runner_source.push_str(&std::fs::read_to_string(f.unwrap().path()).unwrap());
    }
    for file in [
        "deploy/monitoring/alerts.yaml",
        "deploy/monitoring/grafana-dashboard.json",
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        for (i, _) in text.match_indices("tessera_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if text[i + name.len()..].starts_with(".+_") {
                // A family over services, e.g. tessera_.+_consumer_lag_records: the runner
                // must define a metric of that shape.
                let rest: String = text[i + name.len() + 2..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    runner_source.contains(&format!("{{service}}{rest}")),
                    "{file}: no runner metric matches tessera_.+{rest}"
                );
                continue;
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name.clone(), |n, sfx| {
                    n.strip_suffix(sfx).map(str::to_string).unwrap_or(n)
                });
            assert!(
                exposed.contains(&format!("\n{family}")),
                "{file} names {name}, which no service exposes"
            );
        }
    }
    // Every service's metrics pass promtool's lint (test.sh installs it from Debian).
    for (name, url) in [
        ("ingest", &p.ingest),
        ("identity", &p.identity),
        ("profiles", &p.profiles),
        ("activation", &p.activation),
    ] {
        let text = http()
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let findings = promtool_findings(&text);
        assert!(findings.is_empty(), "promtool on {name}: {findings}");
    }
    let segments: Value = http()
        .get(format!("{}/v1/segments", p.profiles))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let buyers = segments["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "buyers")
        .unwrap()
        .clone();
    assert_eq!(buyers["size"], 1);
    p.stop().await;
}

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
                return Err(tessera_common::Error::Invalid("simulated crash".into()));
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

/// An anonymous buyer and a known customer exist as two profiles; one event carrying
/// both ids merges them through identity.merges and profiles.transfers. Every id then
/// finds the survivor, the merged id's URL answers with it, counts add up, and the
/// destination removes the merged profile and adds the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_anonymous_profile_merges_into_the_known_one() {
    let p = Platform::start().await;
    let (anon, user) = (uid("visitor"), uid("customer"));
    let (s, _) = post(
        &p.ingest,
        "/v1/track",
        // A guest checkout leaves an email (the email destination needs an address).
        &json!({"anonymousId": anon, "event": "Order Completed",
                "context": {"traits": {"email": format!("{anon}@guest.example")}}}),
    )
    .await;
    assert_eq!(s, 200);
    let anon_profile = p
        .wait_profile("anonymous_id", &anon, "the anonymous order", |v| {
            v["events_total"] == 1
        })
        .await;
    let (s, _) = post(
        &p.ingest,
        "/v1/identify",
        &json!({"userId": user, "traits": {"email": format!("{user}@example.net")}}),
    )
    .await;
    assert_eq!(s, 200);
    let known = p
        .wait_profile("user_id", &user, "the identify", |v| v["events_total"] == 1)
        .await;
    assert_ne!(
        anon_profile["profile_id"], known["profile_id"],
        "two profiles before the merge"
    );

    let (s, _) = post(
        &p.ingest,
        "/v1/track",
        &json!({"userId": user, "anonymousId": anon, "event": "Cart Viewed"}),
    )
    .await;
    assert_eq!(s, 200);
    let merged = p
        .wait_profile("anonymous_id", &anon, "the merge", |v| {
            v["profile_id"] == known["profile_id"] && v["events_total"] == 3
        })
        .await;
    assert_eq!(
        merged["event_counts"]["Order Completed"], 1,
        "the anonymous order moved over"
    );
    assert_eq!(merged["merged_from"], json!([anon_profile["profile_id"]]));
    assert!(
        merged["segments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == "buyers")
    );
    let old_url: Value = http()
        .get(format!(
            "{}/v1/profiles/{}",
            p.profiles,
            anon_profile["profile_id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        old_url["profile_id"], known["profile_id"],
        "the merged id redirects"
    );

    let (anon_id, known_id) = (
        anon_profile["profile_id"].as_str().unwrap().to_string(),
        known["profile_id"].as_str().unwrap().to_string(),
    );
    let records = read_topic(
        &p.topics().activation("email-demo"),
        Duration::from_secs(30),
        |rs| {
            let acts: Vec<Activation> = rs
                .iter()
                .filter_map(|r| Activation::decode(r).ok())
                .collect();
            acts.iter()
                .any(|a| a.profile_id == anon_id && a.action == "remove")
                && acts
                    .iter()
                    .any(|a| a.profile_id == known_id && a.action == "add")
        },
    )
    .await;
    let acts: Vec<Activation> = records
        .iter()
        .filter_map(|r| Activation::decode(r).ok())
        .collect();
    let add = acts
        .iter()
        .find(|a| a.profile_id == known_id && a.action == "add")
        .expect("the survivor is added");
    assert_eq!(
        serde_json::from_str::<Value>(&add.payload).unwrap()["email"],
        format!("{user}@example.net")
    );
    assert!(
        acts.iter()
            .any(|a| a.profile_id == anon_id && a.action == "remove"),
        "the merged profile is removed: {acts:?}"
    );
    p.stop().await;
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
