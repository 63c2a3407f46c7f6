//! tessera-load: a load program that prints latency numbers (BENCHMARKS.md).
//!
//! `tessera-load pipeline --rate 200 --seconds 20` starts the four services in-process on
//! the broker at KAFKA_BOOTSTRAP (or one it starts), sends `track "Order Completed"` events
//! for new users over HTTP at the given rate, and measures, for each activation record, the
//! time from ingest accepting the event (its `received_at`) to the record being read from
//! the destination topic. It then reports the profiles stage alone: from each resolved
//! record's Kafka create time to its membership record's.
//!
//! `tessera-load null --rate 200 --seconds 20 --hops 4` measures the same number of
//! Kafka hops with plain rdkafka consume → produce relays and no Tessera logic, with the
//! same producer and consumer settings: the floor the pipeline is compared with.
//!
//! `tessera-load overload --concurrency 256 --seconds 10 --batch 50` pushes ingest beyond
//! its capacity from many clients at once (no pacing) and reports how it sheds load:
//! answers by status, whether every 429/503 carried `Retry-After`, the process's peak
//! memory, and whether every event answered 200 is on `events.ingested`. With
//! `--ingest-process` the load goes to an ingest of its own process, whose memory is then
//! measured alone.
//!
//! `tessera-load live --people 20 --events 500` measures what a screen following a profile
//! sees (the console's 360 view): for each event, from sending it over HTTP to the
//! `changed` event on the profile's change stream (`/v1/profiles/{id}/changes`), one
//! event at a time, each for one of `--people` followed profiles.
//!
//! `tessera-load bench --rate 3000 --seconds 30` measures a platform started by
//! `deploy/run.sh` (the services as separate processes) from outside: the CPU each
//! process spent per event of a realistic mix, and with `--latency` the time from accept
//! to activation of new buyers beside four pipelined relays (`bench.rs`).
//!
//! Both pipeline and null first send `--warmup` seconds of traffic that is not measured (page views, which
//! cause no activation; records the null reader ignores).

mod bench;

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures::FutureExt;
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

use tessera_common::config::Config;
use tessera_common::kafka::{TopicKind, consumer_config, ensure_topics, producer_config};
use tessera_common::records::{
    Activation, AvroRecord, IngestedEvent, MembershipChange, ResolvedEvent,
};
use tessera_tests::{Platform, ServiceProcess, WRITE_KEY, bootstrap, open_record, wait_ready};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// HTTP → ingest → identity → profiles → activation, measured end to end.
    Pipeline {
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 5)]
        warmup: u64,
        /// Events per HTTP request (1 = /v1/track, more = /v1/batch).
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Ingest pushed beyond capacity: load shedding, memory, nothing acknowledged lost.
    Overload {
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// Overrides `ingest.max_concurrent_requests`.
        #[arg(long)]
        max_in_flight: Option<usize>,
        /// Load an ingest of its own process (the release binary beside this one), so its
        /// memory is measured alone.
        #[arg(long)]
        ingest_process: bool,
        /// Every event from a visitor never seen before (its own anonymousId, no
        /// userId): each needs a subject key of its own.
        #[arg(long)]
        new_visitors: bool,
        /// Overrides `privacy.key_cache_subjects` (the subjects' keys held in memory).
        #[arg(long)]
        key_cache: Option<usize>,
    },
    /// From an HTTP event to the `changed` on its profile's change stream.
    Live {
        #[arg(long, default_value_t = 20)]
        people: usize,
        #[arg(long, default_value_t = 500)]
        events: usize,
    },
    /// Plain Kafka consume → produce relays: the floor.
    Null {
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 5)]
        warmup: u64,
        #[arg(long, default_value_t = 4)]
        hops: usize,
        /// Relays tuned for latency (linger 0, fetch wait 2 ms) that go on consuming
        /// while their sends are acknowledged.
        #[arg(long)]
        pipelined: bool,
    },
    /// A running platform's CPU per event and latency, measured from outside.
    Bench(bench::Bench),
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn report(name: &str, h: &Histogram<u64>, expected: u64, wall: Duration) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name}: {} of {expected} in {:.1} s ({:.0}/s); latency ms p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        h.len(),
        wall.as_secs_f64(),
        h.len() as f64 / wall.as_secs_f64(),
        ms(0.50),
        ms(0.90),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    match Args::parse().mode {
        Mode::Pipeline {
            rate,
            seconds,
            warmup,
            batch,
        } => pipeline(rate, seconds, warmup, batch).await,
        Mode::Null {
            rate,
            seconds,
            warmup,
            hops,
            pipelined,
        } => null(rate, seconds, warmup, hops, pipelined).await,
        Mode::Bench(b) => bench::bench(b).await,
        Mode::Live { people, events } => live(people, events).await,
        Mode::Overload {
            concurrency,
            seconds,
            batch,
            max_in_flight,
            ingest_process,
            new_visitors,
            key_cache,
        } => {
            overload(
                concurrency,
                seconds,
                batch,
                max_in_flight,
                ingest_process,
                new_visitors,
                key_cache,
            )
            .await
        }
    }
}

/// Sends `rate` events a second for `seconds` over HTTP, `batch` per request, each for a
/// new user. Returns the request latencies and how many requests were not answered 200.
async fn send_paced(
    ingest: &str,
    rate: u64,
    seconds: u64,
    batch: usize,
    event: &str,
) -> anyhow::Result<(Histogram<u64>, u64, Duration)> {
    let client = reqwest::Client::new();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let requests = (rate * seconds).div_ceil(batch as u64);
    let interval = Duration::from_secs_f64(batch as f64 / rate as f64);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for r in 0..requests {
        tokio::time::sleep_until((started + interval.mul_f64(r as f64)).into()).await;
        let events: Vec<Value> = (0..batch as u64)
            .map(|i| {
                let user = format!("{run}-{}", r * batch as u64 + i);
                // An email: the demo email destination needs an address to send to.
                json!({"type": "track", "userId": user, "event": event,
                       "context": {"traits": {"email": format!("{user}@example.com")}}})
            })
            .collect();
        let (url, body) = if batch == 1 {
            (format!("{ingest}/v1/track"), events[0].clone())
        } else {
            (format!("{ingest}/v1/batch"), json!({ "batch": events }))
        };
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = c
                .post(url)
                .basic_auth(WRITE_KEY, Some(""))
                .json(&body)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            (ok, t.elapsed())
        }));
    }
    let mut h = Histogram::<u64>::new(3)?;
    let mut rejected = 0;
    for t in tasks {
        let (ok, took) = t.await?;
        if ok {
            h.record(took.as_micros() as u64)?;
        } else {
            rejected += 1;
        }
    }
    Ok((h, rejected, started.elapsed()))
}

async fn pipeline(rate: u64, seconds: u64, warmup: u64, batch: usize) -> anyhow::Result<()> {
    let platform = Platform::start().await;
    send_paced(&platform.ingest, rate, warmup, batch, "Page Viewed").await?;
    let total = rate * seconds;
    let reader = tokio::spawn(read_latencies(
        platform.topics().activation("email-demo"),
        total,
        Duration::from_secs(seconds + 30),
        |payload, _| {
            Activation::decode(payload)
                .ok()
                .map(|a| now_us() - a.received_at * 1000)
        },
    ));
    let (http_h, rejected, wall) =
        send_paced(&platform.ingest, rate, seconds, batch, "Order Completed").await?;
    let (h, read_wall) = reader.await??;
    println!(
        "pipeline: {rate} events/s for {seconds} s after {warmup} s of warm-up, {batch} event(s) per request, {rejected} requests not answered 200"
    );
    report(
        "http request (send → 200)",
        &http_h,
        total.div_ceil(batch as u64),
        wall,
    );
    report("HTTP accept → activation record", &h, total, read_wall);
    let stage = profiles_stage(&platform, total).await?;
    report(
        "resolved event → membership record (profiles stage, Kafka create times, ms resolution)",
        &stage,
        total,
        read_wall,
    );
    platform.stop().await;
    Ok(())
}

/// The profiles stage alone: for each measured profile, from the create time of its
/// `Order Completed` resolved record (produced by identity) to that of its `buyers`
/// enter record (produced by profiles): one Kafka hop, the profile update and segment
/// evaluation. Both times come from this machine's clock, in milliseconds.
async fn profiles_stage(platform: &Platform, expected: u64) -> anyhow::Result<Histogram<u64>> {
    use std::collections::HashMap;
    let topics = platform.topics();
    let read = |topic: String| async move {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", format!("load-{}", uuid::Uuid::new_v4()))
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[&topic])?;
        let mut out: Vec<(i64, Vec<u8>)> = Vec::new();
        // Until the topic has been quiet for two seconds.
        while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
            let ts = m.timestamp().to_millis().unwrap_or(0);
            out.push((ts, m.payload().unwrap_or_default().to_vec()));
        }
        anyhow::Ok(out)
    };
    let mut sent: HashMap<String, i64> = HashMap::new();
    for (ts, payload) in read(topics.resolved()).await? {
        let payload = open_record(&topics.resolved(), &payload).await;
        if let Ok(r) = ResolvedEvent::from_avro(&payload)
            && r.event.event.as_deref() == Some("Order Completed")
        {
            sent.insert(r.profile_id, ts);
        }
    }
    let mut h = Histogram::<u64>::new(3)?;
    for (ts, payload) in read(topics.membership()).await? {
        let payload = open_record(&topics.membership(), &payload).await;
        if let Ok(m) = MembershipChange::from_avro(&payload)
            && m.segment_id == "buyers"
            && m.change == "enter"
            && let Some(from) = sent.get(&m.profile_id)
        {
            // Microseconds, like the other histograms.
            h.record(((ts - from).max(0) * 1000) as u64)?;
        }
    }
    if h.len() < expected {
        println!("profiles stage: {} of {expected} profiles matched", h.len());
    }
    Ok(h)
}

/// Reads `topic` from the beginning until `expected` latencies are in or `timeout` passes.
async fn read_latencies(
    topic: String,
    expected: u64,
    timeout: Duration,
    latency_us: impl Fn(&[u8], Option<i64>) -> Option<i64> + Send + 'static,
) -> anyhow::Result<(Histogram<u64>, Duration)> {
    let consumer = reader()?;
    consumer.subscribe(&[&topic])?;
    let mut h = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    while h.len() < expected && started.elapsed() < timeout {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
            && let Some(us) = latency_us(m.payload().unwrap_or_default(), m.timestamp().to_millis())
        {
            h.record(us.max(0) as u64)?;
        }
    }
    Ok((h, started.elapsed()))
}

async fn null(
    rate: u64,
    seconds: u64,
    warmup: u64,
    hops: usize,
    pipelined: bool,
) -> anyhow::Result<()> {
    let (h, wall) = relays(rate, seconds, warmup, hops, pipelined).await?;
    let kafka = relay_settings(pipelined);
    println!(
        "null pipeline: {rate} records/s for {seconds} s after {warmup} s of warm-up, {hops} consume→produce hops, linger {} ms, fetch wait {} ms, {}",
        kafka.linger_ms,
        kafka.fetch_wait_max_ms,
        if pipelined {
            "sends pipelined"
        } else {
            "each batch's acknowledgements awaited"
        }
    );
    report("produce → last hop consumed", &h, rate * seconds, wall);
    Ok(())
}

/// The services' Kafka settings, or (`pipelined`) those of a relay tuned for latency:
/// linger 0, fetch wait 2 ms.
fn relay_settings(pipelined: bool) -> tessera_common::config::KafkaConfig {
    let mut kafka = Config::demo().kafka;
    kafka.bootstrap = bootstrap().to_string();
    if pipelined {
        kafka.linger_ms = 0;
        kafka.fetch_wait_max_ms = 2;
    }
    kafka
}

/// A chain of `hops` plain rdkafka consume → produce relays on fresh topics, `rate`
/// records a second for `seconds` (after `warmup`): the latency from producing to
/// reading the last hop. A relay takes what is ready and sends it; `pipelined`, it goes
/// on consuming while the acknowledgements come (acks=all and idempotence keep order and
/// durability); otherwise it waits for them, as the services do.
pub(crate) async fn relays(
    rate: u64,
    seconds: u64,
    warmup: u64,
    hops: usize,
    pipelined: bool,
) -> anyhow::Result<(Histogram<u64>, Duration)> {
    let cfg = Config::demo();
    let kafka = relay_settings(pipelined);
    let prefix = format!("null-{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topics: Vec<String> = (0..=hops).map(|i| format!("{prefix}hop{i}")).collect();
    let topics_cfg = tessera_common::config::TopicsConfig {
        prefix: prefix.clone(),
        ..cfg.topics.clone()
    };
    let names: Vec<_> = topics
        .iter()
        .map(|t| (t.clone(), TopicKind::Events))
        .collect();
    ensure_topics(&kafka, &topics_cfg, &names).await?;

    for i in 0..hops {
        let consumer: StreamConsumer =
            consumer_config(&kafka, "null-relay", &format!("{prefix}relay{i}")).create()?;
        consumer.subscribe(&[&topics[i]])?;
        let producer: FutureProducer = producer_config(&kafka, "null-relay").create()?;
        let out = topics[i + 1].clone();
        tokio::spawn(async move {
            loop {
                // Like any sensible relay (and Tessera's runner): take what is ready,
                // send it all, wait for every acknowledgement.
                let Ok(first) = consumer.recv().await else {
                    continue;
                };
                let mut batch = vec![first.detach()];
                while batch.len() < 500 {
                    match consumer.recv().now_or_never() {
                        Some(Ok(m)) => batch.push(m.detach()),
                        _ => break,
                    }
                }
                let sends: Vec<_> = batch
                    .iter()
                    .map(|m| {
                        let rec = FutureRecord::to(&out)
                            .key(m.key().unwrap_or_default())
                            .payload(m.payload().unwrap_or_default());
                        producer.send_result(rec).map_err(|(e, _)| e)
                    })
                    .collect();
                let acks = futures::future::join_all(sends.into_iter().flatten());
                if pipelined {
                    tokio::spawn(acks);
                } else {
                    acks.await;
                }
            }
        });
    }
    let producer: FutureProducer = producer_config(&kafka, "null-source").create()?;
    let produce_paced = |seconds: u64, measured: bool| {
        let (producer, first) = (producer.clone(), topics[0].clone());
        async move {
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            let started = Instant::now();
            let mut pending = Vec::new();
            for i in 0..rate * seconds {
                tokio::time::sleep_until((started + interval.mul_f64(i as f64)).into()).await;
                let (p, first) = (producer.clone(), first.clone());
                pending.push(tokio::spawn(async move {
                    let payload = if measured {
                        now_us().to_string()
                    } else {
                        "warmup".to_string()
                    };
                    let key = i.to_string();
                    p.send(
                        FutureRecord::to(&first).key(&key).payload(&payload),
                        Duration::from_secs(10),
                    )
                    .await
                    .is_ok()
                }));
            }
            futures::future::join_all(pending).await;
        }
    };
    produce_paced(warmup, false).await;
    let total = rate * seconds;
    let reader = tokio::spawn(read_latencies(
        topics[hops].clone(),
        total,
        Duration::from_secs(seconds + 30),
        // To the last record's create time, as the platform's latency is measured.
        |p, created_ms| {
            let sent = std::str::from_utf8(p).ok()?.parse::<i64>().ok()?;
            Some(created_ms? * 1000 - sent)
        },
    ));
    produce_paced(seconds, true).await;
    reader.await?
}

/// A consumer in a fresh group that reads a topic from its beginning.
fn reader() -> anyhow::Result<StreamConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", format!("load-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .create()?)
}

/// This process's resident memory in MiB (services and load generator together).
/// The resident memory of process `pid`.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn overload(
    concurrency: usize,
    seconds: u64,
    batch: usize,
    max_in_flight: Option<usize>,
    ingest_process: bool,
    new_visitors: bool,
    key_cache: Option<usize>,
) -> anyhow::Result<()> {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::{Arc, Mutex};

    let platform = Platform::start_with(|c| {
        if let Some(m) = max_in_flight {
            c.ingest.max_concurrent_requests = m;
        }
        if let Some(k) = key_cache {
            c.privacy.key_cache_subjects = k;
        }
    })
    .await;
    // Ingest in a process of its own, beside the platform's (same topics).
    let dir = tempfile::tempdir()?;
    let own = if ingest_process {
        let mut c = platform.config.clone();
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        c.ingest.http_listen = l.local_addr()?.to_string();
        c.ingest.state_dir = dir.path().join("ingest");
        drop(l);
        let url = format!("http://{}", c.ingest.http_listen);
        let p = ServiceProcess::start("ingest", &c, dir.path());
        wait_ready(&url, Duration::from_secs(60)).await;
        Some((p, url))
    } else {
        None
    };
    let (ingest_url, pid, measured) = match &own {
        Some((p, url)) => (
            url.clone(),
            p.pid().expect("running"),
            "ingest process alone",
        ),
        None => (
            platform.ingest.clone(),
            std::process::id(),
            "whole process: broker client, four services, load generator",
        ),
    };
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let statuses: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let missing_retry_after = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rss_start = rss_mib(pid);
    let peak = Arc::new(Mutex::new(rss_start));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                let now = rss_mib(pid);
                {
                    let mut p = peak.lock().unwrap();
                    *p = p.max(now);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (client, url, run) = (
            client.clone(),
            format!("{ingest_url}/v1/batch"),
            run.clone(),
        );
        let (acked, statuses, missing) =
            (acked.clone(), statuses.clone(), missing_retry_after.clone());
        workers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let ids: Vec<String> = (0..batch).map(|i| format!("{run}-{w}-{seq}-{i}")).collect();
                seq += 1;
                let events: Vec<Value> = ids
                    .iter()
                    .map(|id| if new_visitors {
                        json!({"type": "track", "anonymousId": format!("v-{id}"), "event": "Page Viewed", "messageId": id})
                    } else {
                        json!({"type": "track", "userId": format!("{run}-u{w}"), "event": "Page Viewed", "messageId": id})
                    })
                    .collect();
                let sent = client
                    .post(&url)
                    .basic_auth(WRITE_KEY, Some(""))
                    .json(&json!({ "batch": events }))
                    .send()
                    .await;
                let status = match sent {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        if (s == 429 || s == 503) && r.headers().get("retry-after").is_none() {
                            missing.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        if s == 200 {
                            acked.lock().unwrap().extend(ids);
                        }
                        s.to_string()
                    }
                    Err(_) => "connection error".to_string(),
                };
                *statuses.lock().unwrap().entry(status).or_default() += 1;
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    sampler.await?;
    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    println!(
        "overload: {concurrency} clients for {seconds} s, {batch} events per request, ingest max_concurrent_requests {}",
        max_in_flight.unwrap_or(platform.config.ingest.max_concurrent_requests)
    );
    println!(
        "answers: {:?}; 429/503 without Retry-After: {}",
        statuses.lock().unwrap(),
        missing_retry_after.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!(
        "memory ({measured}): {:.0} MiB at start, peak {:.0} MiB",
        rss_start,
        *peak.lock().unwrap()
    );
    // Every event answered 200 is on events.ingested.
    let consumer = reader()?;
    consumer.subscribe(&[&platform.topics().ingested()])?;
    let mut found: HashSet<String> = HashSet::new();
    let started = Instant::now();
    while acked.iter().any(|id| !found.contains(id)) && started.elapsed() < Duration::from_secs(120)
    {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
            && let Ok(e) = IngestedEvent::from_avro(
                &open_record(
                    &platform.topics().ingested(),
                    m.payload().unwrap_or_default(),
                )
                .await,
            )
            && e.message_id.starts_with(&run)
        {
            found.insert(e.message_id);
        }
    }
    let lost = acked.iter().filter(|id| !found.contains(*id)).count();
    println!(
        "acknowledged (200) events: {}; on events.ingested: {}; lost: {lost}",
        acked.len(),
        acked.iter().filter(|id| found.contains(*id)).count()
    );
    platform.stop().await;
    anyhow::ensure!(lost == 0, "{lost} acknowledged events are missing");
    Ok(())
}

/// One event at a time, each to one of `people` followed profiles: the time from sending
/// it to its profile's `changed`.
async fn live(people: usize, events: usize) -> anyhow::Result<()> {
    let p = Platform::start().await;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let client = tessera_tests::http();
    let send = |user: String, event: &'static str| {
        let (client, url) = (client.clone(), format!("{}/v1/track", p.ingest));
        async move {
            let r = client
                .post(url)
                .basic_auth(WRITE_KEY, Some(""))
                .json(&json!({"userId": user, "event": event}))
                .send()
                .await?;
            anyhow::ensure!(r.status() == 200, "ingest answered {}", r.status());
            Ok::<_, anyhow::Error>(())
        }
    };
    let mut streams = Vec::new();
    for i in 0..people {
        let user = format!("live-{run}-{i}");
        send(user.clone(), "Signed Up").await?;
        let profile = p
            .wait_profile("user_id", &user, "the profile", |_| true)
            .await;
        let id = profile["profile_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let resp = client
            .get(format!("{}/v1/profiles/{id}/changes", p.profiles))
            .timeout(Duration::from_secs(3600))
            .send()
            .await?;
        let mut stream = Box::pin(resp.bytes_stream());
        let mut buf = String::new();
        tessera_tests::next_sse_event(&mut stream, &mut buf, "ready").await;
        streams.push((user, stream, buf));
    }
    let mut h = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    for n in 0..events {
        let (user, stream, buf) = &mut streams[n % people];
        let t0 = Instant::now();
        send(user.clone(), "Product Viewed").await?;
        tessera_tests::next_sse_event(stream, buf, "changed").await;
        h.record(t0.elapsed().as_micros() as u64)?;
    }
    report(
        "event → profile changed (SSE)",
        &h,
        events as u64,
        started.elapsed(),
    );
    p.stop().await;
    Ok(())
}
