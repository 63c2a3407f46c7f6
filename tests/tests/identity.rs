//! Identity stitching end to end: real broker, real services. Merges, limits and blocked
//! values, a fuzzy CRM/shop match, an un-merge that re-derives both profiles, order
//! independence across two platforms, accounts and households.

use std::time::Duration;

use serde_json::{Value, json};

use tessera_tests::*;

/// The identity API's view of the profile an identifier belongs to.
async fn identity_lookup(p: &Platform, kind: &str, value: &str) -> Option<Value> {
    lookup_at(&p.identity, kind, value).await
}

async fn wait_identity(
    p: &Platform,
    kind: &str,
    value: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    eventually(what, Duration::from_secs(60), || async {
        identity_lookup(p, kind, value).await.filter(|v| pred(v))
    })
    .await
}

/// A counter's value on a service's /metrics page (summed over labels).
async fn counter(base: &str, name: &str) -> f64 {
    metrics_text(base)
        .await
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn send(p: &Platform, path: &str, body: Value) {
    send_ok(&p.ingest, path, body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_and_blocked_values_keep_different_people_apart() {
    let p = Platform::start().await;
    let (alice, bob, kiosk) = (uid("alice"), uid("bob"), uid("kiosk"));
    // A shared kiosk used by two known people: the user_id limit (1) keeps them apart.
    send(
        &p,
        "/v1/track",
        json!({"userId": alice, "anonymousId": kiosk, "event": "Page Viewed"}),
    )
    .await;
    p.wait_profile("user_id", &alice, "alice's event", |v| {
        v["events_total"] == 1
    })
    .await;
    send(
        &p,
        "/v1/track",
        json!({"userId": bob, "anonymousId": kiosk, "event": "Page Viewed"}),
    )
    .await;
    let b = p
        .wait_profile("user_id", &bob, "bob's event", |v| v["events_total"] == 1)
        .await;
    let a = p
        .wait_profile("user_id", &alice, "alice unchanged", |v| {
            v["events_total"] == 1
        })
        .await;
    assert_ne!(a["profile_id"], b["profile_id"]);
    // A placeholder user id links nobody.
    let (z1, z2) = (uid("anon"), uid("anon"));
    send(
        &p,
        "/v1/identify",
        json!({"userId": "undefined", "anonymousId": z1, "traits": {"plan": "a"}}),
    )
    .await;
    send(
        &p,
        "/v1/identify",
        json!({"userId": "undefined", "anonymousId": z2, "traits": {"plan": "b"}}),
    )
    .await;
    let p1 = p
        .wait_profile("anonymous_id", &z1, "z1", |v| v["events_total"] == 1)
        .await;
    let p2 = p
        .wait_profile("anonymous_id", &z2, "z2", |v| v["events_total"] == 1)
        .await;
    assert_ne!(
        p1["profile_id"], p2["profile_id"],
        "'undefined' must not merge them"
    );
    assert!(counter(&p.identity, "tessera_identity_blocked_identifiers_total").await >= 2.0);
    // The identity API answers for custom and standard types, normalised.
    let email = format!("{}@Shop.Test", uid("Mixed"));
    send(
        &p,
        "/v1/identify",
        json!({"userId": alice, "traits": {"email": email, "loyalty_id": "L-1"}}),
    )
    .await;
    let v = wait_identity(&p, "email", &format!("  {email} "), "the email", |v| {
        v["profile_id"] == a["profile_id"]
    })
    .await;
    let ids = v["identifiers"].as_array().unwrap();
    let em = ids
        .iter()
        .find(|i| i["type"] == "email")
        .expect("email listed");
    assert_eq!(em["value"], email.to_lowercase());
    assert_eq!(em["source"], "test");
    assert!(
        em["first_seen"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{em}"
    );
    assert!(identity_lookup(&p, "loyalty_id", "L-1").await.is_some());
    let r = http()
        .get(format!("{}/v1/identity/lookup", p.identity))
        .query(&[("type", "shoe_size"), ("value", "9")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unknown_type");

    // Detach: the loyalty id was given to alice by mistake; it leaves her profile and
    // links to nothing again.
    let detach = |body: Value| {
        let url = format!("{}/v1/identity/detach", p.identity);
        async move { http().post(url).json(&body).send().await.unwrap().status() }
    };
    assert_eq!(
        detach(json!({"type": "loyalty_id", "value": uid("none")})).await,
        404
    );
    assert_eq!(
        detach(json!({"type": "shoe_size", "value": "9"})).await,
        400
    );
    assert_eq!(
        detach(json!({"type": "loyalty_id", "value": "L-1"})).await,
        202
    );
    wait_identity(&p, "loyalty_id", "L-1", "the detach", |v| {
        v["profile_id"] != a["profile_id"] && v["detached"] == true
    })
    .await;
    let loyalty = p
        .wait_profile("loyalty_id", "L-1", "its own profile", |v| {
            v["profile_id"] != a["profile_id"]
        })
        .await;
    let alice_now = p
        .wait_profile("user_id", &alice, "without the loyalty id", |v| {
            v["identifiers"]
                .as_array()
                .is_some_and(|ids| ids.iter().all(|i| i["type"] != "loyalty_id"))
        })
        .await;
    assert_eq!(alice_now["events_total"], 2, "alice keeps her events");
    assert_eq!(loyalty["events_total"], 0);
    // Linking it again does nothing.
    send(
        &p,
        "/v1/identify",
        json!({"userId": alice, "traits": {"loyalty_id": "L-1"}}),
    )
    .await;
    p.wait_profile("user_id", &alice, "the new event", |v| {
        v["events_total"] == 3
    })
    .await;
    let again = identity_lookup(&p, "loyalty_id", "L-1").await.unwrap();
    assert_eq!(again["profile_id"], loyalty["profile_id"]);
    p.stop().await;
}

/// A CRM import and a shop loyalty record of the same person share no identifier; the
/// fuzzy rules link them, the identity API says which rule decided, and an un-merge
/// puts each record's events back on its own profile, segments re-derived.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fuzzy_match_merges_crm_and_shop_records_and_an_unmerge_splits_them() {
    let p = Platform::start().await;
    let (crm, loyalty) = (uid("C"), uid("L"));
    let last = uid("Johnson");
    send(
        &p,
        "/v1/identify",
        json!({"anonymousId": uid("import"), "traits": {
        "crm_id": crm, "firstName": "Katherine", "lastName": last, "birthday": "1981-04-12",
        "address": {"street": "12 Oak Street", "postalCode": "90210"}, "plan": "gold"}}),
    )
    .await;
    p.wait_profile("crm_id", &crm, "the crm record", |v| v["events_total"] == 1)
        .await;
    send(
        &p,
        "/v1/identify",
        json!({"anonymousId": uid("shop"), "traits": {
        "loyalty_id": loyalty, "firstName": "Katharine", "lastName": last, "birthday": "1981-04-12",
        "address": {"street": "12 Oak St.", "postalCode": "90210"}}}),
    )
    .await;
    send(
        &p,
        "/v1/track",
        json!({"anonymousId": uid("shop"), "event": "Order Completed",
        "context": {"traits": {"loyalty_id": loyalty}}, "properties": {"total": 80}}),
    )
    .await;
    let merged = p
        .wait_profile("crm_id", &crm, "the fuzzy merge", |v| {
            v["events_total"] == 3
                && v["segments"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["id"] == "buyers"))
        })
        .await;
    let by_loyalty = p
        .wait_profile("loyalty_id", &loyalty, "the same profile", |_| true)
        .await;
    assert_eq!(by_loyalty["profile_id"], merged["profile_id"]);
    let graph = wait_identity(&p, "crm_id", &crm, "the merge in the identity API", |v| {
        v["merges"].as_array().is_some_and(|m| !m.is_empty())
    })
    .await;
    let merge = &graph["merges"][0];
    assert_eq!(merge["rule"], "probabilistic");
    // The merge explains itself: each field's level and weight, the probability.
    let explain = &merge["explain"];
    assert!(explain["probability"].as_f64().unwrap() >= 0.999, "{merge}");
    assert_eq!(explain["threshold"], 0.999);
    let level = |field: &str| {
        explain["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["field"] == field)
            .map(|f| f["level"].as_str().unwrap().to_string())
    };
    assert_eq!(level("birthday").as_deref(), Some("exact"), "{merge}");
    assert_eq!(level("first_name").as_deref(), Some("jaro_winkler>=0.92"));
    assert_eq!(
        level("street").as_deref(),
        Some("exact"),
        "12 Oak Street and 12 Oak St. normalise alike"
    );
    let merge_id = merge["merge_id"].as_str().unwrap().to_string();

    // Bad requests are refused with a reason.
    let r = http()
        .post(format!("{}/v1/identity/unmerge", p.identity))
        .json(&json!({"merge_id": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http()
        .post(format!("{}/v1/identity/unmerge", p.identity))
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = http()
        .post(format!("{}/v1/identity/unmerge", p.identity))
        .json(&json!({"merge_id": merge_id, "reason": "different people"}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 202, "{}", r.text().await.unwrap());
    let crm_profile = p
        .wait_profile("crm_id", &crm, "the crm profile re-derived", |v| {
            v["events_total"] == 1
        })
        .await;
    assert!(crm_profile["event_counts"].get("Order Completed").is_none());
    assert_eq!(crm_profile["traits"]["plan"], "gold");
    assert!(
        eventually(
            "the crm profile leaves buyers",
            Duration::from_secs(30),
            || async {
                let v = p.wait_profile("crm_id", &crm, "-", |_| true).await;
                v["segments"]
                    .as_array()
                    .is_some_and(|s| s.iter().all(|s| s["id"] != "buyers"))
                    .then_some(true)
            }
        )
        .await
    );
    let shop_profile = p
        .wait_profile("loyalty_id", &loyalty, "the shop profile revived", |v| {
            v["events_total"] == 2
                && v["segments"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["id"] == "buyers"))
        })
        .await;
    assert_ne!(shop_profile["profile_id"], crm_profile["profile_id"]);
    assert_eq!(shop_profile["event_counts"]["Order Completed"], 1);
    assert!(
        shop_profile["traits"].get("plan").is_none(),
        "the CRM's trait stayed there"
    );
    let g = identity_lookup(&p, "crm_id", &crm).await.unwrap();
    assert_eq!(g["merges"][0]["undone"], true);
    // The records stay apart: the same shop record again does not merge them.
    send(
        &p,
        "/v1/identify",
        json!({"anonymousId": uid("shop"), "traits": {
        "loyalty_id": loyalty, "firstName": "Katharine", "lastName": last, "birthday": "1981-04-12",
        "address": {"street": "12 Oak St.", "postalCode": "90210"}}}),
    )
    .await;
    p.wait_profile("loyalty_id", &loyalty, "the repeat", |v| {
        v["events_total"] == 3
    })
    .await;
    let crm_again = p.wait_profile("crm_id", &crm, "-", |_| true).await;
    assert_eq!(crm_again["events_total"], 1);
    let r = http()
        .post(format!("{}/v1/identity/unmerge", p.identity))
        .json(&json!({"merge_id": merge_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "undone once");
    p.stop().await;
}

/// The same events, sent in opposite orders with duplicates to two platforms, give the
/// same graph: every identifier resolves to the same profile id on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_graph_does_not_depend_on_the_order_events_arrive_in() {
    let run = uid("o");
    let id = |s: &str| format!("{s}-{run}");
    let t = |n: u32| format!("2026-01-01T00:00:{n:02}.000Z");
    let events: Vec<(&str, Value)> = vec![
        (
            "/v1/track",
            json!({"anonymousId": id("a1"), "event": "Page Viewed", "timestamp": t(1)}),
        ),
        (
            "/v1/identify",
            json!({"userId": id("u1"), "anonymousId": id("a1"), "traits": {"email": format!("{}@mail.test", id("ann"))}, "timestamp": t(2)}),
        ),
        (
            "/v1/track",
            json!({"userId": id("u2"), "anonymousId": id("kiosk"), "event": "Page Viewed", "timestamp": t(3)}),
        ),
        (
            "/v1/track",
            json!({"userId": id("u1"), "anonymousId": id("kiosk"), "event": "Page Viewed", "timestamp": t(4)}),
        ),
        (
            "/v1/identify",
            json!({"anonymousId": id("imp"), "traits": {"crm_id": id("c1"), "email": format!("{}@mail.test", id("ann")), "firstName": "Ann", "lastName": id("Lee"), "birthday": "1990-01-01", "address": {"postalCode": "10001"}}, "timestamp": t(5)}),
        ),
        (
            "/v1/identify",
            json!({"anonymousId": id("shop"), "traits": {"loyalty_id": id("l1"), "firstName": "Anne", "lastName": id("Lee"), "birthday": "1990-01-01", "address": {"postalCode": "10001"}}, "timestamp": t(6)}),
        ),
        (
            "/v1/track",
            json!({"anonymousId": id("a2"), "event": "Page Viewed", "context": {"traits": {"email": format!("{}@mail.test", id("bob"))}}, "timestamp": t(7)}),
        ),
        (
            "/v1/alias",
            json!({"userId": id("u2"), "previousId": id("a2"), "timestamp": t(8)}),
        ),
        (
            "/v1/track",
            json!({"userId": id("u2"), "anonymousId": id("a1"), "event": "Page Viewed", "timestamp": t(9)}),
        ),
    ];
    let identifiers = [
        ("anonymous_id", id("a1")),
        ("anonymous_id", id("a2")),
        ("anonymous_id", id("kiosk")),
        ("anonymous_id", id("imp")),
        ("anonymous_id", id("shop")),
        ("user_id", id("u1")),
        ("user_id", id("u2")),
        ("email", format!("{}@mail.test", id("ann"))),
        ("email", format!("{}@mail.test", id("bob"))),
        ("crm_id", id("c1")),
        ("loyalty_id", id("l1")),
    ];
    let mut graphs = Vec::new();
    for reversed in [false, true] {
        let p = Platform::start().await;
        let mut order: Vec<&(&str, Value)> = events.iter().collect();
        if reversed {
            order.reverse();
            order.push(&events[1]);
            order.push(&events[4]);
        }
        for (path, body) in &order {
            send(&p, path, body.clone()).await;
        }
        let n = order.len() as f64;
        eventually("every event resolved", Duration::from_secs(60), || async {
            (counter(&p.identity, "tessera_identity_events_resolved_total").await >= n)
                .then_some(())
        })
        .await;
        // The counter moves while a batch is processed, before its state is stored (a
        // few milliseconds later): let the last batch land, and wait for each identifier.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut graph = Vec::new();
        for (kind, value) in &identifiers {
            let v = eventually(
                &format!("{kind}={value} known"),
                Duration::from_secs(30),
                || identity_lookup(&p, kind, value),
            )
            .await;
            graph.push((
                (*kind).to_string(),
                value.clone(),
                v["profile_id"].as_str().unwrap().to_string(),
            ));
        }
        if reversed {
            assert!(
                counter(&p.identity, "tessera_identity_recomputations_total").await > 0.0,
                "late events recomputed"
            );
        }
        graphs.push(graph);
        p.stop().await;
    }
    assert_eq!(graphs[0], graphs[1]);
    let of = |kind: &str, value: &str| {
        graphs[0]
            .iter()
            .find(|g| g.0 == kind && g.1 == value)
            .unwrap()
            .2
            .clone()
    };
    assert_eq!(
        of("anonymous_id", &id("a1")),
        of("user_id", &id("u1")),
        "login merged the visitor"
    );
    assert_ne!(
        of("user_id", &id("u1")),
        of("user_id", &id("u2")),
        "two known people stay apart"
    );
    assert_eq!(
        of("crm_id", &id("c1")),
        of("user_id", &id("u1")),
        "the crm record joined by email"
    );
    assert_eq!(
        of("loyalty_id", &id("l1")),
        of("user_id", &id("u1")),
        "the shop record joined by fuzzy match"
    );
    assert_eq!(
        of("anonymous_id", &id("a2")),
        of("user_id", &id("u2")),
        "alias"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accounts_and_households_group_profiles() {
    let p = Platform::start().await;
    let (u1, u2, acme) = (uid("u"), uid("u"), uid("acme"));
    let street = format!("{} Elm Street", &uid("1")[2..6]);
    send(
        &p,
        "/v1/group",
        json!({"userId": u1, "groupId": acme, "traits": {"name": "Acme"}}),
    )
    .await;
    send(
        &p,
        "/v1/identify",
        json!({"userId": u1, "traits": {"address": {"street": street, "postalCode": "02139"}}}),
    )
    .await;
    send(&p, "/v1/identify", json!({"userId": u2, "traits": {"address": {"street": street.replace("Street", "St."), "postalCode": "02 139"}}})).await;
    let a = p
        .wait_profile("user_id", &u1, "account and address", |v| {
            v["household"].is_string() && v["accounts"] == json!([acme])
        })
        .await;
    let b = p
        .wait_profile("user_id", &u2, "address", |v| v["household"].is_string())
        .await;
    assert_eq!(a["household"], b["household"], "one household");
    let hh: Value = get_json(&format!(
        "{}/v1/households/{}",
        p.profiles,
        a["household"].as_str().unwrap()
    ))
    .await;
    let mut members: Vec<&str> = hh["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    members.sort();
    let mut want = vec![
        a["profile_id"].as_str().unwrap(),
        b["profile_id"].as_str().unwrap(),
    ];
    want.sort();
    assert_eq!(members, want);
    assert_ne!(
        a["profile_id"], b["profile_id"],
        "a household is not a merge"
    );
    let acct: Value = get_json(&format!("{}/v1/accounts/{acme}", p.profiles)).await;
    assert_eq!(acct["members"], json!([a["profile_id"]]));
    let r = http()
        .get(format!("{}/v1/accounts/{}", p.profiles, uid("none")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    p.stop().await;
}

/// A CRM extract with a duplicate inside it is deduplicated by the embedded rules; a
/// namesake (same names, nothing that tells people apart in common) stays apart; and
/// the matcher's parameters are shown by the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crm_duplicate_merges_and_a_namesake_stays_apart() {
    let p = Platform::start().await;
    let (c1, c2, web) = (uid("C"), uid("C"), uid("W"));
    let last = uid("Okafor");
    let record = |crm: &str, first: &str| {
        json!({"anonymousId": uid("import"), "traits": {
        "crm_id": crm, "firstName": first, "lastName": last, "birthday": "1975-03-09",
        "address": {"street": "4 Elm Road", "postalCode": "N1 7AA"}}})
    };
    send(&p, "/v1/identify", record(&c1, "Chidi")).await;
    send(&p, "/v1/identify", record(&c2, "Chidy")).await;
    // Same names, an email of her own, and nothing else in common.
    send(
        &p,
        "/v1/identify",
        json!({"anonymousId": uid("web"), "userId": web, "traits": {
        "email": format!("{web}@mail.test"), "firstName": "Chidi", "lastName": last}}),
    )
    .await;
    let first = wait_identity(&p, "crm_id", &c1, "the duplicate merged", |v| {
        v["identifiers"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|i| i["value"] == c2.as_str()))
    })
    .await;
    let merge = &first["merges"][0];
    assert_eq!(merge["rule"], "probabilistic", "{merge}");
    assert!(merge["explain"]["discriminating"] == true, "{merge}");
    let second = identity_lookup(&p, "crm_id", &c2).await.unwrap();
    assert_eq!(second["profile_id"], first["profile_id"]);
    let namesake = wait_identity(&p, "user_id", &web, "the web profile", |_| true).await;
    assert_ne!(
        namesake["profile_id"], first["profile_id"],
        "names alone never link"
    );
    let r = http()
        .get(format!("{}/v1/identity/matching", p.identity))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m: Value = r.json().await.unwrap();
    assert_eq!(m["mode"], "probabilistic");
    assert!(m["records"].as_u64().unwrap() >= 3, "{m}");
    let birthday = m["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == "birthday")
        .unwrap();
    assert_eq!(birthday["levels"][0]["level"], "exact");
    assert!(
        birthday["levels"][0]["weight"].as_f64().unwrap() > 5.0,
        "{m}"
    );
    let r = http()
        .get(format!(
            "{}/v1/identity/matching?version=999999",
            p.identity
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    p.stop().await;
}

/// The identity API's view of an identifier's profile, from a service at `base`.
async fn lookup_at(base: &str, kind: &str, value: &str) -> Option<Value> {
    let r = http()
        .get(format!("{base}/v1/identity/lookup"))
        .query(&[("type", kind), ("value", value)])
        .send()
        .await
        .ok()?;
    if r.status().is_success() {
        r.json().await.ok()
    } else {
        None
    }
}

/// Identity loses its RocksDB and rebuilds by replaying its input, which it reads in
/// another order (partition by partition, not as the records came). With learning, the
/// parameters then differ at each pair, so the replay takes its fuzzy decisions from the
/// matcher's log (`identity.matches`): every profile, merge and explanation (probability,
/// parameters version) is the same as before the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuilt_identity_decides_as_the_original_run_did() {
    tessera_common::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // A new version of the parameters after every pair: decisions depend on the order.
    let rules = std::fs::read_to_string(repo_root().join("services/identity/rules.toml"))
        .unwrap()
        .replace("refresh_every = 1000", "refresh_every = 1");
    cfg.identity.rules_file = dir.path().join("rules.toml");
    std::fs::write(&cfg.identity.rules_file, rules).unwrap();
    let (mut services, urls) = start_processes(&mut cfg, dir.path()).await;
    let (ingest, identity) = (urls[0].clone(), urls[1].clone());
    let run = uid("relog");
    let people = [
        (
            "Chidi",
            "Chidy",
            "Okafor",
            "1975-03-09",
            "4 Elm Road",
            "N1 7AA",
        ),
        (
            "Katherine",
            "Katharine",
            "Johnson",
            "1981-04-12",
            "12 Oak St",
            "90210",
        ),
        (
            "Amelie",
            "Amelia",
            "Durand",
            "1990-11-02",
            "7 Rue Victor Hugo",
            "33000",
        ),
        (
            "Jonas",
            "Jonas",
            "Schmidt",
            "1968-01-30",
            "21 Bergstrasse",
            "10115",
        ),
        (
            "Priya",
            "Pryia",
            "Raman",
            "1985-07-19",
            "3 Lake View",
            "560001",
        ),
        (
            "Sean",
            "Shaun",
            "Murphy",
            "1979-12-05",
            "88 Harbour Rd",
            "D02",
        ),
    ];
    let record = |crm: String, first: &str, last: &str, born: &str, street: &str, post: &str| {
        json!({"type": "identify", "anonymousId": uid("import"), "traits": {
            "crm_id": crm, "firstName": first, "lastName": last, "birthday": born,
            "address": {"street": street, "postalCode": post}}})
    };
    let crm = |i: usize, side: &str| format!("{run}-{i}{side}");
    // The first records, then their duplicates once the first are in: live, each
    // duplicate meets parameters learned from all of the first ones.
    for side in ["a", "b"] {
        let batch: Vec<Value> = people
            .iter()
            .enumerate()
            .map(|(i, (f1, f2, last, born, street, post))| {
                let first = if side == "a" { f1 } else { f2 };
                record(crm(i, side), first, last, born, street, post)
            })
            .collect();
        let (s, b) = post(&ingest, "/v1/batch", &json!({ "batch": batch })).await;
        assert_eq!(s, 200, "{b}");
        for i in 0..people.len() {
            let id = crm(i, side);
            eventually("the records resolved", Duration::from_secs(60), || {
                lookup_at(&identity, "crm_id", &id)
            })
            .await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut before = Vec::new();
    for i in 0..people.len() {
        for side in ["a", "b"] {
            before.push(lookup_at(&identity, "crm_id", &crm(i, side)).await.unwrap());
        }
    }
    let merges: Vec<&Value> = before
        .iter()
        .flat_map(|v| v["merges"].as_array().into_iter().flatten())
        .filter(|m| m["rule"] == "probabilistic")
        .collect();
    assert!(merges.len() >= 4, "duplicates merged: {before:?}");
    let versions: std::collections::BTreeSet<String> = merges
        .iter()
        .map(|m| m["explain"]["params_version"].to_string())
        .collect();
    assert!(
        versions.len() > 1,
        "decided with several versions: {merges:?}"
    );

    let p = services.get_mut("identity").unwrap();
    p.kill9();
    std::fs::remove_dir_all(&cfg.identity.state_dir).unwrap();
    p.restart();
    wait_ready(&identity, Duration::from_secs(60)).await;
    let mut k = 0;
    for i in 0..people.len() {
        for side in ["a", "b"] {
            let old = &before[k];
            k += 1;
            // Compared once the replay has it, or shown as it is after a minute.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let now = loop {
                let now = lookup_at(&identity, "crm_id", &crm(i, side)).await;
                if now.as_ref() == Some(old) || std::time::Instant::now() > deadline {
                    break now;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            assert_eq!(now.as_ref(), Some(old), "the rebuilt profile");
        }
    }
    let log = tessera_common::topics::Topics::new(&cfg.topics).matches();
    let records = read_topic(&log, Duration::from_secs(4), |_| false).await;
    assert!(
        records.len() >= 2 * people.len(),
        "one entry per record at least"
    );
}
