//! Predictive traits through the processor: the model fitted on the tick and
//! published, the values it gives, and a silent customer leaving "active" at a
//! midnight with no event.

use super::tests::*;
use super::*;
use std::sync::atomic::Ordering;

use tessera_common::records::DefinitionChange;

use crate::computed::predicted;
use crate::predict::{DAY_MS, day_of};

const DEFS: [&str; 4] = [
    r#"{"id":"p_active","event":"Order Completed","aggregate":"p_alive"}"#,
    r#"{"id":"value_90d","event":"Order Completed","aggregate":"expected_value","property":"total","horizon":"90d"}"#,
    r#"{"id":"likely_churn","condition":{"computed":{"name":"p_active","lt":0.5}}}"#,
    r#"{"id":"winback","when":{"segment":"likely_churn","change":"enter"}}"#,
];

/// Ticks at `now` until the fit's model record comes out (the fit runs on a thread),
/// then hands it to the catalog as the definitions topic's reader would.
fn fit_and_publish(p: &mut ProfilesProcessor, s: &tessera_common::store::MemStore, now: i64) {
    for _ in 0..2000 {
        let out = tick_at(p, s, now);
        let models: Vec<&Output> = out
            .iter()
            .filter(|o| o.topic == p.topics.definitions())
            .collect();
        if !models.is_empty() {
            for o in models {
                assert!(o.key.starts_with(b"model/"));
                p.catalog
                    .apply(DefinitionChange::from_avro(&o.payload).unwrap());
            }
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("no model was published");
}

#[test]
fn a_fitted_model_scores_every_buyer_and_a_silent_one_leaves_active_at_midnight() {
    let _clock = hold_clock();
    // Noon of a day, some 200 days after the first purchases.
    let day0 = 20_000;
    let noon = |d: i64| d * DAY_MS + DAY_MS / 2;
    CLOCK.store(noon(day0), Ordering::SeqCst);
    let mut p = processor_with(&DEFS);
    p.fitting.policy.min_customers = 20;
    let s = tessera_common::store::MemStore::default();
    // 120 customers: first purchase on one of the first 60 days, then a purchase every
    // `gap` days for `n` purchases; a few stop early.
    let mut mid = 0;
    for c in 0..120i64 {
        let (first, gap, n) = (day0 - 200 + c % 60, 5 + c % 23, 1 + c % 7);
        for k in 0..n {
            let d = (first + k * gap).min(day0 - 1);
            mid += 1;
            step(
                &mut p,
                &s,
                &order(&format!("c{c}"), &format!("m{mid}"), noon(d), 20 + c % 30),
            );
        }
    }
    // Before a model exists a prediction is null.
    assert_eq!(
        load(&s, "c5").unwrap().computed["p_active"].value,
        serde_json::Value::Null
    );

    let now = noon(day0);
    fit_and_publish(&mut p, &s, now);
    let defs = p.catalog.current();
    let fitted = defs.model("p_active").unwrap().latest().unwrap().clone();
    assert_eq!((fitted.version, fitted.customers), (1, 120));
    assert!(fitted.bgnbd_fit.as_ref().unwrap().converged, "{fitted:?}");
    assert_eq!(fitted.as_of_day, day0);
    // The new model is a new version in force: the back-fill re-evaluates everyone.
    for _ in 0..20 {
        tick_at(&mut p, &s, now + 1);
    }
    let def = |id: &str| defs.computed_trait(id).unwrap().clone();
    let value_model = defs.model("value_90d").unwrap().latest().unwrap().clone();
    // Order values are fitted for the trait that has them.
    assert!(fitted.gamma_gamma.is_none());
    let gg = value_model.gamma_gamma.expect("order values fitted");
    assert!(gg.q > 1.0, "{gg:?}");
    for c in 0..120 {
        let prof = load(&s, &format!("c{c}")).unwrap();
        let state = &prof.computed["p_active"];
        assert_eq!(state.model, Some(1));
        let purchases = state.purchases.as_ref().unwrap();
        let want = predicted(&def("p_active"), &fitted, purchases, day0).unwrap();
        assert_eq!(state.value, serde_json::json!(want), "c{c}");
        let v = &prof.computed["value_90d"];
        let valued = v.purchases.as_ref().unwrap();
        assert_eq!(valued.days.len(), purchases.days.len());
        let want = predicted(&def("value_90d"), &value_model, valued, day0).unwrap();
        assert_eq!(v.value, serde_json::json!(want), "c{c}");
        assert!(want > 0.0);
    }

    // A customer with repeat purchases who is still likely active today: find the
    // midnight when the model says they are more likely gone, and see them enter
    // likely_churn then, with no event, and not a day before.
    let (who, when) = (0..120)
        .find_map(|c| {
            let prof = load(&s, &format!("c{c}")).unwrap();
            let purchases = prof.computed["p_active"].purchases.clone().unwrap();
            let alive = |d| predicted(&def("p_active"), &fitted, &purchases, d).unwrap();
            if purchases.days.len() < 3 || alive(day0) < 0.5 {
                return None;
            }
            (day0 + 1..day0 + 400)
                .find(|d| alive(*d) < 0.5)
                .map(|d| (c, d))
        })
        .expect("some buyer crosses 0.5 within 400 days");
    let id = format!("c{who}");
    assert!(!load(&s, &id).unwrap().segments.contains_key("likely_churn"));
    // Each midnight moves every buyer on (their age grows by a day); walk there.
    let mut entered = None;
    let mut fired = Vec::new();
    for d in day0 + 1..=when {
        let out = tick_at(&mut p, &s, d * DAY_MS);
        fired.extend(
            out.iter()
                .filter(|o| o.key == id.as_bytes() && o.topic == p.topics.triggers())
                .map(|o| TriggerFired::from_avro(&o.payload).unwrap()),
        );
        let mine: Vec<_> = out
            .iter()
            .filter(|o| o.key == id.as_bytes())
            .filter_map(|o| MembershipChange::from_avro(&o.payload).ok())
            .filter(|m| m.segment_id == "likely_churn")
            .collect();
        if !mine.is_empty() {
            entered = Some((d, mine[0].change.clone(), mine[0].event_time));
            break;
        }
    }
    assert_eq!(
        entered,
        Some((when, "enter".to_string(), when * DAY_MS)),
        "{id} enters likely_churn at the midnight its P(alive) falls below 0.5"
    );
    // A trigger on entering the segment fires then too (a back-fill would not start it).
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(
        (fired[0].trigger_id.as_str(), fired[0].event_time),
        ("winback", when * DAY_MS)
    );
    let prof = load(&s, &id).unwrap();
    assert_eq!(prof.computed["p_active"].day, Some(day_of(when * DAY_MS)));
    assert_eq!(prof.timer, Some((when + 1) * DAY_MS));
}

#[test]
fn predictive_definitions_are_checked() {
    let bad = [
        (r#"{"id":"x","aggregate":"p_alive"}"#, "purchase event"),
        (
            r#"{"id":"x","event":"Order Completed","aggregate":"predicted_purchases"}"#,
            "horizon",
        ),
        (
            r#"{"id":"x","event":"Order Completed","aggregate":"expected_value","horizon":"30d"}"#,
            "value property",
        ),
        (
            r#"{"id":"x","event":"Order Completed","aggregate":"p_alive","window":"30d"}"#,
            "no window",
        ),
        (
            r#"{"id":"x","event":"Order Completed","aggregate":"predicted_purchases","horizon":"48h"}"#,
            "days or weeks",
        ),
        (
            r#"{"id":"x","event":"Order Completed","aggregate":"count","horizon":"90d"}"#,
            "horizon is for",
        ),
    ];
    for (doc, says) in bad {
        let e = crate::catalog::Definition::parse(doc, false, None).unwrap_err();
        assert!(e.contains(says), "{doc}: {e}");
    }
}

/// A propensity trait learns from the outcomes the stream reveals: shoppers who browse
/// daily and order every few days, and browsers who come weekly and never order.
#[test]
fn a_propensity_model_learns_from_revealed_outcomes_and_ranks_shoppers_first() {
    let _clock = hold_clock();
    let day0 = 20_000;
    let mut p = processor_with(&[
        r#"{"id":"order_7d","event":"Order Completed","aggregate":"propensity","horizon":"7d"}"#,
    ]);
    p.fitting.policy.min_customers = 20;
    let s = tessera_common::store::MemStore::default();
    let mut mid = 0;
    let at = |d: i64, hour: i64| d * DAY_MS + hour * 3_600_000;
    let mut send = |p: &mut ProfilesProcessor, who: &str, name: &str, t: i64| {
        mid += 1;
        let mut m = order(who, &format!("m{mid}"), t, 10);
        let mut r = ResolvedEvent::from_avro(m.payload.as_ref().unwrap()).unwrap();
        r.event.event = Some(name.into());
        m.payload = Some(r.to_avro().unwrap());
        step(p, &s, &m);
    };
    for d in day0..day0 + 20 {
        for i in 0..100 {
            let shopper = format!("s{i}");
            send(&mut p, &shopper, "Product Viewed", at(d, 9));
            if (d + i) % 3 == 0 {
                send(&mut p, &shopper, "Order Completed", at(d, 10));
            }
            if (d + i) % 7 == 0 {
                send(&mut p, &format!("b{i}"), "Product Viewed", at(d, 11));
            }
        }
        tick_at(&mut p, &s, (d + 1) * DAY_MS);
    }
    let snapshot = load(&s, "s1").unwrap().computed["order_7d"].clone();
    let activity = snapshot.activity.as_ref().unwrap();
    assert!(!activity.examples.is_empty() && !activity.pending.is_empty());
    assert_eq!(snapshot.value, serde_json::Value::Null, "no model yet");
    let now = (day0 + 20) * DAY_MS;
    fit_and_publish(&mut p, &s, now);
    let fitted = p
        .catalog
        .current()
        .model("order_7d")
        .unwrap()
        .latest()
        .unwrap()
        .clone();
    let model = fitted.propensity.as_ref().expect("a propensity model");
    assert!(model.converged, "{model:?}");
    assert!(model.quality.auc > 0.9, "{:?}", model.quality);
    // The back-fill evaluates everyone with it.
    for _ in 0..20 {
        tick_at(&mut p, &s, now + 1);
    }
    let value = |who: &str| {
        load(&s, who).unwrap().computed["order_7d"]
            .value
            .as_f64()
            .unwrap()
    };
    for i in 0..100 {
        assert!(
            value(&format!("s{i}")) > 0.5 && value(&format!("b{i}")) < 0.2,
            "s{i} {} b{i} {}",
            value(&format!("s{i}")),
            value(&format!("b{i}"))
        );
    }
}
