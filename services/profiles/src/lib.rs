//! # tessera-profiles
//!
//! Consumes `events.resolved`, `identity.merges`, `identity.splits` and its own
//! `profiles.transfers`;
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

use tessera_common::admin;
use tessera_common::config::Config;
use tessera_common::runner::RunnerSpec;
use tessera_common::service;
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
    let needed = [
        topics.resolved(),
        topics.merges(),
        topics.splits(),
        topics.transfers(),
        topics.membership(),
        topics.deadletter(),
    ];
    let parts = service::prepare(&config, "profiles", &config.profiles.state_dir, &needed).await?;
    let processor = state::ProfilesProcessor {
        topics: topics.clone(),
        segments: segments.clone(),
        rules: profile::ApplyRules {
            recent_limit: config.profiles.recent_events,
            strategies: config.profiles.trait_strategies.clone(),
        },
        history_limit: config.profiles.history_events,
        dedup_window_ms: config.profiles.dedup_window_ms,
        metrics: state::ProfilesMetrics::new(&parts.admin),
        store_for_size: Some(parts.store.clone()),
    };
    let inputs = vec![
        topics.resolved(),
        topics.merges(),
        topics.splits(),
        topics.transfers(),
    ];
    let spec = RunnerSpec {
        // Expires de-duplication entries.
        tick_every: Some(Duration::from_secs(10)),
        ..RunnerSpec::new("profiles", &topics, inputs)
    };
    let routes = api::router(api::ApiState {
        store: parts.store.clone(),
        segments,
        strategies: Arc::new(config.profiles.trait_strategies.clone()),
    });
    service::run(&config, parts, listener, routes, spec, processor, shutdown).await
}
