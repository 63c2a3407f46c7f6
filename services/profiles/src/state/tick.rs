//! The tick: definitions installed as they change, durable timers (window edges,
//! waiting triggers) fired, and the back-fill after a definition change, within a
//! time budget per tick.

use super::*;

/// Timers and back-fill take at most this long of each tick (every 250 ms), so live
/// events keep flowing while a million timers fire or a back-fill runs; what is left
/// waits for the next tick. Due timers go first.
pub(crate) const TICK_BUDGET: Duration = Duration::from_millis(100);

/// Timers read per scan at most (the first scan of a tick reads a few), profiles per
/// back-fill chunk.
pub(crate) const TIMERS_PER_SCAN: usize = 1000;
const FIRST_TIMER_PAGE: usize = 4;

pub(crate) const BACKFILL_CHUNK: usize = 200;

/// A pass over every profile after definitions changed.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Backfill {
    pub id: String,
    /// `<kind>/<id> v<version>` (or `deleted`) of each change it brings in.
    pub definitions: Vec<String>,
    /// The last profile id done.
    pub cursor: Option<String>,
    pub scanned: u64,
    /// Profiles when it started.
    pub total: u64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

impl ProfilesProcessor {
    /// Installs the catalog's definitions if they changed; when the versions in force
    /// differ from those stored, records the new ones and starts (or widens and
    /// restarts) a back-fill.
    pub(crate) fn sync_definitions(&mut self, txn: &mut Txn<'_>) -> Result<()> {
        let current = self.catalog.current();
        if self.synced && current.generation == self.rules.defs.generation {
            return Ok(());
        }
        self.rules.defs = current.clone();
        self.synced = true;
        let applied: BTreeMap<String, i32> = txn.get_json(META_APPLIED)?.unwrap_or_default();
        if applied == current.versions {
            return Ok(());
        }
        let keys: BTreeSet<&String> = applied.keys().chain(current.versions.keys()).collect();
        let changed: Vec<String> = keys
            .into_iter()
            .filter(|k| applied.get(*k) != current.versions.get(*k))
            .map(|k| match current.versions.get(k) {
                Some(v) => format!("{k} v{v}"),
                None => format!("{k} deleted"),
            })
            .collect();
        let mut job = txn
            .get_json::<Backfill>(META_BACKFILL)?
            .filter(|j| j.finished_at.is_none())
            .unwrap_or_default();
        job.definitions.extend(changed);
        let versions = serde_json::to_string(&current.versions)?;
        job.id = deterministic_id("backfill", &[&versions]);
        job.cursor = None;
        job.scanned = 0;
        let every: Vec<i32> = (0..self.placement.partitions).collect();
        job.total = sum_partitions(|k| txn.get(k), &every, profiles_count_key)? as u64;
        job.started_at = (self.clock)();
        job.finished_at = None;
        tracing::info!(definitions = ?job.definitions, profiles = job.total, "definitions changed: back-fill started");
        txn.put_json(META_APPLIED.to_vec(), &current.versions)?;
        txn.put_json(META_BACKFILL.to_vec(), &job)
    }

    /// Re-evaluates profiles whose next window edge has passed.
    pub(crate) fn fire_timers(
        &self,
        now: i64,
        deadline: Instant,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let serving = self.placement.serving();
        // Partitions take turns at going first, so none waits behind another's backlog.
        let first = (now / 250).rem_euclid(serving.len().max(1) as i64) as usize;
        for i in 0..serving.len() {
            let partition = serving[(first + i) % serving.len()];
            if Instant::now() >= deadline {
                break;
            }
            self.fire_partition_timers(partition, now, deadline, txn, out)?;
        }
        Ok(())
    }

    pub(crate) fn fire_partition_timers(
        &self,
        partition: i32,
        now: i64,
        deadline: Instant,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let prefix = timer_prefix(partition);
        // Timers in due order, from the first on, in pages that grow from a few rows: a
        // tick with nothing due (the usual case) reads one small page, not a thousand
        // timers. A firing may set a timer that is due already; it sorts after the one
        // that fired (a later edge), so the pages after the cursor find it, and a profile
        // is evaluated at each edge in turn: what a replay or a late tick gives is what
        // firing on time gave.
        let mut start = prefix.clone().into_bytes();
        let mut page = FIRST_TIMER_PAGE;
        loop {
            let rows = txn.scan_from(prefix.as_bytes(), &start, page)?;
            // The page ended the timers, unless a firing set a timer after it.
            let mut last_page = rows.len() < page;
            for (k, _) in rows {
                if Instant::now() >= deadline {
                    return Ok(());
                }
                start.clone_from(&k);
                start.push(0);
                let rest = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let Some((due, id)) = rest.split_once('/') else {
                    txn.delete(k);
                    continue;
                };
                let due: i64 = due.parse().unwrap_or(0);
                if due > now {
                    return Ok(());
                }
                txn.delete(k);
                if txn.get(&profile_key(id))?.is_none() {
                    continue;
                }
                let cause_id = format!("timer/{id}/{due}");
                // Stamped with when it was due, not when it fired: the same in a replay.
                let cause = Cause {
                    id: &cause_id,
                    why: Why::Window,
                    event_time: due,
                    received_at: due,
                    event: None,
                };
                self.metrics.timers.inc();
                // Only what left a window is re-evaluated.
                self.update(txn, id, &cause, out, |_, _| false)?;
                last_page = false;
            }
            if last_page {
                return Ok(());
            }
            page = (page * 4).min(TIMERS_PER_SCAN);
        }
    }

    /// Moves the back-fill on by chunks of profiles, for a bounded time.
    pub(crate) fn backfill(
        &self,
        now: i64,
        deadline: Instant,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let Some(mut job) = txn
            .get_json::<Backfill>(META_BACKFILL)?
            .filter(|j| j.finished_at.is_none())
        else {
            return Ok(());
        };
        let cause = Cause {
            id: &job.id.clone(),
            why: Why::Definition,
            event_time: job.started_at,
            received_at: job.started_at,
            event: None,
        };
        while Instant::now() < deadline {
            let start = match &job.cursor {
                Some(c) => {
                    let mut k = profile_key(c);
                    k.push(0);
                    k
                }
                None => b"p/".to_vec(),
            };
            let rows = txn.scan_from(b"p/", &start, BACKFILL_CHUNK)?;
            for (k, _) in &rows {
                let id = String::from_utf8_lossy(&k[2..]).into_owned();
                // A profile whose partition moved away is brought up to date too, so it
                // is current if the partition comes back; its records are the new
                // owner's to send.
                let mut elsewhere = Vec::new();
                let sink = if self.placement.owns(&id) {
                    &mut *out
                } else {
                    &mut elsewhere
                };
                self.update(txn, &id, &cause, sink, |_, t| {
                    *t = Touched::all();
                    false
                })?;
                job.scanned += 1;
                job.cursor = Some(id);
            }
            self.metrics.backfilled.inc_by(rows.len() as u64);
            if rows.len() < BACKFILL_CHUNK {
                job.finished_at = Some(now);
                tracing::info!(profiles = job.scanned, "back-fill done");
                break;
            }
        }
        txn.put_json(META_BACKFILL.to_vec(), &job)
    }
}
