//! Access end to end: ingest write key rotation, disabled sources, per-source rate
//! limits; API tokens on the services' own APIs and the audit trail of changes.

use serde_json::{Value, json};

use tessera_common::config::SourceConfig;
use tessera_tests::*;

async fn send(ingest: &str, key: &str, path: &str, body: &Value) -> (u16, Option<String>, Value) {
    let r = http()
        .post(format!("{ingest}{path}"))
        .basic_auth(key, Some(""))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

fn batch(n: usize, tag: &str) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"type": "track", "userId": format!("{tag}-{i}"), "event": "Page Viewed"}))
        .collect();
    json!({"batch": events})
}

/// A rotated key keeps working beside the new one (and is counted); a disabled source
/// gets 403 with its reason; a source over its rate gets 429 with `Retry-After`, and is
/// served again once its allowance refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_rotate_sources_can_be_disabled_and_rates_are_limited() {
    let p = Platform::start_with(|c| {
        c.ingest.sources.push(SourceConfig {
            previous_write_keys: vec!["crm-old-key".into()],
            ..SourceConfig::new("crm", "crm-new-key")
        });
        c.ingest.sources.push(SourceConfig {
            enabled: false,
            ..SourceConfig::new("legacy-app", "legacy-key")
        });
        c.ingest.sources.push(SourceConfig {
            max_events_per_second: Some(5),
            ..SourceConfig::new("partner", "partner-key")
        });
    })
    .await;
    let one = json!({"userId": "rot-1", "event": "Page Viewed"});
    for key in ["crm-new-key", "crm-old-key"] {
        let (status, _, body) = send(&p.ingest, key, "/v1/track", &one).await;
        assert_eq!(status, 200, "{key}: {body}");
    }
    let (status, _, body) = send(&p.ingest, "legacy-key", "/v1/track", &one).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "source_disabled");
    assert!(
        body["reason"].as_str().unwrap().contains("legacy-app"),
        "{body}"
    );
    let (status, _, body) = send(&p.ingest, "no-such-key", "/v1/track", &one).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );

    // Five events a second: a batch of five passes, the next is refused with a wait.
    let (status, _, body) = send(&p.ingest, "partner-key", "/v1/batch", &batch(5, "a")).await;
    assert_eq!(status, 200, "{body}");
    let (status, retry, body) = send(&p.ingest, "partner-key", "/v1/batch", &batch(3, "b")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "rate_limited");
    let wait: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    // More than a second's allowance can never pass: said so, without a wait to try.
    let (status, _, body) = send(&p.ingest, "partner-key", "/v1/batch", &batch(6, "c")).await;
    assert_eq!(status, 429);
    assert!(
        body["reason"].as_str().unwrap().contains("smaller batches"),
        "{body}"
    );
    tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
    let (status, _, body) = send(&p.ingest, "partner-key", "/v1/batch", &batch(3, "d")).await;
    assert_eq!(status, 200, "after the wait: {body}");
    // Other sources are not limited by the partner's rate.
    let (status, _, _) = send(&p.ingest, WRITE_KEY, "/v1/batch", &batch(50, "e")).await;
    assert_eq!(status, 200);

    let text = metrics_text(&p.ingest).await;
    for line in [
        r#"tessera_ingest_previous_write_key_requests_total{source="crm"} 1"#,
        r#"tessera_ingest_events_rejected_total{origin="http",reason="source_disabled"} 1"#,
        r#"tessera_ingest_events_rejected_total{origin="http",reason="rate_limited"} 2"#,
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    p.stop().await;
}

/// The profiles and identity APIs refuse requests without a valid token (401, JSON
/// reason) and keep health and metrics open; a definition change made with a token is
/// on the audit trail with the token's name, the action, the target and the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_tokens_guard_the_apis_and_changes_are_audited() {
    use tessera_common::records::{AuditEntry, AvroRecord};

    let p = Platform::start().await;
    let bare = reqwest::Client::new();
    for url in [
        format!("{}/v1/segments", p.profiles),
        format!("{}/v1/identity/lookup?type=email&value=a@b.co", p.identity),
    ] {
        let r = bare.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{url}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized", "{body}");
        let r = bare
            .get(&url)
            .bearer_auth("not-a-token-at-all")
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["reason"], "unknown API token", "{body}");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = bare
            .get(format!("{}{path}", p.profiles))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} stays open");
    }
    let doc =
        json!({"id": "audited", "condition": {"event_count": {"event": "Signed Up", "min": 1}}});
    let r = http()
        .post(format!("{}/v1/segments", p.profiles))
        .json(&doc)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http()
        .delete(format!("{}/v1/segments/audited", p.profiles))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let shown: Value = get_json(&format!("{}/v1/segments", p.profiles)).await;
    assert!(
        shown["segments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["id"] != "audited")
    );

    let raw = read_topic(
        &p.topics().audit(),
        std::time::Duration::from_secs(30),
        |rs| rs.len() >= 2,
    )
    .await;
    let entries: Vec<AuditEntry> = raw
        .iter()
        .map(|r| AuditEntry::from_avro(r).unwrap())
        .collect();
    let summary: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|e| (e.who.as_str(), e.action.as_str(), e.target.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("tests", "definition.create", "segment/audited"),
            ("tests", "definition.delete", "segment/audited"),
        ]
    );
    assert_eq!(entries[0].service, "profiles");
    let versions: Vec<Value> = entries
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.detail).unwrap()["version"].clone())
        .collect();
    assert_eq!(
        versions,
        vec![json!(1), json!(2)],
        "the deletion is the next version"
    );
    let record = get_json(&format!("{}/v1/segments/audited", p.profiles)).await;
    assert_eq!(record["error"], "not_found", "{record}");
    p.stop().await;
}

/// Slow and oversized clients are cut off instead of holding connections: headers that
/// do not complete in time close the connection, headers over the limit are refused, and
/// a body trickled or stalled past the deadline gets 408 with a JSON reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_oversized_clients_are_cut_off() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let p = Platform::start_with(|c| {
        c.http.header_read_timeout_ms = 1000;
        c.http.body_timeout_ms = 1500;
        c.http.max_header_bytes = 8192;
    })
    .await;
    let addr = p.ingest.trim_start_matches("http://").to_string();
    let auth = "Authorization: Basic dGVzdC13cml0ZS1rZXk6\r\n"; // test-write-key:
    async fn answer(s: &mut TcpStream, within: Duration) -> (String, Duration) {
        let started = Instant::now();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(within, s.read_to_end(&mut buf)).await;
        (
            String::from_utf8_lossy(&buf).into_owned(),
            started.elapsed(),
        )
    }

    // Headers that never finish: the connection is closed after the header timeout.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (text, took) = answer(&mut s, Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(5),
        "closed after {took:?}: {text:?}"
    );
    assert!(!text.contains("200 OK"), "{text}");

    // Headers over the limit: refused.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let big = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let (text, _) = answer(&mut s, Duration::from_secs(5)).await;
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );

    // A body trickled a byte at a time (each gap shorter than the limit) and one that
    // stalls: both end in 408 once the body deadline passes.
    let body = r#"{"userId":"slow","event":"Page Viewed"}"#;
    for trickle in [true, false] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/track HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body.as_bytes()[..5]).await.unwrap();
        let started = Instant::now();
        if trickle {
            for b in body.as_bytes()[5..15].iter() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
            }
        }
        let (text, _) = answer(&mut s, Duration::from_secs(10)).await;
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "trickle={trickle}: {text}"
        );
        assert!(text.contains(r#""error":"request_timeout""#), "{text}");
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
    }

    // A normal request is served as ever.
    let (status, _) = post(
        &p.ingest,
        "/v1/track",
        &json!({"userId": "fine", "event": "Page Viewed"}),
    )
    .await;
    assert_eq!(status, 200);
    p.stop().await;
}

/// Ingest sheds load by what it holds, not by connections. The audit's finding: a slot
/// was taken before the body was read (up to 30 s), so ~17 trickling connections a second
/// held every slot and every client got 429. Now clients that trickle their bodies hold
/// only the bytes they sent; beyond the budget of bytes being read
/// (`max_concurrent_requests` × `max_request_bytes`) ingest refuses at once with 429 and
/// `Retry-After` instead of queueing, and serves again once the bytes are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_bodies_hold_bytes_not_slots_and_ingest_sheds_beyond_its_budget() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let p = Platform::start_with(|c| {
        c.ingest.max_concurrent_requests = 2;
        c.ingest.max_request_bytes = 4096;
    })
    .await;
    let addr = p.ingest.trim_start_matches("http://").to_string();
    let head = |len: usize| {
        format!(
            "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic dGVzdC13cml0ZS1rZXk6\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
    };
    // Twenty connections trickle their bodies: a few bytes each, then nothing yet.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(head(100).as_bytes()).await.unwrap();
        s.write_all(b"{\"userId\"").await.unwrap();
        slow.push(s);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, _, answer) = send(
        &p.ingest,
        WRITE_KEY,
        "/v1/track",
        &json!({"userId": "served", "event": "Page Viewed"}),
    )
    .await;
    assert_eq!(status, 200, "slow clients took the slots: {answer}");

    // A body that has nearly all arrived holds nearly the whole budget (2 × 4096 bytes
    // less the tricklers'): a request that needs more than is left is refused at once.
    let body = |user: &str, len: usize| {
        let mut b = format!(r#"{{"userId":"{user}","event":"Page Viewed","properties":{{"pad":""#);
        let pad = len - b.len() - 3;
        b.push_str(&"x".repeat(pad));
        b.push_str(r#""}}"#);
        assert_eq!(b.len(), len);
        b
    };
    let big = body("holder", 4000);
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(head(big.len()).as_bytes()).await.unwrap();
        s.write_all(&big.as_bytes()[..3900]).await.unwrap();
        holders.push(s);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, retry, answer) = send(
        &p.ingest,
        WRITE_KEY,
        "/v1/track",
        &json!({"userId": "second", "event": "Page Viewed", "properties": {"pad": "x".repeat(600)}}),
    )
    .await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"], "overloaded");
    assert_eq!(retry.as_deref(), Some("1"));
    // The held requests complete and are stored; then ingest serves again.
    for mut s in holders {
        s.write_all(&big.as_bytes()[3900..]).await.unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.unwrap();
        assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"));
    }
    let (status, _, _) = send(
        &p.ingest,
        WRITE_KEY,
        "/v1/track",
        &json!({"userId": "third", "event": "Page Viewed", "properties": {"pad": "x".repeat(600)}}),
    )
    .await;
    assert_eq!(status, 200);
    drop(slow);
    p.stop().await;
}

/// A broker of our own with a SASL_PLAINTEXT listener (`deploy/kafka.sh start --sasl`).
fn sasl_broker(dir: &std::path::Path) -> String {
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("deploy/kafka.sh"))
        .args(["start", "--sasl", "--data"])
        .arg(dir)
        .args(["--watch-pid", &std::process::id().to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running deploy/kafka.sh");
    assert!(
        out.status.success(),
        "deploy/kafka.sh could not start a broker"
    );
    std::fs::read_to_string(dir.join("sasl_bootstrap"))
        .unwrap()
        .trim()
        .to_string()
}

/// Kafka connections authenticate through configuration alone (librdkafka properties
/// under `[kafka.properties]`): the whole platform runs against a SASL listener, and a
/// wrong password stops a service at start with an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_connections_authenticate_with_sasl() {
    let broker = tempfile::tempdir().unwrap();
    let sasl = sasl_broker(broker.path());
    let login = |c: &mut tessera_common::config::Config, password: &str| {
        c.kafka.bootstrap = sasl.clone();
        for (k, v) in [
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "PLAIN"),
            ("sasl.username", "tessera"),
            ("sasl.password", password),
        ] {
            c.kafka.properties.insert(k.into(), v.into());
        }
    };
    let p = Platform::start_with(|c| login(c, "tessera-secret")).await;
    assert_eq!(
        p.config.kafka.bootstrap, sasl,
        "every client goes through the SASL listener"
    );
    let user = format!("sasl-{}", uuid::Uuid::new_v4().simple());
    let (status, _, answer) = send(
        &p.ingest,
        WRITE_KEY,
        "/v1/track",
        &json!({"userId": user, "event": "Signed In"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    p.wait_profile("user_id", &user, "the event, through SASL", |v| {
        v["events_total"] == 1
    })
    .await;
    p.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    login(&mut cfg, "not-the-password");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let start = tessera_identity::run_with_listener(
        cfg,
        listener,
        tokio_util::sync::CancellationToken::new(),
    );
    let err = tokio::time::timeout(std::time::Duration::from_secs(60), start)
        .await
        .expect("refused credentials end the start")
        .expect_err("no service runs with a wrong password")
        .to_string();
    assert!(
        err.contains("refused this client's credentials") && err.contains("Authentication failed"),
        "{err}"
    );
}
