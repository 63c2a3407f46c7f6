//! Properties of resolution as a whole: the final graph depends on the set of events,
//! not on their order or duplicates.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Value, json};

use tessera_common::records::{Identifier, IngestedEvent};
use tessera_common::store::{MemStore, Store, Txn};

use super::*;

fn rules() -> Rules {
    Rules::parse(rules::DEFAULT_RULES, "test").unwrap()
}

fn event(msg: &str, t: i64, payload: Value) -> IngestedEvent {
    IngestedEvent {
        message_id: msg.into(),
        source: "test".into(),
        kind: payload["type"].as_str().unwrap_or("track").into(),
        user_id: payload["userId"].as_str().map(Into::into),
        anonymous_id: payload["anonymousId"].as_str().map(Into::into),
        event: Some("E".into()),
        received_at: t,
        event_time: t,
        payload: payload.to_string(),
    }
}

fn apply_all(rules: &Rules, events: &[IngestedEvent]) -> MemStore {
    let s = MemStore::default();
    for e in events {
        let mut txn = Txn::new(&s);
        let payload: Value = serde_json::from_str(&e.payload).unwrap();
        resolve_event(rules, &mut txn, e, &payload).unwrap();
        s.write(txn.into_batch()).unwrap();
    }
    s
}

/// Every identifier's profile.
fn graph_of(s: &MemStore, ids: &[Identifier]) -> BTreeMap<Identifier, Option<String>> {
    let txn = Txn::new(s);
    ids.iter()
        .map(|i| (i.clone(), graph::lookup(&txn, i).unwrap()))
        .collect()
}

/// A small world: four people, their devices, a shared kiosk, emails, CRM and shop
/// records with typos. Each generated event carries a random subset of one person's
/// identifiers (sometimes the kiosk).
fn world_event(person: usize, pick: u8, kiosk: bool, n: usize) -> Value {
    let names = [
        ("ann", "lee", "1990-01-01", "10001"),
        ("bob", "ng", "1985-05-05", "60601"),
        ("cat", "lee", "1992-02-02", "10001"),
        ("dan", "ortiz", "1970-07-07", "94110"),
    ];
    let (first, last, dob, zip) = names[person];
    let mut m = json!({"type": "track", "messageId": format!("m{n}")});
    if pick & 1 != 0 {
        m["userId"] = json!(format!("user-{person}"));
    }
    if pick & 2 != 0 {
        m["anonymousId"] = json!(if kiosk {
            "kiosk".to_string()
        } else {
            format!("anon-{person}-{}", pick % 3)
        });
    }
    if pick & 4 != 0 {
        m["context"] = json!({"traits": {"email": format!("{first}.{last}@mail.test")}});
    }
    if pick & 8 != 0 {
        m["type"] = json!("identify");
        m["traits"] = json!({"crm_id": format!("crm-{person}"), "firstName": first, "lastName": last, "birthday": dob, "address": {"postalCode": zip}});
    }
    if pick & 32 != 0 {
        // A duplicate in the CRM: another record of the same person, a typo in the name.
        m["type"] = json!("identify");
        let typo = format!("{last}{}", &last[..1]);
        m["traits"] = json!({"crm_id": format!("crm-{person}-b"), "firstName": first, "lastName": typo, "birthday": dob, "address": {"postalCode": zip}});
    }
    if pick & 16 != 0 {
        m["type"] = json!("identify");
        let typo = format!("{}{}", &first[..first.len() - 1], "h");
        m["traits"] = json!({"loyalty_id": format!("loy-{person}"), "firstName": typo, "lastName": last, "birthday": dob, "address": {"postalCode": zip}});
    }
    m
}

fn all_identifiers() -> Vec<Identifier> {
    let mut out = vec![Identifier {
        kind: "anonymous_id".into(),
        value: "kiosk".into(),
    }];
    for p in 0..4 {
        let names = ["ann.lee", "bob.ng", "cat.lee", "dan.ortiz"];
        out.push(Identifier {
            kind: "user_id".into(),
            value: format!("user-{p}"),
        });
        out.push(Identifier {
            kind: "email".into(),
            value: format!("{}@mail.test", names[p]),
        });
        out.push(Identifier {
            kind: "crm_id".into(),
            value: format!("crm-{p}"),
        });
        out.push(Identifier {
            kind: "crm_id".into(),
            value: format!("crm-{p}-b"),
        });
        out.push(Identifier {
            kind: "loyalty_id".into(),
            value: format!("loy-{p}"),
        });
        for k in 0..3 {
            out.push(Identifier {
                kind: "anonymous_id".into(),
                value: format!("anon-{p}-{k}"),
            });
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The same events in any order, with duplicates, give the same final graph, fuzzy
    /// links (across sources and within the CRM) included. The model's parameters are
    /// fixed here (`learn = false`): learned ones are decided with as they are when a
    /// pair is compared.
    #[test]
    fn the_final_graph_does_not_depend_on_order_or_duplicates(
        specs in prop::collection::vec((0usize..4, 1u8..64, prop::bool::weighted(0.2), 0i64..50), 1..24),
        seed in any::<u64>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut rules = rules();
        rules.fuzzy.as_mut().unwrap().learn = false;
        let events: Vec<IngestedEvent> = specs
            .iter()
            .enumerate()
            .map(|(n, (person, pick, kiosk, t))| event(&format!("m{n}"), *t, world_event(*person, *pick, *kiosk, n)))
            .collect();
        let mut shuffled = events.clone();
        for d in &dups {
            shuffled.push(events[d.index(events.len())].clone());
        }
        // A deterministic shuffle from the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let ids = all_identifiers();
        let a = graph_of(&apply_all(&rules, &events), &ids);
        let b = graph_of(&apply_all(&rules, &shuffled), &ids);
        prop_assert_eq!(a, b);
    }
}

#[test]
fn two_known_people_never_share_a_profile_whatever_links_them() {
    let rules = rules();
    // A kiosk and a family email link Ann and Bob; the user_id limit keeps them apart.
    let events = vec![
        event(
            "1",
            1,
            json!({"type": "track", "userId": "ann", "anonymousId": "kiosk"}),
        ),
        event(
            "2",
            2,
            json!({"type": "track", "userId": "bob", "anonymousId": "kiosk"}),
        ),
        event(
            "3",
            3,
            json!({"type": "identify", "userId": "bob", "traits": {"email": "family@home.test"}}),
        ),
        event(
            "4",
            4,
            json!({"type": "identify", "userId": "ann", "traits": {"email": "family@home.test"}}),
        ),
    ];
    let s = apply_all(&rules, &events);
    let txn = Txn::new(&s);
    let ann = graph::lookup(
        &txn,
        &Identifier {
            kind: "user_id".into(),
            value: "ann".into(),
        },
    )
    .unwrap();
    let bob = graph::lookup(
        &txn,
        &Identifier {
            kind: "user_id".into(),
            value: "bob".into(),
        },
    )
    .unwrap();
    assert_ne!(ann, bob);
}

#[test]
fn a_crm_record_and_a_shop_record_of_one_person_merge_with_an_explanation() {
    let rules = rules();
    let events = [
        event(
            "c1",
            1,
            json!({"type": "identify", "traits": {"crm_id": "C-1", "firstName": "Katherine", "lastName": "Johnson", "birthday": "1981-04-12", "address": {"street": "12 Oak Street", "postalCode": "90210"}}}),
        ),
        event(
            "s1",
            2,
            json!({"type": "identify", "traits": {"loyalty_id": "L-9", "firstName": "Katharine", "lastName": "Johnson", "birthday": "1981-04-12", "address": {"street": "12 Oak St", "postalCode": "90210"}}}),
        ),
        event(
            "s2",
            3,
            json!({"type": "identify", "traits": {"loyalty_id": "L-10", "firstName": "Michael", "lastName": "Johnson", "birthday": "1979-09-30", "address": {"street": "12 Oak St", "postalCode": "90210"}}}),
        ),
    ];
    let s = apply_all(&rules, &events[..1]);
    let mut txn = Txn::new(&s);
    let payload: Value = serde_json::from_str(&events[1].payload).unwrap();
    let r = resolve_event(&rules, &mut txn, &events[1], &payload).unwrap();
    s.write(txn.into_batch()).unwrap();
    assert_eq!(r.changes.merges.len(), 1);
    assert_eq!(r.changes.merges[0].rule.as_deref(), Some("probabilistic"));
    let merge_id = &r.changes.merges[0].merge_id;
    let info: graph::MergeInfo = Txn::new(&s)
        .get_json(&graph::merge_info_key(merge_id))
        .unwrap()
        .unwrap();
    let e = info.explain.expect("the merge says why");
    assert!(e.links() && e.probability >= 0.999, "{e:?}");
    let birthday = e.fields.iter().find(|f| f.field == "birthday").unwrap();
    assert_eq!(birthday.level, "exact");
    let mut txn = Txn::new(&s);
    let payload: Value = serde_json::from_str(&events[2].payload).unwrap();
    let spouse = resolve_event(&rules, &mut txn, &events[2], &payload).unwrap();
    assert!(spouse.changes.merges.is_empty(), "the spouse stays apart");
    assert_ne!(spouse.profile_id, r.profile_id);
}

#[test]
fn blocked_values_resolve_to_nobody_in_particular() {
    let rules = rules();
    let e = event(
        "1",
        1,
        json!({"type": "track", "userId": "null", "anonymousId": "undefined"}),
    );
    let s = MemStore::default();
    let mut txn = Txn::new(&s);
    let r = resolve_event(
        &rules,
        &mut txn,
        &e,
        &serde_json::from_str(&e.payload).unwrap(),
    )
    .unwrap();
    assert_eq!(r.blocked, vec!["user_id", "anonymous_id"]);
    assert!(r.identifiers.is_empty());
    let e2 = event(
        "2",
        2,
        json!({"type": "track", "userId": "null", "anonymousId": "undefined"}),
    );
    let r2 = resolve_event(
        &rules,
        &mut txn,
        &e2,
        &serde_json::from_str(&e2.payload).unwrap(),
    )
    .unwrap();
    assert_ne!(
        r.profile_id, r2.profile_id,
        "blocked values never join two events"
    );
}

/// A privacy request through the processor: a delete erases the person, suppresses her
/// identifiers (her next event is dropped, not resolved), hands on to profiles and
/// reports; the same request written twice is applied once.
#[test]
fn a_delete_request_is_applied_once_and_suppresses_the_person() {
    use tessera_common::config::Config;
    use tessera_common::message::Message;
    use tessera_common::records::{AvroRecord, IdentityCommand, PrivacyAction, PrivacyReport};
    use tessera_common::runner::Processor;
    let cfg = Config::demo();
    let topics = Topics::new(&cfg.topics);
    let mut p = IdentityProcessor::new(
        topics.clone(),
        Arc::new(rules()),
        &tessera_common::admin::Admin::new(),
    );
    let s = MemStore::default();
    let msg = |topic: String, key: &str, payload: Vec<u8>| Message {
        topic,
        partition: 0,
        offset: 0,
        key: Some(key.as_bytes().to_vec()),
        payload: Some(payload),
        timestamp_ms: None,
        replayed: false,
    };
    let mut step = |m: &Message| {
        let mut txn = Txn::new(&s);
        let mut out = Vec::new();
        p.process(m, &mut txn, &mut out).unwrap();
        s.write(txn.into_batch()).unwrap();
        out
    };
    let jane = event(
        "m1",
        1,
        json!({"type": "identify", "userId": "jane", "traits": {"email": "jane@mail.test"}}),
    );
    step(&msg(
        topics.ingested(),
        "subject-1",
        jane.to_avro().unwrap(),
    ));
    let delete = IdentityCommand {
        command_id: "r1".into(),
        action: "delete".into(),
        merge_id: None,
        survivor_identifiers: vec![],
        merged_identifiers: vec![],
        kind: Some("email".into()),
        value: Some("jane@mail.test".into()),
        reason: None,
        suppress: true,
        requested_at: 5,
    };
    let cmd = msg(topics.commands(), "r1", delete.to_avro().unwrap());
    let out = step(&cmd);
    let on = |t: String| out.iter().filter(move |o| o.topic == t).count();
    assert_eq!(on(topics.suppressions()), 2, "her user id and email");
    assert_eq!(on(topics.privacy_actions()), 1);
    let action = out
        .iter()
        .find(|o| o.topic == topics.privacy_actions())
        .unwrap();
    assert_eq!(
        PrivacyAction::from_avro(&action.payload).unwrap().stage,
        "profiles"
    );
    let report = out
        .iter()
        .find(|o| o.topic == topics.privacy_reports())
        .unwrap();
    let report = PrivacyReport::from_avro(&report.payload).unwrap();
    assert_eq!(
        (report.status.as_str(), report.service.as_str()),
        ("done", "identity")
    );
    let email = Identifier {
        kind: "email".into(),
        value: "jane@mail.test".into(),
    };
    assert!(graph::lookup(&Txn::new(&s), &email).unwrap().is_none());
    assert!(step(&cmd).is_empty(), "the same request again does nothing");
    // Her next event, from a new device, is dropped: nothing is resolved or linked.
    let again = event(
        "m2",
        6,
        json!({"type": "track", "anonymousId": "new-device", "context": {"traits": {"email": "jane@mail.test"}}}),
    );
    let out = step(&msg(
        topics.ingested(),
        "subject-2",
        again.to_avro().unwrap(),
    ));
    assert!(out.iter().all(|o| o.topic != topics.resolved()), "{out:?}");
    assert!(graph::lookup(&Txn::new(&s), &email).unwrap().is_none());
}

/// The audit's finding: merges were stamped with the wall clock, so a replay wrote other
/// merge records than the original run. They carry the time of the record that caused
/// them.
#[test]
fn a_merge_is_stamped_with_its_record_time_not_the_clock() {
    let rules = rules();
    let s = MemStore::default();
    let mut merges = Vec::new();
    for e in [
        event(
            "m1",
            1_000,
            json!({"type": "track", "anonymousId": "anon-1"}),
        ),
        event("m2", 2_000, json!({"type": "track", "userId": "u-1"})),
        event(
            "m3",
            3_000,
            json!({"type": "identify", "userId": "u-1", "anonymousId": "anon-1"}),
        ),
    ] {
        let mut txn = Txn::new(&s);
        let payload: Value = serde_json::from_str(&e.payload).unwrap();
        merges.extend(
            resolve_event(&rules, &mut txn, &e, &payload)
                .unwrap()
                .changes
                .merges,
        );
        s.write(txn.into_batch()).unwrap();
    }
    assert_eq!(merges.len(), 1, "{merges:?}");
    assert_eq!(merges[0].received_at, 3_000);
}

/// Found by the outside review: two CRM records of one person never merged, because
/// `crm_id`'s limit of one per profile forbade it. A fuzzy match may now join values of
/// a `dedupe` type; a later event that carries one of them still joins the profile, and
/// one that would bring a third value does not.
#[test]
fn duplicates_within_the_crm_merge_and_the_limit_bounds_what_a_link_adds() {
    let rules = rules();
    let crm = |msg: &str, t: i64, id: &str, first: &str, extra: Value| {
        let mut traits = json!({"crm_id": id, "firstName": first, "lastName": "Okafor",
            "birthday": "1975-03-09", "address": {"street": "4 Elm Road", "postalCode": "N1 7AA"}});
        for (k, v) in extra.as_object().unwrap() {
            traits[k] = v.clone();
        }
        event(msg, t, json!({"type": "identify", "traits": traits}))
    };
    let events = [
        crm("c1", 1, "C-1", "Chidi", json!({})),
        crm("c2", 2, "C-2", "Chidy", json!({})),
        event(
            "e1",
            3,
            json!({"type": "identify", "traits": {"crm_id": "C-1", "email": "chidi@mail.test"}}),
        ),
        event(
            "e2",
            4,
            json!({"type": "identify", "traits": {"crm_id": "C-3", "email": "chidi@mail.test"}}),
        ),
    ];
    let s = apply_all(&rules, &events);
    let txn = Txn::new(&s);
    let of = |kind: &str, value: &str| {
        graph::lookup(
            &txn,
            &Identifier {
                kind: kind.into(),
                value: value.into(),
            },
        )
        .unwrap()
        .unwrap()
    };
    assert_eq!(of("crm_id", "C-1"), of("crm_id", "C-2"), "deduplicated");
    assert_eq!(of("email", "chidi@mail.test"), of("crm_id", "C-1"));
    assert_ne!(
        of("crm_id", "C-3"),
        of("crm_id", "C-1"),
        "a third CRM id by an identifier alone breaks the limit"
    );
}
