//! Activation end to end: real broker, real services.

use std::time::Duration;

use serde_json::{Value, json};

use tessera_activation::hashing;
use tessera_common::config::{DestinationConfig, DestinationKind, FrequencyCap};
use tessera_common::ids::deterministic_id;
use tessera_common::records::Activation;
use tessera_tests::*;

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn track(ingest: &str, body: Value) {
    let (status, answer) = post(ingest, "/v1/track", &body).await;
    assert_eq!(status, 200, "{answer}");
}

async fn identify(ingest: &str, body: Value) {
    let (status, answer) = post(ingest, "/v1/identify", &body).await;
    assert_eq!(status, 200, "{answer}");
}

/// Reads a destination topic until `done` holds for the records read so far.
async fn activations(
    topic: &str,
    secs: u64,
    done: impl Fn(&[Activation]) -> bool,
) -> Vec<Activation> {
    let decode = |rs: &[Vec<u8>]| -> Vec<Activation> {
        rs.iter()
            .map(|r| Activation::decode(r).expect("an activation record"))
            .collect()
    };
    let raw = read_topic(topic, Duration::from_secs(secs), |rs| done(&decode(rs))).await;
    decode(&raw)
}

fn of<'a>(all: &'a [Activation], profile: &str) -> Vec<&'a Activation> {
    all.iter().filter(|a| a.profile_id == profile).collect()
}

async fn profile_id(ingest_profiles: &str, user: &str) -> String {
    wait_profile(ingest_profiles, "user_id", user, "the profile", |_| true).await["profile_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// An abandoned-cart trigger (4 s wait here) fires at its deadline although profiles
/// and activation are killed with SIGKILL while it waits; another person's cart is
/// cancelled by a purchase. The send has the cart's properties, the consent it rests
/// on and an id derived from its inputs (the same whatever restarts happen).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abandoned_cart_fires_at_its_deadline_across_restarts_and_a_purchase_cancels_another() {
    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("definitions");
    std::fs::create_dir_all(&defs).unwrap();
    std::fs::write(
        defs.join("abandoned-cart.yaml"),
        "id: abandoned-cart\nwhen: {event: Cart Viewed}\nwait: 4s\nunless: {event: Order Completed}\n",
    )
    .unwrap();
    let mut cfg = test_config(dir.path());
    cfg.profiles.definitions_dir = defs;
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, profiles) = (urls[0].clone(), urls[2].clone());
    let run = uid("cart");
    let (ann, bob) = (format!("{run}-ann"), format!("{run}-bob"));
    let now = chrono::Utc::now().timestamp_millis();
    for u in [&ann, &bob] {
        identify(
            &ingest,
            json!({"userId": u, "traits": {"email": format!("{u}@example.com")}}),
        )
        .await;
        track(
            &ingest,
            json!({"userId": u, "event": "Cart Viewed", "messageId": format!("{u}-cart"),
            "timestamp": iso(now), "properties": {"cart_id": format!("c-{u}"), "value": 120}}),
        )
        .await;
    }
    track(
        &ingest,
        json!({"userId": bob, "event": "Order Completed", "timestamp": iso(now + 500),
        "properties": {"total": 120}}),
    )
    .await;
    let (ann_id, bob_id) = (
        profile_id(&profiles, &ann).await,
        profile_id(&profiles, &bob).await,
    );
    // Both services die while the carts wait and come back.
    services.get_mut("profiles").unwrap().restart();
    services.get_mut("activation").unwrap().restart();
    for url in [&urls[2], &urls[3]] {
        wait_ready(url, Duration::from_secs(60)).await;
    }
    let topic = tessera_common::topics::Topics::new(&cfg.topics).activation("cart-email");
    let all = activations(&topic, 60, |all| !of(all, &ann_id).is_empty()).await;
    let sent = of(&all, &ann_id);
    assert!(!sent.is_empty(), "ann's abandoned cart fired");
    let a = sent[0];
    assert_eq!(
        (a.action.as_str(), a.source.as_str(), a.source_id.as_str()),
        ("send", "trigger", "abandoned-cart")
    );
    assert_eq!(
        a.event_time,
        now + 4000,
        "fires at the deadline: the cart's time + 4 s"
    );
    let payload: Value = serde_json::from_str(&a.payload).unwrap();
    assert_eq!(payload["email"], format!("{ann}@example.com"));
    assert_eq!(payload["event"]["name"], "Cart Viewed");
    assert_eq!(
        payload["event"]["properties"]["cart_id"],
        format!("c-{ann}")
    );
    let consent: Value = serde_json::from_str(&a.consent).unwrap();
    assert_eq!(consent["marketing"]["granted"], true, "{consent}");
    let record = deterministic_id(
        "trigger",
        &[&ann_id, "abandoned-cart", "1", &format!("{ann}-cart")],
    );
    assert_eq!(
        a.activation_id,
        deterministic_id("activation", &["cart-email", &record])
    );
    // Bob bought: nothing for him, though his deadline passed as long ago as ann's.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = activations(&topic, 5, |_| false).await;
    assert!(
        of(&all, &bob_id).is_empty(),
        "bob's cart was cancelled by his order"
    );
    assert!(
        of(&all, &ann_id)
            .iter()
            .all(|x| x.activation_id == a.activation_id),
        "any repeat has the same id"
    );
    // The restarted profiles service fired it.
    let text = metrics_text(&profiles).await;
    assert!(
        text.contains(
            r#"tessera_profiles_triggers_total{outcome="fired",trigger="abandoned-cart"} 1"#
        ),
        "{text}"
    );
}

/// An ads audience with hashed identifiers: a person who granted advertising consent is
/// added; buying puts them in `recent-buyers`, a suppression, and they are removed at
/// once; another person withdrawing consent is removed. An order trigger shows the
/// frequency cap and a marketing refusal stopping sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audiences_follow_suppressions_and_consent_and_sends_respect_caps() {
    let p = Platform::start_with(|c| {
        c.activation.destinations.push(DestinationConfig {
            id: "thanks".into(),
            kind: DestinationKind::Email,
            format: Default::default(),
            segments: vec![],
            triggers: vec!["order-thanks".into()],
            fields: vec!["email".into()],
            purposes: None,
            channel: None,
            frequency_cap: Some(FrequencyCap {
                max: 1,
                per: "1h".into(),
            }),
            allow_labels: vec!["pii".into()],
        });
    })
    .await;
    let r = http()
        .post(format!("{}/v1/triggers", p.profiles))
        .json(&json!({"id": "order-thanks",
            "when": {"event": "Order Completed", "where": [{"property": "total", "gt": 10}]}}))
        .send()
        .await
        .unwrap();
    let (status, answer) = (r.status().as_u16(), r.text().await.unwrap());
    assert_eq!(status, 201, "{answer}");
    // Refused definitions say why: a bad wait (400), a segment that does not exist (409).
    for (doc, want, why) in [
        (
            json!({"id": "t1", "when": {"event": "A"}, "wait": "soon"}),
            400,
            "wait",
        ),
        (
            json!({"id": "t2", "when": {"segment": "no-such-segment"}}),
            409,
            "no-such-segment",
        ),
    ] {
        let r = http()
            .post(format!("{}/v1/triggers", p.profiles))
            .json(&doc)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want);
        let body: Value = r.json().await.unwrap();
        assert!(body["reason"].as_str().unwrap().contains(why), "{body}");
    }
    let run = uid("aud");
    let (cat, dan) = (format!("{run}-cat"), format!("{run}-dan"));
    let granted = json!({"consent": {"categoryPreferences": {"Advertising": true}}});
    for u in [&cat, &dan] {
        identify(&p.ingest, json!({"userId": u, "context": granted,
            "traits": {"email": format!(" {}@Example.com", u.to_uppercase()), "phone": "(650) 555-1212"}})).await;
    }
    let (cat_id, dan_id) = (
        profile_id(&p.profiles, &cat).await,
        profile_id(&p.profiles, &dan).await,
    );
    let ads = p.topics().activation("google-audience");
    let added = |all: &[Activation]| {
        [&cat_id, &dan_id]
            .iter()
            .all(|id| of(all, id).iter().any(|a| a.action == "add"))
    };
    let all = activations(&ads, 60, added).await;
    let add = of(&all, &cat_id)[0].clone();
    let payload: Value = serde_json::from_str(&add.payload).unwrap();
    assert_eq!(
        payload["hashed_email"],
        hashing::sha256_hex(&format!("{cat}@example.com")),
        "trimmed, lower-cased, SHA-256"
    );
    assert_eq!(
        payload["hashed_phone_number"],
        hashing::sha256_hex("+16505551212"),
        "E.164 with +"
    );
    assert_eq!(add.kind, "google_ads");
    // Cat buys: recent-buyers suppresses the acquisition audience.
    track(
        &p.ingest,
        json!({"userId": cat, "event": "Order Completed", "properties": {"total": 80}}),
    )
    .await;
    // Dan withdraws advertising consent.
    identify(&p.ingest, json!({"userId": dan, "context": {"consent": {"categoryPreferences": {"Advertising": false}}}})).await;
    let removed = |all: &[Activation]| {
        [&cat_id, &dan_id]
            .iter()
            .all(|id| of(all, id).iter().any(|a| a.action == "remove"))
    };
    let all = activations(&ads, 60, removed).await;
    let cat_remove = of(&all, &cat_id)
        .into_iter()
        .find(|a| a.action == "remove")
        .unwrap()
        .clone();
    // How fast: from ingest accepting the order to activation producing the remove
    // (the record's Kafka create time), printed, not asserted.
    let timed = read_timed(&ads, std::time::Duration::from_secs(5), |rs| {
        rs.iter().any(|r| {
            Activation::decode(r).is_ok_and(|a| a.activation_id == cat_remove.activation_id)
        })
    })
    .await;
    if let Some((_, at)) = timed.iter().find(|(r, _)| {
        Activation::decode(r).is_ok_and(|a| a.activation_id == cat_remove.activation_id)
    }) {
        eprintln!(
            "activation test: order accepted → ads audience remove produced in {} ms",
            at - cat_remove.received_at
        );
    }
    assert!(
        cat_remove
            .reason
            .contains("suppression recent-buyers-not-in-acquisition"),
        "{}",
        cat_remove.reason
    );
    assert_eq!(
        cat_remove.payload, add.payload,
        "the remove names whom to remove"
    );
    let dan_remove = of(&all, &dan_id)
        .into_iter()
        .find(|a| a.action == "remove")
        .unwrap()
        .clone();
    assert!(
        dan_remove.reason.contains("no_consent"),
        "{}",
        dan_remove.reason
    );

    // Sends: cat's first order was thanked; a second within the hour is capped.
    let thanks = p.topics().activation("thanks");
    let first = activations(&thanks, 60, |all| !of(all, &cat_id).is_empty()).await;
    assert_eq!(of(&first, &cat_id).len(), 1);
    track(
        &p.ingest,
        json!({"userId": cat, "event": "Order Completed", "properties": {"total": 90}}),
    )
    .await;
    // Dan refuses marketing by email, then orders: no thanks for him.
    track(
        &p.ingest,
        json!({"userId": dan, "event": "Order Completed", "properties": {"total": 30},
        "context": {"consent": {"categoryPreferences": {"marketing.email": false}}}}),
    )
    .await;
    let text = eventually("the cap and the refusal", Duration::from_secs(30), || async {
        let t = metrics_text(&p.activation).await;
        (t.contains(r#"tessera_activation_records_total{action="send",destination="thanks",outcome="capped"} 1"#)
            && t.contains(r#"tessera_activation_records_total{action="send",destination="thanks",outcome="no_consent"} 1"#))
        .then_some(t)
    })
    .await;
    assert!(text.contains(r#"tessera_activation_records_total{action="send",destination="thanks",outcome="sent"} 1"#), "{text}");
    let all = activations(&thanks, 3, |_| false).await;
    assert_eq!(of(&all, &cat_id).len(), 1, "capped");
    assert!(of(&all, &dan_id).is_empty(), "no consent");
    p.stop().await;
}
