//! The lifecycle every consuming service shares: create its topics, open its state,
//! build its producer, serve HTTP (its own routes plus the admin ones), run its
//! processor with the runner until shutdown, then stop the server and flush.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::Result;
use crate::admin::{self, Admin};
use crate::config::Config;
use crate::kafka::{self, Producer, TopicKind};
use crate::runner::{self, Processor, RunnerSpec};
use crate::store::{RocksStore, SharedStore};

/// What a service builds its processor and routes from.
pub struct Parts {
    pub admin: Admin,
    pub store: SharedStore,
    pub producer: Arc<Producer>,
}

/// Creates the service's topics (all of them `Events`), opens its RocksDB in
/// `state_dir` and builds its producer.
pub async fn prepare(
    config: &Config,
    service: &str,
    state_dir: &Path,
    topics: &[String],
) -> Result<Parts> {
    let needed: Vec<(String, TopicKind)> = topics
        .iter()
        .map(|t| (t.clone(), TopicKind::Events))
        .collect();
    kafka::ensure_topics(&config.kafka, &config.topics, &needed).await?;
    let admin = Admin::new();
    let producer = Producer::new(&config.kafka, &format!("tessera-{service}"))?;
    producer.register_metrics(&admin.registry, service)?;
    Ok(Parts {
        admin,
        store: Arc::new(RocksStore::open(state_dir)?),
        producer: Arc::new(producer),
    })
}

/// Serves `routes` and the admin endpoints on `listener` and runs `processor` until
/// `shutdown` (or until the runner fails, which then stops the server too). The spec's
/// readiness is the admin's: ready once the group assigned partitions.
pub async fn run<P: Processor>(
    config: &Config,
    parts: Parts,
    listener: TcpListener,
    routes: Router,
    mut spec: RunnerSpec,
    processor: P,
    shutdown: CancellationToken,
) -> Result<()> {
    let Parts {
        admin,
        store,
        producer,
    } = parts;
    spec.ready = Some(admin.health.clone());
    let service = spec.service;
    let router = routes.merge(admin.router());
    let server = tokio::spawn(admin::serve(listener, router, shutdown.clone()));
    info!(service, "running");
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
    producer.flush(crate::shutdown::GRACE);
    result
}
