//! `tessera-load bench`: the cost per event of a platform that runs as a user runs it
//! (the services as separate processes, started by `deploy/run.sh`), measured from
//! outside. It sends a realistic mix over HTTP batches, waits until every service has
//! consumed and committed all of it, and reads each process's CPU time from
//! `/proc/<pid>/stat` before and after.
//!
//! The mix, for `--people` people (the same people every run, so a second run updates
//! the profiles the first created): 15 % `identify` with email, phone and names, 30 %
//! `page`, 55 % `track` of three kinds (`Product Viewed`, `Product Added`, `Order
//! Completed`). A person is drawn at random for each event.
//!
//! `--latency`: instead of the mix, one `Order Completed` for a new person per event
//! (each enters `buyers` and makes an `add` record for `email-demo`), and the time from
//! ingest accepting it (its `received_at`) to the activation record's Kafka create time.
//! With `--known`, each buyer was seen before (a `page` with the same userId and email,
//! consumed by every service before the orders are sent): the order still makes them
//! enter `buyers`, but no subject key is made on its way.
//! Then the same rate through a chain of four plain librdkafka relays on the same broker
//! (`acks=all`, idempotent, linger 0, fetch wait 2 ms, sends pipelined): Kafka's own
//! floor for four hops.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};

use tessera_common::records::Activation;

use crate::report;

#[derive(clap::Args)]
pub struct Bench {
    /// Events per second.
    #[arg(long, default_value_t = 3000)]
    rate: u64,
    /// How long the measured part lasts.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Unmeasured traffic first (same mix and rate), then a wait until it is consumed.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    #[arg(long, default_value_t = 20_000)]
    people: u64,
    /// Events per `POST /v1/batch`.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    ingest: String,
    #[arg(long, default_value = "demo-write-key")]
    write_key: String,
    /// The topics' and groups' prefix of the running platform.
    #[arg(long, default_value = "tessera.")]
    prefix: String,
    /// Measure the latency of new buyers instead of the mix's cost.
    #[arg(long)]
    latency: bool,
    /// With `--latency`: buyers seen before (a page view each, sent and consumed before
    /// the measured orders), so no subject key is made on the measured path.
    #[arg(long, requires = "latency")]
    known: bool,
}

const SERVICES: [&str; 4] = ["ingest", "identity", "profiles", "activation"];

pub async fn bench(b: Bench) -> anyhow::Result<()> {
    let pids = processes()?;
    if b.latency {
        return latency(&b).await;
    }
    println!(
        "bench: {} events/s for {} s ({} s warm-up), {} people, {} per request",
        b.rate, b.seconds, b.warmup, b.people, b.batch
    );
    let mut rng = StdRng::seed_from_u64(7);
    if b.warmup > 0 {
        send(&b, b.warmup, &mut |_| mix(&mut rng, b.people)).await?;
        drained(&b.prefix, Duration::from_secs(300)).await?;
    }
    let before = cpu(&pids);
    let started = Instant::now();
    let sent = send(&b, b.seconds, &mut |_| mix(&mut rng, b.people)).await?;
    let drain = drained(&b.prefix, Duration::from_secs(600)).await?;
    let after = cpu(&pids);
    let wall = started.elapsed();
    println!(
        "{} events accepted ({} requests refused) in {:.1} s; consumed by every service {:.1} s after the last was sent",
        sent.accepted,
        sent.refused,
        wall.as_secs_f64(),
        drain.as_secs_f64()
    );
    report(
        "http request (send → 200)",
        &sent.http,
        sent.requests,
        sent.wall,
    );
    println!("| process | CPU s | µs per event | cores busy |");
    println!("| --- | ---: | ---: | ---: |");
    let mut summed = 0.0;
    for name in pids.keys() {
        let secs = after[name] - before[name];
        let per_event = secs * 1e6 / sent.accepted.max(1) as f64;
        if SERVICES.contains(&name.as_str()) {
            summed += per_event;
        }
        println!(
            "| {name} | {secs:.2} | {per_event:.0} | {:.2} |",
            secs / wall.as_secs_f64()
        );
    }
    println!("| **four services, summed** | | **{summed:.0}** | |");
    Ok(())
}

/// One event of the mix for a person drawn from `people`.
fn mix(rng: &mut StdRng, people: u64) -> Value {
    let i = rng.random_range(0..people);
    let user = format!("bench-user-{i}");
    let anonymous = format!("bench-anon-{i}");
    let roll: f64 = rng.random();
    if roll < 0.15 {
        let (first, last) = name(i);
        return json!({"type": "identify", "userId": user, "anonymousId": anonymous,
            "traits": {"email": format!("{}.{}.{i}@example.com", first.to_lowercase(), last.to_lowercase()),
                       "phone": phone(i), "first_name": first, "last_name": last}});
    }
    if roll < 0.45 {
        let page = rng.random_range(0..50);
        return json!({"type": "page", "anonymousId": anonymous, "name": format!("page {page}"),
            "properties": {"path": format!("/p/{page}"), "referrer": "https://search.example/"}});
    }
    let product = rng.random_range(0..500);
    let price = 5 + product % 95;
    let (event, props) = match rng.random_range(0..10) {
        0..5 => (
            "Product Viewed",
            json!({"product_id": format!("sku-{product}"), "price": price}),
        ),
        5..8 => (
            "Product Added",
            json!({"product_id": format!("sku-{product}"), "price": price, "quantity": 1}),
        ),
        _ => (
            "Order Completed",
            json!({"order_id": uuid::Uuid::new_v4().to_string(), "total": price, "revenue": price, "currency": "USD"}),
        ),
    };
    json!({"type": "track", "userId": user, "anonymousId": anonymous, "event": event, "properties": props})
}

/// Person `i`'s first and last name: made of syllables, 400 first names and 8,000 last
/// names drawn by a hash of `i`, so namesakes exist but a name is not a crowd.
fn name(i: u64) -> (String, String) {
    const SYLLABLES: [&str; 20] = [
        "an", "be", "ca", "da", "el", "fi", "go", "ha", "is", "jo", "ka", "lu", "ma", "ne", "or",
        "pa", "ri", "su", "to", "vi",
    ];
    let mut h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D_4C95_7F2D;
    let mut word = |n: usize| {
        let mut w = String::new();
        for _ in 0..n {
            w.push_str(SYLLABLES[(h % 20) as usize]);
            h /= 20;
        }
        let mut c = w.chars();
        c.next()
            .map(|f| f.to_uppercase().chain(c).collect::<String>())
            .unwrap_or_default()
    };
    let first = word(2);
    (first, word(3))
}

/// Person `i`'s phone number: valid (so identity keeps it), one per person.
fn phone(i: u64) -> String {
    const AREAS: [u32; 8] = [415, 212, 646, 718, 917, 310, 312, 617];
    format!("+1{}555{:04}", AREAS[(i / 10_000 % 8) as usize], i % 10_000)
}

struct Sent {
    accepted: u64,
    refused: u64,
    requests: u64,
    http: Histogram<u64>,
    wall: Duration,
}

/// Sends `b.rate` events a second for `seconds`, `b.batch` per request, each made by
/// `event(n)`, paced from the start (a slow answer does not slow the sending).
async fn send(
    b: &Bench,
    seconds: u64,
    event: &mut dyn FnMut(u64) -> Value,
) -> anyhow::Result<Sent> {
    let client = reqwest::Client::new();
    let requests = (b.rate * seconds).div_ceil(b.batch as u64);
    let interval = Duration::from_secs_f64(b.batch as f64 / b.rate as f64);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut n = 0;
    for r in 0..requests {
        tokio::time::sleep_until((started + interval.mul_f64(r as f64)).into()).await;
        let batch: Vec<Value> = (0..b.batch)
            .map(|_| {
                n += 1;
                event(n)
            })
            .collect();
        let (c, url, key) = (
            client.clone(),
            format!("{}/v1/batch", b.ingest),
            b.write_key.clone(),
        );
        let count = batch.len() as u64;
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = c
                .post(url)
                .basic_auth(key, Some(""))
                .json(&json!({ "batch": batch }))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            (ok, count, t.elapsed())
        }));
    }
    let mut sent = Sent {
        accepted: 0,
        refused: 0,
        requests,
        http: Histogram::new(3)?,
        wall: Duration::ZERO,
    };
    for t in tasks {
        let (ok, count, took) = t.await?;
        if ok {
            sent.accepted += count;
            sent.http.record(took.as_micros() as u64)?;
        } else {
            sent.refused += 1;
        }
    }
    sent.wall = started.elapsed();
    Ok(sent)
}

/// The platform's processes by name (the four services, the broker, this program).
fn processes() -> anyhow::Result<BTreeMap<String, u32>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let program = args[0].rsplit('/').next().unwrap_or_default();
        if let Some(service) = program.strip_prefix("tessera-")
            && SERVICES.contains(&service)
            && found.insert(service.to_string(), pid).is_some()
        {
            anyhow::bail!("more than one tessera-{service} runs: measure one platform at a time");
        }
        if program == "java" && args.iter().any(|a| a == "kafka.Kafka") {
            found.insert("broker".into(), pid);
        }
    }
    for s in SERVICES {
        anyhow::ensure!(
            found.contains_key(s),
            "tessera-{s} is not running: start the platform with deploy/run.sh first"
        );
    }
    found.insert("load generator".into(), std::process::id());
    Ok(found)
}

/// CPU seconds (user and system) each process has used so far.
fn cpu(pids: &BTreeMap<String, u32>) -> BTreeMap<String, f64> {
    let tick = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0);
    pids.iter()
        .map(|(name, pid)| {
            let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // After the command's name in parentheses: state is field 3, utime
                    // and stime are fields 14 and 15.
                    let rest = s.rsplit_once(')')?.1;
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
                })
                .unwrap_or(0.0);
            (name.clone(), ticks / tick)
        })
        .collect()
}

/// Waits until each service's group has committed every record of its main input (what
/// the previous stage produced); returns how long that took.
async fn drained(prefix: &str, within: Duration) -> anyhow::Result<Duration> {
    let stages = [
        ("identity", "events.ingested"),
        ("profiles", "events.resolved"),
        ("activation", "segments.membership"),
    ];
    let started = Instant::now();
    let prefix = prefix.to_string();
    tokio::task::spawn_blocking(move || {
        let mut behind = Vec::new();
        while started.elapsed() < within {
            behind.clear();
            for (service, topic) in stages {
                let topic = format!("{prefix}{topic}");
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", tessera_tests::bootstrap())
                    .set("group.id", format!("{prefix}{service}"))
                    .create()?;
                let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
                let mut tpl = TopicPartitionList::new();
                for p in md.topics()[0].partitions() {
                    tpl.add_partition(&topic, p.id());
                }
                let committed = c.committed_offsets(tpl, Duration::from_secs(10))?;
                let mut lag = 0;
                for e in committed.elements() {
                    let (_, high) =
                        c.fetch_watermarks(&topic, e.partition(), Duration::from_secs(10))?;
                    let at = match e.offset() {
                        Offset::Offset(o) => o,
                        _ => 0,
                    };
                    lag += (high - at).max(0);
                }
                if lag > 0 {
                    behind.push(format!("{service} {lag}"));
                }
            }
            if behind.is_empty() {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        anyhow::bail!("not consumed within {within:?}: {behind:?} records behind")
    })
    .await?
}

/// New buyers at `b.rate` for `b.seconds`: accept → activation record (Kafka create
/// time), then Kafka's own floor on the same broker.
async fn latency(b: &Bench) -> anyhow::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    if b.known {
        let visitor = |n: u64| {
            let user = format!("bench-{run}-{n}");
            json!({"type": "page", "userId": user, "name": "Home",
                   "context": {"traits": {"email": format!("{user}@example.com")}}})
        };
        send(b, b.seconds, &mut |n| visitor(n)).await?;
        drained(&b.prefix, Duration::from_secs(300)).await?;
    }
    let topic = format!("{}activation.email-demo", b.prefix);
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", tessera_tests::bootstrap())
        .set("group.id", format!("bench-{}", uuid::Uuid::new_v4()))
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let md = reader.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(&topic, p.id(), Offset::End)?;
    }
    reader.assign(&tpl)?;
    let buyer = |n: u64| {
        let user = format!("bench-{run}-{n}");
        json!({"type": "track", "userId": user, "event": "Order Completed",
               "properties": {"total": 20},
               "context": {"traits": {"email": format!("{user}@example.com")}}})
    };
    let expected = b.rate * b.seconds;
    let read = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new(3)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while h.len() < expected && Instant::now() < deadline {
            let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), reader.recv()).await
            else {
                continue;
            };
            let (Some(created), Some(payload)) = (m.timestamp().to_millis(), m.payload()) else {
                continue;
            };
            if let Ok(a) = Activation::decode(payload)
                && a.action == "add"
            {
                h.record(((created - a.received_at).max(0) * 1000) as u64)?;
            }
        }
        anyhow::Ok(h)
    });
    let sent = send(b, b.seconds, &mut |n| buyer(n)).await?;
    let h = read.await??;
    println!(
        "latency: {} {} buyers/s for {} s, {} per request; {} accepted, {} requests refused",
        b.rate,
        if b.known { "known" } else { "new" },
        b.seconds,
        b.batch,
        sent.accepted,
        sent.refused
    );
    report(
        "HTTP accept → activation record (Kafka create time, ms resolution)",
        &h,
        sent.accepted,
        sent.wall,
    );
    let floor = crate::relays(b.rate, b.seconds, 2, 4, true).await?;
    report(
        "Kafka floor: four pipelined relays, linger 0, fetch wait 2 ms",
        &floor.0,
        b.rate * b.seconds,
        floor.1,
    );
    let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64;
    println!(
        "p50 {:.1}×, p99 {:.1}× the relay chain",
        q(&h, 0.5) / q(&floor.0, 0.5).max(1.0),
        q(&h, 0.99) / q(&floor.0, 0.99).max(1.0)
    );
    Ok(())
}
