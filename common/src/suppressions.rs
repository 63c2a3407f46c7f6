//! Suppressed identifiers: the `privacy.suppressions` table (compacted, one partition)
//! followed whole by ingest and identity. A record's key is the identifier's hash (the
//! deterministic id of its type and value, as identity computes it), never the value;
//! an unsuppress is a tombstone. Ingest drops events whose `userId` or `anonymousId` is
//! suppressed; identity drops events that carry any suppressed identifier.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::config::KafkaConfig;
use crate::ids::deterministic_id;
use crate::message::Message;
use crate::records::{AvroRecord, Suppression};

/// The hash an identifier is suppressed under.
pub fn identifier_hash(kind: &str, value: &str) -> String {
    deterministic_id("identifier", &[kind, value])
}

/// Suppressed identifier hashes, each with the request that suppressed it.
#[derive(Clone, Default)]
pub struct Suppressions(Arc<RwLock<HashMap<String, String>>>);

impl Suppressions {
    /// Reads the whole table, then keeps following it until `shutdown`.
    pub async fn follow(
        kafka: &KafkaConfig,
        topic: &str,
        client_id: &str,
        shutdown: CancellationToken,
    ) -> Result<Suppressions> {
        let s = Suppressions::default();
        let applied = s.clone();
        crate::table::follow(
            kafka,
            topic,
            &format!("{client_id}-suppressions"),
            move |m: &Message| applied.apply(m),
            shutdown,
        )
        .await?;
        Ok(s)
    }

    fn apply(&self, m: &Message) {
        let Some(key) = m.key.as_deref().map(String::from_utf8_lossy) else {
            return;
        };
        match m.payload.as_deref() {
            None | Some([]) => {
                self.remove(&key);
            }
            Some(bytes) => match Suppression::from_avro(bytes) {
                Ok(r) => self.insert(&key, &r.request_id),
                Err(e) => {
                    tracing::warn!(offset = m.offset, error = %e, "an unreadable suppression record, skipped")
                }
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.read().expect("suppressions lock").is_empty()
    }

    pub fn contains(&self, hash: &str) -> bool {
        self.0.read().expect("suppressions lock").contains_key(hash)
    }

    /// The request that suppressed this identifier.
    pub fn request_of(&self, hash: &str) -> Option<String> {
        self.0.read().expect("suppressions lock").get(hash).cloned()
    }

    /// Every identifier hash a request suppressed.
    pub fn of_request(&self, request: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .read()
            .expect("suppressions lock")
            .iter()
            .filter(|(_, r)| *r == request)
            .map(|(h, _)| h.clone())
            .collect();
        v.sort();
        v
    }

    /// Applied at once by the writer (its record on the table follows).
    pub fn insert(&self, hash: &str, request: &str) {
        self.0
            .write()
            .expect("suppressions lock")
            .insert(hash.to_string(), request.to_string());
    }

    pub fn remove(&self, hash: &str) -> bool {
        self.0
            .write()
            .expect("suppressions lock")
            .remove(hash)
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(key: &str, payload: Option<Vec<u8>>) -> Message {
        Message {
            topic: "s".into(),
            partition: 0,
            offset: 0,
            key: Some(key.as_bytes().to_vec()),
            payload,
            timestamp_ms: None,
            replayed: false,
        }
    }

    #[test]
    fn the_table_adds_and_tombstones_remove() {
        let s = Suppressions::default();
        let h = identifier_hash("email", "jane@example.com");
        assert!(!h.contains("jane"), "a hash, not the value");
        let rec = Suppression {
            identifier: h.clone(),
            kind: "email".into(),
            request_id: "r1".into(),
            at: 1,
        };
        s.apply(&msg(&h, Some(rec.to_avro().unwrap())));
        assert!(s.contains(&h));
        assert_eq!(s.request_of(&h).as_deref(), Some("r1"));
        assert_eq!(s.of_request("r1"), vec![h.clone()]);
        s.apply(&msg(&h, None));
        assert!(s.is_empty());
        s.apply(&msg("x", Some(vec![1, 2])));
        assert!(s.is_empty(), "an unreadable record is skipped");
    }
}
