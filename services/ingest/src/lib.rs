//! # tessera-ingest
//!
//! Takes Segment-spec events over HTTP ([`http`]) and from a raw Kafka topic
//! ([`raw`]), validates and normalises them ([`validate`]) and produces them to
//! `events.ingested`; refused input goes to `events.deadletter` with its reason.
//! Stateless: scale it as a Deployment.

pub mod body;
pub mod http;
pub mod metrics;
pub mod raw;
pub mod refusal;
pub mod validate;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use tessera_common::Result;
use tessera_common::admin::{self, Admin};
use tessera_common::config::Config;
use tessera_common::kafka::{self, Producer, TopicKind};
use tessera_common::runner::{self, OffsetStorage, RunnerSpec};
use tessera_common::service;
use tessera_common::store::{MemStore, RocksStore, SharedStore};
use tessera_common::suppressions::Suppressions;
use tessera_common::topics::Topics;

/// Reads the subject keys and the suppressed identifiers.
async fn load_privacy(
    config: &Config,
    topics: &Topics,
    producer: &Arc<Producer>,
    store: &SharedStore,
    shutdown: &CancellationToken,
) -> Result<http::Privacy> {
    if !config.topics.create {
        // Checked here, not before serving: ingest answers (503) without a broker.
        kafka::check_topic_settings(
            &config.kafka,
            &config.topics,
            &service::shared_topics(topics),
        )
        .await?;
    }
    let vault =
        service::follow_keys(config, "ingest", producer.clone(), store.clone(), shutdown).await?;
    let suppressions = Suppressions::follow(
        &config.kafka,
        &topics.suppressions(),
        "tessera-ingest",
        shutdown.clone(),
    )
    .await?;
    Ok(http::Privacy {
        vault,
        suppressions,
    })
}

/// Runs ingest on the configured address until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let listener = admin::bind(&config.ingest.http_listen).await?;
    run_with_listener(config, listener, shutdown).await
}

/// Runs ingest on an already bound listener (tests bind port 0).
pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let topics = Topics::new(&config.topics);
    // The subject keys ingest read (a cache of the keys topic).
    let dir = &config.ingest.state_dir;
    let store: SharedStore = Arc::new(RocksStore::open(dir)?);
    service::check_state_format(store.as_ref(), "ingest", dir)?;
    let mut needed = vec![
        (topics.raw(), TopicKind::Events),
        (topics.ingested(), TopicKind::Events),
        (topics.deadletter(), TopicKind::Events),
    ];
    needed.extend(service::shared_topics(&topics));
    kafka::ensure_topics(&config.kafka, &config.topics, &needed).await?;
    let producer = Arc::new(Producer::new(&config.kafka, "tessera-ingest")?);
    let admin = Admin::new();
    producer.register_metrics(&admin.registry, "ingest")?;
    let metrics = metrics::IngestMetrics::new(&admin);
    let limits = validate::Limits::from(&config.ingest);
    let privacy: Arc<OnceLock<http::Privacy>> = Arc::default();
    let state = Arc::new(http::AppState {
        producer: producer.clone(),
        topics: topics.clone(),
        metrics: metrics.clone(),
        limits: limits.clone(),
        max_request_bytes: config.ingest.max_request_bytes,
        max_batch_events: config.ingest.max_batch_events,
        body_timeout: std::time::Duration::from_millis(config.http.body_timeout_ms),
        in_flight: Arc::new(tokio::sync::Semaphore::new(
            config.ingest.max_concurrent_requests.max(1),
        )),
        reading: Arc::new(tokio::sync::Semaphore::new(
            (config.ingest.max_concurrent_requests.max(1))
                .saturating_mul(config.ingest.max_request_bytes.max(1))
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        )),
        sources: http::source_keys(&config.ingest.sources),
        privacy: privacy.clone(),
    });
    let router = http::router(state).merge(admin.router());

    // The subject keys and the suppressions are read in the background: ingest answers
    // (503 until they are loaded, as without a broker) from the start. Then the raw
    // topic's consumer starts, if configured.
    let background = {
        let (config, topics, producer, registry, token, privacy) = (
            config.clone(),
            topics.clone(),
            producer.clone(),
            admin.registry.clone(),
            shutdown.clone(),
            privacy.clone(),
        );
        let store = store.clone();
        tokio::spawn(async move {
            let loaded = loop {
                match load_privacy(&config, &topics, &producer, &store, &token).await {
                    Ok(p) => break p,
                    // Settings that cannot work (a keys topic that would lose keys): stop.
                    Err(e @ tessera_common::Error::Config(_)) => {
                        error!(error = %e, "refusing to run");
                        token.cancel();
                        return Err(e);
                    }
                    Err(e) if !token.is_cancelled() => {
                        warn!(error = %e, "privacy tables not read yet, retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(_) => return Ok(()),
                }
            };
            let _ = privacy.set(loaded.clone());
            if !config.ingest.consume_raw_topic {
                return Ok(());
            }
            let spec = RunnerSpec {
                // Stateless: offsets are committed to the group; ingest's readiness is
                // the brokers' (below), whatever this consumer does.
                group_id: topics.group("ingest-raw"),
                offsets: OffsetStorage::Kafka,
                vault: Some(loaded.vault),
                ..RunnerSpec::new("ingest", &topics, vec![topics.raw()])
            };
            let mut processor = raw::RawProcessor::new(
                topics.clone(),
                config.ingest.raw_topic_source.clone(),
                limits,
                metrics,
            );
            processor.suppressions = loaded.suppressions;
            // Stateless: an empty in-memory store, offsets committed to the group.
            let r = runner::run(
                &config.kafka,
                spec,
                processor,
                Arc::new(MemStore::default()),
                producer,
                &registry,
                token.clone(),
            )
            .await;
            if r.is_err() {
                token.cancel();
            }
            r
        })
    };

    // Ready while the brokers answer, once the privacy tables are read.
    let health = admin.health.clone();
    let (probe_producer, probe_token) = (producer.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            let p = probe_producer.clone();
            let ok = privacy.get().is_some()
                && tokio::task::spawn_blocking(move || p.broker_reachable(Duration::from_secs(2)))
                    .await
                    .unwrap_or(false);
            health.set_ready(ok);
            tokio::select! {
                _ = probe_token.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    });

    info!(addr = %listener.local_addr()?, "ingest listening");
    admin::serve(listener, router, &config.http, shutdown.clone()).await?;
    background
        .await
        .map_err(|e| tessera_common::Error::Internal(format!("raw consumer task: {e}")))??;
    producer.flush(tessera_common::shutdown::GRACE);
    Ok(())
}
