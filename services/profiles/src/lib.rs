//! # tessera-profiles
//!
//! Consumes `events.resolved`, `identity.merges`, `identity.splits` and its own
//! `profiles.transfers`; keeps profiles in RocksDB ([`profile`], [`state`]) with
//! computed traits ([`computed`]); evaluates the segment definitions ([`segments`]) on
//! every change and at window edges (durable timers) and emits enter/exit records to
//! `segments.membership`. Definitions live on the `profiles.definitions` table topic
//! ([`catalog`]), written by the definitions API and the definition files, and are
//! back-filled over existing profiles when they change. Serves the profile, segment and
//! definitions API ([`api`]).

pub mod api;
pub mod apply;
pub mod catalog;
pub mod computed;
pub mod live;
pub mod model_api;
pub mod peers;
pub mod predict;
pub mod privacy;
pub mod profile;
pub mod segments;
pub mod state;
pub mod triggers;
pub mod yaml;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tessera_common::admin;
use tessera_common::config::Config;
use tessera_common::kafka::{self, Producer, TopicKind};
use tessera_common::records::{AvroRecord, DefinitionChange};
use tessera_common::runner::RunnerSpec;
use tessera_common::topics::Topics;
use tessera_common::{Error, Result, service, table};

use catalog::Catalog;

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let listener = admin::bind(&config.profiles.http_listen).await?;
    run_with_listener(config, listener, shutdown).await
}

/// Publishes a definition change and waits until this instance's catalog has it.
pub async fn publish(
    producer: &Producer,
    topics: &Topics,
    catalog: &Catalog,
    change: &DefinitionChange,
) -> Result<bool> {
    let key = format!("{}/{}", change.kind, change.id);
    producer
        .send(&topics.definitions(), key.as_bytes(), &change.to_avro()?)
        .await?;
    for _ in 0..200 {
        if catalog
            .record(&change.kind, &change.id)
            .is_some_and(|r| r.version >= change.version)
        {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(false)
}

pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let files = catalog::load_dir(&config.profiles.definitions_dir).map_err(Error::Config)?;
    let topics = Topics::new(&config.topics);
    let needed = [
        topics.resolved(),
        topics.merges(),
        topics.splits(),
        topics.transfers(),
        topics.membership(),
        topics.triggers(),
        topics.deadletter(),
    ];
    let parts = service::prepare(
        &config,
        "profiles",
        &config.profiles.state_dir,
        &needed,
        &shutdown,
    )
    .await?;
    kafka::ensure_topics(
        &config.kafka,
        &config.topics,
        &[(topics.definitions(), TopicKind::Table)],
    )
    .await?;
    let catalog = Catalog::default();
    let filled = catalog.clone();
    table::follow(
        &config.kafka,
        &topics.definitions(),
        "tessera-profiles-definitions",
        move |m| match m.payload.as_deref().map(DefinitionChange::from_avro) {
            Some(Ok(change)) => filled.apply(change),
            Some(Err(e)) => {
                warn!(offset = m.offset, error = %e, "unreadable definition record skipped")
            }
            None => {}
        },
        shutdown.clone(),
    )
    .await?;
    for change in catalog::file_changes(&catalog, &files).map_err(Error::Config)? {
        info!(kind = %change.kind, id = %change.id, version = change.version, "publishing a definition file");
        publish(&parts.producer, &topics, &catalog, &change).await?;
    }
    let defs = catalog.current();
    info!(
        segments = defs.segments.len(),
        computed_traits = defs.computed.len(),
        "definitions loaded"
    );
    let changes = state::Changes::default();
    let ownership = tessera_common::runner::Ownership::default();
    let placement = state::Placement {
        partitions: kafka::partition_count(&config.kafka, &topics.resolved()).await?,
        topic: topics.resolved(),
        ownership: Some(ownership.clone()),
    };
    let processor = state::ProfilesProcessor {
        inputs: state::Input::routes(&topics),
        topics: topics.clone(),
        catalog: catalog.clone(),
        rules: apply::ApplyRules {
            strategies: config.profiles.trait_strategies.clone(),
            defs,
        },
        synced: false,
        clock: tessera_common::now_ms,
        history_limit: config.profiles.history_events,
        dedup_window_ms: config.profiles.dedup_window_ms,
        metrics: state::ProfilesMetrics::new(&parts.admin),
        changes: changes.clone(),
        placement: placement.clone(),
        fitting: state::Fitting::new((&config.profiles).into()),
    };
    let fit_requests = processor.fitting.requested.clone();
    let fit_status = processor.fitting.status.clone();
    let inputs = vec![
        topics.resolved(),
        topics.merges(),
        topics.splits(),
        topics.transfers(),
        topics.privacy_actions(),
    ];
    let spec = RunnerSpec {
        // Fires window timers, moves back-fills on, expires de-duplication entries.
        tick_every: Some(Duration::from_millis(250)),
        ownership,
        ..RunnerSpec::new("profiles", &topics, inputs)
    };
    let routes = api::router(api::ApiState {
        store: parts.store.clone(),
        audit: tessera_common::audit::Audit::new(parts.producer.clone(), &topics, "profiles"),
        catalog,
        producer: parts.producer.clone(),
        topics,
        strategies: std::sync::Arc::new(config.profiles.trait_strategies.clone()),
        history_limit: config.profiles.history_events,
        recent_events: config.profiles.recent_events,
        placement: placement.clone(),
        fit_requests,
        fit_status,
    })
    .merge(live::routes(live::LiveState {
        store: parts.store.clone(),
        changes,
        placement: placement.clone(),
    }));
    let peers = peers::Peers::new(&config.profiles.peers, placement, &parts.admin);
    let routes = routes.layer(axum::middleware::from_fn_with_state(peers, peers::gather));
    service::run(&config, parts, listener, routes, spec, processor, shutdown).await
}
