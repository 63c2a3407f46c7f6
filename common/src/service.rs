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
use crate::config::{Config, KafkaConfig};
use crate::kafka::{self, Producer, TopicKind};
use crate::runner::{self, Processor, RunnerSpec};
use crate::store::{RocksStore, SharedStore, Store, WriteBatch};
use crate::vault::{Keeping, Lifetime, Vault};
use crate::{Error, Result};

/// What a service builds its processor and routes from.
pub struct Parts {
    pub admin: Admin,
    pub store: SharedStore,
    pub producer: Arc<Producer>,
    /// The subject keys: opens sealed input, seals output that carries a person's data.
    pub vault: Arc<Vault>,
}

/// The topics every service uses: the audit trail and the privacy topics.
pub fn shared_topics(topics: &crate::topics::Topics) -> Vec<(String, TopicKind)> {
    vec![
        (topics.audit(), TopicKind::Audit),
        (topics.keys(), TopicKind::Erasable),
        (topics.privacy_reports(), TopicKind::Erasable),
        (topics.suppressions(), TopicKind::Table),
        (topics.privacy_actions(), TopicKind::Events),
    ]
}

/// Creates the service's topics (all of them `Events`) and the shared ones, opens its
/// RocksDB in `state_dir`, builds its producer and reads the subject keys.
pub async fn prepare(
    config: &Config,
    service: &str,
    state_dir: &Path,
    topics: &[String],
    shutdown: &CancellationToken,
) -> Result<Parts> {
    let names = crate::topics::Topics::new(&config.topics);
    let mut needed: Vec<(String, TopicKind)> = topics
        .iter()
        .map(|t| (t.clone(), TopicKind::Events))
        .collect();
    for shared in shared_topics(&names) {
        if !needed.iter().any(|(n, _)| *n == shared.0) {
            needed.push(shared);
        }
    }
    kafka::ensure_topics(&config.kafka, &config.topics, &needed).await?;
    if !config.topics.create {
        kafka::check_topic_settings(&config.kafka, &config.topics, &needed).await?;
    }
    let admin = Admin::new();
    // The runner produces a whole batch at once and then waits for its acknowledgements
    // (and a new subject's key is awaited before the records sealed with it): lingering
    // would only delay each hop. `kafka.linger_ms` is for ingest's HTTP requests, which
    // share produce requests.
    let unlingered = KafkaConfig {
        linger_ms: 0,
        ..config.kafka.clone()
    };
    let producer = Arc::new(Producer::new(&unlingered, &format!("tessera-{service}"))?);
    producer.register_metrics(&admin.registry, service)?;
    let store: SharedStore = Arc::new(RocksStore::open(state_dir)?);
    check_state_format(store.as_ref(), service, state_dir)?;
    let vault = follow_keys(config, service, producer.clone(), store.clone(), shutdown).await?;
    Ok(Parts {
        admin,
        store,
        producer,
        vault,
    })
}

/// Installs the deployment's pseudonym secret (every id derived from personal data is
/// keyed with it, [`crate::ids`]), reads the subject keys into `store` and checks that the deployment's
/// ids were made with this secret (recording it if it is the first service to start).
pub async fn follow_keys(
    config: &Config,
    service: &str,
    producer: Arc<Producer>,
    store: SharedStore,
    shutdown: &CancellationToken,
) -> Result<Arc<Vault>> {
    crate::ids::install_secret(&config.privacy.pseudonym_secret)?;
    let vault = Vault::follow(
        &config.kafka,
        crate::topics::Topics::new(&config.topics).keys(),
        &format!("tessera-{service}"),
        Some(producer),
        Keeping {
            store,
            cache_subjects: config.privacy.key_cache_subjects,
            lifetime: Lifetime::for_retention(config.topics.events_retention_ms),
        },
        shutdown.clone(),
    )
    .await?;
    vault.check_secret().await?;
    Ok(vault)
}

/// Tombstones expired subject keys every hour until `shutdown` (one service does it
/// for the deployment; every vault then drops them).
pub fn sweep_expired_keys(vault: Arc<Vault>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            match vault.sweep_expired(10_000).await {
                Ok(10_000) => continue,
                Ok(n) if n > 0 => info!(keys = n, "expired subject keys swept"),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "expired subject keys not swept, retrying later")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            }
        }
    });
}

/// The format of each service's state. Bump a service's number when its state layout
/// changes incompatibly; state in an older format is refused with what to do.
pub fn state_format(service: &str) -> u32 {
    match service {
        // 2: the fact graph (issue 3); 3: fuzzy records indexed by anchor, ingest
        // subjects per profile (erasure, issue 6); 4: identifiers in keys by hash;
        // 5: ids keyed with the pseudonym secret; 6: blocks ordered by event time and
        // the learned matcher's state (issue 25).
        "identity" => 6,
        // 2: segment member index, timers and applied definition versions (issue 4);
        // 3: timers, sizes and profile counts per partition (several instances);
        // 4: the identifier index by hash; 5: ids keyed with the pseudonym secret.
        "profiles" => 5,
        // 2: profile ids keyed with the pseudonym secret.
        "activation" => 2,
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

/// A service's own HTTP routes: the API (admin tokens) and, for identity, the privacy
/// API (privacy tokens only).
#[derive(Default)]
pub struct ApiRoutes {
    pub api: Router,
    pub privacy: Router,
}

impl From<Router> for ApiRoutes {
    fn from(api: Router) -> ApiRoutes {
        ApiRoutes {
            api,
            privacy: Router::new(),
        }
    }
}

/// Serves `routes` and the admin endpoints on `listener` and runs `processor` until
/// `shutdown` (or until the runner fails, which then stops the server too). The spec's
/// readiness is the admin's: ready once the group assigned partitions.
pub async fn run<P: Processor>(
    config: &Config,
    parts: Parts,
    listener: TcpListener,
    routes: impl Into<ApiRoutes>,
    mut spec: RunnerSpec,
    processor: P,
    shutdown: CancellationToken,
) -> Result<()> {
    let Parts {
        admin,
        store,
        producer,
        vault,
    } = parts;
    spec.ready = Some(admin.health.clone());
    spec.vault = Some(vault);
    spec.skip_missing_keys = config.privacy.skip_missing_keys;
    let service = spec.service;
    // The service's own API needs a token; health, readiness and metrics do not. The
    // privacy API has credentials of its own.
    let routes = routes.into();
    let api = routes.api.layer(axum::middleware::from_fn_with_state(
        admin::Tokens::new(&config.admin.tokens),
        admin::require_token,
    ));
    let privacy = routes.privacy.layer(axum::middleware::from_fn_with_state(
        admin::Tokens::new(&config.admin.privacy_tokens),
        admin::require_token,
    ));
    let router = api.merge(privacy).merge(admin.router());
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

    /// The local run resets its state when the formats change: it must know them.
    #[test]
    fn the_local_run_knows_the_state_formats() {
        let run = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/run.sh"))
            .unwrap();
        let want = format!(
            "state_formats=\"identity={} profiles={} activation={}\"",
            state_format("identity"),
            state_format("profiles"),
            state_format("activation")
        );
        assert!(run.contains(&want), "deploy/run.sh should say {want}");
    }

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
        // Unstamped state is format 1, which a service still in format 1 takes.
        check_state_format(&old, "ingest", dir).unwrap();
    }
}
