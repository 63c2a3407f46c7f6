//! Opening sealed input and sealing output, around a batch: records of erased subjects
//! are skipped, a record whose key is missing holds the runner (never taken for an
//! erasure), outputs naming a subject are sealed with its key.

use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Message, Output, RunnerMetrics};
use crate::admin::Health;
use crate::ids::SubjectHash;
use crate::vault::{self, Opened, Vault};
use crate::{Error, Result};

/// What opening a batch's sealed records needs.
pub(super) struct Opening<'a> {
    pub vault: Option<&'a Vault>,
    pub metrics: &'a RunnerMetrics,
    pub ready: Option<&'a Health>,
    pub skip_missing: bool,
}

/// Opens the sealed records of a batch: each comes with the subject it was sealed for;
/// a shredded one (its key was erased) is counted and left out. A record whose key is
/// missing (never erased: the keys topic lost it) holds the runner, unready, retrying
/// until the key is back or the operator chooses to skip such records. `None` if
/// shutdown came meanwhile.
pub(super) async fn open_all(
    o: &Opening<'_>,
    batch: Vec<Message>,
    shutdown: &CancellationToken,
) -> Option<Vec<(Message, Option<SubjectHash>)>> {
    let started = Instant::now();
    let opened = open_each(o, batch, shutdown).await;
    if o.vault.is_some() {
        o.metrics
            .open_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    opened
}

async fn open_each(
    o: &Opening<'_>,
    batch: Vec<Message>,
    shutdown: &CancellationToken,
) -> Option<Vec<(Message, Option<SubjectHash>)>> {
    let mut opened = Vec::with_capacity(batch.len());
    for mut m in batch {
        let (Some(v), Some(subject)) = (
            o.vault,
            m.payload.as_deref().and_then(vault::sealed_subject),
        ) else {
            opened.push((m, None));
            continue;
        };
        let sealed = m.payload.take().unwrap_or_default();
        let mut held = false;
        let result = loop {
            let wait = match v.open(&sealed).await {
                Ok(Opened::Missing) if !o.skip_missing => {
                    if !held {
                        error!(topic = %m.topic, partition = m.partition, offset = m.offset,
                            "a record is sealed with a subject key that the keys topic does not \
                             hold and that was never erased: the keys topic lost records. Holding \
                             here, unready, until the key is back (runbook: subject keys are missing)");
                        held = true;
                        o.metrics.missing_key_hold.set(1);
                        if let Some(h) = o.ready {
                            h.set_ready(false);
                        }
                    }
                    Duration::from_secs(5)
                }
                Ok(r) => break r,
                Err(e) => {
                    warn!(error = %e, "cannot read the keys topic, retrying");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        };
        if held {
            info!(topic = %m.topic, partition = m.partition, offset = m.offset, "the missing subject key is back: going on");
            o.metrics.missing_key_hold.set(0);
            if let Some(h) = o.ready {
                h.set_ready(true);
            }
        }
        match result {
            Opened::Plain(p) => {
                m.payload = Some(p);
                opened.push((m, Some(subject)));
            }
            Opened::Shredded => o
                .metrics
                .shredded
                .with_label_values(&[m.topic.as_str()])
                .inc(),
            Opened::Missing => {
                warn!(topic = %m.topic, partition = m.partition, offset = m.offset, "a record whose subject key is missing is skipped (privacy.skip_missing_keys)");
                o.metrics
                    .missing_key_skipped
                    .with_label_values(&[m.topic.as_str()])
                    .inc();
            }
            // Left sealed: the processor cannot decode it and dead-letters it.
            Opened::Corrupt => {
                m.payload = Some(sealed);
                opened.push((m, None));
            }
        }
    }
    Some(opened)
}

/// Dead letters written for a record that was sealed are sealed for its subject.
pub(super) fn seal_dead_letters(out: &mut [Output], topic: &str, subject: &Option<SubjectHash>) {
    for o in out
        .iter_mut()
        .filter(|o| o.topic == topic && o.subject.is_none())
    {
        o.subject = *subject;
    }
}

/// Seals the outputs that name a subject; the subjects new to the vault get their keys
/// first, together. Outputs about a subject erased a moment ago are dropped (counted in
/// `erased_outputs`). `None` if shutdown came while new keys could not be stored.
pub(super) async fn seal_all(
    vault: Option<&Vault>,
    outputs: Vec<Output>,
    metrics: &RunnerMetrics,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<Output>>> {
    let started = Instant::now();
    let sealed = seal_each(vault, outputs, &metrics.erased_outputs, shutdown).await;
    if vault.is_some() {
        metrics
            .seal_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    sealed
}

async fn seal_each(
    vault: Option<&Vault>,
    outputs: Vec<Output>,
    erased: &IntCounterVec,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<Output>>> {
    if outputs.iter().all(|o| o.subject.is_none()) {
        return Ok(Some(outputs));
    }
    let Some(v) = vault else {
        return Err(Error::Internal(
            "records must be sealed, and this runner has no vault".into(),
        ));
    };
    for lasting in [false, true] {
        let subjects: Vec<SubjectHash> = outputs
            .iter()
            .filter(|o| o.lasting == lasting)
            .filter_map(|o| o.subject)
            .collect();
        if subjects.is_empty() {
            continue;
        }
        while let Err(e) = v.ensure_keys(&subjects, lasting).await {
            warn!(error = %e, "cannot store new subject keys, retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
    let mut sealed = Vec::with_capacity(outputs.len());
    for mut o in outputs {
        if let Some(subject) = o.subject.take() {
            let payload = if o.lasting {
                v.seal_lasting(&subject, &o.payload).await
            } else {
                v.seal(&subject, &o.payload).await
            };
            match payload {
                Ok(p) => o.payload = p,
                // About a person erased a moment ago (a timer, a record in flight): it
                // must not be written.
                Err(Error::Erased) => {
                    erased.with_label_values(&[o.topic.as_str()]).inc();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        sealed.push(o);
    }
    Ok(Some(sealed))
}
