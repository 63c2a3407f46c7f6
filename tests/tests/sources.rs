//! Ingest sources end to end: write key rotation, disabled sources, per-source rate limits.

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
