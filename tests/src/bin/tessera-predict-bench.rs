//! Predictive traits in process (state in RocksDB, no Kafka):
//!
//! - `--fit-customers N`: N customers drawn from BG/NBD with the CDNOW parameters (in
//!   days); the model fit's time on them and what it recovered.
//! - `--people N --days D`: a shop's visitors with a hidden intent to buy (they browse,
//!   add to cart and order in bursts, some drop away), their events applied day by day
//!   by the profiles processor with a `propensity` trait (Order Completed within 7 days);
//!   the model fitted after `--fit-day` days from the outcomes the stream revealed, then
//!   each midnight's prediction for every visitor scored against what they did in the
//!   7 days after it (AUC, calibration), beside a simple score (orders in the last 30
//!   days). The CDNOW benchmark through the platform is `tests/predict/cdnow.sh`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use clap::Parser;
use serde_json::json;

use tessera_common::admin::Admin;
use tessera_common::config::Config;
use tessera_common::message::{Message, Output};
use tessera_common::records::{
    AvroRecord, DefinitionChange, Identifier, IngestedEvent, ResolvedEvent,
};
use tessera_common::runner::Processor;
use tessera_common::store::{RocksStore, Store, Txn};
use tessera_common::topics::Topics;
use tessera_profiles::apply::ApplyRules;
use tessera_profiles::catalog::{Catalog, Definition};
use tessera_profiles::predict::propensity::quality;
use tessera_profiles::predict::{self, BgNbd, DAY_MS, Summary};
use tessera_profiles::profile::Profile;
use tessera_profiles::state::{
    Fitting, Placement, ProfilesMetrics, ProfilesProcessor, profile_key,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 0)]
    fit_customers: usize,
    #[arg(long, default_value_t = 10_000)]
    people: usize,
    #[arg(long, default_value_t = 100)]
    days: i64,
    #[arg(long, default_value_t = 60)]
    fit_day: i64,
}

/// The simulated time: the processor's clock (a back-fill evaluates at it).
static NOW: AtomicI64 = AtomicI64::new(0);
fn simulated_clock() -> i64 {
    NOW.load(Ordering::SeqCst)
}

/// A small xorshift: the same run every time.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

fn main() {
    let args = Args::parse();
    if args.fit_customers > 0 {
        return simulated_fit(args.fit_customers);
    }
    propensity(&args);
}
/// Customers drawn from BG/NBD (CDNOW's parameters, in days), observed for 1 to 546
/// days since their first purchase; the fit's time on them and what it recovered.
fn simulated_fit(n: usize) {
    let truth = BgNbd {
        r: 0.243,
        alpha: 4.414 * 7.0,
        a: 0.793,
        b: 2.426,
    };
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut uniform = move || rng.uniform();
    let started = Instant::now();
    let customers: Vec<Summary> = (0..n)
        .map(|_| {
            let rate = gamma(truth.r, &mut uniform) / truth.alpha;
            let p = {
                let (x, y) = (gamma(truth.a, &mut uniform), gamma(truth.b, &mut uniform));
                x / (x + y)
            };
            let t = 1.0 + (uniform() * 546.0).floor();
            // Purchases at exponential gaps; after each repeat purchase the customer
            // may leave (after the first they are active: BG/NBD's assumption).
            let (mut x, mut t_x, mut now) = (0u32, 0.0, 0.0);
            loop {
                now += -uniform().ln() / rate;
                if now > t {
                    break;
                }
                x += 1;
                t_x = now;
                if uniform() < p {
                    break;
                }
            }
            // Purchase days are whole days, as the profiles count them.
            Summary {
                x,
                t_x: f64::floor(t_x),
                t,
                m: None,
            }
        })
        .collect();
    let drawn = started.elapsed();
    let f = predict::fit(&customers, 0, 0, vec![0]);
    let (b, fit) = (f.bgnbd.expect("BG/NBD"), f.bgnbd_fit.expect("a report"));
    println!(
        "simulated fit: {n} customers drawn from BG/NBD (r {:.3} alpha {:.3} d a {:.3} b {:.3}) in {:.1} s",
        truth.r,
        truth.alpha,
        truth.a,
        truth.b,
        drawn.as_secs_f64()
    );
    println!(
        "  fit: {} ms, {} evaluations, converged {}; recovered r {:.3} alpha {:.3} d a {:.3} b {:.3}",
        f.fit_ms, fit.evaluations, fit.converged, b.r, b.alpha, b.a, b.b
    );
}

/// Gamma(shape, 1) by Marsaglia and Tsang (with the boost for a shape below 1).
fn gamma(shape: f64, uniform: &mut dyn FnMut() -> f64) -> f64 {
    if shape < 1.0 {
        return gamma(shape + 1.0, uniform) * uniform().powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        // A standard normal by Box–Muller.
        let z = (-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos();
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        if uniform().ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// One visitor of the simulated shop: how often they come, how often they start
/// shopping, how likely a shopping spell ends in an order, and whether they stop coming.
struct Visitor {
    visits: f64,
    shopping: f64,
    converts: f64,
    leaves: f64,
    /// Days left in the current shopping spell.
    spell: i64,
    gone: bool,
}

/// One day of a visitor: their events (name, time), in time order.
fn day_of_visitor(v: &mut Visitor, day: i64, rng: &mut Rng) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    if v.gone {
        return out;
    }
    if rng.uniform() < v.leaves {
        v.gone = true;
        return out;
    }
    if v.spell == 0 && rng.uniform() < v.shopping {
        v.spell = 1 + (rng.next() % 5) as i64;
    }
    let rate = if v.spell > 0 {
        v.visits * 4.0 + 0.5
    } else {
        v.visits
    };
    let mut at = day * DAY_MS + 8 * 3_600_000;
    // Poisson visits: exponential gaps within the day.
    loop {
        at += (-rng.uniform().ln() / rate * DAY_MS as f64 * 0.5) as i64;
        if at >= (day + 1) * DAY_MS {
            break;
        }
        out.push(("Product Viewed", at));
        if v.spell > 0 && rng.uniform() < 0.3 {
            out.push(("Product Added", at + 60_000));
            if rng.uniform() < v.converts {
                out.push(("Order Completed", at + 120_000));
                v.spell = 0;
                break;
            }
        }
    }
    if v.spell > 0 {
        v.spell -= 1;
    }
    out
}

fn event(person: usize, n: u64, name: &str, t: i64) -> Message {
    let user = format!("v{person}");
    let r = ResolvedEvent {
        profile_id: format!("p{person}"),
        identifiers: vec![Identifier {
            kind: "user_id".into(),
            value: user.clone(),
        }],
        event: IngestedEvent {
            message_id: format!("m{n}"),
            source: "bench".into(),
            kind: "track".into(),
            user_id: Some(user),
            anonymous_id: None,
            event: Some(name.into()),
            received_at: t,
            event_time: t,
            payload: json!({"properties": {"total": 40}}).to_string(),
        },
    };
    Message {
        topic: "tessera.events.resolved".into(),
        partition: 0,
        offset: n as i64,
        key: None,
        payload: Some(r.to_avro().expect("avro")),
        timestamp_ms: None,
        replayed: false,
    }
}

/// Ticks at `now` until no timer is left due; the model records the ticks sent.
fn ticks(p: &mut ProfilesProcessor, store: &RocksStore, now: i64) -> Vec<DefinitionChange> {
    let mut models = Vec::new();
    loop {
        let fired = p.metrics.timers.get();
        let mut txn = Txn::new(store);
        let mut out: Vec<Output> = Vec::new();
        p.tick(now, &mut txn, &mut out).expect("tick");
        store.write(txn.into_batch()).expect("commit");
        models.extend(
            out.iter()
                .filter(|o| o.key.starts_with(b"model/"))
                .map(|o| DefinitionChange::from_avro(&o.payload).expect("a model record")),
        );
        if p.metrics.timers.get() == fired {
            return models;
        }
    }
}

fn propensity(args: &Args) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(RocksStore::open(dir.path()).expect("rocksdb"));
    let cfg = Config::demo();
    let topics = Topics::new(&cfg.topics);
    let catalog = Catalog::default();
    let def = Definition::parse(
        r#"{"id":"order_7d","event":"Order Completed","aggregate":"propensity","horizon":"7d"}"#,
        false,
        None,
    )
    .expect("a definition");
    let change = catalog
        .propose(def.kind(), def.id(), Some(&def), "bench")
        .expect("consistent");
    catalog.apply(change);
    let mut p = ProfilesProcessor {
        inputs: tessera_profiles::state::Input::routes(&topics),
        topics: topics.clone(),
        catalog: catalog.clone(),
        rules: ApplyRules {
            strategies: Default::default(),
            defs: catalog.current(),
        },
        synced: false,
        clock: simulated_clock,
        history_limit: cfg.profiles.history_events,
        dedup_window_ms: cfg.profiles.dedup_window_ms,
        metrics: ProfilesMetrics::new(&Admin::new()),
        changes: Default::default(),
        placement: Placement::everything(),
        fitting: Fitting::new((&cfg.profiles).into()),
    };
    let mut rng = Rng(0xfeed);
    let mut visitors: Vec<Visitor> = (0..args.people)
        .map(|_| Visitor {
            visits: 0.05 + rng.uniform().powi(2) * 1.5,
            shopping: rng.uniform() * 0.08,
            converts: rng.uniform() * 0.6,
            leaves: rng.uniform() * 0.02,
            spell: 0,
            gone: false,
        })
        .collect();
    // Day 20000 on: a fixed stretch of time, far from any real clock.
    let first = 20_000i64;
    let mut orders: Vec<Vec<i64>> = vec![Vec::new(); args.people];
    let mut predictions: Vec<(i64, usize, f64)> = Vec::new();
    let (mut n, mut events) = (0u64, 0u64);
    let started = Instant::now();
    let mut fitted = None;
    for d in first..first + args.days {
        let mut day: Vec<(i64, usize, &'static str)> = Vec::new();
        for (i, v) in visitors.iter_mut().enumerate() {
            for (name, t) in day_of_visitor(v, d, &mut rng) {
                day.push((t, i, name));
            }
        }
        day.sort();
        let mut txn = Txn::new(store.as_ref());
        let mut out = Vec::new();
        for (t, i, name) in day {
            n += 1;
            if name == "Order Completed" {
                orders[i].push(t);
            }
            NOW.store(t, Ordering::SeqCst);
            p.process(&event(i, n, name, t), &mut txn, &mut out)
                .expect("processed");
            events += 1;
            if n % 500 == 0 {
                store
                    .write(std::mem::replace(&mut txn, Txn::new(store.as_ref())).into_batch())
                    .expect("commit");
            }
        }
        store.write(txn.into_batch()).expect("commit");
        let midnight = (d + 1) * DAY_MS;
        NOW.store(midnight, Ordering::SeqCst);
        // The first fit, then one each midnight (the service's default is daily).
        if d + 1 >= first + args.fit_day {
            p.fitting.requested.store(true, Ordering::SeqCst);
            for _ in 0..100_000 {
                let models = ticks(&mut p, &store, midnight);
                if let Some(m) = models.into_iter().next() {
                    catalog.apply(m.clone());
                    fitted.get_or_insert(m);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            // The new model re-evaluates every profile (the back-fill).
            for _ in 0..1000 {
                ticks(&mut p, &store, midnight);
            }
        }
        ticks(&mut p, &store, midnight);
        // Predictions made at this midnight, scored once 7 days have passed.
        if fitted.is_some() && d + 1 + 7 <= first + args.days {
            for i in 0..args.people {
                let Some(b) = store.get(&profile_key(&format!("p{i}"))).expect("read") else {
                    continue;
                };
                let prof: Profile = serde_json::from_slice(&b).expect("a profile");
                if let Some(v) = prof.computed["order_7d"].value.as_f64() {
                    predictions.push((midnight, i, v));
                }
            }
        }
    }
    let fitted = fitted.expect("a model was fitted");
    let history: predict::ModelHistory = serde_json::from_str(&fitted.definition).expect("a model");
    let f = history.latest().expect("a version");
    let l = f.propensity.as_ref().expect("a propensity model");
    println!(
        "propensity bench: {} visitors, {} days, {events} events in {:.1} s; first fitted on day {} (then daily) from {} resolved examples ({} held back), {} iterations",
        args.people,
        args.days,
        started.elapsed().as_secs_f64(),
        args.fit_day,
        f.customers,
        l.quality.examples,
        l.iterations
    );
    println!(
        "  the fit's own report on held-back people: AUC {:.3}, log loss {:.3}, Brier {:.4}, positive rate {:.3}",
        l.quality.auc, l.quality.log_loss, l.quality.brier, l.quality.positive_rate
    );
    let outcome = |i: usize, at: i64| orders[i].iter().any(|t| *t > at && *t <= at + 7 * DAY_MS);
    let scored: Vec<(f64, bool)> = predictions
        .iter()
        .map(|(at, i, v)| (*v, outcome(*i, *at)))
        .collect();
    let q = quality(&scored, true);
    // A simple score to compare with: orders in the 30 days before.
    let simple: Vec<(f64, bool)> = predictions
        .iter()
        .map(|(at, i, _)| {
            let recent = orders[*i]
                .iter()
                .filter(|t| **t <= *at && **t > at - 30 * DAY_MS)
                .count();
            (recent as f64 / 100.0, outcome(*i, *at))
        })
        .collect();
    let qs = quality(&simple, true);
    println!(
        "  after the fit, each midnight's prediction against the next 7 days: {} predictions, AUC {:.3} (orders in the last 30 days: {:.3}), log loss {:.3}, Brier {:.4}, positive rate {:.3}",
        q.examples, q.auc, qs.auc, q.log_loss, q.brier, q.positive_rate
    );
    println!("  calibration: predicted -> observed (count)");
    for b in &q.calibration {
        println!(
            "    {:.1}-{:.1}: {:.3} -> {:.3} ({})",
            b.from, b.to, b.predicted, b.observed, b.count
        );
    }
}
