//! # tessera-activation
//!
//! Consumes `segments.membership` and turns each enter/exit of a segment that a
//! destination syncs into an `add`/`remove` record on `activation.<destination>`, with
//! only the fields the destination may receive. Every record has a deterministic
//! `activation_id`, the same after any replay, so downstream systems can de-duplicate.

use axum::Router;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tessera_common::Result;
use tessera_common::admin::{self, Admin};
use tessera_common::config::{Config, DestinationConfig};
use tessera_common::ids::deterministic_id;
use tessera_common::records::{Activation, AvroRecord, MembershipChange};
use tessera_common::runner::{self, Message, Output, Processor, RunnerSpec};
use tessera_common::service;
use tessera_common::store::Txn;
use tessera_common::topics::Topics;

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let listener = admin::bind(&config.activation.http_listen).await?;
    run_with_listener(config, listener, shutdown).await
}

pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let topics = Topics::new(&config.topics);
    let destinations = &config.activation.destinations;
    let mut needed = vec![topics.membership(), topics.deadletter()];
    needed.extend(destinations.iter().map(|d| topics.activation(&d.id)));
    let parts =
        service::prepare(&config, "activation", &config.activation.state_dir, &needed).await?;
    info!(destinations = destinations.len(), "destinations configured");
    let processor = ActivationProcessor::new(topics.clone(), destinations.clone(), &parts.admin);
    let spec = RunnerSpec::new("activation", &topics, vec![topics.membership()]);
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

pub struct ActivationProcessor {
    topics: Topics,
    destinations: Vec<DestinationConfig>,
    activations: IntCounterVec,
    latency: Histogram,
}

impl ActivationProcessor {
    pub fn new(topics: Topics, destinations: Vec<DestinationConfig>, admin: &Admin) -> Self {
        ActivationProcessor {
            topics,
            destinations,
            activations: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_activation_records_total",
                        "Activation records by destination, action and outcome",
                    ),
                    &["destination", "action", "outcome"],
                )
                .unwrap(),
            ),
            latency: admin.register(
                &Histogram::with_opts(
                    HistogramOpts::new(
                        "tessera_activation_event_to_activation_seconds",
                        "From ingest accepting the causing event to the activation record",
                    )
                    .buckets(vec![
                        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                    ]),
                )
                .unwrap(),
            ),
        }
    }
}

/// What a destination last received for a profile in a segment.
fn sent_key(destination: &str, segment: &str, profile: &str) -> Vec<u8> {
    format!("sent/{destination}/{segment}/{profile}").into_bytes()
}

/// Only the fields a destination may receive.
fn payload_for(d: &DestinationConfig, fields_json: &str) -> String {
    let all: Map<String, Value> = serde_json::from_str(fields_json).unwrap_or_default();
    let picked: Map<String, Value> = d
        .fields
        .iter()
        .filter_map(|f| all.get(f).map(|v| (f.clone(), v.clone())))
        .collect();
    Value::Object(picked).to_string()
}

impl Processor for ActivationProcessor {
    fn process(&mut self, msg: &Message, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        let change = match MembershipChange::from_avro(msg.payload.as_deref().unwrap_or_default()) {
            Ok(c) => c,
            Err(e) => {
                runner::handled_or_dead_letter(&self.topics.deadletter(), msg, Err(e), out)?;
                return Ok(());
            }
        };
        if !matches!(change.change.as_str(), "enter" | "exit" | "update") {
            let other = change.change.as_str();
            warn!(change = other, "unknown membership change, dead-lettered");
            let reason = format!("unknown membership change {other:?}");
            out.push(runner::dead_letter(
                &self.topics.deadletter(),
                msg,
                &reason,
            )?);
            return Ok(());
        }
        for d in self
            .destinations
            .iter()
            .filter(|d| d.segments.contains(&change.segment_id))
        {
            let payload = payload_for(d, &change.traits);
            let sent = sent_key(&d.id, &change.segment_id, &change.profile_id);
            let last = txn.get(&sent)?;
            let action = match (change.change.as_str(), &last) {
                ("exit", _) => {
                    txn.delete(sent);
                    "remove"
                }
                // An update of a member this destination never received is an add.
                ("enter", _) | ("update", None) => {
                    txn.put(sent, payload.clone().into_bytes());
                    "add"
                }
                (_, Some(last)) if last.as_slice() == payload.as_bytes() => {
                    self.activations
                        .with_label_values(&[d.id.as_str(), "update", "unchanged"])
                        .inc();
                    continue;
                }
                _ => {
                    txn.put(sent, payload.clone().into_bytes());
                    "update"
                }
            };
            let a = Activation {
                activation_id: deterministic_id("activation", &[&d.id, &change.record_id]),
                destination: d.id.clone(),
                profile_id: change.profile_id.clone(),
                action: action.into(),
                segment_id: change.segment_id.clone(),
                segment_version: change.segment_version,
                reason: format!(
                    "segment {} {}: {}",
                    change.segment_id, change.change, change.reason
                ),
                event_time: change.event_time,
                received_at: change.received_at,
                payload,
            };
            out.push(Output {
                topic: self.topics.activation(&d.id),
                key: a.profile_id.clone().into_bytes(),
                payload: a.to_avro()?,
            });
            self.activations
                .with_label_values(&[d.id.as_str(), action, "sent"])
                .inc();
            let latency_ms = (tessera_common::now_ms() - change.received_at).max(0);
            self.latency.observe(latency_ms as f64 / 1000.0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_common::store::{MemStore, Store};

    #[test]
    fn enter_becomes_add_with_only_allowed_fields_and_a_stable_id() {
        let cfg = Config::load_without_env(None).unwrap();
        let mut p = ActivationProcessor::new(
            Topics::new(&cfg.topics),
            cfg.activation.destinations.clone(),
            &Admin::new(),
        );
        let change = MembershipChange {
            record_id: "r1".into(),
            profile_id: "p1".into(),
            segment_id: "buyers".into(),
            segment_version: 1,
            change: "enter".into(),
            reason: "event_count(Order Completed)".into(),
            event_time: 1,
            received_at: 2,
            traits: r#"{"email":"a@b.c","phone":"+441234","first_name":"Ann"}"#.into(),
        };
        let msg = Message {
            topic: "tessera.segments.membership".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(change.to_avro().unwrap()),
            timestamp_ms: None,
        };
        let store = MemStore::default();
        let mut out = Vec::new();
        let mut txn = Txn::new(&store);
        p.process(&msg, &mut txn, &mut out).unwrap();
        store.write(txn.into_batch()).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "tessera.activation.email-demo");
        let a = Activation::from_avro(&out[0].payload).unwrap();
        assert_eq!(a.action, "add");
        let fields: Value = serde_json::from_str(&a.payload).unwrap();
        assert_eq!(
            fields,
            serde_json::json!({"email":"a@b.c","first_name":"Ann"}),
            "phone is not allowed"
        );
        let mut again = Vec::new();
        p.process(&msg, &mut Txn::new(&store), &mut again).unwrap();
        assert_eq!(
            Activation::from_avro(&again[0].payload)
                .unwrap()
                .activation_id,
            a.activation_id
        );
        // The member's email changes: an update. The same fields again: nothing.
        let update = MembershipChange {
            record_id: "r2".into(),
            change: "update".into(),
            traits: r#"{"email":"new@b.c","first_name":"Ann","phone":"+1"}"#.into(),
            ..change.clone()
        };
        let umsg = Message {
            payload: Some(update.to_avro().unwrap()),
            ..msg.clone()
        };
        let mut txn = Txn::new(&store);
        let mut out = Vec::new();
        p.process(&umsg, &mut txn, &mut out).unwrap();
        store.write(txn.into_batch()).unwrap();
        let u = Activation::from_avro(&out[0].payload).unwrap();
        assert_eq!(u.action, "update");
        assert!(u.payload.contains("new@b.c"));
        let same = MembershipChange {
            record_id: "r3".into(),
            traits: r#"{"email":"new@b.c","first_name":"Ann","phone":"+2"}"#.into(),
            ..update.clone()
        };
        let mut out = Vec::new();
        let smsg = Message {
            payload: Some(same.to_avro().unwrap()),
            ..msg.clone()
        };
        p.process(&smsg, &mut Txn::new(&store), &mut out).unwrap();
        assert!(
            out.is_empty(),
            "a change the destination cannot see sends nothing"
        );
        // A segment no destination syncs produces nothing.
        let other = MembershipChange {
            segment_id: "other".into(),
            ..change
        };
        let msg = Message {
            payload: Some(other.to_avro().unwrap()),
            ..msg
        };
        let mut none = Vec::new();
        p.process(&msg, &mut Txn::new(&store), &mut none).unwrap();
        assert!(none.is_empty());
    }
}
