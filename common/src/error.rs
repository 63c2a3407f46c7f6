use thiserror::Error;

/// The shared crate's error. Each variant says whose fault it is, and
/// [`Error::is_retryable`] whether doing the same again later can succeed:
/// - a **record** that cannot be used is [`Error::Data`]: the runner dead-letters that
///   record with the reason and goes on (a poison record never stops a service);
/// - the **surroundings** failing for now (the broker unreachable or slow to answer, a
///   full queue, a busy store) are retryable: a commit is tried again, a start-up waits;
/// - everything else is **fatal** for the running service (wrong configuration, corrupt
///   state, a bug): it stops with the reason, and restarting it will not help until
///   someone acts.
#[derive(Debug, Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The broker could not be asked, did not answer in time, or refused a request
    /// (metadata, topic creation, a produce not acknowledged).
    #[error("broker: {0}")]
    Broker(String),
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
    /// A record (or a value in one) this service cannot use: its content is wrong, and
    /// reading it again will not change that.
    #[error("{0}")]
    Data(String),
    /// What should not happen: corrupt state, a task that panicked, a bug.
    #[error("{0}")]
    Internal(String),
    /// Sealing for a subject that was erased a moment ago: what was to be sealed is about
    /// an erased person and must not be written ([`crate::vault`]).
    #[error("the subject was erased")]
    Erased,
}

impl Error {
    /// Whether the same operation can succeed if tried again later, unchanged.
    pub fn is_retryable(&self) -> bool {
        use rdkafka::error::KafkaError as K;
        match self {
            Error::Broker(_) | Error::QueueFull => true,
            // The client's own transient conditions; a fatal producer or a bad
            // configuration is not one.
            Error::Kafka(e) => !matches!(
                e,
                K::ClientCreation(_)
                    | K::ClientConfig(..)
                    | K::Subscription(_)
                    | K::MessageConsumptionFatal(_)
                    | K::Nul(_)
            ),
            Error::Store(e) => matches!(
                e.kind(),
                rocksdb::ErrorKind::Busy
                    | rocksdb::ErrorKind::TryAgain
                    | rocksdb::ErrorKind::TimedOut
                    | rocksdb::ErrorKind::Incomplete
            ),
            Error::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
            ),
            Error::Config(_)
            | Error::Avro(_)
            | Error::Json(_)
            | Error::Data(_)
            | Error::Internal(_)
            | Error::Erased => false,
        }
    }
}

impl From<apache_avro::Error> for Error {
    fn from(e: apache_avro::Error) -> Self {
        Error::Avro(e.to_string())
    }
}

impl From<crate::kafka::ProduceError> for Error {
    fn from(e: crate::kafka::ProduceError) -> Self {
        match e {
            crate::kafka::ProduceError::QueueFull => Error::QueueFull,
            crate::kafka::ProduceError::Unavailable(why) => {
                Error::Broker(format!("not acknowledged: {why}"))
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_can_succeed_later_is_retryable_and_the_rest_is_not() {
        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        for e in [
            Error::Broker("metadata".into()),
            Error::QueueFull,
            Error::Io(timed_out),
        ] {
            assert!(e.is_retryable(), "{e}");
        }
        for e in [
            Error::Config("no such file".into()),
            Error::Data("traits are not an object".into()),
            Error::Internal("corrupt offset".into()),
            Error::Erased,
            Error::Io(std::io::Error::other("disk full")),
        ] {
            assert!(!e.is_retryable(), "{e}");
        }
    }
}
