//! Producing a batch's outputs in the order of each key, retries included.
//!
//! Records of one key (topic and Kafka key) must reach the topic in the batch's order:
//! a consumer that reads `exit` before `enter` ends in the wrong state. All records go
//! out at once and librdkafka keeps a partition's order, unless a record fails:
//! - a record that could not be queued (the queue is full) holds the later records of
//!   its key back until it is queued in a later round;
//! - a record that was queued but not acknowledged while a later one of its key was:
//!   the later ones are produced again after it, so the last record of every key on the
//!   topic is the batch's last (what a consumer of latest states ends with).
//!
//! Batches in flight at once keep the same order between them: a batch queues its
//! records only once the batch before has queued its own ([`Turn`]), and the keys a
//! batch had to send again are sent again by each later batch in flight
//! (`in_flight.rs`), so the last record of every key is still the latest batch's.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Output, RunnerMetrics};
use crate::kafka::{ProduceError, Producer};

/// What waits for one record's acknowledgement.
pub(super) type Delivery<'a> = Pin<Box<dyn Future<Output = Result<(), ProduceError>> + Send + 'a>>;

/// Where records go: the Kafka producer, or a script in tests.
pub(super) trait Sink {
    /// Queues a record, in the order of the calls.
    fn enqueue(&self, o: &Output) -> Result<Delivery<'_>, ProduceError>;
}

impl Sink for Producer {
    fn enqueue(&self, o: &Output) -> Result<Delivery<'_>, ProduceError> {
        let d = Producer::enqueue(self, &o.topic, &o.key, &o.payload)?;
        Ok(Box::pin(async move { d.await.map(|_| ()) }))
    }
}

/// Keys (topic and Kafka key) whose records were sent more than once.
pub(super) type Keys = HashSet<(String, Vec<u8>)>;

/// A batch's turn to queue its records: after the batch before has queued its own
/// (`wait`), and saying so to the batch after (`done`).
#[derive(Default)]
pub(super) struct Turn {
    pub wait: Option<oneshot::Receiver<()>>,
    pub done: Option<oneshot::Sender<()>>,
}

/// Produces every output and waits for every acknowledgement, retrying with a backoff
/// and keeping each key's order. The keys whose records were sent again (a record failed),
/// or `None` if shutdown came first (the batch is then replayed).
pub(super) async fn produce_all(
    sink: &(impl Sink + ?Sized),
    outputs: &[Output],
    metrics: &RunnerMetrics,
    shutdown: &CancellationToken,
    mut turn: Turn,
) -> Option<Keys> {
    if let Some(before) = turn.wait.take() {
        // An error: the batch before stopped (shutdown); nothing to wait for then.
        let _ = before.await;
    }
    let mut pending: BTreeSet<usize> = (0..outputs.len()).collect();
    let mut again = Keys::new();
    let mut backoff = Duration::from_millis(50);
    while !pending.is_empty() {
        let (queued, mut failed) = enqueue(sink, outputs, &pending);
        if let Some(done) = turn.done.take() {
            let _ = done.send(());
        }
        let (delivered, undelivered) = delivered(queued).await;
        failed.extend(undelivered);
        for &i in &delivered {
            metrics
                .produced
                .with_label_values(&[outputs[i].topic.as_str()])
                .inc();
        }
        for (i, e) in &failed {
            metrics
                .produce_retries
                .with_label_values(&[outputs[*i].topic.as_str()])
                .inc();
            if !matches!(e, ProduceError::QueueFull) {
                warn!(topic = %outputs[*i].topic, error = %e, "produce failed, retrying");
            }
        }
        again.extend(
            failed
                .iter()
                .map(|(i, _)| (outputs[*i].topic.clone(), outputs[*i].key.clone())),
        );
        pending = next_round(outputs, &delivered, &failed);
        if !pending.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
    Some(again)
}

type Chain<'a> = (&'a str, &'a [u8]);

fn chain(o: &Output) -> Chain<'_> {
    (o.topic.as_str(), o.key.as_slice())
}

type Queued<'a> = Vec<(usize, Delivery<'a>)>;

/// Queues the pending records in order (none after a record of its key that could not
/// be queued): what was queued, and what could not be.
fn enqueue<'a>(
    sink: &'a (impl Sink + ?Sized),
    outputs: &'a [Output],
    pending: &BTreeSet<usize>,
) -> (Queued<'a>, Vec<(usize, ProduceError)>) {
    let mut held: HashSet<Chain<'_>> = HashSet::new();
    let mut queued = Vec::new();
    let mut failed = Vec::new();
    for &i in pending {
        let o = &outputs[i];
        if held.contains(&chain(o)) {
            continue;
        }
        match sink.enqueue(o) {
            Ok(d) => queued.push((i, d)),
            Err(e) => {
                held.insert(chain(o));
                failed.push((i, e));
            }
        }
    }
    (queued, failed)
}

/// Waits for the queued records: what was delivered, and what failed.
async fn delivered(queued: Queued<'_>) -> (Vec<usize>, Vec<(usize, ProduceError)>) {
    let mut failed = Vec::new();
    let (indexes, deliveries): (Vec<usize>, Vec<Delivery<'_>>) = queued.into_iter().unzip();
    let results = futures::future::join_all(deliveries).await;
    let mut delivered = Vec::new();
    for (i, r) in indexes.into_iter().zip(results) {
        match r {
            Ok(()) => delivered.push(i),
            Err(e) => failed.push((i, e)),
        }
    }
    (delivered, failed)
}

/// What the next round sends: the failed records, the records held back, and the
/// delivered records that overtook a failed record of their key (they go again after
/// it).
fn next_round(
    outputs: &[Output],
    delivered: &[usize],
    failed: &[(usize, ProduceError)],
) -> BTreeSet<usize> {
    let delivered: BTreeSet<usize> = delivered.iter().copied().collect();
    let mut next: BTreeSet<usize> = failed.iter().map(|(i, _)| *i).collect();
    // The first failure of each key: every later record of it that is not delivered
    // was held back, every later one that is delivered overtook it.
    let mut first_failed: Vec<(Chain<'_>, usize)> = Vec::new();
    for &i in &next {
        if !first_failed.iter().any(|(c, _)| *c == chain(&outputs[i])) {
            first_failed.push((chain(&outputs[i]), i));
        }
    }
    for (c, first) in first_failed {
        for (j, o) in outputs.iter().enumerate().skip(first + 1) {
            if chain(o) == c && (delivered.contains(&j) || !next.contains(&j)) {
                next.insert(j);
            }
        }
    }
    next
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink that follows a script: which records fail to queue or to be delivered in
    /// which round, and what the topic got, in order. A record's payload is its number.
    #[derive(Default)]
    pub(crate) struct Script {
        pub queue_full: Mutex<Vec<usize>>,
        pub undelivered: Mutex<Vec<usize>>,
        pub topic: Mutex<Vec<String>>,
    }

    impl Sink for Script {
        fn enqueue(&self, o: &Output) -> Result<Delivery<'_>, ProduceError> {
            let n: usize = String::from_utf8_lossy(&o.payload).parse().unwrap();
            let mut full = self.queue_full.lock().unwrap();
            if let Some(at) = full.iter().position(|&x| x == n) {
                full.remove(at);
                return Err(ProduceError::QueueFull);
            }
            let mut lost = self.undelivered.lock().unwrap();
            if let Some(at) = lost.iter().position(|&x| x == n) {
                lost.remove(at);
                return Ok(Box::pin(async {
                    Err(ProduceError::Unavailable("timed out".into()))
                }));
            }
            self.topic
                .lock()
                .unwrap()
                .push(format!("{}:{n}", String::from_utf8_lossy(&o.key)));
            Ok(Box::pin(async { Ok(()) }))
        }
    }

    /// Records of the given keys, numbered from `first`.
    pub(crate) fn numbered(first: usize, keys: &[&str]) -> Vec<Output> {
        keys.iter()
            .enumerate()
            .map(|(n, k)| (first + n, k))
            .map(|(n, k)| {
                Output::plain(
                    "t".into(),
                    k.as_bytes().to_vec(),
                    n.to_string().into_bytes(),
                )
            })
            .collect()
    }

    fn outputs(keys: &[&str]) -> Vec<Output> {
        numbered(0, keys)
    }

    pub(crate) fn metrics() -> RunnerMetrics {
        RunnerMetrics::new(&prometheus::Registry::new(), "test").unwrap()
    }

    /// The last record of each key on the topic, in the order they last appear.
    pub(crate) fn last_of_each_key(topic: &[String]) -> Vec<String> {
        let mut last: Vec<String> = Vec::new();
        for r in topic {
            let key = r.split(':').next().unwrap();
            last.retain(|x| x.split(':').next().unwrap() != key);
            last.push(r.clone());
        }
        last
    }

    /// The audit's finding: retried outputs of a partly failed batch overtook later
    /// records of their key (`exit` before `enter`). A record that could not be queued
    /// holds its key's later records back; one that was not acknowledged while a later
    /// one was makes the later one go again after it.
    #[tokio::test]
    async fn each_key_keeps_the_batch_order_through_failed_sends() {
        let outs = outputs(&["a", "a", "b", "a", "b"]);
        let stop = CancellationToken::new();

        // Record 0 (a) finds the queue full: 1 and 3 (a) wait for it; b goes on.
        let s = Script {
            queue_full: Mutex::new(vec![0]),
            ..Default::default()
        };
        let again = produce_all(&s, &outs, &metrics(), &stop, Turn::default()).await;
        assert_eq!(again, Some(Keys::from([("t".to_string(), b"a".to_vec())])));
        assert_eq!(
            *s.topic.lock().unwrap(),
            ["b:2", "b:4", "a:0", "a:1", "a:3"]
        );

        // Record 1 (a) is not acknowledged while 3 (a) is: 3 goes again after 1.
        let s = Script {
            undelivered: Mutex::new(vec![1]),
            ..Default::default()
        };
        let again = produce_all(&s, &outs, &metrics(), &stop, Turn::default()).await;
        assert_eq!(again, Some(Keys::from([("t".to_string(), b"a".to_vec())])));
        let topic = s.topic.lock().unwrap().clone();
        assert_eq!(topic, ["a:0", "b:2", "a:3", "b:4", "a:1", "a:3"]);
        assert_eq!(last_of_each_key(&topic), ["b:4", "a:3"]);
    }
}
