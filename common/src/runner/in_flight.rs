//! The batches in flight: their outputs are being acknowledged while the loop processes
//! the next batch against the store with their writes on top ([`Layered`]). Up to
//! [`MAX_IN_FLIGHT`] are: a batch's outputs go out as soon as it is processed, without
//! waiting for the acknowledgements of the batches before (a round trip to the broker
//! per hop, which most batches waited for when one was in flight).
//!
//! What stays true with several batches in flight:
//! - state and offsets are committed only after the batch's outputs are acknowledged,
//!   and batches are committed in order: a crash replays from the last committed batch,
//!   as before;
//! - each key's records reach Kafka in order: a batch queues its records only once the
//!   batch before has queued its own (`producing::Turn`), and librdkafka keeps a
//!   partition's order. A record that fails is sent again after later ones: within its
//!   batch the later records of its key go again after it (`producing.rs`), and each
//!   later batch in flight sends its records of that key again before it is committed
//!   ([`Committing::settle`]); what a batch sends again this way is passed on in turn to
//!   the batches that started since. So the last record of every key is still the latest;
//! - a partition assigned while batches are in flight starts after the last of them,
//!   not at the offset stored before them ([`PendingOffsets`]): they will be committed.
//!
//! A service that keeps its offsets with its state also tells the group where it is,
//! for lag tools and for a rebuild (which does not produce again below it). That is a
//! request to the broker and a write to `__consumer_offsets`: it is sent at most every
//! [`GROUP_COMMIT_EVERY`] ([`GroupCommits`]), not once per batch.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, StreamConsumer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::metrics::RunnerMetrics;
use super::producing::{Keys, Sink, Turn, produce_all};
use super::purge::commit_state;
use super::{OffsetStorage, Ownership, RunnerContext, commit_kafka, core};
use crate::Result;
use crate::message::Output;
use crate::store::{Layered, SharedStore, WriteBatch};

/// What a processor wants done once the batch it just processed is committed (announce
/// what changed to readers of the committed state).
pub type AfterCommit = Box<dyn FnOnce() + Send>;

/// At most this many batches are in flight per hop. Two measured better than one and
/// than four on this box, at 1,000 and 3,000 events/s (BENCHMARKS.md); it also bounds
/// the writes held in memory and the records sent again after a failure.
pub(super) const MAX_IN_FLIGHT: usize = 2;

/// Partition → next offset of the last batch in flight, for the rebalance callback.
#[derive(Clone, Default)]
pub(super) struct PendingOffsets(Arc<Mutex<BTreeMap<(String, i32), i64>>>);

impl PendingOffsets {
    /// The next offsets of the batches in flight, the later ones last.
    pub fn set<'a>(&self, batches: impl IntoIterator<Item = &'a BTreeMap<(String, i32), i64>>) {
        let mut pending = self.0.lock().expect("pending offsets");
        pending.clear();
        for offsets in batches {
            pending.extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
        }
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
    pub started: Instant,
    pub after_commit: Option<AfterCommit>,
    outputs: Arc<Vec<Output>>,
    sink: Arc<dyn Sink + Send + Sync>,
    metrics: RunnerMetrics,
    shutdown: CancellationToken,
    /// Producing the outputs, until it is over (`None` with no outputs).
    acks: Option<JoinHandle<Option<Keys>>>,
    /// Says when the outputs are queued (taken by the next batch, which queues after).
    queued: Option<oneshot::Receiver<()>>,
    /// `false` once shutdown came before every output was acknowledged.
    acked: bool,
    /// Keys whose records this batch sent again (after a failure, or overtaken): later
    /// batches send theirs again.
    sent_again: Keys,
    /// Keys an earlier batch sent again after this batch's records went out.
    overtaken: Keys,
}

impl InFlight {
    /// Starts producing `outputs` (in a task of its own, so acknowledgements arrive
    /// while the loop works on), after `before` (the last batch in flight) has queued
    /// its own.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        sink: Arc<dyn Sink + Send + Sync>,
        before: Option<&mut InFlight>,
        outputs: Vec<Output>,
        metrics: &RunnerMetrics,
        shutdown: &CancellationToken,
        write: WriteBatch,
        next_offsets: BTreeMap<(String, i32), i64>,
        replaying: HashMap<(String, i32), i64>,
        started: Instant,
        after_commit: Option<AfterCommit>,
    ) -> InFlight {
        let outputs = Arc::new(outputs);
        let wait = before.and_then(|b| b.queued.take());
        let (acks, queued) = if outputs.is_empty() {
            // Nothing to queue: the next batch waits for the one before.
            (None, wait)
        } else {
            let (done, queued) = oneshot::channel();
            let turn = Turn {
                wait,
                done: Some(done),
            };
            let (sink, outputs, metrics, shutdown) = (
                sink.clone(),
                outputs.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            let task = tokio::spawn(async move {
                produce_all(sink.as_ref(), &outputs, &metrics, &shutdown, turn).await
            });
            (Some(task), Some(queued))
        };
        InFlight {
            write: Arc::new(write),
            next_offsets,
            replaying,
            started,
            after_commit,
            outputs,
            sink,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            acks,
            queued,
            acked: true,
            sent_again: Keys::new(),
            overtaken: Keys::new(),
        }
    }

    /// Waits until every output is acknowledged, and those an earlier batch overtook are
    /// sent and acknowledged again: `false` if shutdown came first (the batch is then not
    /// committed, and replayed after a restart). Safe to cancel: what is not done yet is
    /// done by the next call.
    pub async fn acknowledged(&mut self) -> bool {
        if let Some(task) = &mut self.acks {
            match task.await.ok().flatten() {
                Some(again) => self.sent_again.extend(again),
                None => self.acked = false,
            }
            self.acks = None;
        }
        if self.acked && !self.overtaken.is_empty() {
            let again: Vec<Output> = self
                .outputs
                .iter()
                .filter(|o| self.overtaken.contains(&(o.topic.clone(), o.key.clone())))
                .cloned()
                .collect();
            let turn = Turn::default();
            match produce_all(
                self.sink.as_ref(),
                &again,
                &self.metrics,
                &self.shutdown,
                turn,
            )
            .await
            {
                Some(more) => {
                    // What went again may overtake a batch that started since: it
                    // hears of these keys too when this batch is committed.
                    self.sent_again
                        .extend(again.iter().map(|o| (o.topic.clone(), o.key.clone())));
                    self.sent_again.extend(more);
                    self.overtaken.clear();
                }
                None => self.acked = false,
            }
        }
        self.acked
    }

    /// The records this batch sent again may have overtaken later batches' records of
    /// their keys: those batches send theirs again once this one is done.
    fn pass_on(&self, later: &mut VecDeque<InFlight>) {
        if self.sent_again.is_empty() {
            return;
        }
        warn!(
            keys = self.sent_again.len(),
            later = later.len(),
            "records sent again: later batches in flight send theirs of the same keys again"
        );
        for f in later {
            f.overtaken.extend(self.sent_again.iter().cloned());
        }
    }

    /// The number of outputs.
    pub fn outputs(&self) -> usize {
        self.outputs.len()
    }

    /// `base` as it will be once this batch is committed.
    pub fn view(&self, base: SharedStore) -> SharedStore {
        Arc::new(Layered::new(base, self.write.clone()))
    }

    /// The batch's writes, to commit: no view of it is left by then.
    pub fn take_write(&mut self) -> WriteBatch {
        let write = std::mem::replace(&mut self.write, Arc::new(WriteBatch::default()));
        Arc::try_unwrap(write).unwrap_or_else(|shared| (*shared).clone())
    }
}

/// `store` as it will be once every batch in flight is committed.
pub(super) fn view(store: &SharedStore, in_flight: &VecDeque<InFlight>) -> SharedStore {
    in_flight.iter().fold(store.clone(), |base, f| f.view(base))
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
    /// Waits for the first batch in flight, if any, and commits it: `false` if shutdown
    /// came before its outputs were acknowledged (it is then replayed after a restart,
    /// with the batches after it).
    pub async fn settle(
        &self,
        in_flight: &mut VecDeque<InFlight>,
        done: &mut BTreeMap<(String, i32), i64>,
    ) -> Result<bool> {
        let Some(first) = in_flight.front_mut() else {
            return Ok(true);
        };
        if !first.acknowledged().await {
            warn!(
                service = self.service,
                "shutdown while producing: the batch will be replayed"
            );
            return Ok(false);
        }
        let f = in_flight.pop_front().expect("the first batch in flight");
        f.pass_on(in_flight);
        self.commit(f, done).await?;
        self.pending.set(in_flight.iter().map(|f| &f.next_offsets));
        Ok(true)
    }

    /// Settles every batch in flight, in order: `false` as [`Committing::settle`].
    pub async fn settle_all(
        &self,
        in_flight: &mut VecDeque<InFlight>,
        done: &mut BTreeMap<(String, i32), i64>,
    ) -> Result<bool> {
        while !in_flight.is_empty() {
            if !self.settle(in_flight, done).await? {
                return Ok(false);
            }
        }
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
        if !f.next_offsets.is_empty() || f.outputs() > 0 {
            self.metrics
                .batch_seconds
                .observe(f.started.elapsed().as_secs_f64());
            self.metrics.state_bytes.set(self.store.size_bytes() as i64);
            debug!(
                records = f.next_offsets.len(),
                outputs = f.outputs(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::producing::tests::{Script, last_of_each_key, metrics, numbered};

    fn start(
        sink: &Arc<Script>,
        before: Option<&mut InFlight>,
        outputs: Vec<Output>,
        metrics: &RunnerMetrics,
    ) -> InFlight {
        InFlight::start(
            sink.clone(),
            before,
            outputs,
            metrics,
            &CancellationToken::new(),
            WriteBatch::default(),
            BTreeMap::new(),
            HashMap::new(),
            Instant::now(),
            None,
        )
    }

    /// Two batches in flight: the first one's record of key `a` is not acknowledged and
    /// goes again after the second batch's record of `a` went out. The second batch
    /// sends its record again before it is committed, so the topic ends with it.
    #[tokio::test]
    async fn a_record_sent_again_does_not_end_its_key_on_an_older_batch() {
        let sink = Arc::new(Script {
            undelivered: std::sync::Mutex::new(vec![0]),
            ..Default::default()
        });
        let m = metrics();
        let mut first = start(&sink, None, numbered(0, &["a", "b"]), &m);
        let mut second = start(&sink, Some(&mut first), numbered(2, &["a"]), &m);
        let mut third = start(&sink, Some(&mut second), Vec::new(), &m);
        let mut later = VecDeque::new();
        assert!(second.acknowledged().await, "the second batch's own sends");
        later.push_back(second);
        later.push_back(third);

        // As `Committing::settle` does, in batch order.
        assert!(first.acknowledged().await);
        first.pass_on(&mut later);
        let mut second = later.pop_front().unwrap();
        assert!(second.acknowledged().await);
        second.pass_on(&mut later);
        third = later.pop_front().unwrap();
        assert!(third.acknowledged().await);

        let topic = sink.topic.lock().unwrap().clone();
        assert!(topic.contains(&"a:0".to_string()), "{topic:?}");
        assert_eq!(last_of_each_key(&topic), ["b:1", "a:2"], "{topic:?}");
    }

    /// With two in flight, a batch starts once the first is committed: here the third
    /// starts after the first passed its overtaken key on. The second batch's record of
    /// `a`, sent again, then overtakes the third's, which must go again too.
    #[tokio::test]
    async fn a_record_sent_again_for_an_older_batch_is_passed_on_to_a_newer_one() {
        let sink = Arc::new(Script {
            undelivered: std::sync::Mutex::new(vec![0]),
            ..Default::default()
        });
        let m = metrics();
        let mut first = start(&sink, None, numbered(0, &["a", "b"]), &m);
        let second = start(&sink, Some(&mut first), numbered(2, &["a"]), &m);
        let mut later = VecDeque::from([second]);
        assert!(first.acknowledged().await);
        first.pass_on(&mut later);

        let mut third = start(&sink, later.back_mut(), numbered(3, &["a"]), &m);
        // As with the runtime's other threads: the third batch's record goes out first.
        third.queued.take().unwrap().await.unwrap();
        later.push_back(third);
        let mut second = later.pop_front().unwrap();
        assert!(second.acknowledged().await);
        second.pass_on(&mut later);
        let mut third = later.pop_front().unwrap();
        assert!(third.acknowledged().await);

        let topic = sink.topic.lock().unwrap().clone();
        assert_eq!(last_of_each_key(&topic), ["b:1", "a:3"], "{topic:?}");
    }

    /// The state a batch is processed against: every batch in flight on top of the
    /// store, the newest last.
    #[tokio::test]
    async fn the_view_reads_through_every_batch_in_flight_newest_first() {
        let store: SharedStore = Arc::new(crate::store::MemStore::default());
        let mut base = WriteBatch::default();
        base.put(b"k".to_vec(), b"0".to_vec());
        base.put(b"gone".to_vec(), b"0".to_vec());
        store.write(base).unwrap();
        let (sink, m) = (Arc::new(Script::default()), metrics());
        let mut queue = VecDeque::new();
        for (n, (key, value)) in [
            ("k", Some("1")),
            ("only-older", Some("x")),
            ("k", Some("2")),
            ("gone", None),
        ]
        .into_iter()
        .enumerate()
        {
            let mut f = start(&sink, queue.back_mut(), Vec::new(), &m);
            let mut w = WriteBatch::default();
            match value {
                Some(v) => w.put(key.as_bytes().to_vec(), v.as_bytes().to_vec()),
                None => w.delete(key.as_bytes().to_vec()),
            }
            f.write = Arc::new(w);
            assert_eq!(n, queue.len());
            queue.push_back(f);
        }
        let v = view(&store, &queue);
        assert_eq!(v.get(b"k").unwrap(), Some(b"2".to_vec()));
        assert_eq!(v.get(b"only-older").unwrap(), Some(b"x".to_vec()));
        assert_eq!(v.get(b"gone").unwrap(), None);
        assert_eq!(
            store.get(b"k").unwrap(),
            Some(b"0".to_vec()),
            "the store is untouched"
        );
    }
}
