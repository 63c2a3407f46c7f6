//! The lifecycle every consuming service shares: create its topics, open its state,
//! build its producer, serve HTTP (its own routes plus the admin ones), run its
//! processor with the runner until shutdown, then stop the server and flush.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::kafka::{self, Producer, TopicKind};
use crate::runner::{self, Processor, RunnerSpec};
use crate::store::{RocksStore, SharedStore, Store, WriteBatch};
use crate::{Error, Result};

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
    let mut needed: Vec<(String, TopicKind)> = topics
        .iter()
        .map(|t| (t.clone(), TopicKind::Events))
        .collect();
    // Every service with an API writes its changes to the audit trail.
    needed.push((
        crate::topics::Topics::new(&config.topics).audit(),
        TopicKind::Audit,
    ));
    kafka::ensure_topics(&config.kafka, &config.topics, &needed).await?;
    let admin = Admin::new();
    let producer = Producer::new(&config.kafka, &format!("tessera-{service}"))?;
    producer.register_metrics(&admin.registry, service)?;
    let store: SharedStore = Arc::new(RocksStore::open(state_dir)?);
    check_state_format(store.as_ref(), service, state_dir)?;
    Ok(Parts {
        admin,
        store,
        producer: Arc::new(producer),
    })
}

/// The format of each service's state. Bump a service's number when its state layout
/// changes incompatibly; state in an older format is refused with what to do.
pub fn state_format(service: &str) -> u32 {
    match service {
        // 2: the fact graph (issue 3).
        "identity" => 2,
        // 2: segment member index, timers and applied definition versions (issue 4).
        "profiles" => 2,
        _ => 1,
    }
}

const FORMAT_KEY: &[u8] = b"meta/state_format";

/// Accepts an empty store (and stamps it) or one in this version's format. State
/// written before formats were stamped counts as format 1.
pub fn check_state_format(store: &dyn Store, service: &str, dir: &Path) -> Result<()> {
    let want = state_format(service);
    let found = match store.get(FORMAT_KEY)? {
        Some(v) => String::from_utf8_lossy(&v).parse::<u32>().unwrap_or(0),
        None if store.scan_prefix(b"", 1)?.is_empty() => {
            let mut b = WriteBatch::default();
            b.put(FORMAT_KEY.to_vec(), want.to_string().into_bytes());
            store.write(b)?;
            return Ok(());
        }
        None => 1,
    };
    if found == want {
        return Ok(());
    }
    if found < want {
        return Err(Error::Config(format!(
            "{service}: the state in {} is in format {found}, this version needs format \
             {want}. Remove that folder: the service rebuilds its state by replaying its \
             input topics (see docs/operations.md, Upgrading).",
            dir.display()
        )));
    }
    Err(Error::Config(format!(
        "{service}: the state in {} is in format {found}, newer than this version's {want}: \
         run the newer version, or remove the folder to rebuild it",
        dir.display()
    )))
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
    // The service's own API needs a token; health, readiness and metrics do not.
    let routes = routes.layer(axum::middleware::from_fn_with_state(
        admin::Tokens::new(&config.admin.tokens),
        admin::require_token,
    ));
    let router = routes.merge(admin.router());
    let http = config.http.clone();
    let shutdown_for_server = shutdown.clone();
    let server =
        tokio::spawn(
            async move { admin::serve(listener, router, &http, shutdown_for_server).await },
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn state_in_another_format_is_refused_with_what_to_do() {
        let dir = Path::new("/state");
        let empty = MemStore::default();
        check_state_format(&empty, "identity", dir).unwrap();
        check_state_format(&empty, "identity", dir).unwrap();
        let old = MemStore::default();
        let mut b = WriteBatch::default();
        b.put(b"pr/x".to_vec(), b"{}".to_vec());
        old.write(b).unwrap();
        let err = check_state_format(&old, "identity", dir)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("format 1") && err.contains("Remove that folder"),
            "{err}"
        );
        check_state_format(&old, "activation", dir).unwrap();
    }
}
