//! Profiles at scale, in process (state in RocksDB, no Kafka): the processor with 100
//! segment definitions and 10 computed traits over `--profiles` profiles.
//!
//! Prints: events/s through the processor with segment evaluation (one thread, batches
//! committed like the runner does), the per-event processing latency (a resolved event
//! in, its membership records out) p50/p99, state bytes per profile, profile lookup
//! latency over HTTP (the real API server on loopback), and the back-fill rate of a
//! definition added at run time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use tessera_common::admin::Admin;
use tessera_common::config::Config;
use tessera_common::kafka::Producer;
use tessera_common::message::{Message, Output};
use tessera_common::records::{AvroRecord, Identifier, IngestedEvent, ResolvedEvent};
use tessera_common::runner::Processor;
use tessera_common::store::{RocksStore, SharedStore, Store, Txn};
use tessera_common::topics::Topics;
use tessera_profiles::apply::ApplyRules;
use tessera_profiles::catalog::{Catalog, Definition};
use tessera_profiles::state::{ProfilesMetrics, ProfilesProcessor};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    profiles: usize,
    /// Events measured after the fill.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    #[arg(long, default_value_t = 20_000)]
    lookups: usize,
    /// Skip the back-fill measurement.
    #[arg(long)]
    no_backfill: bool,
    /// Add four predictive traits (p_alive, predicted_purchases, expected_value and a
    /// propensity on Order Completed) and a segment on one, and measure a model fit over
    /// the profiles before the measured events.
    #[arg(long)]
    predictive: bool,
}

const EVENTS: [&str; 6] = [
    "Order Completed",
    "Product Viewed",
    "Cart Viewed",
    "Song Played",
    "Signed Up",
    "Refund Issued",
];
const DAY: i64 = 86_400_000;

/// 10 computed traits and 100 segments of every kind of condition (and, with
/// `predictive`, three predictions and a segment on one).
fn definitions(predictive: bool) -> Vec<String> {
    let mut d = Vec::new();
    if predictive {
        d.extend(
            [
                r#"{"id":"p_active","event":"Order Completed","aggregate":"p_alive"}"#,
                r#"{"id":"purchases_90d","event":"Order Completed","aggregate":"predicted_purchases","horizon":"90d"}"#,
                r#"{"id":"value_90d","event":"Order Completed","aggregate":"expected_value","property":"total","horizon":"90d"}"#,
                r#"{"id":"order_7d","event":"Order Completed","aggregate":"propensity","horizon":"7d"}"#,
                r#"{"id":"likely_churn","condition":{"computed":{"name":"p_active","lt":0.3}}}"#,
            ]
            .map(String::from),
        );
    }
    let windows = ["7d", "30d", "90d"];
    for (i, (agg, prop)) in [
        ("count", None),
        ("sum", Some("total")),
        ("average", Some("total")),
        ("max", Some("total")),
        ("unique_count", Some("category")),
        ("most_frequent", Some("category")),
        ("count", None),
        ("sum", Some("total")),
        ("last", Some("category")),
        ("unique_list", Some("category")),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = json!({"id": format!("ct{i}"), "event": EVENTS[i % 4], "aggregate": agg});
        if let Some(p) = prop {
            c["property"] = json!(p);
        }
        if i % 2 == 0 {
            c["window"] = json!(windows[i % 3]);
        }
        d.push(c.to_string());
    }
    for i in 0..100 {
        let ev = EVENTS[i % EVENTS.len()];
        let plan = ["free", "pro", "team"][i % 3];
        let cond = match i % 5 {
            0 => json!({"event_count": {"event": ev, "min": 1 + i % 4}}),
            1 => json!({"event_count": {"event": ev, "min": 1 + i % 3,
                "where": [{"property": "total", "gt": (i % 7) * 10}], "within": windows[i % 3]}}),
            2 => json!({"any": [{"trait": {"name": "plan", "equals": plan}},
                                {"trait": {"name": "ltv", "gte": (i % 10) * 100}}]}),
            3 => json!({"computed": {"name": format!("ct{}", i % 10), "gte": 1 + i % 3}}),
            _ => json!({"all": [{"has_identifier": "email"}, {"consent": "Advertising"},
                                {"not": {"in_segment": format!("s{}", i - 4)}}]}),
        };
        d.push(json!({"id": format!("s{i}"), "condition": cond}).to_string());
    }
    d
}

/// Puts definitions in force, as the API does.
fn define(catalog: &Catalog, docs: &[&str]) {
    for doc in docs {
        let def = Definition::parse(doc, false, None).expect("a valid definition");
        let change = catalog
            .propose(def.kind(), def.id(), Some(&def), "bench")
            .expect("a consistent set");
        catalog.apply(change);
    }
}

/// A small xorshift: the same events on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn event(i: usize, profile: usize, rng: &mut Rng, now: i64) -> Message {
    let user = format!("user-{profile}");
    let t = now - rng.below(120 * DAY as u64) as i64;
    let (kind, name, payload) = if rng.below(5) == 0 {
        let plan = ["free", "pro", "team"][rng.below(3) as usize];
        (
            "identify",
            None,
            json!({"traits": {"plan": plan, "ltv": rng.below(1000), "email": format!("{user}@example.com")},
                   "context": {"consent": {"categoryPreferences": {"Advertising": rng.below(2) == 0}}}}),
        )
    } else {
        let name = EVENTS[rng.below(EVENTS.len() as u64) as usize];
        (
            "track",
            Some(name.to_string()),
            json!({"properties": {"total": rng.below(200), "category": format!("c{}", rng.below(12))}}),
        )
    };
    let r = ResolvedEvent {
        profile_id: format!("p{profile}"),
        identifiers: vec![Identifier {
            kind: "user_id".into(),
            value: user.clone(),
        }],
        event: IngestedEvent {
            message_id: format!("m{i}"),
            source: "bench".into(),
            kind: kind.into(),
            user_id: Some(user),
            anonymous_id: None,
            event: name,
            received_at: now,
            event_time: t,
            payload: payload.to_string(),
        },
    };
    Message {
        topic: "tessera.events.resolved".into(),
        partition: 0,
        offset: i as i64,
        key: None,
        payload: Some(r.to_avro().expect("avro")),
        timestamp_ms: None,
        replayed: false,
    }
}

/// Processes events in batches of 500 committed like the runner; observes each event's
/// processing time; returns the membership records produced.
fn run(
    p: &mut ProfilesProcessor,
    store: &RocksStore,
    events: impl Iterator<Item = Message>,
    mut observe: impl FnMut(u64),
) -> usize {
    let mut txn = Txn::new(store);
    let mut out: Vec<Output> = Vec::new();
    let (mut n, mut records) = (0, 0);
    for m in events {
        let started = Instant::now();
        p.process(&m, &mut txn, &mut out).expect("processed");
        observe(started.elapsed().as_nanos() as u64);
        n += 1;
        if n % 500 == 0 {
            records += out.len();
            out.clear();
            store
                .write(std::mem::replace(&mut txn, Txn::new(store)).into_batch())
                .expect("commit");
        }
    }
    records += out.len();
    store.write(txn.into_batch()).expect("commit");
    records
}

fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(RocksStore::open(dir.path()).expect("rocksdb"));
    let cfg = Config::demo();
    let topics = Topics::new(&cfg.topics);
    let docs = definitions(args.predictive);
    let catalog = Catalog::default();
    define(
        &catalog,
        &docs.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let defs = catalog.current();
    let mut p = ProfilesProcessor {
        inputs: tessera_profiles::state::Input::routes(&topics),
        topics: topics.clone(),
        catalog: catalog.clone(),
        rules: ApplyRules {
            strategies: Default::default(),
            defs,
        },
        synced: false,
        clock: tessera_common::now_ms,
        history_limit: cfg.profiles.history_events,
        dedup_window_ms: cfg.profiles.dedup_window_ms,
        metrics: ProfilesMetrics::new(&Admin::new()),
        changes: Default::default(),
        placement: tessera_profiles::state::Placement::everything(),
        fitting: tessera_profiles::state::Fitting::new((&cfg.profiles).into()),
    };
    let now = tessera_common::now_ms();
    let mut rng = Rng(0x5eed);

    // Fill: one event per profile, then the measured events on random profiles.
    let started = Instant::now();
    let fill = (0..args.profiles).map(|i| event(i, i, &mut Rng(i as u64 * 7919 + 1), now));
    let records = run(&mut p, &store, fill, |_| {});
    let fill_took = started.elapsed();
    let own = if args.predictive { 14 } else { 10 };
    println!(
        "profiles bench: {} profiles, {} segments, {} computed traits (and {} segment counters)",
        args.profiles,
        catalog.current().segments.len(),
        own,
        catalog.current().computed.len() - own
    );
    println!(
        "  fill: {} events in {:.1} s ({:.0} events/s), {records} membership records",
        args.profiles,
        fill_took.as_secs_f64(),
        args.profiles as f64 / fill_took.as_secs_f64()
    );
    if args.predictive {
        // Fitted before the measured events, so they are evaluated with the models.
        fit_models(&mut p, &store, &catalog);
    }
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let base = args.profiles;
    let profiles = args.profiles as u64;
    let measured: Vec<Message> = (0..args.events)
        .map(|i| {
            let profile = rng.below(profiles) as usize;
            event(base + i, profile, &mut rng, now)
        })
        .collect();
    let started = Instant::now();
    let records = run(&mut p, &store, measured.into_iter(), |ns| {
        hist.record(ns.max(1)).expect("record");
    });
    let took = started.elapsed();
    println!(
        "  events: {} on existing profiles in {:.1} s = {:.0} events/s (one thread), {records} membership records",
        args.events,
        took.as_secs_f64(),
        args.events as f64 / took.as_secs_f64()
    );
    println!(
        "  per event (resolved event in -> membership records out, no Kafka): p50 {:.0} us  p99 {:.0} us  max {:.1} ms",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1e6
    );
    store.flush_and_compact().expect("compact");
    println!(
        "  state: {:.0} bytes per profile ({:.2} GiB live SST, lz4, history of up to {} events kept per profile)",
        store.size_bytes() as f64 / args.profiles as f64,
        store.size_bytes() as f64 / (1u64 << 30) as f64,
        cfg.profiles.history_events
    );

    // Lookups over HTTP: the real API on loopback.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let shared: SharedStore = store.clone();
        let producer = Arc::new(Producer::new(&cfg.kafka, "bench").expect("producer"));
        let routes = tessera_profiles::api::router(tessera_profiles::api::ApiState {
            store: shared,
            audit: tessera_common::audit::Audit::new(producer.clone(), &topics, "profiles"),
            catalog: catalog.clone(),
            producer,
            topics: topics.clone(),
            strategies: Arc::new(Default::default()),
            history_limit: cfg.profiles.history_events,
            recent_events: cfg.profiles.recent_events,
            placement: tessera_profiles::state::Placement::everything(),
            fit_requests: p.fitting.requested.clone(),
            fit_status: p.fitting.status.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let http = cfg.http.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { tessera_common::admin::serve(listener, routes, &http, stop).await });
        let client = reqwest::Client::new();
        let mut hist = Histogram::<u64>::new(3).expect("histogram");
        let mut rng = Rng(99);
        for i in 0..args.lookups + 1000 {
            let id = rng.below(profiles);
            let started = Instant::now();
            let r = client
                .get(format!("http://{addr}/v1/profiles/p{id}"))
                .send()
                .await
                .expect("answer");
            assert_eq!(r.status(), 200);
            // Timed to the last byte of the answer; the client's parsing is not.
            let bytes = r.bytes().await.expect("body");
            let took = started.elapsed();
            let body: Value = serde_json::from_slice(&bytes).expect("json");
            assert!(body["profile_id"].is_string());
            if i >= 1000 {
                hist.record(took.as_nanos() as u64).expect("record");
            }
        }
        println!(
            "  lookup GET /v1/profiles/{{id}} over HTTP (keep-alive, one client, to the last byte): p50 {:.0} us  p99 {:.0} us",
            hist.value_at_quantile(0.5) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0
        );
        shutdown.cancel();
    });

    if args.no_backfill {
        return;
    }
    // Back-fill: a new computed trait and a segment on it, added at run time.
    define(
        &catalog,
        &[
            r#"{"id":"views_30d","event":"Product Viewed","aggregate":"count","window":"30d"}"#,
            r#"{"id":"browsers","condition":{"computed":{"name":"views_30d","gte":1}}}"#,
        ],
    );
    let started = Instant::now();
    let records = backfill(&mut p, &store);
    let took = started.elapsed();
    println!(
        "  back-fill of a new computed trait (from the kept history) and a segment on it: {} profiles in {:.1} s = {:.0} profiles/s, {records} membership records",
        args.profiles,
        took.as_secs_f64(),
        args.profiles as f64 / took.as_secs_f64()
    );
}

/// Ticks back to back until the back-fill in progress is done; the records it sent.
fn backfill(p: &mut ProfilesProcessor, store: &RocksStore) -> usize {
    let mut records = 0;
    loop {
        let mut txn = Txn::new(store);
        let mut out = Vec::new();
        p.tick(tessera_common::now_ms(), &mut txn, &mut out)
            .expect("tick");
        records += out.len();
        store.write(txn.into_batch()).expect("commit");
        let job: Value = store
            .get(tessera_profiles::state::META_BACKFILL)
            .expect("read")
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if !job["finished_at"].is_null() {
            return records;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A fit asked for, with ticks back to back: the profiles read (a bounded share of each
/// tick in the service), the fit on its thread, the model published; then every
/// profile re-evaluated with it.
fn fit_models(p: &mut ProfilesProcessor, store: &RocksStore, catalog: &Catalog) {
    use std::sync::atomic::Ordering;
    use tessera_common::records::DefinitionChange;
    p.fitting.requested.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut ticks = 0;
    let published = loop {
        let mut txn = Txn::new(store);
        let mut out = Vec::new();
        p.tick(tessera_common::now_ms(), &mut txn, &mut out)
            .expect("tick");
        store.write(txn.into_batch()).expect("commit");
        ticks += 1;
        let models: Vec<DefinitionChange> = out
            .iter()
            .filter(|o| o.key.starts_with(b"model/"))
            .map(|o| DefinitionChange::from_avro(&o.payload).expect("a model record"))
            .collect();
        if !models.is_empty() {
            break models;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = started.elapsed();
    for m in &published {
        let h: tessera_profiles::predict::ModelHistory =
            serde_json::from_str(&m.definition).expect("a model");
        let f = h.latest().expect("a version");
        if let Some(l) = &f.propensity {
            let q = &l.quality;
            println!(
                "  model fit {}: {} examples, fit {} ms, AUC {:.3} on {} held back",
                m.id, f.customers, f.fit_ms, q.auc, q.examples
            );
            catalog.apply(m.clone());
            continue;
        }
        let (b, fit) = (
            f.bgnbd.expect("BG/NBD"),
            f.bgnbd_fit.clone().expect("a report"),
        );
        println!(
            "  model fit {}: {} customers ({} with repeat purchases), fit {} ms, converged {}; r {:.3} alpha {:.1} d a {:.3} b {:.3}",
            m.id, f.customers, f.repeat_customers, f.fit_ms, fit.converged, b.r, b.alpha, b.a, b.b
        );
        catalog.apply(m.clone());
    }
    println!(
        "  model fits asked for -> published: {:.1} s over {ticks} ticks back to back (reading every profile, then the fits on their thread)",
        took.as_secs_f64()
    );
    let started = Instant::now();
    let records = backfill(p, store);
    let took = started.elapsed();
    println!(
        "  every profile re-evaluated with the new models: {:.1} s, {records} membership records",
        took.as_secs_f64()
    );
}
