//! tessera-load: a load program that prints latency numbers (BENCHMARKS.md).
//!
//! `tessera-load pipeline --rate 200 --seconds 20` starts the four services in-process on
//! the broker at KAFKA_BOOTSTRAP (or one it starts), sends `track "Order Completed"` events
//! for new users over HTTP at the given rate, and measures, for each activation record, the
//! time from ingest accepting the event (its `received_at`) to the record being read from
//! the destination topic.
//!
//! `tessera-load null --rate 200 --seconds 20 --hops 4` measures the same number of
//! Kafka hops with plain rdkafka consume → produce relays and no Tessera logic, with the
//! same producer and consumer settings: the floor the pipeline is compared with.

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use tessera_common::config::Config;
use tessera_common::kafka::{consumer_config, producer_config};
use tessera_common::records::{Activation, AvroRecord};
use tessera_tests::{Platform, WRITE_KEY, bootstrap};

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
        /// Events per HTTP request (1 = /v1/track, more = /v1/batch).
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Plain Kafka consume → produce relays: the floor.
    Null {
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 4)]
        hops: usize,
    },
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn report(name: &str, h: &Histogram<u64>, expected: u64, wall: Duration) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name}: {} of {expected} records in {:.1} s ({:.0}/s); latency ms p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
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
            batch,
        } => pipeline(rate, seconds, batch).await,
        Mode::Null {
            rate,
            seconds,
            hops,
        } => null(rate, seconds, hops).await,
    }
}

async fn pipeline(rate: u64, seconds: u64, batch: usize) -> anyhow::Result<()> {
    let platform = Platform::start().await;
    let topic = platform.topics().activation("email-demo");
    let total = rate * seconds;
    let reader = tokio::spawn(read_latencies(
        topic,
        total,
        Duration::from_secs(seconds + 30),
        |payload| {
            let a = Activation::from_avro(payload).ok()?;
            Some(now_us() - a.received_at * 1000)
        },
    ));
    let client = reqwest::Client::new();
    let mut http_h = Histogram::<u64>::new(3)?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let requests = total.div_ceil(batch as u64);
    let interval = Duration::from_secs_f64(batch as f64 / rate as f64);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for r in 0..requests {
        let due = started + interval.mul_f64(r as f64);
        tokio::time::sleep_until(due.into()).await;
        let events: Vec<_> = (0..batch as u64)
            .map(|i| json!({"type": "track", "userId": format!("{run}-{}", r * batch as u64 + i), "event": "Order Completed"}))
            .collect();
        let (url, body) = if batch == 1 {
            (format!("{}/v1/track", platform.ingest), events[0].clone())
        } else {
            (
                format!("{}/v1/batch", platform.ingest),
                json!({"batch": events}),
            )
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
    let mut rejected = 0;
    for t in tasks {
        let (ok, took) = t.await?;
        if ok {
            http_h.record(took.as_micros() as u64)?;
        } else {
            rejected += 1;
        }
    }
    let (h, wall) = reader.await??;
    println!(
        "pipeline: rate {rate}/s for {seconds} s, {batch} event(s) per request, {rejected} requests not answered 200"
    );
    report(
        "http request (send → 200)",
        &http_h,
        requests,
        started.elapsed(),
    );
    report("HTTP accept → activation record", &h, total, wall);
    platform.stop().await;
    Ok(())
}

/// Reads `topic` until `expected` latencies are in or `timeout` passes.
async fn read_latencies(
    topic: String,
    expected: u64,
    timeout: Duration,
    latency_us: impl Fn(&[u8]) -> Option<i64> + Send + 'static,
) -> anyhow::Result<(Histogram<u64>, Duration)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", format!("load-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let mut h = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    while h.len() < expected && started.elapsed() < timeout {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
            && let Some(us) = latency_us(m.payload().unwrap_or_default())
        {
            h.record(us.max(0) as u64)?;
        }
    }
    Ok((h, started.elapsed()))
}

async fn null(rate: u64, seconds: u64, hops: usize) -> anyhow::Result<()> {
    let cfg = Config::load_without_env(None)?;
    let mut kafka = cfg.kafka.clone();
    kafka.bootstrap = bootstrap().to_string();
    let prefix = format!("null-{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topics: Vec<String> = (0..=hops).map(|i| format!("{prefix}hop{i}")).collect();
    let topics_cfg = tessera_common::config::TopicsConfig {
        prefix: prefix.clone(),
        partitions: 6,
        ..cfg.topics.clone()
    };
    let names: Vec<_> = topics
        .iter()
        .map(|t| (t.clone(), tessera_common::kafka::TopicKind::Events))
        .collect();
    tessera_common::kafka::ensure_topics(&kafka, &topics_cfg, &names).await?;

    // Relays hop i → i+1, each waiting for the produce acknowledgement like the services.
    for i in 0..hops {
        let consumer: StreamConsumer =
            consumer_config(&kafka, "null-relay", &format!("{prefix}relay{i}")).create()?;
        consumer.subscribe(&[&topics[i]])?;
        let producer: FutureProducer = producer_config(&kafka, "null-relay").create()?;
        let out = topics[i + 1].clone();
        tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else {
                    continue;
                };
                let rec = FutureRecord::to(&out)
                    .key(m.key().unwrap_or_default())
                    .payload(m.payload().unwrap_or_default());
                let _ = producer.send(rec, Duration::from_secs(10)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // let the relays join their groups
    let total = rate * seconds;
    let reader = tokio::spawn(read_latencies(
        topics[hops].clone(),
        total,
        Duration::from_secs(seconds + 30),
        |p| {
            std::str::from_utf8(p)
                .ok()?
                .parse::<i64>()
                .ok()
                .map(|sent| now_us() - sent)
        },
    ));
    let producer: FutureProducer = producer_config(&kafka, "null-source").create()?;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until((started + interval.mul_f64(i as f64)).into()).await;
        let p = producer.clone();
        let first = topics[0].clone();
        pending.push(tokio::spawn(async move {
            let payload = now_us().to_string();
            let key = i.to_string();
            p.send(
                FutureRecord::to(&first).key(&key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .is_ok()
        }));
    }
    for p in pending {
        p.await?;
    }
    let (h, wall) = reader.await??;
    println!(
        "null pipeline: rate {rate}/s for {seconds} s, {hops} consume→produce hops, linger {} ms, fetch wait {} ms",
        kafka.linger_ms, kafka.fetch_wait_max_ms
    );
    report("produce → last hop consumed", &h, total, wall);
    Ok(())
}
