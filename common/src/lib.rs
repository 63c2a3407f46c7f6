//! Shared plumbing for the Tessera services. Each piece exists once, here:
//! configuration ([`config`]), topic names ([`topics`]), the RocksDB store ([`store`]),
//! the Avro codec and record types ([`avro`], [`records`]), the Kafka producer and the
//! consume→process→produce runner ([`kafka`], [`runner`]), the admin HTTP server with
//! `/healthz`, `/readyz` and `/metrics` ([`admin`]), tracing ([`telemetry`]),
//! shutdown handling ([`shutdown`]) and text normalisation ([`text`]).

pub mod admin;
pub mod audit;
pub mod avro;
pub mod cli;
pub mod config;
pub mod erasure;
pub mod error;
pub mod ids;
pub mod kafka;
pub mod message;
pub mod records;
pub mod runner;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod suppressions;
pub mod table;
pub mod telemetry;
pub mod text;
pub mod time;
pub mod topics;
pub mod vault;

pub use error::{Error, Result};

/// Every Tessera binary allocates with mimalloc: the services allocate many small,
/// short-lived buffers per record (JSON, keys), and glibc's allocator was a fifth of
/// identity's time (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Milliseconds since the Unix epoch, the time unit of every record.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
