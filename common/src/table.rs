//! Follows a table topic (compacted, see [`TopicKind::Table`](crate::kafka::TopicKind))
//! from its beginning, outside any consumer group: every instance of a service reads
//! all of it. Used for definitions, which every instance needs whole.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::KafkaConfig;
use crate::kafka::consumer_config;
use crate::message::{Message, owned};
use crate::{Error, Result};

/// Reads `topic` from the beginning, calling `apply` for each record in order. Returns
/// once every record that existed at the call has been applied (so the caller starts
/// with the whole table); later records keep being applied on a thread of their own
/// until `shutdown`.
pub async fn follow(
    kafka: &KafkaConfig,
    topic: &str,
    client_id: &str,
    apply: impl FnMut(&Message) + Send + 'static,
    shutdown: CancellationToken,
) -> Result<()> {
    follow_from(kafka, topic, client_id, 0, apply, shutdown).await
}

/// [`follow`] from offset `from` of every partition on (a reader that keeps what it
/// read resumes there).
pub async fn follow_from(
    kafka: &KafkaConfig,
    topic: &str,
    client_id: &str,
    from: i64,
    mut apply: impl FnMut(&Message) + Send + 'static,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut cfg = consumer_config(kafka, client_id, &format!("{client_id}-reader"));
    // Assigned, never subscribed: no group membership, nothing committed.
    cfg.set("statistics.interval.ms", "0");
    let consumer: BaseConsumer = cfg.create()?;
    let topic = topic.to_string();
    let (caught_up, ready) = tokio::sync::oneshot::channel::<Result<()>>();
    std::thread::Builder::new()
        .name(format!("table-{topic}"))
        .spawn(move || {
            let mut caught_up = Some(caught_up);
            // A topic created a moment ago may have no leader yet: retried for a while.
            let start_positions = || -> Result<Vec<(i32, i64)>> {
                let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
                let partitions: Vec<i32> = md
                    .topics()
                    .iter()
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect();
                if partitions.is_empty() {
                    return Err(Error::Broker(format!("topic {topic} has no partitions")));
                }
                let mut tpl = TopicPartitionList::new();
                let mut ends = Vec::new();
                for p in partitions {
                    let (_, high) =
                        consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
                    let start = if from > 0 {
                        Offset::Offset(from)
                    } else {
                        Offset::Beginning
                    };
                    tpl.add_partition_offset(&topic, p, start)?;
                    // Nothing to wait for where the reader is already at the end.
                    ends.push((p, if from >= high { 0 } else { high }));
                }
                consumer.assign(&tpl)?;
                Ok(ends)
            };
            let mut attempt = 0;
            let start = loop {
                match start_positions() {
                    Err(e) if attempt < 60 && !shutdown.is_cancelled() => {
                        attempt += 1;
                        warn!(%topic, error = %e, "table not readable yet, retrying");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    r => break r,
                }
            };
            let mut pending = match start {
                Ok(ends) => ends,
                Err(e) => {
                    let _ = caught_up.take().map(|c| c.send(Err(e)));
                    return;
                }
            };
            while !shutdown.is_cancelled() {
                pending.retain(|(_, high)| *high > 0);
                if pending.is_empty()
                    && let Some(c) = caught_up.take()
                {
                    info!(%topic, "table loaded");
                    if c.send(Ok(())).is_err() {
                        // The caller gave up waiting (it retries with a reader of its own).
                        return;
                    }
                }
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        let m = owned(m);
                        for (p, high) in &mut pending {
                            if *p == m.partition && m.offset + 1 >= *high {
                                *high = 0;
                            }
                        }
                        apply(&m);
                    }
                    Some(Err(e)) => warn!(%topic, error = %e, "table read error"),
                    // Nothing to read: the position says whether the end was reached
                    // (compaction can leave the last offsets without records).
                    None => {
                        if let Ok(pos) = consumer.position() {
                            for (p, high) in &mut pending {
                                let at = pos.find_partition(&topic, *p).map(|e| e.offset());
                                if let Some(Offset::Offset(o)) = at
                                    && o >= *high
                                {
                                    *high = 0;
                                }
                            }
                        }
                    }
                }
            }
        })
        .map_err(|e| Error::Internal(format!("cannot start the table reader: {e}")))?;
    match tokio::time::timeout(Duration::from_secs(120), ready).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(Error::Internal("the table reader stopped".into())),
        Err(_) => Err(Error::Broker(
            "the table was not read within 120 s (is the broker reachable?)".into(),
        )),
    }
}
