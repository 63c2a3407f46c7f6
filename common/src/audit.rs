//! The audit trail: every change accepted through a service's API (definitions, identity
//! commands) is recorded on `<prefix>audit` with who made it (the API token's name),
//! what, when and on what, before the API answers. Targets and details name things
//! (`segment/buyers`, a command id), never a person's values.

use std::sync::Arc;

use serde_json::Value;

use crate::Result;
use crate::kafka::Producer;
use crate::records::{AuditEntry, AvroRecord};
use crate::topics::Topics;

#[derive(Clone)]
pub struct Audit {
    producer: Arc<Producer>,
    topic: String,
    service: &'static str,
}

impl Audit {
    pub fn new(producer: Arc<Producer>, topics: &Topics, service: &'static str) -> Audit {
        Audit {
            producer,
            topic: topics.audit(),
            service,
        }
    }

    /// Records a change once Kafka has it (an error means it was not recorded: the
    /// caller refuses the change or reports it).
    pub async fn record(&self, who: &str, action: &str, target: &str, detail: Value) -> Result<()> {
        let entry = AuditEntry {
            audit_id: uuid::Uuid::new_v4().to_string(),
            at: crate::now_ms(),
            who: who.to_string(),
            service: self.service.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail: detail.to_string(),
        };
        self.producer
            .send(&self.topic, target.as_bytes(), &entry.to_avro()?)
            .await
            .map_err(|e| crate::Error::Broker(format!("audit record not written: {e}")))?;
        Ok(())
    }
}
