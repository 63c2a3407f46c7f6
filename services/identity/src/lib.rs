//! # tessera-identity
//!
//! Consumes `events.ingested`, resolves each event's identifiers to one profile in the
//! identity graph ([`graph`], RocksDB), and produces the event with its profile id to
//! `events.resolved` and a record per merge to `identity.merges`. Offsets are stored
//! in the same RocksDB write batch as the graph changes.
//!
//! Runs as one active consumer for now (a merge can touch any two identifiers); the
//! scale-out design belongs to the identity issue.

pub mod graph;

use axum::Router;
use prometheus::{IntCounter, IntCounterVec, Opts};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tessera_common::Result;
use tessera_common::admin::{self, Admin};
use tessera_common::config::Config;
use tessera_common::records::{AvroRecord, IngestedEvent, ResolvedEvent};
use tessera_common::runner::{self, Message, Output, Processor, RunnerSpec};
use tessera_common::service;
use tessera_common::store::Txn;
use tessera_common::topics::Topics;

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let listener = admin::bind(&config.identity.http_listen).await?;
    run_with_listener(config, listener, shutdown).await
}

pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let topics = Topics::new(&config.topics);
    let produced = [
        topics.ingested(),
        topics.resolved(),
        topics.merges(),
        topics.deadletter(),
    ];
    let parts =
        service::prepare(&config, "identity", &config.identity.state_dir, &produced).await?;
    let processor = IdentityProcessor::new(topics.clone(), &parts.admin);
    let spec = RunnerSpec::new("identity", &topics, vec![topics.ingested()]);
    service::run(
        &config,
        parts,
        listener,
        Router::new(),
        spec,
        processor,
        shutdown,
    )
    .await
}

pub struct IdentityProcessor {
    topics: Topics,
    resolved: IntCounter,
    merges: IntCounter,
    created: IntCounter,
    undecodable: IntCounterVec,
}

impl IdentityProcessor {
    pub fn new(topics: Topics, admin: &Admin) -> Self {
        IdentityProcessor {
            topics,
            resolved: admin.register(
                &IntCounter::new(
                    "tessera_identity_events_resolved_total",
                    "Events resolved to a profile",
                )
                .unwrap(),
            ),
            merges: admin.register(
                &IntCounter::new(
                    "tessera_identity_merges_total",
                    "Profiles merged into another",
                )
                .unwrap(),
            ),
            created: admin.register(
                &IntCounter::new(
                    "tessera_identity_profiles_created_total",
                    "Profiles created",
                )
                .unwrap(),
            ),
            undecodable: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_identity_records_deadlettered_total",
                        "Input records that could not be decoded",
                    ),
                    &["topic"],
                )
                .unwrap(),
            ),
        }
    }
}

impl Processor for IdentityProcessor {
    fn process(&mut self, msg: &Message, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        let bytes = msg.payload.as_deref().unwrap_or_default();
        let event = match IngestedEvent::from_avro(bytes) {
            Ok(e) => e,
            Err(e) => {
                warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, error = %e, "undecodable record, dead-lettered");
                self.undecodable
                    .with_label_values(&[msg.topic.as_str()])
                    .inc();
                out.push(runner::dead_letter(
                    &self.topics.deadletter(),
                    msg,
                    &e.to_string(),
                )?);
                return Ok(());
            }
        };
        let payload: Value = serde_json::from_str(&event.payload).unwrap_or(Value::Null);
        let identifiers = graph::extract(&event, &payload);
        let previous_id = (event.kind == "alias").then(|| match &payload["previousId"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => String::new(),
        });
        let res = graph::resolve(txn, &event, &identifiers, previous_id.as_deref())?;
        if res.created {
            self.created.inc();
        }
        for m in &res.merges {
            self.merges.inc();
            info!(survivor = %m.survivor, merged = %m.merged, "profiles merged");
            out.push(Output {
                topic: self.topics.merges(),
                key: m.merged.clone().into_bytes(),
                payload: m.to_avro()?,
            });
        }
        let resolved = ResolvedEvent {
            profile_id: res.profile_id.clone(),
            identifiers,
            event,
        };
        out.push(Output {
            topic: self.topics.resolved(),
            key: res.profile_id.into_bytes(),
            payload: resolved.to_avro()?,
        });
        self.resolved.inc();
        Ok(())
    }
}
