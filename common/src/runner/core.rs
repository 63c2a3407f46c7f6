//! The runner's pure core: a batch in, a write batch and outputs out, with no Kafka in
//! sight. The loop in `runner.rs` consumes, opens, calls [`process_batch`], then seals,
//! produces and commits what it returns.
//!
//! - Each record is processed in order on one [`Txn`]; a record whose processing
//!   panics is undone (the transaction rolls back to before it, its outputs dropped) and
//!   dead-lettered with the panic's message, so a poison record cannot crash-loop the
//!   service. A record the processor cannot use ([`Error::Data`]) is undone and
//!   dead-lettered the same way, with its reason; any other `Err` fails the whole batch
//!   (the service stops with it, and the batch is processed again after a restart).
//! - A record below the committed offset of a partition being rebuilt is replayed: it
//!   is marked ([`Message::replayed`]) and its outputs are dropped (downstream has them).
//! - What a sealed record's processing dead-letters stays sealed with its subject.
//! - [`finished_rebuilds`] says which rebuilds a committed batch completed.

use std::collections::{BTreeMap, HashMap};

use crate::ids::SubjectHash;
use crate::message::{Message, Output};
use crate::store::{Store, Txn, WriteBatch};
use crate::{Error, Result};

use super::sealing::seal_dead_letters;
use super::{Processor, dead_letter};

/// What processing one batch did.
pub(super) struct Processed {
    pub write: WriteBatch,
    pub outputs: Vec<Output>,
    /// Outputs of replayed records, dropped.
    pub suppressed: u64,
    /// Records whose processing panicked, dead-lettered.
    pub panicked: u64,
    /// Records the processor could not use ([`crate::Error::Data`]), dead-lettered.
    pub unusable: u64,
}

/// Processes `batch` (opened records with the subject they were sealed for) on one
/// transaction of `store`. `rebuilding`: partitions being rebuilt, with the offset below
/// which their outputs exist already. `tick_at`: the wall clock, when the processor's
/// tick is due after the records.
pub(super) fn process_batch<P: Processor>(
    processor: &mut P,
    store: &dyn Store,
    batch: &mut [(Message, Option<SubjectHash>)],
    rebuilding: &HashMap<(String, i32), i64>,
    tick_at: Option<i64>,
    dead_letter_topic: &str,
) -> Result<Processed> {
    let mut txn = Txn::new(store);
    let mut out = Vec::new();
    let (mut suppressed, mut panicked, mut unusable) = (0, 0, 0);
    for (m, subject) in batch.iter_mut() {
        m.replayed = rebuilding
            .get(&(m.topic.clone(), m.partition))
            .is_some_and(|done| m.offset < *done);
        let (savepoint, produced) = (txn.savepoint(), out.len());
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            processor.process(m, &mut txn, &mut out)
        }));
        let refused = match attempt {
            Ok(Ok(())) => {
                seal_dead_letters(&mut out[produced..], dead_letter_topic, subject);
                if m.replayed {
                    suppressed += (out.len() - produced) as u64;
                    out.truncate(produced);
                }
                continue;
            }
            Ok(Err(Error::Data(why))) => {
                tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset, reason = %why, "record dead-lettered: the processor cannot use it");
                unusable += 1;
                why
            }
            Ok(Err(e)) => return Err(e),
            Err(panic) => {
                let what = panic_message(&panic);
                tracing::error!(topic = %m.topic, partition = m.partition, offset = m.offset, panic = %what, "record dead-lettered: the processor panicked");
                panicked += 1;
                format!("processor panicked: {what}")
            }
        };
        txn.rollback_to(savepoint);
        out.truncate(produced);
        out.push(dead_letter(dead_letter_topic, m, &refused)?);
        seal_dead_letters(&mut out[produced..], dead_letter_topic, subject);
    }
    if let Some(now) = tick_at {
        processor.tick(now, &mut txn, &mut out)?;
    }
    Ok(Processed {
        write: txn.into_batch(),
        outputs: out,
        suppressed,
        panicked,
        unusable,
    })
}

/// The rebuilds a committed batch completed: a partition's rebuild is over once its next
/// offset reached the committed one. They leave `rebuilding`; returned for the log.
pub(super) fn finished_rebuilds(
    rebuilding: &mut HashMap<(String, i32), i64>,
    next_offsets: &BTreeMap<(String, i32), i64>,
) -> Vec<(String, i32)> {
    let mut over = Vec::new();
    rebuilding.retain(|tp, committed| {
        let done = next_offsets.get(tp).is_some_and(|next| next >= committed);
        if done {
            over.push(tp.clone());
        }
        !done
    });
    over
}

pub(super) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{AvroRecord, DeadLetter};
    use crate::store::MemStore;

    /// Writes `seen/<payload>` and echoes each record to `out`; panics on "boom" after
    /// writing, fails on "fail"; the tick writes `ticked`.
    struct Echo;

    impl Processor for Echo {
        fn process(
            &mut self,
            msg: &Message,
            txn: &mut Txn<'_>,
            out: &mut Vec<Output>,
        ) -> Result<()> {
            let body =
                String::from_utf8_lossy(msg.payload.as_deref().unwrap_or_default()).into_owned();
            txn.put(format!("seen/{body}").into_bytes(), Vec::new());
            out.push(Output::plain(
                "echo".into(),
                Vec::new(),
                body.clone().into_bytes(),
            ));
            match body.as_str() {
                "boom" => panic!("boom at {}", msg.offset),
                "fail" => Err(crate::Error::Internal("failed".into())),
                "unusable" => Err(crate::Error::Data(format!("unusable at {}", msg.offset))),
                _ => Ok(()),
            }
        }

        fn tick(&mut self, _now_ms: i64, txn: &mut Txn<'_>, _out: &mut Vec<Output>) -> Result<()> {
            txn.put(b"ticked".to_vec(), Vec::new());
            Ok(())
        }
    }

    fn record(partition: i32, offset: i64, body: &str) -> (Message, Option<SubjectHash>) {
        let m = Message {
            topic: "in".into(),
            partition,
            offset,
            key: None,
            payload: Some(body.as_bytes().to_vec()),
            timestamp_ms: Some(1),
            replayed: false,
        };
        (m, None)
    }

    fn run(
        batch: &mut [(Message, Option<SubjectHash>)],
        rebuilding: &HashMap<(String, i32), i64>,
        tick_at: Option<i64>,
    ) -> (MemStore, Result<Processed>) {
        let s = MemStore::default();
        let r = process_batch(&mut Echo, &s, batch, rebuilding, tick_at, "dead");
        (s, r)
    }

    fn keys(s: &MemStore) -> Vec<String> {
        Txn::new(s)
            .scan(b"", usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect()
    }

    #[test]
    fn a_panicking_record_is_undone_and_dead_lettered_and_the_others_stay() {
        let mut batch = vec![record(0, 1, "a"), record(0, 2, "boom"), record(0, 3, "b")];
        let (s, r) = run(&mut batch, &HashMap::new(), None);
        let p = r.unwrap();
        s.write(p.write).unwrap();
        assert_eq!(
            keys(&s),
            ["seen/a", "seen/b"],
            "the panicking record's write is undone"
        );
        let topics: Vec<&str> = p.outputs.iter().map(|o| o.topic.as_str()).collect();
        assert_eq!(
            topics,
            ["echo", "dead", "echo"],
            "its output replaced by a dead letter"
        );
        let d = DeadLetter::from_avro(&p.outputs[1].payload).unwrap();
        assert!(d.reason.contains("boom at 2"), "{}", d.reason);
        assert_eq!((d.input_offset, d.original), (Some(2), b"boom".to_vec()));
        assert_eq!(p.panicked, 1);
    }

    /// A record the processor says it cannot use (`Error::Data`) was a failed batch: the
    /// service stopped, restarted and met the same record again, for ever.
    #[test]
    fn an_unusable_record_is_undone_and_dead_lettered_with_its_reason() {
        let mut batch = vec![
            record(0, 1, "a"),
            record(0, 2, "unusable"),
            record(0, 3, "b"),
        ];
        let (s, r) = run(&mut batch, &HashMap::new(), None);
        let p = r.expect("the batch goes on");
        s.write(p.write).unwrap();
        assert_eq!(keys(&s), ["seen/a", "seen/b"], "its write is undone");
        let topics: Vec<&str> = p.outputs.iter().map(|o| o.topic.as_str()).collect();
        assert_eq!(topics, ["echo", "dead", "echo"]);
        let d = DeadLetter::from_avro(&p.outputs[1].payload).unwrap();
        assert!(d.reason.contains("unusable at 2"), "{}", d.reason);
        assert_eq!((p.unusable, p.panicked), (1, 0));
    }

    #[test]
    fn any_other_error_fails_the_whole_batch() {
        let mut batch = vec![record(0, 1, "a"), record(0, 2, "fail")];
        assert!(run(&mut batch, &HashMap::new(), None).1.is_err());
    }

    #[test]
    fn replayed_records_change_state_but_produce_nothing_again() {
        let rebuilding: HashMap<(String, i32), i64> = [(("in".to_string(), 0), 3)].into();
        let mut batch = vec![record(0, 1, "a"), record(0, 3, "b"), record(1, 1, "c")];
        let (s, r) = run(&mut batch, &rebuilding, None);
        let p = r.unwrap();
        s.write(p.write).unwrap();
        assert_eq!(keys(&s), ["seen/a", "seen/b", "seen/c"]);
        let bodies: Vec<&[u8]> = p.outputs.iter().map(|o| o.payload.as_slice()).collect();
        assert_eq!(
            bodies,
            [b"b".as_slice(), b"c"],
            "below the committed offset: dropped"
        );
        assert_eq!(p.suppressed, 1);
        let replayed: Vec<bool> = batch.iter().map(|(m, _)| m.replayed).collect();
        assert_eq!(replayed, [true, false, false]);
    }

    #[test]
    fn a_sealed_records_dead_letter_stays_sealed_and_the_tick_runs_after_the_records() {
        let subject: SubjectHash = [7; 16];
        let mut batch = vec![(record(0, 1, "boom").0, Some(subject))];
        let (s, r) = run(&mut batch, &HashMap::new(), Some(5));
        let p = r.unwrap();
        assert_eq!(p.outputs[0].subject, Some(subject));
        s.write(p.write).unwrap();
        assert_eq!(keys(&s), ["ticked"]);
    }

    #[test]
    fn a_rebuild_is_over_once_the_partition_passed_the_committed_offset() {
        let mut rebuilding: HashMap<(String, i32), i64> =
            [(("in".to_string(), 0), 10), (("in".to_string(), 1), 10)].into();
        let next: BTreeMap<(String, i32), i64> =
            [(("in".to_string(), 0), 10), (("in".to_string(), 1), 9)].into();
        assert_eq!(
            finished_rebuilds(&mut rebuilding, &next),
            [("in".to_string(), 0)]
        );
        assert_eq!(rebuilding.len(), 1);
    }
}
