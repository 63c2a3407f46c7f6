//! End-to-end tests: a real Apache Kafka broker and the real services. Each test starts
//! its own platform under a unique topic prefix, so they run in parallel on one broker.
//! Here: the SDKs, health and metrics, an anonymous profile merging into a known one,
//! a profile merged away and back by late events;
//! ingest's refusals and outages are in `ingest.rs`, crashes and rebuilds in
//! `recovery.rs`.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use tessera_common::records::Activation;
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
        // ... and the time its batches spent opening sealed records (all of its input
        // here is sealed).
        let opened = format!("tessera_{name}_sealing_seconds_count{{step=\"open\"}} ");
        let batches = text
            .lines()
            .find_map(|l| l.strip_prefix(&opened))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert!(
            batches.is_some_and(|n| n > 0.0),
            "{name}: {opened}{batches:?}"
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

/// Two late events move a person's anchor away and back: identity merges X into Y, then
/// Y back into X, and profiles reads the two merges and their transfers. X ends live with
/// every event and Y redirects to it (before merges carried a version, profiles looped on
/// the redirects and dead-lettered the second transfer: the state was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_profile_merged_away_and_back_by_late_events_keeps_every_event() {
    let p = Platform::start().await;
    let device = uid("device");
    let (first, second) = (uid("first"), uid("second"));
    let email = |who: &str| format!("{who}@mail.test");
    let at = |s: u32| format!("2026-01-01T00:00:{s:02}.000Z");
    let track = |who: &str, s: u32| {
        json!({"anonymousId": device, "event": "Page Viewed", "timestamp": at(s),
               "context": {"traits": {"email": email(who)}}})
    };
    let total = |n: u64| move |v: &Value| v["events_total"] == n;
    let (s, _) = post(&p.ingest, "/v1/track", &track(&first, 30)).await;
    assert_eq!(s, 200);
    let x = p
        .wait_profile("email", &email(&first), "the first event", total(1))
        .await["profile_id"]
        .clone();
    // Earlier than the first: the second email is now the part's first seen.
    let (s, _) = post(&p.ingest, "/v1/track", &track(&second, 20)).await;
    assert_eq!(s, 200);
    let y = p
        .wait_profile("email", &email(&first), "merged away", |v| {
            v["profile_id"] != x && v["events_total"] == 2
        })
        .await["profile_id"]
        .clone();
    // Earlier still, with the first email: the anchor moves back, and so does the profile.
    let (s, _) = post(&p.ingest, "/v1/track", &track(&first, 10)).await;
    assert_eq!(s, 200);
    let back = p
        .wait_profile("email", &email(&second), "merged back", |v| {
            v["profile_id"] == x && v["events_total"] == 3
        })
        .await;
    assert_eq!(back["event_counts"]["Page Viewed"], 3);
    let old: Value = http()
        .get(format!(
            "{}/v1/profiles/{}",
            p.profiles,
            y.as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(old["profile_id"], x, "the merged-back id redirects to X");
    p.stop().await;
}
