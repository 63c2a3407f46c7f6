//! The runner's metrics (`tessera_<service>_...`): consumed and produced records, retries,
//! batch time, lag, panics, rebuild suppression, erased subjects, state size.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::{Error, Result};

#[derive(Clone)]
pub(super) struct RunnerMetrics {
    pub(super) consumed: IntCounterVec,
    pub(super) produced: IntCounterVec,
    pub(super) produce_retries: IntCounterVec,
    pub(super) batch_seconds: Histogram,
    /// Per batch: opening sealed input, and sealing output (`sealing_seconds{step}`).
    pub(super) open_seconds: Histogram,
    pub(super) seal_seconds: Histogram,
    pub(super) lag: IntGaugeVec,
    pub(super) panics: prometheus::IntCounter,
    pub(super) unusable: prometheus::IntCounter,
    pub(super) suppressed: prometheus::IntCounter,
    pub(super) shredded: IntCounterVec,
    pub(super) erased_outputs: IntCounterVec,
    pub(super) state_bytes: prometheus::IntGauge,
    pub(super) retention_gap: IntCounterVec,
    /// 1 while the runner holds on a record whose subject key is missing.
    pub(super) missing_key_hold: prometheus::IntGauge,
    pub(super) missing_key_skipped: IntCounterVec,
}

impl RunnerMetrics {
    pub(super) fn new(registry: &Registry, service: &str) -> Result<Self> {
        let reg = |e: prometheus::Error| Error::Internal(format!("metrics: {e}"));
        let consumed = IntCounterVec::new(
            Opts::new(
                format!("tessera_{service}_consumed_records_total"),
                "Records consumed from Kafka",
            ),
            &["topic"],
        )
        .map_err(reg)?;
        let produced = IntCounterVec::new(
            Opts::new(
                format!("tessera_{service}_produced_records_total"),
                "Records produced and acknowledged",
            ),
            &["topic"],
        )
        .map_err(reg)?;
        let produce_retries = IntCounterVec::new(
            Opts::new(
                format!("tessera_{service}_produce_retries_total"),
                "Produce attempts that failed and were retried",
            ),
            &["topic"],
        )
        .map_err(reg)?;
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                format!("tessera_{service}_batch_duration_seconds"),
                "Time to process, produce and commit one consumed batch",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .map_err(reg)?;
        let sealing_seconds = HistogramVec::new(
            HistogramOpts::new(
                format!("tessera_{service}_sealing_seconds"),
                "Time a batch spent opening its sealed records (step=open: waiting for subject \
                 keys not read yet) or sealing its outputs (step=seal: storing new subjects' \
                 keys first)",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["step"],
        )
        .map_err(reg)?;
        registry
            .register(Box::new(sealing_seconds.clone()))
            .map_err(reg)?;
        let lag = IntGaugeVec::new(
            Opts::new(
                format!("tessera_{service}_consumer_lag_records"),
                "Records behind the partition's end",
            ),
            &["topic", "partition"],
        )
        .map_err(reg)?;
        registry.register(Box::new(consumed.clone())).map_err(reg)?;
        registry.register(Box::new(produced.clone())).map_err(reg)?;
        registry
            .register(Box::new(produce_retries.clone()))
            .map_err(reg)?;
        registry
            .register(Box::new(batch_seconds.clone()))
            .map_err(reg)?;
        registry.register(Box::new(lag.clone())).map_err(reg)?;
        let panics = prometheus::IntCounter::new(
            format!("tessera_{service}_processor_panics_total"),
            "Records dead-lettered because the processor panicked on them",
        )
        .map_err(reg)?;
        registry.register(Box::new(panics.clone())).map_err(reg)?;
        let unusable = prometheus::IntCounter::new(
            format!("tessera_{service}_unusable_records_total"),
            "Records dead-lettered because the processor could not use them",
        )
        .map_err(reg)?;
        registry.register(Box::new(unusable.clone())).map_err(reg)?;
        let suppressed = prometheus::IntCounter::new(
            format!("tessera_{service}_rebuild_suppressed_outputs_total"),
            "Outputs not produced again while state was rebuilt by replaying input",
        )
        .map_err(reg)?;
        registry
            .register(Box::new(suppressed.clone()))
            .map_err(reg)?;
        let shredded = IntCounterVec::new(
            Opts::new(
                format!("tessera_{service}_shredded_records_total"),
                "Input records skipped because their subject was erased (their key is gone)",
            ),
            &["topic"],
        )
        .map_err(reg)?;
        registry.register(Box::new(shredded.clone())).map_err(reg)?;
        let erased_outputs = IntCounterVec::new(
            Opts::new(
                format!("tessera_{service}_erased_outputs_dropped_total"),
                "Records not produced because their subject had just been erased",
            ),
            &["topic"],
        )
        .map_err(reg)?;
        registry
            .register(Box::new(erased_outputs.clone()))
            .map_err(reg)?;
        let state_bytes = prometheus::IntGauge::new(
            format!("tessera_{service}_state_size_bytes"),
            "Live SST bytes of this instance's RocksDB state (read after each batch)",
        )
        .map_err(reg)?;
        registry
            .register(Box::new(state_bytes.clone()))
            .map_err(reg)?;
        let retention_gap = IntCounterVec::new(
            Opts::new(
                format!("tessera_{service}_retention_gap_records_total"),
                "Input records deleted by the topic's retention before this instance's state \
                 read them (its stored offset was below the partition's first offset)",
            ),
            &["topic"],
        )
        .map_err(reg)?;
        registry
            .register(Box::new(retention_gap.clone()))
            .map_err(reg)?;
        let missing_key_hold = prometheus::IntGauge::new(
            format!("tessera_{service}_missing_key_hold"),
            "1 while consumption is held on a record sealed with a subject key that the keys \
             topic does not hold and that was never erased (the keys topic lost records)",
        )
        .map_err(reg)?;
        registry
            .register(Box::new(missing_key_hold.clone()))
            .map_err(reg)?;
        let missing_key_skipped = IntCounterVec::new(
            Opts::new(
                format!("tessera_{service}_missing_key_records_skipped_total"),
                "Records skipped because their subject key is missing, by the operator's \
                 choice (privacy.skip_missing_keys): their data is lost",
            ),
            &["topic"],
        )
        .map_err(reg)?;
        registry
            .register(Box::new(missing_key_skipped.clone()))
            .map_err(reg)?;
        Ok(RunnerMetrics {
            retention_gap,
            missing_key_hold,
            missing_key_skipped,
            consumed,
            produced,
            produce_retries,
            batch_seconds,
            open_seconds: sealing_seconds.with_label_values(&["open"]),
            seal_seconds: sealing_seconds.with_label_values(&["seal"]),
            lag,
            panics,
            unusable,
            suppressed,
            shredded,
            erased_outputs,
            state_bytes,
        })
    }
}
