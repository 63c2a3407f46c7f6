//! The raw input topic: producers that publish Segment-spec JSON straight to Kafka.
//! Each record is one message (or a `{"batch": [...]}` envelope). Valid messages go to
//! `events.ingested`; invalid ones to `events.deadletter` with the reason and the
//! original bytes. Replays are deterministic: a missing messageId is derived from the
//! record's position, and the receive time is the record's Kafka timestamp.

use serde_json::Value;

use tessera_common::message::{Message, Output};
use tessera_common::records::{AvroRecord, DeadLetter};
use tessera_common::runner::Processor;
use tessera_common::store::Txn;
use tessera_common::suppressions::Suppressions;
use tessera_common::topics::Topics;
use tessera_common::{Result, ids};

use crate::metrics::IngestMetrics;
use crate::validate::{self, Envelope, Limits, Reject};

pub struct RawProcessor {
    topics: Topics,
    source: String,
    limits: Limits,
    metrics: IngestMetrics,
    /// Identifiers whose events are dropped.
    pub suppressions: Suppressions,
}

impl RawProcessor {
    pub fn new(topics: Topics, source: String, limits: Limits, metrics: IngestMetrics) -> Self {
        RawProcessor {
            topics,
            source,
            limits,
            metrics,
            suppressions: Suppressions::default(),
        }
    }

    fn dead(
        &self,
        msg: &Message,
        received_at: i64,
        r: Reject,
        index: Option<i32>,
        original: Vec<u8>,
    ) -> Result<Output> {
        self.metrics
            .rejected
            .with_label_values(&["kafka", r.code])
            .inc();
        let d = DeadLetter {
            origin: "kafka".into(),
            source: Some(self.source.clone()),
            reason: format!("{}: {}", r.code, r.reason),
            received_at,
            batch_index: index,
            input_topic: Some(msg.topic.clone()),
            input_partition: Some(msg.partition),
            input_offset: Some(msg.offset),
            original,
        };
        // A refused event that names a visitor is sealed like their events.
        let subject = serde_json::from_slice::<Value>(&d.original)
            .ok()
            .and_then(|v| validate::subject_of_input(&v));
        let (topic, key, payload) = (
            self.topics.deadletter(),
            self.source.clone().into_bytes(),
            d.to_avro()?,
        );
        Ok(match subject {
            Some(s) => Output::sealed(topic, key, payload, &s),
            None => Output::plain(topic, key, payload),
        })
    }
}

impl Processor for RawProcessor {
    fn process(&mut self, msg: &Message, _txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        let received_at = msg.timestamp_ms.unwrap_or_else(tessera_common::now_ms);
        let bytes = msg.payload.clone().unwrap_or_default();
        let value: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                let r = Reject::new("invalid_json", format!("record is not valid JSON: {e}"));
                out.push(self.dead(msg, received_at, r, None, bytes)?);
                return Ok(());
            }
        };
        if bytes.len() > self.limits.max_event_bytes && value.get("batch").is_none() {
            let r = Reject::new(
                "event_too_large",
                format!("event is larger than {} bytes", self.limits.max_event_bytes),
            );
            out.push(self.dead(msg, received_at, r, None, bytes)?);
            return Ok(());
        }
        let (items, envelope_root) = match value {
            Value::Object(mut root) if root.contains_key("batch") => match root.remove("batch") {
                Some(Value::Array(items)) => (
                    items.into_iter().map(|v| (v, true)).collect::<Vec<_>>(),
                    Some(root),
                ),
                _ => {
                    let r = Reject::new("invalid_batch", "batch must be an array");
                    out.push(self.dead(msg, received_at, r, None, bytes)?);
                    return Ok(());
                }
            },
            other => (vec![(other, false)], None),
        };
        let envelope = Envelope {
            sent_at: envelope_root.as_ref().and_then(|r| r.get("sentAt")),
            context: envelope_root
                .as_ref()
                .and_then(|r| r.get("context"))
                .and_then(Value::as_object),
        };
        for (index, (item, in_batch)) in items.into_iter().enumerate() {
            let original = if in_batch {
                serde_json::to_vec(&item).unwrap_or_default()
            } else {
                bytes.clone()
            };
            let position = format!("{}/{}/{}/{}", msg.topic, msg.partition, msg.offset, index);
            let id = || ids::deterministic_id("raw-message", &[&position]);
            match validate::normalise(
                item,
                None,
                &envelope,
                &self.source,
                received_at,
                &self.limits,
                id,
            ) {
                Ok(e) => {
                    self.metrics
                        .accepted
                        .with_label_values(&["kafka", &self.source])
                        .inc();
                    if validate::is_suppressed(&e, &self.suppressions) {
                        self.metrics
                            .dropped
                            .with_label_values(&["kafka", "suppressed"])
                            .inc();
                        continue;
                    }
                    let subject = validate::partition_key(&e);
                    out.push(Output::sealed(
                        self.topics.ingested(),
                        subject.clone().into_bytes(),
                        e.to_avro()?,
                        &subject,
                    ));
                }
                Err(r) => {
                    let idx = in_batch.then_some(index as i32);
                    out.push(self.dead(msg, received_at, r, idx, original)?);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_common::admin::Admin;
    use tessera_common::config::Config;
    use tessera_common::records::IngestedEvent;
    use tessera_common::store::MemStore;

    fn processor() -> RawProcessor {
        let cfg = Config::demo();
        RawProcessor::new(
            Topics::new(&cfg.topics),
            "kafka-raw".into(),
            Limits::from(&cfg.ingest),
            IngestMetrics::new(&Admin::new()),
        )
    }

    fn msg(payload: &[u8]) -> Message {
        Message {
            topic: "tessera.events.raw".into(),
            partition: 0,
            offset: 7,
            key: None,
            payload: Some(payload.to_vec()),
            timestamp_ms: Some(1_000),
            replayed: false,
        }
    }

    #[test]
    fn valid_goes_to_ingested_with_a_deterministic_id_and_invalid_to_deadletter() {
        let mut p = processor();
        let store = MemStore::default();
        let mut out = Vec::new();
        let m = msg(br#"{"batch":[{"type":"track","userId":"u","event":"E"},{"type":"track","userId":"u"}]}"#);
        p.process(&m, &mut Txn::new(&store), &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].topic, "tessera.events.ingested");
        let e = IngestedEvent::from_avro(&out[0].payload).unwrap();
        assert_eq!(e.received_at, 1_000);
        let mut again = Vec::new();
        p.process(&m, &mut Txn::new(&store), &mut again).unwrap();
        assert_eq!(out, again, "a replay gives the same records");
        let d = DeadLetter::from_avro(&out[1].payload).unwrap();
        assert_eq!(out[1].topic, "tessera.events.deadletter");
        assert_eq!(d.batch_index, Some(1));
        assert!(d.reason.starts_with("missing_event"), "{}", d.reason);
        assert_eq!((d.input_partition, d.input_offset), (Some(0), Some(7)));
    }

    #[test]
    fn garbage_keeps_its_original_bytes() {
        let mut p = processor();
        let store = MemStore::default();
        let mut out = Vec::new();
        p.process(&msg(b"\xff not json"), &mut Txn::new(&store), &mut out)
            .unwrap();
        let d = DeadLetter::from_avro(&out[0].payload).unwrap();
        assert_eq!(d.original, b"\xff not json");
        assert!(d.reason.starts_with("invalid_json"));
    }
}
