//! Identity quality and speed, in process (state in RocksDB, no Kafka).
//!
//! `quality`: generates a synthetic customer base with ground truth (see
//! `tessera_tests::synth`), resolves its events (a share of them delayed, so late
//! events recompute), and prints profiles vs people and pairwise precision, recall and F1.
//!
//! `speed`: fills the graph to at least `--identifiers` identifiers, then resolves
//! deterministic events (known people on new and old devices) and prints per-event
//! latency p50/p99 and throughput on one thread; then the cost of fuzzy scoring.

use std::time::Instant;

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use tessera_common::records::{Identifier, IngestedEvent};
use tessera_common::store::{RocksStore, Store, Txn};
use tessera_identity::rules::Rules;
use tessera_identity::{fuzzy, graph, resolve_event};
use tessera_tests::synth;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Quality {
        #[arg(long, default_value_t = 20_000)]
        people: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Share of events delivered late (out of order).
        #[arg(long, default_value_t = 0.05)]
        late: f64,
        /// Print examples of wrong merges and of people split over profiles.
        #[arg(long)]
        explain: bool,
    },
    /// Public linkage data (`tests/linkage/febrl.py export`): each line's message is
    /// resolved in order; prints pairwise quality, blocking's pairs completeness,
    /// candidates per record and matching time.
    Linkage {
        /// JSON lines: {"message": identify event, "entity": the true person}.
        input: std::path::PathBuf,
        /// Print the wrong merges and missed pairs, with their explanation.
        #[arg(long)]
        explain: bool,
    },
    Speed {
        #[arg(long, default_value_t = 1_000_000)]
        identifiers: usize,
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Fuzzy records in the graph before matching is timed.
        #[arg(long, default_value_t = 1_000_000)]
        fuzzy_records: usize,
    },
}

fn ingested(msg: &str, kind: &str, t: i64, message: &Value) -> IngestedEvent {
    IngestedEvent {
        message_id: msg.to_string(),
        source: "bench".into(),
        kind: kind.to_string(),
        user_id: message["userId"].as_str().map(Into::into),
        anonymous_id: message["anonymousId"].as_str().map(Into::into),
        event: message["event"].as_str().map(Into::into),
        received_at: t,
        event_time: t,
        payload: message.to_string(),
    }
}

/// Resolves events, committing a batch every `batch` events like the runner does.
fn resolve_all(
    rules: &Rules,
    store: &RocksStore,
    events: impl Iterator<Item = (IngestedEvent, Value)>,
    batch: usize,
    mut observe: impl FnMut(u64),
) -> (usize, usize) {
    let mut txn = Txn::new(store);
    let (mut n, mut recomputed) = (0, 0);
    for (e, _) in events {
        // Timed like the service does it: from the event's JSON payload on.
        let started = Instant::now();
        let payload: Value = serde_json::from_str(&e.payload).expect("json");
        let r = resolve_event(rules, &mut txn, &e, &payload).expect("resolves");
        observe(started.elapsed().as_nanos() as u64);
        recomputed += r.changes.recomputed;
        n += 1;
        if n % batch == 0 {
            store
                .write(std::mem::replace(&mut txn, Txn::new(store)).into_batch())
                .expect("commit");
        }
    }
    store.write(txn.into_batch()).expect("commit");
    (n, recomputed)
}

fn main() {
    let args = Args::parse();
    let rules = Rules::parse(tessera_identity::rules::DEFAULT_RULES, "embedded").expect("rules");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RocksStore::open(dir.path()).expect("rocksdb");
    match args.mode {
        Mode::Quality {
            people,
            seed,
            late,
            explain,
        } => {
            let world = synth::generate(people, seed);
            let mut events = world.events.clone();
            // Deliver a share of events late: each moves a random distance later.
            let mut x = seed | 1;
            let mut rnd = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let n = events.len();
            for i in 0..n {
                if (rnd() % 10_000) as f64 / 10_000.0 < late {
                    let to = (i + (rnd() as usize % 500)).min(n - 1);
                    events.swap(i, to);
                }
            }
            let started = Instant::now();
            let (count, recomputed) = resolve_all(
                &rules,
                &store,
                events.iter().map(|e| {
                    (
                        ingested(&e.message_id, e.kind, e.event_time, &e.message),
                        e.message.clone(),
                    )
                }),
                500,
                |_| {},
            );
            let took = started.elapsed();
            let txn = Txn::new(&store);
            let assigned: Vec<(usize, String)> = world
                .truth
                .iter()
                .map(|((kind, value), person)| {
                    let i = Identifier {
                        kind: kind.clone(),
                        value: rules.normalise(kind, value).unwrap_or(value.clone()),
                    };
                    let p = graph::lookup(&txn, &i)
                        .expect("lookup")
                        .unwrap_or_else(|| format!("missing:{kind}:{value}"));
                    (*person, p)
                })
                .collect();
            let q = synth::quality(&assigned);
            if explain {
                // Profiles holding several people, and people split over profiles.
                type Members<'a> = Vec<(usize, &'a (String, String))>;
                let mut by_profile: std::collections::BTreeMap<&str, Members<'_>> =
                    Default::default();
                type Parts<'a> = Vec<(&'a str, &'a (String, String))>;
                let mut by_person: std::collections::BTreeMap<usize, Parts<'_>> =
                    Default::default();
                for ((id, person), (_, p)) in world.truth.iter().zip(&assigned) {
                    by_profile
                        .entry(p.as_str())
                        .or_default()
                        .push((*person, id));
                    by_person.entry(*person).or_default().push((p.as_str(), id));
                }
                let wrong = by_profile
                    .iter()
                    .filter(|(_, m)| m.iter().any(|x| x.0 != m[0].0));
                for (p, members) in wrong.take(6) {
                    println!("  wrong merge in {p}: {members:?}");
                }
                let split = by_person
                    .iter()
                    .filter(|(_, parts)| parts.iter().any(|x| x.0 != parts[0].0));
                for (person, parts) in split.take(6) {
                    println!("  person {person} split: {parts:?}");
                    for e in world.events.iter().filter(|e| {
                        let a = e.message["anonymousId"].as_str().unwrap_or("");
                        a == format!("crm-import-{person}") || a == format!("shop-{person}")
                    }) {
                        println!("    {}", e.message["traits"]);
                    }
                }
            }
            println!(
                "identity quality: {people} people (seed {seed}), {count} events, {:.0}% delivered late",
                late * 100.0
            );
            println!(
                "  identifiers {}  true people {}  profiles {}",
                q.identifiers, q.people, q.profiles
            );
            println!(
                "  pairwise precision {:.5}  recall {:.5}  F1 {:.5}",
                q.precision, q.recall, q.f1
            );
            println!(
                "  recomputations {recomputed}  time {:.2} s ({:.0} events/s)",
                took.as_secs_f64(),
                count as f64 / took.as_secs_f64()
            );
        }
        Mode::Linkage { input, explain } => linkage(&rules, &store, &input, explain),
        Mode::Speed {
            identifiers,
            events,
            fuzzy_records,
        } => {
            // Fill: people with a user id, an email and two devices (4 identifiers each).
            let people = identifiers.div_ceil(4);
            let t0: i64 = 1_700_000_000_000;
            let fill = (0..people).flat_map(|p| {
                let t = t0 + p as i64 * 10;
                [
                    json!({"type": "track", "anonymousId": format!("a{p}-0"), "event": "Page Viewed"}),
                    json!({"type": "identify", "userId": format!("u{p}"), "anonymousId": format!("a{p}-0"), "traits": {"email": format!("p{p}@mail.test")}}),
                    json!({"type": "track", "userId": format!("u{p}"), "anonymousId": format!("a{p}-1"), "event": "Page Viewed"}),
                ]
                .into_iter()
                .enumerate()
                .map(move |(k, m)| {
                    let kind = if k == 1 { "identify" } else { "track" };
                    (ingested(&format!("f{p}-{k}"), kind, t + k as i64, &m), m)
                })
            });
            let started = Instant::now();
            let (filled, _) = resolve_all(&rules, &store, fill, 1000, |_| {});
            println!(
                "identity speed: graph filled with {} identifiers ({people} people) from {filled} events in {:.1} s",
                people * 4,
                started.elapsed().as_secs_f64()
            );
            // Measured: known people browsing (user id + known or new device), anonymous
            // visitors, logins of new visitors: a realistic deterministic mix.
            let later = t0 + people as i64 * 10 + 1;
            let mix = (0..events).map(|n| {
                let p = (n * 7919) % people;
                let m = match n % 4 {
                    0 => json!({"type": "track", "userId": format!("u{p}"), "anonymousId": format!("a{p}-0"), "event": "Order Completed"}),
                    1 => json!({"type": "track", "anonymousId": format!("new{n}"), "event": "Page Viewed"}),
                    2 => json!({"type": "identify", "userId": format!("u{p}"), "anonymousId": format!("new{}", n - 1)}),
                    _ => json!({"type": "track", "anonymousId": format!("a{p}-1"), "event": "Page Viewed"}),
                };
                let kind = if n % 4 == 2 { "identify" } else { "track" };
                (ingested(&format!("e{n}"), kind, later + n as i64, &m), m)
            });
            // Generated before the clock starts: the figures are identity's alone.
            let mix: Vec<(IngestedEvent, Value)> = mix.collect();
            let mut h = Histogram::<u64>::new(3).unwrap();
            let started = Instant::now();
            let (count, _) = resolve_all(&rules, &store, mix.into_iter(), 500, |ns| {
                h.record(ns.max(1)).unwrap();
            });
            let took = started.elapsed();
            println!(
                "  deterministic events: {count} in {:.2} s = {:.0} events/s on one thread; per event (JSON payload to resolution) p50 {:.1} us  p99 {:.1} us  max {:.1} us (batch commits included in throughput only)",
                took.as_secs_f64(),
                count as f64 / took.as_secs_f64(),
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.max() as f64 / 1000.0
            );
            // Fuzzy: a CRM of `fuzzy_records` people (names from a small table, so name
            // blocks fill up), then 20,000 more records timed, a tenth of them duplicates
            // of earlier people with a typo.
            let f = rules.fuzzy.as_ref().expect("fuzzy rules");
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut rnd = move |n: usize| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % n as u64) as usize
            };
            let person = |p: usize, rnd: &mut dyn FnMut(usize) -> usize| {
                let first = synth::FIRST[p % synth::FIRST.len()];
                let last = synth::LAST[(p / synth::FIRST.len()) % synth::LAST.len()];
                let street = synth::LAST[(p * 7 + 3) % synth::LAST.len()];
                json!({
                    "firstName": first, "lastName": last,
                    "birthday": format!("{}-{:02}-{:02}", 1930 + rnd(75), 1 + rnd(12), 1 + rnd(28)),
                    "address": {"street": format!("{} {street} street", 1 + rnd(300)), "postalCode": format!("{}", 1000 + rnd(8000))},
                })
            };
            let start = later + events as i64 + 1;
            let mut people: Vec<Value> = Vec::with_capacity(fuzzy_records);
            let mut txn = Txn::new(&store);
            let started = Instant::now();
            for p in 0..fuzzy_records {
                let mut traits = person(p, &mut rnd);
                people.push(traits.clone());
                traits["crm_id"] = json!(format!("c{p}"));
                let m =
                    json!({"type": "identify", "anonymousId": format!("i{p}"), "traits": traits});
                let e = ingested(&format!("fz{p}"), "identify", start + p as i64, &m);
                resolve_event(&rules, &mut txn, &e, &m).expect("resolves");
                if p % 1000 == 999 {
                    store
                        .write(std::mem::replace(&mut txn, Txn::new(&store)).into_batch())
                        .expect("commit");
                }
            }
            store.write(txn.into_batch()).expect("commit");
            println!(
                "  fuzzy: {fuzzy_records} CRM records filled in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            let timed: Vec<(IngestedEvent, Value)> = (0..20_000)
                .map(|n| {
                    let p = fuzzy_records + n;
                    let mut traits = if n % 10 == 0 {
                        let mut t = people[rnd(people.len())].clone();
                        let name = t["firstName"].as_str().unwrap_or("x").to_string();
                        t["firstName"] = json!(format!("{name}e"));
                        t
                    } else {
                        person(p, &mut rnd)
                    };
                    traits["crm_id"] = json!(format!("c{p}"));
                    let m = json!({"type": "identify", "anonymousId": format!("i{p}"), "traits": traits});
                    (ingested(&format!("fz{p}"), "identify", start + p as i64, &m), m)
                })
                .collect();
            let mut h = Histogram::<u64>::new(3).unwrap();
            let (mut compared, mut merged, mut oversized) = (0usize, 0usize, 0usize);
            let started = Instant::now();
            let mut txn = Txn::new(&store);
            for (n, (e, payload)) in timed.iter().enumerate() {
                let s = Instant::now();
                let r = resolve_event(&rules, &mut txn, e, payload).expect("resolves");
                h.record((s.elapsed().as_nanos() as u64).max(1)).unwrap();
                compared += r.fuzzy_compared;
                oversized += r.fuzzy_oversized_blocks;
                merged += r.changes.merges.len();
                if n % 1000 == 999 {
                    store
                        .write(std::mem::replace(&mut txn, Txn::new(&store)).into_batch())
                        .expect("commit");
                }
            }
            store.write(txn.into_batch()).expect("commit");
            let took = started.elapsed();
            let records = timed;
            let a: std::collections::BTreeMap<String, String> = [
                ("first_name", "katherine"),
                ("last_name", "johnson"),
                ("birthday", "1981-04-12"),
                ("street", "12 oak st"),
                ("postcode", "90210"),
                ("city", "springfield"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            let mut b = a.clone();
            b.insert("first_name".into(), "katharine".into());
            let n = 200_000;
            let txn = Txn::new(&store);
            let params = fuzzy::model::current(&txn, f).expect("params");
            let acc = fuzzy::model::accumulators(&txn).expect("accumulators");
            let s = Instant::now();
            let mut matched = 0;
            for _ in 0..n {
                let e = fuzzy::model::score(
                    &txn,
                    f,
                    &params,
                    &acc,
                    std::hint::black_box(&a),
                    std::hint::black_box(&b),
                    f.threshold,
                )
                .expect("scored");
                matched += usize::from(e.links());
            }
            let per_pair = s.elapsed().as_nanos() as f64 / n as f64;
            println!(
                "  fuzzy records with {fuzzy_records} in the graph: {} in {:.2} s ({merged} merges, {:.2} oversized blocks per record); {:.1} candidates scored per record; per record p50 {:.1} us  p99 {:.1} us; one pair scored in {:.0} ns ({matched} matched)",
                records.len(),
                took.as_secs_f64(),
                oversized as f64 / records.len() as f64,
                compared as f64 / records.len() as f64,
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                per_pair
            );
            let txn = Txn::new(&store);
            let params = fuzzy::model::current(&txn, f).expect("params");
            print_weights(f, &params);
            println!("  state on disk: {} MiB", store.size_bytes() / (1 << 20));
        }
    }
}

fn linkage(rules: &Rules, store: &RocksStore, input: &std::path::Path, explain: bool) {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    let text = std::fs::read_to_string(input).expect("the input file");
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let f = rules.fuzzy.as_ref().expect("fuzzy matching on");
    let id_of = |m: &Value| -> Identifier {
        let t = &m["traits"];
        let (kind, v) = match t.get("crm_id") {
            Some(v) => ("crm_id", v),
            None => ("loyalty_id", &t["loyalty_id"]),
        };
        Identifier {
            kind: kind.into(),
            value: v.as_str().expect("an id").into(),
        }
    };
    let mut entities: HashMap<String, usize> = HashMap::new();
    let mut records = Vec::new();
    for (n, l) in lines.iter().enumerate() {
        let m = &l["message"];
        let next = entities.len();
        let entity = *entities
            .entry(l["entity"].as_str().expect("entity").to_string())
            .or_insert(next);
        let t = chrono::DateTime::parse_from_rfc3339(m["timestamp"].as_str().unwrap_or(""))
            .map_or(n as i64, |d| d.timestamp_millis());
        let mut e = ingested(
            m["messageId"].as_str().expect("messageId"),
            "identify",
            t,
            m,
        );
        e.source = l["source"].as_str().unwrap_or("bench").to_string();
        records.push((e, m.clone(), entity, id_of(m)));
    }
    // Blocking's reach: the share of true pairs that share a blocking key.
    let mut by_entity: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        by_entity.entry(r.2).or_default().push(i);
    }
    let blocks: Vec<BTreeSet<String>> = records
        .iter()
        .map(|r| {
            fuzzy::blocking_values(f, &rules.fuzzy_fields(&r.1))
                .into_iter()
                .collect()
        })
        .collect();
    let (mut true_pairs, mut reached) = (0usize, 0usize);
    for members in by_entity.values() {
        for (x, &a) in members.iter().enumerate() {
            for &b in &members[x + 1..] {
                true_pairs += 1;
                reached += usize::from(!blocks[a].is_disjoint(&blocks[b]));
            }
        }
    }
    let mut h = Histogram::<u64>::new(3).unwrap();
    let mut compared = 0usize;
    let started = Instant::now();
    let mut txn = Txn::new(store);
    for (n, (e, payload, _, _)) in records.iter().enumerate() {
        let s = Instant::now();
        let r = resolve_event(rules, &mut txn, e, payload).expect("resolves");
        h.record((s.elapsed().as_nanos() as u64).max(1)).unwrap();
        compared += r.fuzzy_compared;
        if n % 500 == 499 {
            store
                .write(std::mem::replace(&mut txn, Txn::new(store)).into_batch())
                .expect("commit");
        }
    }
    store.write(txn.into_batch()).expect("commit");
    let took = started.elapsed();
    let txn = Txn::new(store);
    let assigned: Vec<(usize, String)> = records
        .iter()
        .map(|(_, _, entity, id)| {
            let p = graph::lookup(&txn, id).expect("lookup").unwrap_or_default();
            (*entity, p)
        })
        .collect();
    let q = synth::quality(&assigned);
    let params = fuzzy::model::current(&txn, f).expect("params");
    println!(
        "identity linkage: {} ({} records)",
        input.display(),
        records.len()
    );
    println!(
        "  pairwise precision {:.5}  recall {:.5}  F1 {:.5}  (true pairs {true_pairs}, profiles {})",
        q.precision, q.recall, q.f1, q.profiles
    );
    println!(
        "  blocking: pairs completeness {:.4} ({reached} of {true_pairs} true pairs share a key); {:.1} candidates scored per record",
        reached as f64 / true_pairs.max(1) as f64,
        compared as f64 / records.len() as f64
    );
    println!(
        "  matching per record p50 {:.1} us  p99 {:.1} us; {:.2} s; parameters version {}",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        took.as_secs_f64(),
        params.version
    );
    if explain {
        let acc = fuzzy::model::accumulators(&txn).expect("accumulators");
        print_weights(f, &params);
        let mut shown = (0, 0);
        for members in by_entity.values() {
            for (x, &a) in members.iter().enumerate() {
                for &b in &members[x + 1..] {
                    if assigned[a].1 != assigned[b].1 && shown.0 < 12 {
                        shown.0 += 1;
                        let (fa, fb) = (
                            rules.fuzzy_fields(&records[a].1),
                            rules.fuzzy_fields(&records[b].1),
                        );
                        let e = fuzzy::model::score(&txn, f, &params, &acc, &fa, &fb, f.threshold)
                            .expect("scored");
                        println!(
                            "  missed (blocked together: {}): {fa:?}\n       {fb:?}\n    {:.4} {:?} veto {:?}",
                            !blocks[a].is_disjoint(&blocks[b]),
                            e.probability,
                            e.fields
                                .iter()
                                .map(|x| format!("{} {} {}", x.field, x.level, x.weight))
                                .collect::<Vec<_>>(),
                            e.veto
                        );
                    }
                }
            }
        }
        let mut by_profile: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, (_, p)) in assigned.iter().enumerate() {
            by_profile.entry(p.as_str()).or_default().push(i);
        }
        for members in by_profile.values() {
            for (x, &a) in members.iter().enumerate() {
                for &b in &members[x + 1..] {
                    if records[a].2 != records[b].2 && shown.1 < 12 {
                        shown.1 += 1;
                        println!(
                            "  wrong merge: {:?}\n               {:?}",
                            rules.fuzzy_fields(&records[a].1),
                            rules.fuzzy_fields(&records[b].1)
                        );
                    }
                }
            }
        }
    }
}

/// Each field's learned weight per level, in bits.
fn print_weights(f: &tessera_identity::rules::Fuzzy, params: &fuzzy::model::Params) {
    for field in &f.fields {
        let w: Vec<String> = params
            .weights(&field.name)
            .iter()
            .map(|w| format!("{w:.1}"))
            .collect();
        println!(
            "  weights v{} {}: [{}]",
            params.version,
            field.name,
            w.join(", ")
        );
    }
}
