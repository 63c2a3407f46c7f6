//! # tessera-profiles
//!
//! Consumes `events.resolved`, `identity.merges` and its own `profiles.transfers`;
//! keeps profiles in RocksDB ([`profile`], [`state`]); evaluates the segment
//! definitions ([`segments`]) on every change and emits enter/exit records to
//! `segments.membership`; serves the profile API ([`api`]).

pub mod api;
pub mod profile;
pub mod segments;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use tessera_common::admin::{self, Admin};
use tessera_common::config::Config;
use tessera_common::kafka::{self, Producer, TopicKind};
use tessera_common::runner::{self, OffsetStorage, RunnerSpec};
use tessera_common::store::{RocksStore, SharedStore};
use tessera_common::topics::Topics;
use tessera_common::{Error, Result};

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let listener = admin::bind(&config.profiles.http_listen).await?;
    run_with_listener(config, listener, shutdown).await
}

pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let segments =
        Arc::new(segments::load_dir(&config.profiles.definitions_dir).map_err(Error::Config)?);
    info!(segments = segments.len(), "segment definitions loaded");
    let topics = Topics::new(&config.topics);
    kafka::ensure_topics(
        &config.kafka,
        &config.topics,
        &[
            (topics.resolved(), TopicKind::Events),
            (topics.merges(), TopicKind::Events),
            (topics.transfers(), TopicKind::Events),
            (topics.membership(), TopicKind::Events),
            (topics.deadletter(), TopicKind::Events),
        ],
    )
    .await?;
    let store: SharedStore = Arc::new(RocksStore::open(&config.profiles.state_dir)?);
    let producer = Arc::new(Producer::new(&config.kafka, "tessera-profiles")?);
    let admin = Admin::new();
    let processor = state::ProfilesProcessor {
        topics: topics.clone(),
        segments: segments.clone(),
        recent_limit: config.profiles.recent_events,
        dedup_window_ms: config.profiles.dedup_window_ms,
        metrics: state::ProfilesMetrics::new(&admin),
        store_for_size: Some(store.clone()),
    };
    let spec = RunnerSpec {
        service: "profiles",
        group_id: topics.group("profiles"),
        topics: vec![topics.resolved(), topics.merges(), topics.transfers()],
        offsets: OffsetStorage::State,
        max_batch: 500,
        tick_every: Some(Duration::from_secs(10)),
        ready: Some(admin.health.clone()),
    };
    let router = api::router(api::ApiState {
        store: store.clone(),
        segments,
    })
    .merge(admin.router());
    let server = tokio::spawn(admin::serve(listener, router, shutdown.clone()));
    info!("profiles running");
    let result = runner::run(
        &config.kafka,
        spec,
        processor,
        store,
        producer.clone(),
        &admin.registry,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    let _ = server.await;
    producer.flush(tessera_common::shutdown::GRACE);
    result
}
