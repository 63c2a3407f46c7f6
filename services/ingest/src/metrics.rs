use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};

use tessera_common::admin::Admin;

/// Ingest's metrics. Labels carry endpoint, status, source name and reason codes: never
/// user data.
#[derive(Clone)]
pub struct IngestMetrics {
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub produce_seconds: Histogram,
    pub accepted: IntCounterVec,
    pub rejected: IntCounterVec,
    pub dropped: IntCounterVec,
    pub unavailable: IntCounter,
    pub previous_key_requests: IntCounterVec,
}

const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

impl IngestMetrics {
    pub fn new(admin: &Admin) -> IngestMetrics {
        IngestMetrics {
            requests: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_ingest_http_requests_total",
                        "HTTP requests by endpoint and status",
                    ),
                    &["endpoint", "status"],
                )
                .unwrap(),
            ),
            request_seconds: admin.register(
                &HistogramVec::new(
                    HistogramOpts::new(
                        "tessera_ingest_http_request_duration_seconds",
                        "HTTP request time, accept to answer",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["endpoint"],
                )
                .unwrap(),
            ),
            produce_seconds: admin.register(
                &Histogram::with_opts(
                    HistogramOpts::new(
                        "tessera_ingest_produce_duration_seconds",
                        "Time for Kafka to acknowledge a request's records",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            accepted: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_ingest_events_accepted_total",
                        "Events accepted and acknowledged by Kafka",
                    ),
                    &["origin", "source"],
                )
                .unwrap(),
            ),
            rejected: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_ingest_events_rejected_total",
                        "Requests or events refused, by reason code",
                    ),
                    &["origin", "reason"],
                )
                .unwrap(),
            ),
            dropped: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_ingest_events_dropped_total",
                        "Valid events not stored, by reason (suppressed: the person asked to \
                         be suppressed); the client is answered as for a stored event",
                    ),
                    &["origin", "reason"],
                )
                .unwrap(),
            ),
            unavailable: admin.register(
                &IntCounter::new(
                    "tessera_ingest_kafka_unavailable_total",
                    "Requests answered 429/503 because Kafka did not acknowledge",
                )
                .unwrap(),
            ),
            previous_key_requests: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_ingest_previous_write_key_requests_total",
                        "Requests authenticated with a source's previous write key (a \
                         rotation in progress: zero for a while means every client moved)",
                    ),
                    &["source"],
                )
                .unwrap(),
            ),
        }
    }
}
