//! The one Kafka consume → process → produce → commit loop every service uses.
//!
//! A batch is what the consumer has ready (up to `max_batch` records). For each batch:
//! 1. the [`Processor`] handles each record in order against a [`Txn`] (its writes are
//!    buffered) and pushes [`Output`] records;
//! 2. every output is produced and acknowledged by Kafka (retrying until it is, or until
//!    shutdown, in which case nothing of the batch is committed and it is replayed);
//! 3. the buffered state and the next offsets are written to RocksDB in one write batch
//!    ([`OffsetStorage::State`]), or the offsets are committed to Kafka
//!    ([`OffsetStorage::Kafka`], for stateless processors).
//!
//! Up to two batches are in flight: while their outputs are acknowledged the loop takes
//! and processes the next one, against the state with the batches in flight on top, and
//! produces its outputs at once; batches are committed (step 3) in order
//! (`runner/in_flight.rs`).
//!
//! A crash anywhere before step 3 replays the batch against the old state, producing the
//! same outputs with the same deterministic ids: at-least-once output, exactly-once state.
//! On partition assignment the consumer starts from the offsets stored with the state.
//!
//! Processing a batch (savepoints, panics dead-lettered, rebuild suppression) is the
//! pure, unit-tested core in `runner/core.rs`; opening and sealing records is in
//! `runner/sealing.rs`, producing in `runner/producing.rs`, the state commit and the
//! purge an erasure owes in `runner/purge.rs`. Here: the spec, metrics, the rebalance
//! callback and the loop.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use prometheus::{IntCounterVec, IntGaugeVec, Registry};
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admin::Health;
use crate::config::KafkaConfig;
use crate::kafka::{Producer, consumer_config};
use crate::store::{SharedStore, Txn};
use crate::vault::Vault;
use crate::{Error, Result};

mod core;
mod in_flight;
mod metrics;
mod producing;
mod purge;
mod sealing;

pub use in_flight::AfterCommit;
use in_flight::{Committing, InFlight, MAX_IN_FLIGHT, PendingOffsets};
use metrics::RunnerMetrics;
pub use purge::resume_purge;
use sealing::{Opening, open_all, seal_all};

use crate::message::owned;
use crate::message::{Message, Output};

/// A service's logic. It must be deterministic in its inputs and state: a replayed batch
/// must give the same outputs. A record it cannot use (undecodable, invalid) is its own
/// business: dead-letter it itself, or return [`Error::Data`] and the runner does (the
/// record's effects undone); any other `Err` means the service cannot go on.
pub trait Processor: Send + 'static {
    fn process(&mut self, msg: &Message, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()>;

    /// Called every `tick_every` with the wall clock, for timers and expiry.
    fn tick(&mut self, _now_ms: i64, _txn: &mut Txn<'_>, _out: &mut Vec<Output>) -> Result<()> {
        Ok(())
    }

    /// Called after each batch is processed: what to do once that batch's state is
    /// committed (readers then see it). Committing comes later, after the batch's
    /// outputs are acknowledged, and the next batch may be processed meanwhile.
    fn processed(&mut self) -> Option<AfterCommit> {
        None
    }
}

/// Where consumed offsets live.
#[derive(Clone)]
pub enum OffsetStorage {
    /// In the state store, in the same write batch as the state (stateful services).
    State,
    /// Committed to the consumer group in Kafka after the outputs are acknowledged.
    Kafka,
}

/// Which partitions this instance consumes now, and which of them it is still
/// rebuilding: the runner keeps it current on every assignment, revocation and finished
/// rebuild. A processor whose state is keyed like its input (profiles) acts only on what
/// it owns, and its API answers only for partitions it serves.
#[derive(Clone, Default)]
pub struct Ownership(Arc<Mutex<Owned>>);

#[derive(Default)]
struct Owned {
    assigned: BTreeSet<(String, i32)>,
    /// Partitions being rebuilt from their topic's beginning, and the group's committed
    /// offset below which their outputs were already produced (so are not produced again).
    rebuilding: HashMap<(String, i32), i64>,
}

impl Ownership {
    fn lock(&self) -> std::sync::MutexGuard<'_, Owned> {
        self.0.lock().expect("ownership")
    }

    /// Whether `partition` of `topic` is assigned to this instance.
    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        self.lock()
            .assigned
            .contains(&(topic.to_string(), partition))
    }

    /// Keeps only the offsets of partitions assigned here now. A batch may outlive its
    /// partitions (revoked while it was processed): committing their offsets to the
    /// group could move back what their new owner already committed.
    fn retain_owned(&self, offsets: &mut BTreeMap<(String, i32), i64>) {
        let o = self.lock();
        offsets.retain(|tp, _| o.assigned.contains(tp));
    }

    /// Whether `partition` of `topic` is assigned here and caught up.
    pub fn serves(&self, topic: &str, partition: i32) -> bool {
        let o = self.lock();
        let tp = (topic.to_string(), partition);
        o.assigned.contains(&tp) && !o.rebuilding.contains_key(&tp)
    }

    /// The partitions of `topic` assigned here and caught up (not being rebuilt).
    pub fn serving(&self, topic: &str) -> Vec<i32> {
        let o = self.lock();
        o.assigned
            .iter()
            .filter(|tp| tp.0 == topic && !o.rebuilding.contains_key(*tp))
            .map(|(_, p)| *p)
            .collect()
    }

    /// Sets what this instance owns, as a test or a single-instance tool would.
    pub fn set_assigned(&self, parts: impl IntoIterator<Item = (String, i32)>) {
        self.lock().assigned = parts.into_iter().collect();
    }

    fn rebuilding(&self) -> HashMap<(String, i32), i64> {
        self.lock().rebuilding.clone()
    }
}

pub struct RunnerSpec {
    /// `tessera_<service>_...` metric names.
    pub service: &'static str,
    pub group_id: String,
    pub topics: Vec<String>,
    pub offsets: OffsetStorage,
    pub max_batch: usize,
    pub tick_every: Option<Duration>,
    /// Set ready once the group has assigned this consumer its partitions.
    pub ready: Option<Arc<Health>>,
    /// Where records that make the processor panic go (`events.deadletter`).
    pub dead_letter_topic: String,
    /// Opens sealed input records and seals outputs that name a subject. A runner
    /// without one refuses to produce such an output.
    pub vault: Option<Arc<Vault>>,
    /// Kept current by the runner (see [`Ownership`]).
    pub ownership: Ownership,
    /// The processor's state spans every partition (identity's graph): it must be the
    /// group's only consumer. An assignment of only some partitions (a second instance
    /// joined the group) is held paused and the service unready, with an error, until
    /// the group gives this instance every partition again.
    pub sole_consumer: bool,
    /// A record sealed with a key that is missing (neither held nor erased) is skipped
    /// and counted instead of holding the runner (`privacy.skip_missing_keys`: the
    /// operator's decision once the keys are known to be lost).
    pub skip_missing_keys: bool,
}

impl RunnerSpec {
    /// A consumer of `inputs` with the defaults: offsets kept with the state, group and
    /// dead-letter topic under the deployment's prefix, batches of up to 500, no tick.
    pub fn new(
        service: &'static str,
        topics: &crate::topics::Topics,
        inputs: Vec<String>,
    ) -> RunnerSpec {
        RunnerSpec {
            service,
            group_id: topics.group(service),
            topics: inputs,
            offsets: OffsetStorage::State,
            max_batch: 500,
            tick_every: None,
            ready: None,
            dead_letter_topic: topics.deadletter(),
            vault: None,
            ownership: Ownership::default(),
            sole_consumer: false,
            skip_missing_keys: false,
        }
    }
}

const OFFSET_PREFIX: &str = "~offset/";

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    format!("{OFFSET_PREFIX}{topic}/{partition}").into_bytes()
}

/// The next offset to consume for a partition, as stored with the state.
pub fn stored_offset(store: &SharedStore, topic: &str, partition: i32) -> Result<Option<i64>> {
    match store.get(&offset_key(topic, partition))? {
        None => Ok(None),
        Some(v) => {
            let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| {
                Error::Internal(format!(
                    "stored offset of {topic}/{partition} is corrupt ({} bytes)",
                    v.len()
                ))
            })?;
            Ok(Some(i64::from_be_bytes(bytes)))
        }
    }
}

/// Seeks assigned partitions to the offsets stored with the state, and turns
/// librdkafka statistics into the lag gauge.
struct RunnerContext {
    store: Option<SharedStore>,
    lag: IntGaugeVec,
    ready: Option<Arc<Health>>,
    ownership: Ownership,
    /// With [`RunnerSpec::sole_consumer`]: the assigned partitions held paused.
    paused: Option<prometheus::IntGauge>,
    retention_gap: IntCounterVec,
    /// The next offsets of the batch being acknowledged, not stored yet.
    pending: PendingOffsets,
}

impl ClientContext for RunnerContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.hi_offset < 0 {
                    continue;
                }
                // Where this consumer stands: what it consumed, else what the group
                // committed, else the log start (auto.offset.reset is earliest).
                let position = [p.app_offset, p.committed_offset, p.lo_offset]
                    .into_iter()
                    .find(|o| *o >= 0)
                    .unwrap_or(p.hi_offset);
                self.lag
                    .with_label_values(&[topic.as_str(), &partition.to_string()])
                    .set((p.hi_offset - position).max(0));
            }
        }
    }
}

impl RunnerContext {
    /// The state resumes at `next`: if retention already deleted records from there on
    /// (an instance away longer than the topic keeps records, a restored old copy of the
    /// state), the state never sees them. Said loudly and counted: it cannot be undone
    /// here, only by a state restored from a newer copy.
    fn check_retention(
        &self,
        consumer: &BaseConsumer<RunnerContext>,
        topic: &str,
        partition: i32,
        next: i64,
    ) {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok((low, _)) if next < low => {
                error!(
                    %topic,
                    partition,
                    stored = next,
                    first = low,
                    "records this state never read were deleted by retention: it resumes at \
                     the partition's first offset without them"
                );
                self.retention_gap
                    .with_label_values(&[topic])
                    .inc_by((low - next) as u64);
            }
            Ok(_) => {}
            Err(e) => warn!(%topic, partition, error = %e, "cannot read the partition's offsets"),
        }
    }
}

impl ConsumerContext for RunnerContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(store) = &self.store {
                    let parts: Vec<(String, i32)> = tpl
                        .elements()
                        .iter()
                        .map(|e| (e.topic().to_string(), e.partition()))
                        .collect();
                    // What the group committed: how far downstream already got.
                    let committed = consumer
                        .committed_offsets(tpl.clone(), Duration::from_secs(10))
                        .map_err(|e| warn!(error = %e, "cannot read the group's committed offsets"))
                        .ok();
                    for (topic, partition) in parts {
                        let stored = match stored_offset(store, &topic, partition) {
                            // A batch in flight is committed before the next one: it
                            // holds the partition's next offset.
                            Ok(s) => s.max(self.pending.get(&topic, partition)),
                            Err(e) => {
                                error!(%topic, partition, error = %e, "cannot read the stored offset");
                                continue;
                            }
                        };
                        let (start, from) = match stored {
                            Some(next) => {
                                self.check_retention(consumer, &topic, partition, next);
                                (Offset::Offset(next), next)
                            }
                            // No local state for this partition (a new node, a lost disk):
                            // rebuild it by replaying the topic from its start.
                            None => (Offset::Beginning, 0),
                        };
                        // The group commits only after outputs are acknowledged, so outputs
                        // of records below its committed offset exist already; replays are
                        // deterministic, so they are not produced again. This covers a
                        // rebuild, a rebuild interrupted by a crash, and state that lost
                        // its last writes with the machine.
                        let committed = committed
                            .as_ref()
                            .and_then(|c| c.find_partition(&topic, partition))
                            .and_then(|e| match e.offset() {
                                Offset::Offset(o) if o > from => Some(o),
                                _ => None,
                            });
                        if let Some(done) = committed {
                            warn!(%topic, partition, from, committed = done, "replaying to rebuild state, not producing again below the committed offset");
                            self.ownership
                                .lock()
                                .rebuilding
                                .insert((topic.clone(), partition), done);
                        }
                        if let Err(e) = tpl.set_partition_offset(&topic, partition, start) {
                            error!(%topic, partition, error = %e, "cannot set the start offset");
                        }
                    }
                } else {
                    // Offsets committed to the group: a batch in flight commits its own
                    // after this assignment, so its partitions start after it.
                    let parts: Vec<(String, i32)> = tpl
                        .elements()
                        .iter()
                        .map(|e| (e.topic().to_string(), e.partition()))
                        .collect();
                    for (topic, partition) in parts {
                        if let Some(next) = self.pending.get(&topic, partition)
                            && let Err(e) =
                                tpl.set_partition_offset(&topic, partition, Offset::Offset(next))
                        {
                            error!(%topic, partition, error = %e, "cannot set the start offset");
                        }
                    }
                }
                self.ownership.lock().assigned = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                info!(partitions = tpl.count(), "partitions assigned");
                let partial = self.paused.as_ref().and_then(|_| partial(consumer, tpl));
                match consumer.assign(tpl) {
                    Ok(()) => {}
                    Err(e) => {
                        error!(error = %e, "assigning partitions failed");
                        return;
                    }
                }
                if let Some((got, all)) = partial {
                    // Acting on part of a state that spans every partition would resolve
                    // against part of it: hold everything until the group settles on one
                    // consumer (nothing is consumed, so nothing is lost).
                    error!(
                        assigned = got,
                        partitions = all,
                        "this service must be its group's only consumer, and another instance \
                         shares the group: holding every partition paused until it leaves"
                    );
                    if let Err(e) = consumer.pause(tpl) {
                        error!(error = %e, "pausing partitions failed");
                    }
                    if let Some(g) = &self.paused {
                        g.set(got as i64);
                    }
                    if let Some(h) = &self.ready {
                        h.set_ready(false);
                    }
                    return;
                }
                if let Some(g) = &self.paused {
                    // A pause outlives a reassignment in librdkafka: lift it.
                    if let Err(e) = consumer.resume(tpl) {
                        error!(error = %e, "resuming partitions failed");
                    }
                    g.set(0);
                }
                if let Some(h) = &self.ready {
                    h.set_ready(true);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!(partitions = tpl.count(), "partitions revoked");
                {
                    let mut o = self.ownership.lock();
                    o.assigned.clear();
                    o.rebuilding.clear();
                }
                self.lag.reset();
                if let Err(e) = consumer.unassign() {
                    error!(error = %e, "unassigning partitions failed");
                }
            }
            other => {
                error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

/// `Some((assigned, all))` when `tpl` lacks some partition of a topic it names (the
/// brokers' metadata says how many there are); `None` when it is complete or the
/// metadata cannot be read (then the assignment stands, as without the check).
fn partial(
    consumer: &BaseConsumer<RunnerContext>,
    tpl: &TopicPartitionList,
) -> Option<(usize, usize)> {
    let topics: BTreeSet<String> = tpl
        .elements()
        .iter()
        .map(|e| e.topic().to_string())
        .collect();
    let mut all = 0;
    for topic in &topics {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Ok(md) => all += md.topics().first().map_or(0, |t| t.partitions().len()),
            Err(e) => {
                warn!(%topic, error = %e, "cannot read the partition count");
                return None;
            }
        }
    }
    (tpl.count() < all).then_some((tpl.count(), all))
}

/// Runs `processor` over `spec.topics` until `shutdown` is cancelled. `store` holds the
/// processor's state (and the offsets, with [`OffsetStorage::State`]).
pub async fn run<P: Processor>(
    kafka: &KafkaConfig,
    spec: RunnerSpec,
    mut processor: P,
    store: SharedStore,
    producer: Arc<Producer>,
    registry: &Registry,
    shutdown: CancellationToken,
) -> Result<()> {
    let metrics = RunnerMetrics::new(registry, spec.service)?;
    {
        let st = store.clone();
        blocking(false, move || resume_purge(&st)).await??;
    }
    let ownership = spec.ownership.clone();
    let paused = match spec.sole_consumer {
        false => None,
        true => {
            let g = prometheus::IntGauge::new(
                format!("tessera_{}_paused_partitions", spec.service),
                "Assigned partitions held paused because another instance shares the group \
                 of a service that must be its only consumer",
            )
            .map_err(|e| Error::Internal(format!("metrics: {e}")))?;
            registry
                .register(Box::new(g.clone()))
                .map_err(|e| Error::Internal(format!("metrics: {e}")))?;
            Some(g)
        }
    };
    let pending = PendingOffsets::default();
    let context = RunnerContext {
        pending: pending.clone(),
        store: matches!(spec.offsets, OffsetStorage::State).then(|| store.clone()),
        lag: metrics.lag.clone(),
        ready: spec.ready.clone(),
        ownership: ownership.clone(),
        paused,
        retention_gap: metrics.retention_gap.clone(),
    };
    let client_id = format!("tessera-{}", spec.service);
    let consumer: StreamConsumer<RunnerContext> =
        consumer_config(kafka, &client_id, &spec.group_id).create_with_context(context)?;
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    info!(service = spec.service, topics = ?spec.topics, group = %spec.group_id, "consuming");

    let mut ticker = spec.tick_every.map(tokio::time::interval);
    // Offsets of work that is durable, for a final synchronous commit in Kafka mode.
    let mut done: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let committing = Committing {
        service: spec.service,
        store: &store,
        offsets: &spec.offsets,
        consumer: &consumer,
        ownership: &ownership,
        pending: &pending,
        metrics: &metrics,
        group: Default::default(),
    };
    // The batches whose outputs are being acknowledged while the next one is processed,
    // oldest first (runner/in_flight.rs).
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let sink: Arc<dyn producing::Sink + Send + Sync> = producer.clone();
    loop {
        let mut batch: Vec<Message> = Vec::new();
        let mut tick_now = false;
        let group_due = committing.group_due();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // Acknowledged while waiting for records: commit it now (settle finds it done).
            _ = async { in_flight.front_mut().expect("a batch in flight").acknowledged().await }, if !in_flight.is_empty() => {
                if !committing.settle(&mut in_flight, &mut done).await? {
                    break;
                }
                continue;
            }
            _ = async { ticker.as_mut().unwrap().tick().await }, if ticker.is_some() => tick_now = true,
            // Offsets committed with the state, told to the group a moment later.
            _ = tokio::time::sleep_until(group_due.unwrap_or_else(tokio::time::Instant::now)), if group_due.is_some() => {
                committing.tell_group(CommitMode::Async);
                continue;
            }
            msg = consumer.recv() => {
                match msg {
                    Ok(m) => batch.push(owned(m)),
                    Err(e) => {
                        // Transport errors and the like: librdkafka recovers by itself.
                        warn!(service = spec.service, error = %e, "consume error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
                // Take what else is ready now, without waiting.
                while batch.len() < spec.max_batch {
                    match consumer.recv().now_or_never() {
                        Some(Ok(m)) => batch.push(owned(m)),
                        Some(Err(e)) => {
                            warn!(service = spec.service, error = %e, "consume error");
                            break;
                        }
                        None => break,
                    }
                }
            }
        }
        let started = Instant::now();
        let mut next_offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in &batch {
            metrics
                .consumed
                .with_label_values(&[m.topic.as_str()])
                .inc();
            next_offsets.insert((m.topic.clone(), m.partition), m.offset + 1);
        }

        // Sealed records are opened; those of erased subjects are skipped (their offsets
        // still advance).
        let opening = Opening {
            vault: spec.vault.as_deref(),
            metrics: &metrics,
            ready: spec.ready.as_deref(),
            skip_missing: spec.skip_missing_keys,
        };
        let Some(mut batch) = open_all(&opening, batch, &shutdown).await else {
            break;
        };

        // 1. Process (RocksDB reads and CPU work) off the async threads, against the
        //    state as it will be once the batches in flight are committed.
        let st = in_flight::view(&store, &in_flight);
        let dead_letter_topic = spec.dead_letter_topic.clone();
        // Partitions being rebuilt, as of this batch (pruned once the batch is committed).
        let replaying = ownership.rebuilding();
        let rebuilding = replaying.clone();
        let tick_at = tick_now.then(crate::now_ms);
        let small = tick_at.is_none() && batch.len() <= INLINE_RECORDS;
        let (p, result) = blocking(small, move || {
            let r = core::process_batch(
                &mut processor,
                st.as_ref(),
                &mut batch,
                &rebuilding,
                tick_at,
                &dead_letter_topic,
            );
            (processor, r)
        })
        .await?;
        processor = p;
        let processed = match result {
            Ok(processed) => processed,
            Err(e) => {
                // The batches before are not at fault: commit them before stopping.
                committing.settle_all(&mut in_flight, &mut done).await?;
                return Err(e);
            }
        };
        let after_commit = processor.processed();
        metrics.suppressed.inc_by(processed.suppressed);
        metrics.panics.inc_by(processed.panicked);
        metrics.unusable.inc_by(processed.unusable);
        let (mut write, outputs) = (processed.write, processed.outputs);
        let Some(outputs) = seal_all(spec.vault.as_deref(), outputs, &metrics, &shutdown).await?
        else {
            warn!(
                service = spec.service,
                "shutdown while sealing: the batch will be replayed"
            );
            break;
        };

        // 2. With as many batches in flight as there may be, the first is acknowledged
        //    and committed first: state and offsets are committed in batch order.
        if in_flight.len() >= MAX_IN_FLIGHT && !committing.settle(&mut in_flight, &mut done).await?
        {
            break;
        }

        // 3. Produce (after the batches in flight have queued theirs: each key's records
        //    in order), and commit once acknowledged (above, or when the acknowledgements
        //    arrive while waiting for records).
        if matches!(spec.offsets, OffsetStorage::State) {
            for ((topic, partition), next) in &next_offsets {
                write.put(offset_key(topic, *partition), next.to_be_bytes().to_vec());
            }
        }
        let started_batch = InFlight::start(
            sink.clone(),
            in_flight.back_mut(),
            outputs,
            &metrics,
            &shutdown,
            write,
            next_offsets,
            replaying,
            started,
            after_commit,
        );
        in_flight.push_back(started_batch);
        pending.set(in_flight.iter().map(|f| &f.next_offsets));
    }
    // Batches being acknowledged at shutdown are committed once they are (a shutdown
    // during their retries leaves them to be replayed).
    committing.settle_all(&mut in_flight, &mut done).await?;
    if committing.group_due().is_some() {
        committing.tell_group(CommitMode::Sync);
    }
    if matches!(spec.offsets, OffsetStorage::Kafka) {
        // Make sure the last processed offsets land before leaving the group (never the
        // consumer's position: it may be ahead of what was processed), for the
        // partitions still assigned here.
        ownership.retain_owned(&mut done);
        commit_kafka(&consumer, &done, CommitMode::Sync);
    }
    info!(service = spec.service, "consumer stopped");
    Ok(())
}

/// Up to this many records are processed on the runner's own thread; a larger batch (or
/// a tick) goes to a blocking thread. The hand-off to the blocking pool and back wakes
/// two threads, which costs more than processing a few records.
const INLINE_RECORDS: usize = 8;

/// Runs `f` here (`inline`: short work) or on a blocking thread. A panic is an error
/// either way (the service stops and says why, as for any internal error).
pub(crate) async fn blocking<T: Send + 'static>(
    inline: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let panicked = |what: String| Error::Internal(format!("a blocking task panicked: {what}"));
    if inline {
        return std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .map_err(|p| panicked(core::panic_message(&p)));
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| panicked(e.to_string()))
}

/// The result of handling a record that may not have decoded: a decoding error sends
/// the record to the dead-letter topic (with a warning) and returns `Ok(true)`; a
/// handled record returns the handler's result.
pub fn handled_or_dead_letter(
    deadletter_topic: &str,
    msg: &Message,
    decoded: Result<Result<()>>,
    out: &mut Vec<Output>,
) -> Result<bool> {
    match decoded {
        Ok(handled) => handled.map(|()| false),
        Err(e) => {
            warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, error = %e, "undecodable record, dead-lettered");
            out.push(dead_letter(deadletter_topic, msg, &e.to_string())?);
            Ok(true)
        }
    }
}

/// A record a service cannot decode goes to the dead-letter topic with its position
/// and original bytes, so nothing is silently dropped.
pub fn dead_letter(topic: &str, msg: &Message, reason: &str) -> Result<Output> {
    use crate::records::{AvroRecord, DeadLetter};
    let d = DeadLetter {
        origin: "kafka".into(),
        source: None,
        reason: format!("undecodable: {reason}"),
        received_at: msg.timestamp_ms.unwrap_or_else(crate::now_ms),
        batch_index: None,
        input_topic: Some(msg.topic.clone()),
        input_partition: Some(msg.partition),
        input_offset: Some(msg.offset),
        original: msg.payload.clone().unwrap_or_default(),
    };
    Ok(Output::plain(
        topic.to_string(),
        msg.topic.clone().into_bytes(),
        d.to_avro()?,
    ))
}

fn commit_kafka(
    consumer: &StreamConsumer<RunnerContext>,
    next: &BTreeMap<(String, i32), i64>,
    mode: CommitMode,
) {
    if next.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            warn!(error = %e, "cannot build the offset commit");
            return;
        }
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        debug!(error = %e, "offset commit to the group failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work done on the runner's thread reports a panic as an error, as the blocking pool
    /// does, instead of unwinding through the runner.
    #[tokio::test]
    async fn a_panic_is_an_error_on_the_runners_thread_as_on_a_blocking_one() {
        for inline in [true, false] {
            let r = blocking(inline, || -> u8 { panic!("poisoned") }).await;
            let Err(Error::Internal(why)) = r else {
                panic!("inline {inline}: {r:?}");
            };
            assert!(why.contains("panicked"), "{why}");
            assert_eq!(blocking(inline, || 7).await.unwrap(), 7);
        }
    }

    /// The audit's finding: a batch's offsets were committed to the group for every
    /// partition in it, revoked ones included, which could move back what their new
    /// owner had committed (and the final commit named every partition ever processed).
    #[test]
    fn only_partitions_assigned_now_are_committed() {
        let ownership = Ownership::default();
        ownership.set_assigned([("in".to_string(), 0), ("in".to_string(), 2)]);
        let mut offsets: BTreeMap<(String, i32), i64> = [
            (("in".to_string(), 0), 10),
            (("in".to_string(), 1), 20),
            (("in".to_string(), 2), 30),
        ]
        .into();
        ownership.retain_owned(&mut offsets);
        assert_eq!(offsets.keys().map(|(_, p)| *p).collect::<Vec<_>>(), [0, 2]);
        ownership.set_assigned([]);
        ownership.retain_owned(&mut offsets);
        assert!(offsets.is_empty(), "all revoked: nothing is committed");
    }
}
