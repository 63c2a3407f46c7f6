//! Structured logs with `tracing`. JSON lines when `TESSERA_LOG_FORMAT=json` (what the
//! Helm chart sets), human-readable otherwise; the filter comes from `RUST_LOG`
//! (default `info`). Never log raw identifiers or traits: log profile ids or counts.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,librdkafka=warn"));
    let json = std::env::var("TESSERA_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    // try_init: tests start several services in one process.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
