//! Each profile's kept events (its history): the timeline, and what a split, an
//! erasure or a new computed trait re-derives from.

use super::*;

/// Rebuilds, from the kept history, each computed trait the profile lacks or holds for
/// another version of its definition (a definition added or changed since). A profile
/// with more events than it keeps gets values from the kept ones.
pub(crate) fn ensure_computed(
    txn: &Txn<'_>,
    p: &mut Profile,
    defs: &DefinitionSet,
    history_limit: usize,
) -> Result<()> {
    if p.events_total == 0 {
        return Ok(());
    }
    let stale: Vec<_> = defs
        .computed
        .iter()
        .filter(|d| p.computed.get(&d.id).is_none_or(|s| s.version != d.version))
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    let events = read_log(txn, &p.id, history_limit)?;
    for def in stale {
        p.recompute(def, &events);
    }
    Ok(())
}

/// A profile's kept history, oldest first.
pub(crate) fn read_log(
    txn: &Txn<'_>,
    id: &str,
    history_limit: usize,
) -> Result<Vec<ResolvedEvent>> {
    txn.scan(log_prefix(id).as_bytes(), history_limit + 16)?
        .iter()
        .map(|(_, v)| ResolvedEvent::from_avro(v))
        .collect()
}

impl ProfilesProcessor {
    /// Appends events to a profile's kept history, dropping the oldest beyond the limit.
    pub(crate) fn log_events(
        &self,
        txn: &mut Txn<'_>,
        id: &str,
        events: &[ResolvedEvent],
    ) -> Result<()> {
        if self.history_limit == 0 || events.is_empty() {
            return Ok(());
        }
        let mut n: u64 = txn.get_json(&log_count_key(id))?.unwrap_or(0);
        // Every event here is new to this profile: messages are de-duplicated before,
        // and a transfer's history comes from another profile.
        for r in events {
            txn.put(
                log_key(id, r.event.event_time, &r.event.message_id),
                r.to_avro()?,
            );
            n += 1;
        }
        if n > self.history_limit as u64 {
            let excess = (n - self.history_limit as u64) as usize;
            for (k, _) in txn.scan(log_prefix(id).as_bytes(), excess)? {
                txn.delete(k);
                n -= 1;
            }
        }
        txn.put_json(log_count_key(id), &n)
    }

    /// Removes and returns a profile's kept history, oldest first.
    pub(crate) fn take_log(&self, txn: &mut Txn<'_>, id: &str) -> Result<Vec<ResolvedEvent>> {
        let out = read_log(txn, id, self.history_limit)?;
        for r in &out {
            txn.delete(log_key(id, r.event.event_time, &r.event.message_id));
        }
        txn.delete(log_count_key(id));
        Ok(out)
    }

    /// A profile's kept history, oldest first.
    pub(crate) fn read_history(&self, txn: &Txn<'_>, id: &str) -> Result<Vec<ResolvedEvent>> {
        read_log(txn, id, self.history_limit)
    }

    /// Removes and returns a profile's kept history.
    pub(crate) fn take_history(&self, txn: &mut Txn<'_>, id: &str) -> Result<Vec<ResolvedEvent>> {
        self.take_log(txn, id)
    }

    /// Drops a message's de-duplication entry; returns whether there was one.
    pub(crate) fn forget_message(&self, txn: &mut Txn<'_>, id: &str) -> Result<bool> {
        let Some(v) = txn.get(&seen_key(id))? else {
            return Ok(false);
        };
        if let Ok(b) = <[u8; 8]>::try_from(v.as_slice()) {
            let expiry = i64::from_be_bytes(b);
            txn.delete(format!("{SEEN_EXP_PREFIX}{expiry:020}/{id}").into_bytes());
        }
        txn.delete(seen_key(id));
        Ok(true)
    }
}
