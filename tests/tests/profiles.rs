//! Profiles end to end: real broker, real services.

use serde_json::{Value, json};

use tessera_common::config::{SourceConfig, TraitStrategy};
use tessera_tests::*;

fn uid(tag: &str) -> String {
    format!("{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Each trait is chosen by its configured strategy whatever order the events arrive in,
/// and `explain` says which strategy chose it and from which source and event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traits_resolve_by_their_strategy_with_provenance() {
    let p = Platform::start_with(|c| {
        c.ingest.sources.push(SourceConfig {
            name: "crm".into(),
            write_key: "crm-write-key".into(),
        });
        let s = &mut c.profiles.trait_strategies;
        s.insert("ltv".into(), TraitStrategy::Max);
        s.insert("nick".into(), TraitStrategy::FirstNonEmpty);
        s.insert("color".into(), TraitStrategy::MostFrequent);
        s.insert(
            "plan".into(),
            TraitStrategy::SourcePriority {
                sources: vec!["crm".into(), "test".into()],
            },
        );
    })
    .await;
    let user = uid("u");
    let t = |n: u32| format!("2026-01-01T00:00:0{n}.000Z");
    let events = [
        (
            WRITE_KEY,
            json!({"ltv": 30, "plan": "pro", "color": "red", "nick": ""}),
            t(1),
        ),
        (
            "crm-write-key",
            json!({"ltv": 80, "plan": "team", "color": "blue", "nick": "Al"}),
            t(2),
        ),
        (
            WRITE_KEY,
            json!({"ltv": 50, "plan": "free", "color": "red", "nick": "Ally"}),
            t(3),
        ),
        (
            WRITE_KEY,
            json!({"ltv": 5, "plan": "pro", "color": "blue"}),
            t(4),
        ),
    ];
    for i in [2, 0, 3, 1] {
        let (key, traits, ts) = &events[i];
        let r = http()
            .post(format!("{}/v1/identify", p.ingest))
            .basic_auth(key, Some(""))
            .json(&json!({"userId": user, "traits": traits, "timestamp": ts}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let profile = p
        .wait_profile("user_id", &user, "all four identifies", |v| {
            v["events_total"] == 4
        })
        .await;
    let id = profile["profile_id"].as_str().unwrap();
    let v: Value = get_json(&format!("{}/v1/profiles/{id}?explain=true", p.profiles)).await;
    let traits = &v["traits"];
    assert_eq!(traits["ltv"]["value"], 80, "max: {traits}");
    assert_eq!(traits["ltv"]["strategy"]["strategy"], "max");
    assert_eq!(traits["nick"]["value"], "Al", "first non-empty");
    assert_eq!(traits["plan"]["value"], "team", "the crm ranks first");
    assert_eq!(traits["plan"]["source"], "crm");
    assert_eq!(
        traits["color"]["value"], "blue",
        "a tie goes to the latest sighting"
    );
    assert_eq!(traits["color"]["count"], 2);
    assert_eq!(traits["color"]["event_time"], "2026-01-01T00:00:04.000Z");
    p.stop().await;
}
