//! Erasure end to end: a deleted person leaves nothing readable, and nobody else loses
//! anything. Real broker, the services as processes.

use std::time::Duration;

use serde_json::json;

use tessera_common::records::Activation;
use tessera_common::topics::Topics;
use tessera_tests::*;

/// Jane browses anonymously, identifies with her email, phone, name and address, buys
/// (segment `buyers`, so the email destination gets her) and leaves a cart (the
/// abandoned-cart trigger waits an hour). Bob does the same. A delete by Jane's email,
/// through the privacy API with its own token:
/// - survives profiles and activation being killed while it is under way;
/// - reports what each service removed, and notifies every destination;
/// - leaves no trace in lookups, the graph, segments or waiting triggers; Bob is intact;
/// - her later events are dropped at ingest (the delete suppresses by default);
/// - after the services stop, no record of any topic of the platform (destination topics
///   aside: they are the hand-off to downstream systems, which get the deletion notice)
///   holds any of her values, as stored or opened with the platform's keys; no RocksDB
///   store holds them (read through RocksDB and as raw files), and no service logged them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_person_deleted_by_email_is_gone_from_every_topic_and_store() {
    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, identity, profiles) = (urls[0].clone(), urls[1].clone(), urls[2].clone());
    let run = uid("gdpr");
    let jane = json!({
        "user": format!("{run}-jane-user"),
        "anon": format!("{run}-jane-anon"),
        "email": format!("{run}-jane@example.com"),
        "phone": "+1 415 555 0123",
        "first_name": format!("Janeth{}", &run[5..11]),
        "street": format!("{run} Privacy Lane"),
    });
    let bob_user = format!("{run}-bob-user");
    let s = |k: &str| jane[k].as_str().unwrap().to_string();
    send_ok(
        &ingest,
        "/v1/page",
        json!({"anonymousId": s("anon"), "name": "Home",
        "context": {"traits": {"email": s("email")}}}),
    )
    .await;
    send_ok(
        &ingest,
        "/v1/identify",
        json!({"userId": s("user"), "anonymousId": s("anon"),
        "traits": {"email": s("email"), "phone": s("phone"), "first_name": s("first_name"),
                   "last_name": "Doe", "address": {"street": s("street"), "city": "Lisbon"}}}),
    )
    .await;
    for (u, street) in [
        (s("user"), s("street")),
        (bob_user.clone(), "1 Main St".into()),
    ] {
        send_ok(
            &ingest,
            "/v1/track",
            json!({"userId": u, "event": "Order Completed",
            "properties": {"total": 30, "shipping_street": street}}),
        )
        .await;
        send_ok(
            &ingest,
            "/v1/track",
            json!({"userId": u, "event": "Cart Viewed",
            "properties": {"cart_id": "c1"}}),
        )
        .await;
    }
    send_ok(
        &ingest,
        "/v1/identify",
        json!({"userId": bob_user,
        "traits": {"email": format!("{bob_user}@example.com")}}),
    )
    .await;
    let before = wait_profile(
        &profiles,
        "email",
        &s("email"),
        "jane in buyers with a waiting cart",
        |p| {
            p["segments"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x["id"] == "buyers" || x == "buyers"))
                && p["waiting_triggers"]
                    .as_array()
                    .is_some_and(|t| !t.is_empty())
        },
    )
    .await;
    let jane_id = before["profile_id"].as_str().unwrap().to_string();
    let bob = wait_profile(&profiles, "user_id", &bob_user, "bob", |_| true).await;
    let topics = Topics::new(&cfg.topics);
    let email_topic = topics.activation("email-demo");
    read_topic(&email_topic, Duration::from_secs(60), |rs| {
        rs.iter()
            .any(|r| Activation::decode(r).is_ok_and(|a| a.profile_id == jane_id))
    })
    .await;

    // The privacy API takes its own token only; the admin token does not open it.
    let r = http()
        .post(format!("{identity}/v1/privacy/requests"))
        .json(&json!({"action": "delete", "identifier": {"type": "email", "value": s("email")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "an admin token is refused");
    let (status, bad) = privacy_request(
        &identity,
        &json!({"action": "forget", "identifier": {"type": "email", "value": "x@y.z"}}),
    )
    .await;
    assert_eq!(
        (status, bad["error"].as_str()),
        (400, Some("invalid_action")),
        "{bad}"
    );

    let (status, accepted) = privacy_request(
        &identity,
        &json!({"action": "delete",
        "identifier": {"type": "email", "value": s("email").to_uppercase()},
        "request_id": format!("{run}-erase")}),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let request = accepted["request_id"].as_str().unwrap().to_string();
    // The same request again is the same request (idempotent), not a second one.
    let (again, same) = privacy_request(
        &identity,
        &json!({"action": "delete",
        "identifier": {"type": "email", "value": s("email")}, "request_id": request}),
    )
    .await;
    assert_eq!(
        (again, same["request_id"].as_str()),
        (200, Some(request.as_str()))
    );
    // Requests are durable: profiles and activation die (SIGKILL) as it is on its way.
    for name in ["profiles", "activation"] {
        services.get_mut(name).unwrap().restart();
    }
    for url in &urls {
        wait_ready(url, Duration::from_secs(60)).await;
    }
    let report = privacy_finished(&identity, &request).await;
    assert_eq!(report["status"], "done", "{report}");
    assert_eq!(report["profile_id"], jane_id.as_str());
    let steps = &report["steps"];
    assert!(
        steps["identity"]["detail"]["identifiers"].as_u64().unwrap() >= 4,
        "{report}"
    );
    assert!(
        steps["identity"]["detail"]["keys_destroyed"]
            .as_u64()
            .unwrap()
            >= 2,
        "{report}"
    );
    assert_eq!(steps["profiles"]["detail"]["profiles"], 1, "{report}");
    assert_eq!(
        steps["profiles"]["detail"]["pending_triggers"], 1,
        "{report}"
    );
    assert!(
        steps["profiles"]["detail"]["memberships"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(
        steps["activation"]["detail"]["deletion_notices"]
            .as_u64()
            .unwrap()
            >= 3,
        "{report}"
    );

    // Gone from lookups, the graph and the segments; Bob is untouched.
    for (kind, value) in [
        ("email", s("email")),
        ("user_id", s("user")),
        ("anonymous_id", s("anon")),
    ] {
        let r = http()
            .get(format!("{identity}/v1/identity/lookup"))
            .query(&[("type", kind), ("value", value.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404, "{kind} still resolves");
    }
    // A service reports its step when the batch that did it has produced its outputs;
    // the batch's state is committed right after, so a read may see it a moment later.
    eventually("the profile to be gone", Duration::from_secs(5), || async {
        let r = http()
            .get(format!("{profiles}/v1/profiles/{jane_id}"))
            .send()
            .await
            .ok()?;
        (r.status().as_u16() == 404).then_some(())
    })
    .await;
    let members = get_json(&format!("{profiles}/v1/segments/buyers/members")).await;
    assert!(!members.to_string().contains(&jane_id), "{members}");
    assert!(
        members
            .to_string()
            .contains(bob["profile_id"].as_str().unwrap()),
        "{members}"
    );
    // Every destination hears of it.
    let notices = read_topic(&email_topic, Duration::from_secs(30), |rs| {
        rs.iter().any(|r| {
            Activation::decode(r).is_ok_and(|a| a.profile_id == jane_id && a.action == "delete")
        })
    })
    .await;
    assert!(notices.iter().any(|r| {
        Activation::decode(r).is_ok_and(|a| a.profile_id == jane_id && a.action == "delete")
    }));

    // Her later events are dropped (suppressed), and nothing of her comes back.
    send_ok(
        &ingest,
        "/v1/track",
        json!({"userId": s("user"), "event": "Order Completed",
        "properties": {"total": 10}}),
    )
    .await;
    let dropped = metrics_text(&ingest).await;
    assert!(
        dropped
            .lines()
            .any(|l| l.starts_with("tessera_ingest_events_dropped_total")
                && l.contains("suppressed")
                && !l.ends_with(" 0")),
        "{dropped}"
    );
    send_ok(
        &ingest,
        "/v1/track",
        json!({"anonymousId": format!("{run}-jane-new-device"), "event": "Viewed",
        "context": {"traits": {"email": s("email")}}}),
    )
    .await;
    send_ok(
        &ingest,
        "/v1/track",
        json!({"userId": bob_user, "event": "Viewed"}),
    )
    .await;
    wait_profile(&profiles, "user_id", &bob_user, "bob's later event", |p| {
        p["events_total"].as_u64() >= Some(3)
    })
    .await;
    let r = http()
        .get(format!("{identity}/v1/identity/lookup"))
        .query(&[("type", "email"), ("value", s("email").as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        404,
        "an event naming her suppressed email is dropped by identity"
    );

    // Nothing of her readable: every record of every topic of the platform (destinations
    // aside) as stored and as opened with the platform's keys, every store, every log.
    let needles: Vec<String> = ["user", "anon", "email", "phone", "first_name", "street"]
        .iter()
        .map(|k| s(k))
        .chain([s("email").to_uppercase(), "4155550123".into()])
        .collect();
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let mut leaks = Vec::new();
    let mut scanned = 0;
    keys_caught_up(&topics.keys()).await;
    for topic in platform_topics(&cfg.topics.prefix) {
        if topic.starts_with(&format!("{}activation.", cfg.topics.prefix)) {
            continue;
        }
        for record in read_stored(&topic, Duration::from_secs(3)).await {
            scanned += 1;
            // As stored, and as whoever holds the platform's keys can open it.
            let opened = open_record(&topic, &record).await;
            for n in &needles {
                if contains(&record, n.as_bytes()) || contains(&opened, n.as_bytes()) {
                    leaks.push(format!("{topic}: {n}"));
                }
            }
        }
    }
    assert!(
        scanned > 20,
        "the scan read the platform's records ({scanned})"
    );
    for (name, svc) in services.iter_mut() {
        svc.kill9();
        for n in &needles {
            if svc.log().contains(n) {
                leaks.push(format!("{name} log: {n}"));
            }
        }
    }
    for state in [
        &cfg.identity.state_dir,
        &cfg.profiles.state_dir,
        &cfg.activation.state_dir,
    ] {
        leaks.extend(store_mentions(state, &needles));
        leaks.extend(files_mentioning(state, &needles));
    }
    assert!(leaks.is_empty(), "personal data left readable: {leaks:#?}");
    // Bob's data is still there to read (sealed, with a key that exists).
    assert!(!store_mentions(&cfg.profiles.state_dir, &[&bob_user]).is_empty());
}
/// The audit's finding: after a delete by email, the address was still on disk as raw
/// bytes in identity's MANIFEST. RocksDB records the smallest and largest key of every
/// table file there, compaction does not rewrite that history, and identity's keys held
/// identifier values (`id/email/<address>`). With the person alone in the stores her keys
/// are at every file boundary; after her deletion every file of every store is read as
/// raw bytes, and none holds any of her values, nor any id anyone could derive from them
/// without the deployment's pseudonym secret (ids were once unkeyed UUIDv5s, so her
/// email's hash in a MANIFEST named her to anyone with a list of emails).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_person_alone_in_the_stores_leaves_no_byte_of_hers_in_any_store_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, identity, profiles) = (urls[0].clone(), urls[1].clone(), urls[2].clone());
    let run = uid("alone");
    let (user, anon) = (format!("{run}-user"), format!("{run}-anon"));
    let email = format!("{run}@example.com");
    let (phone, first_name) = ("+1 415 555 0177", format!("Solenne{}", &run[6..12]));
    send_ok(
        &ingest,
        "/v1/identify",
        json!({"userId": user, "anonymousId": anon,
        "traits": {"email": email, "phone": phone, "first_name": first_name}}),
    )
    .await;
    send_ok(
        &ingest,
        "/v1/track",
        json!({"userId": user, "event": "Order Completed", "properties": {"total": 12}}),
    )
    .await;
    let profile = wait_profile(
        &profiles,
        "email",
        &email,
        "her profile with both events",
        |p| p["events_total"].as_u64() >= Some(2),
    )
    .await;
    // What anyone holding a list of emails computes: the ids her values gave before ids
    // were keyed with the deployment's secret (UUIDv5 under a constant namespace).
    let unkeyed = |kind: &str, parts: &[&str]| {
        let ns = uuid::Uuid::from_u128(0x7e55e7a0_cd90_4c1b_9a57_4f3d2b1c0e11);
        let mut name = kind.to_string();
        for p in parts {
            name.push('\u{1f}');
            name.push_str(p);
        }
        uuid::Uuid::new_v5(&ns, name.as_bytes()).to_string()
    };
    let mut derived = Vec::new();
    for (kind, value) in [
        ("user_id", &user),
        ("anonymous_id", &anon),
        ("email", &email),
    ] {
        derived.push(unkeyed("profile", &[kind, value]));
        derived.push(unkeyed("identifier", &[kind, value]));
    }
    let profile_id = profile["profile_id"].as_str().expect("a profile id");
    assert!(
        !derived.iter().any(|d| d == profile_id),
        "her profile id is the public formula of one of her identifiers"
    );
    let (status, accepted) = privacy_request(
        &identity,
        &json!({"action": "delete", "identifier": {"type": "email", "value": email}}),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let report = privacy_finished(&identity, accepted["request_id"].as_str().unwrap()).await;
    assert_eq!(report["status"], "done", "{report}");
    // Each service reports once its batch is produced; its state is written just after.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (_, svc) in services.iter_mut() {
        svc.kill9();
    }
    let mut needles = vec![
        user.as_str(),
        anon.as_str(),
        email.as_str(),
        "4155550177",
        phone,
        first_name.as_str(),
    ];
    needles.extend(derived.iter().map(String::as_str));
    let mut leaks = Vec::new();
    let mut files = 0;
    for state in [
        &cfg.identity.state_dir,
        &cfg.profiles.state_dir,
        &cfg.activation.state_dir,
    ] {
        files += std::fs::read_dir(state).unwrap().count();
        leaks.extend(files_mentioning(state, &needles));
        leaks.extend(store_mentions(state, &needles));
    }
    assert!(files > 10, "the stores' files were read ({files})");
    assert!(leaks.is_empty(), "her values left on disk: {leaks:#?}");
}

/// A kiosk (one anonymousId) is shared. Ann browses on it and logs in; Bob logs in on it
/// later and buys; his app's batch holds an event ingest refuses. Erasing Ann destroys the keys of
/// everything that was hers. Bob's records from the kiosk (his events on
/// `events.ingested`, his dead letter) are his, not hers: they stay readable, so a
/// rebuild of identity by replay still links them, and an export of Bob still finds
/// them. Nothing of Ann's stays readable there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn erasing_a_person_leaves_others_records_from_her_shared_device_readable() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    let (_services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, identity, profiles) = (urls[0].clone(), urls[1].clone(), urls[2].clone());
    let run = uid("kiosk");
    let kiosk = format!("{run}-kiosk");
    let (ann, bob) = (format!("{run}-ann"), format!("{run}-bob"));
    let (ann_email, bob_email) = (format!("{ann}@example.com"), format!("{bob}@example.com"));
    send_ok(
        &ingest,
        "/v1/page",
        json!({"anonymousId": kiosk, "name": "Home"}),
    )
    .await;
    send_ok(
        &ingest,
        "/v1/identify",
        json!({"anonymousId": kiosk, "userId": ann, "traits": {"email": ann_email}}),
    )
    .await;
    let ann_profile = wait_profile(&profiles, "user_id", &ann, "ann", |p| {
        p["events_total"].as_u64() >= Some(2)
    })
    .await;
    send_ok(
        &ingest,
        "/v1/identify",
        json!({"anonymousId": kiosk, "userId": bob, "traits": {"email": bob_email}}),
    )
    .await;
    // A batch from the kiosk's app: Bob's order, and an event ingest refuses (a dead
    // letter, sealed under the same subject as Bob's events).
    let (status, answer) = post(
        &ingest,
        "/v1/batch",
        &json!({"batch": [
            {"type": "track", "anonymousId": kiosk, "userId": bob, "event": "Order Completed",
             "properties": {"total": 12}},
            {"type": "track", "anonymousId": kiosk, "userId": bob,
             "properties": {"note": "no event name"}},
        ]}),
    )
    .await;
    assert_eq!(
        (status, answer["accepted"].as_u64()),
        (200, Some(1)),
        "{answer}"
    );
    let bob_profile = wait_profile(&profiles, "user_id", &bob, "bob", |p| {
        p["events_total"].as_u64() >= Some(2)
    })
    .await;
    assert_ne!(
        bob_profile["profile_id"], ann_profile["profile_id"],
        "one userId per profile: Bob is his own person"
    );

    let (status, accepted) = privacy_request(
        &identity,
        &json!({"action": "delete", "identifier": {"type": "user_id", "value": ann}}),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let report = privacy_finished(&identity, accepted["request_id"].as_str().unwrap()).await;
    assert_eq!(report["status"], "done", "{report}");

    let topics = Topics::new(&cfg.topics);
    keys_caught_up(&topics.keys()).await;
    for (topic, bobs) in [(topics.ingested(), 2), (topics.deadletter(), 1)] {
        let mut readable_of_bob = 0;
        for record in read_stored(&topic, Duration::from_secs(3)).await {
            let opened = open_record(&topic, &record).await;
            assert!(
                !contains(&opened, ann.as_bytes()),
                "{topic}: a record of Ann's is still readable"
            );
            if contains(&opened, bob.as_bytes()) {
                readable_of_bob += 1;
            }
        }
        assert_eq!(
            readable_of_bob, bobs,
            "{topic}: Bob's records from the kiosk must stay readable after Ann's erasure"
        );
    }
    let bob_after = get_json(&format!(
        "{profiles}/v1/profiles/{}",
        bob_profile["profile_id"].as_str().unwrap()
    ))
    .await;
    assert_eq!(
        bob_after["traits"]["email"],
        bob_email.as_str(),
        "{bob_after}"
    );
}
