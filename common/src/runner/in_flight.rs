//! The batch in flight: its outputs are being acknowledged while the loop processes the
//! next batch against the store with its writes on top ([`Layered`]).
//!
//! What stays true with one batch in flight:
//! - state and offsets are committed only after the batch's outputs are acknowledged,
//!   and batches are committed in order: a crash replays from the last committed batch,
//!   as before;
//! - each key's records reach Kafka in order: a batch's outputs are produced only once
//!   the previous batch's are acknowledged (retries included) and its state committed;
//! - a partition assigned while a batch is in flight starts after that batch, not at
//!   the offset stored before it ([`PendingOffsets`]): the batch will be committed.
//!
//! A service that keeps its offsets with its state also tells the group where it is,
//! for lag tools and for a rebuild (which does not produce again below it). That is a
//! request to the broker and a write to `__consumer_offsets`: it is sent at most every
//! [`GROUP_COMMIT_EVERY`] ([`GroupCommits`]), not once per batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, StreamConsumer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::metrics::RunnerMetrics;
use super::producing::produce_all;
use super::purge::commit_state;
use super::{OffsetStorage, Ownership, RunnerContext, commit_kafka, core};
use crate::Result;
use crate::kafka::Producer;
use crate::message::Output;
use crate::store::{Layered, SharedStore, WriteBatch};

/// What a processor wants done once the batch it just processed is committed (announce
/// what changed to readers of the committed state).
pub type AfterCommit = Box<dyn FnOnce() + Send>;

/// Partition → next offset of the batch in flight, for the rebalance callback.
#[derive(Clone, Default)]
pub(super) struct PendingOffsets(Arc<Mutex<BTreeMap<(String, i32), i64>>>);

impl PendingOffsets {
    pub fn set(&self, offsets: &BTreeMap<(String, i32), i64>) {
        *self.0.lock().expect("pending offsets") = offsets.clone();
    }
    pub fn clear(&self) {
        self.0.lock().expect("pending offsets").clear();
    }
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.0
            .lock()
            .expect("pending offsets")
            .get(&(topic.to_string(), partition))
            .copied()
    }
}

/// A processed batch whose outputs are being produced and acknowledged.
pub(super) struct InFlight {
    /// Its state and, with offsets kept in the state, its next offsets.
    pub write: Arc<WriteBatch>,
    pub next_offsets: BTreeMap<(String, i32), i64>,
    /// Partitions being rebuilt as of the batch, with their committed offsets.
    pub replaying: HashMap<(String, i32), i64>,
    pub outputs: usize,
    pub started: Instant,
    pub after_commit: Option<AfterCommit>,
    /// Producing the outputs, until it is over (`None` with no outputs).
    acks: Option<JoinHandle<bool>>,
    /// `false` once shutdown came before every output was acknowledged.
    acked: bool,
}

impl InFlight {
    /// Starts producing `outputs` (in a task of its own, so acknowledgements arrive
    /// while the loop works on).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        producer: &Arc<Producer>,
        outputs: Vec<Output>,
        metrics: &RunnerMetrics,
        shutdown: &CancellationToken,
        write: WriteBatch,
        next_offsets: BTreeMap<(String, i32), i64>,
        replaying: HashMap<(String, i32), i64>,
        started: Instant,
        after_commit: Option<AfterCommit>,
    ) -> InFlight {
        let count = outputs.len();
        let acks = (!outputs.is_empty()).then(|| {
            let (producer, metrics, shutdown) =
                (producer.clone(), metrics.clone(), shutdown.clone());
            tokio::spawn(async move {
                produce_all(producer.as_ref(), &outputs, &metrics, &shutdown).await
            })
        });
        InFlight {
            write: Arc::new(write),
            next_offsets,
            replaying,
            outputs: count,
            started,
            after_commit,
            acks,
            acked: true,
        }
    }

    /// Waits until every output is acknowledged: `false` if shutdown came first (the
    /// batch is then not committed, and replayed after a restart).
    pub async fn acknowledged(&mut self) -> bool {
        if let Some(task) = &mut self.acks {
            self.acked = task.await.unwrap_or(false);
            self.acks = None;
        }
        self.acked
    }

    /// `store` as it will be once this batch is committed.
    pub fn view(&self, store: &SharedStore) -> SharedStore {
        Arc::new(Layered::new(store.clone(), self.write.clone()))
    }

    /// The batch's writes, to commit: no view of it is left by then.
    pub fn take_write(&mut self) -> WriteBatch {
        let write = std::mem::replace(&mut self.write, Arc::new(WriteBatch::default()));
        Arc::try_unwrap(write).unwrap_or_else(|shared| (*shared).clone())
    }
}

/// How often a service whose offsets live in its state tells the group how far it got.
/// At most this much of a partition's output is produced again by a rebuild (a lost
/// disk): the same records with the same ids, as after any crash.
pub(super) const GROUP_COMMIT_EVERY: Duration = Duration::from_millis(500);

/// Offsets committed with the state but not yet told to the group, and when the group
/// was last told.
pub(super) struct GroupCommits {
    unsent: BTreeMap<(String, i32), i64>,
    last: Instant,
}

impl Default for GroupCommits {
    fn default() -> Self {
        GroupCommits {
            unsent: BTreeMap::new(),
            last: Instant::now(),
        }
    }
}

/// What committing a batch needs.
pub(super) struct Committing<'a> {
    pub service: &'static str,
    pub store: &'a SharedStore,
    pub offsets: &'a OffsetStorage,
    pub consumer: &'a StreamConsumer<RunnerContext>,
    pub ownership: &'a Ownership,
    pub pending: &'a PendingOffsets,
    pub metrics: &'a RunnerMetrics,
    pub group: Mutex<GroupCommits>,
}

impl Committing<'_> {
    /// Waits for the batch in flight, if any, and commits it: `false` if shutdown came
    /// before its outputs were acknowledged (it is then replayed after a restart).
    pub async fn settle(
        &self,
        in_flight: &mut Option<InFlight>,
        done: &mut BTreeMap<(String, i32), i64>,
    ) -> Result<bool> {
        let Some(mut f) = in_flight.take() else {
            return Ok(true);
        };
        if !f.acknowledged().await {
            warn!(
                service = self.service,
                "shutdown while producing: the batch will be replayed"
            );
            return Ok(false);
        }
        self.commit(f, done).await?;
        Ok(true)
    }

    /// Commits an acknowledged batch: its state and offsets together (or its offsets
    /// to Kafka), then tells the group and the processor's readers.
    async fn commit(&self, mut f: InFlight, done: &mut BTreeMap<(String, i32), i64>) -> Result<()> {
        let write = f.take_write();
        match self.offsets {
            OffsetStorage::State => {
                commit_state(self.store, write).await?;
                // Also tell the group, so external lag tools see progress (best effort:
                // the offsets in the store are the truth), but never move it back while
                // a partition is being rebuilt: its committed offset marks what
                // downstream already has.
                let mut forward = f.next_offsets.clone();
                forward.retain(|tp, next| {
                    f.replaying
                        .get(tp)
                        .is_none_or(|committed| *next >= *committed)
                });
                let mut group = self.group.lock().expect("group commits");
                group.unsent.extend(forward);
                if group.last.elapsed() >= GROUP_COMMIT_EVERY {
                    drop(group);
                    self.tell_group(CommitMode::Async);
                }
            }
            OffsetStorage::Kafka => {
                if !write.is_empty() {
                    commit_state(self.store, write).await?;
                }
                let mut owned = f.next_offsets.clone();
                self.ownership.retain_owned(&mut owned);
                commit_kafka(self.consumer, &owned, CommitMode::Async);
            }
        }
        self.pending.clear();
        if let Some(announce) = f.after_commit.take() {
            announce();
        }
        done.extend(f.next_offsets.iter().map(|(k, v)| (k.clone(), *v)));
        if !f.replaying.is_empty() {
            let over =
                core::finished_rebuilds(&mut self.ownership.lock().rebuilding, &f.next_offsets);
            for (topic, partition) in over {
                info!(%topic, partition, "state rebuilt");
            }
        }
        if !f.next_offsets.is_empty() || f.outputs > 0 {
            self.metrics
                .batch_seconds
                .observe(f.started.elapsed().as_secs_f64());
            self.metrics.state_bytes.set(self.store.size_bytes() as i64);
            debug!(
                records = f.next_offsets.len(),
                outputs = f.outputs,
                "batch committed"
            );
        }
        Ok(())
    }

    /// When the group is next due to hear of offsets committed with the state (`None`:
    /// there are none it has not heard of).
    pub fn group_due(&self) -> Option<tokio::time::Instant> {
        let group = self.group.lock().expect("group commits");
        (!group.unsent.is_empty()).then(|| (group.last + GROUP_COMMIT_EVERY).into())
    }

    /// Tells the group the offsets committed with the state since it last heard, for the
    /// partitions still assigned here.
    pub fn tell_group(&self, mode: CommitMode) {
        let mut group = self.group.lock().expect("group commits");
        let mut unsent = std::mem::take(&mut group.unsent);
        group.last = Instant::now();
        drop(group);
        self.ownership.retain_owned(&mut unsent);
        commit_kafka(self.consumer, &unsent, mode);
    }
}
