//! The records a processor takes in and gives out: the vocabulary shared by the runner,
//! the table readers and the vault, below all of them.

use rdkafka::message::Message as _;

/// One consumed record, owned.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The record's Kafka timestamp (create or append time), when it has one.
    pub timestamp_ms: Option<i64>,
    /// Replayed to rebuild state: its outputs were produced before (the runner drops
    /// them). A processor that keeps a log of its own decisions takes them from it.
    pub replayed: bool,
}

/// A record to produce. With a subject, the runner seals the payload with that
/// subject's key before producing it (the runner, [`crate::vault`]): every record that carries a
/// person's data names its subject.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub topic: String,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub subject: Option<crate::ids::SubjectHash>,
    /// Sealed with a key that never expires: the record stays (a compacted topic).
    /// Otherwise the key expires once the events topics' retention has removed it.
    pub lasting: bool,
}

impl Output {
    /// A record that carries nobody's data: produced as it is.
    pub fn plain(topic: String, key: Vec<u8>, payload: Vec<u8>) -> Output {
        Output {
            topic,
            key,
            payload,
            subject: None,
            lasting: false,
        }
    }

    /// A record sealed with `subject`'s key (a profile id, an ingest subject).
    pub fn sealed(topic: String, key: Vec<u8>, payload: Vec<u8>, subject: &str) -> Output {
        Output {
            topic,
            key,
            payload,
            subject: Some(crate::ids::subject_hash(subject)),
            lasting: false,
        }
    }

    /// [`Output::sealed`] for a record that stays on a compacted topic (an export
    /// report): its key never expires.
    pub fn sealed_lasting(topic: String, key: Vec<u8>, payload: Vec<u8>, subject: &str) -> Output {
        Output {
            lasting: true,
            ..Output::sealed(topic, key, payload, subject)
        }
    }
}

/// A consumed record, owned.
pub(crate) fn owned(m: rdkafka::message::BorrowedMessage<'_>) -> Message {
    Message {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        timestamp_ms: m.timestamp().to_millis(),
        replayed: false,
    }
}
