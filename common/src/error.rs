use thiserror::Error;

/// The shared crate's error.
#[derive(Debug, Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("kafka producer queue is full")]
    QueueFull,
    #[error("state store: {0}")]
    Store(#[from] rocksdb::Error),
    #[error("avro: {0}")]
    Avro(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
    /// Sealing for a subject that was erased a moment ago: what was to be sealed is about
    /// an erased person and must not be written ([`crate::vault`]).
    #[error("the subject was erased")]
    Erased,
}

impl From<apache_avro::Error> for Error {
    fn from(e: apache_avro::Error) -> Self {
        Error::Avro(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
