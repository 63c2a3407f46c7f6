//! The profiles processor: applies resolved events, merges and transfers to profiles in
//! RocksDB, evaluates segments on every change and emits membership changes.
//!
//! By concern: `keys` (the key layout), `placement` (which profiles this instance
//! acts on), `metrics`, `events` (an event applied), `history` (the kept events),
//! `merges` (merges, splits, transfers), `tick` (definitions, timers, back-fill), `fit`
//! (the predictive models, fitted on the tick) and
//! `queries` (the API's reads), `changes` (what a batch changed, for the live stream);
//! the processor's tests are in `tests.rs`.
//!
//! Definitions change at run time (see `catalog`): the processor notices a new catalog
//! generation, records the versions it now applies and starts a back-fill, a pass over
//! every profile on the tick that rebuilds stale computed traits from the kept history
//! and re-evaluates the segments, emitting enter and exit records.
//!
//! Merges across partitions: a merge record arrives keyed by the merged profile, where
//! its state lives. That state leaves as a transfer keyed by the survivor and is
//! absorbed there; the merged id becomes a redirect, and events still in flight for it
//! are forwarded the same way.

mod changes;
mod events;
mod fit;
mod history;
mod keys;
mod merges;
mod metrics;
mod placement;
pub mod queries;
mod tick;

pub use changes::Changes;
use events::*;
pub use fit::{FitPolicy, FitStatus, Fitting};
use history::*;
pub use keys::*;
pub use metrics::*;
pub use placement::*;
pub use queries::*;
pub use tick::*;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use tracing::debug;

use tessera_common::admin::Admin;
use tessera_common::ids::deterministic_id;
use tessera_common::message::{Message, Output};
use tessera_common::records::{
    AvroRecord, Identifier, MembershipChange, PrivacyAction, ProfileMerge, ProfileSplit,
    ProfileTransfer, ResolvedEvent, TriggerFired,
};
use tessera_common::runner::{self, Ownership, Processor};
use tessera_common::store::{Store, Txn};
use tessera_common::topics::{Routes, Topics};
use tessera_common::{Error, Result};

use crate::apply::ApplyRules;
use crate::catalog::{Catalog, DefinitionSet};
use crate::profile::{Membership, Profile, Transition};
use crate::segments::Touched;
use crate::triggers;

/// What a record the processor consumes is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input {
    Resolved,
    Merges,
    Splits,
    Transfers,
    PrivacyActions,
}

impl Input {
    /// The processor's input topics.
    pub fn routes(topics: &Topics) -> Routes<Input> {
        Routes::new([
            (topics.resolved(), Input::Resolved),
            (topics.merges(), Input::Merges),
            (topics.splits(), Input::Splits),
            (topics.transfers(), Input::Transfers),
            (topics.privacy_actions(), Input::PrivacyActions),
        ])
    }
}

pub struct ProfilesProcessor {
    pub topics: Topics,
    /// The input topics, resolved once ([`Input::routes`]).
    pub inputs: Routes<Input>,
    /// Definitions as the table reader last saw them; installed into `rules.defs`.
    pub catalog: Catalog,
    /// Timeline length, trait strategies and the definitions in force.
    pub rules: ApplyRules,
    /// Whether `rules.defs` was checked against the stored versions since start.
    pub synced: bool,
    /// The wall clock (windows are relative to it); a fixed one in tests.
    pub clock: fn() -> i64,
    /// Events kept per profile to re-derive it after a split.
    pub history_limit: usize,
    pub dedup_window_ms: i64,
    pub metrics: ProfilesMetrics,
    /// Profiles changed by the batch, announced to live readers after commit.
    pub changes: Changes,
    /// Which profiles are this instance's to act on.
    pub placement: Placement,
    /// The predictive traits' model fits.
    pub fitting: Fitting,
}

impl Processor for ProfilesProcessor {
    fn process(&mut self, msg: &Message, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        self.sync_definitions(txn)?;
        let bytes = msg.payload.as_deref().unwrap_or_default();
        let decoded = match self.inputs.of(&msg.topic) {
            Some(Input::Resolved) => {
                ResolvedEvent::from_avro(bytes).map(|r| self.on_event(r, txn, out))
            }
            Some(Input::Merges) => {
                ProfileMerge::from_avro(bytes).map(|m| self.on_merge(m, txn, out))
            }
            Some(Input::Splits) => {
                ProfileSplit::from_avro(bytes).map(|s| self.on_split(s, txn, out))
            }
            Some(Input::Transfers) => {
                ProfileTransfer::from_avro(bytes).map(|t| self.on_transfer(t, txn, out))
            }
            Some(Input::PrivacyActions) => {
                PrivacyAction::from_avro(bytes).map(|a| self.on_privacy(a, txn, out))
            }
            None => Err(Error::Internal(format!("unexpected topic {}", msg.topic))),
        };
        runner::handled_or_dead_letter(&self.topics.deadletter(), msg, decoded, out)?;
        Ok(())
    }

    /// Fires due timers, moves the back-fill and the model fits on and forgets
    /// de-duplication entries past their window.
    fn tick(&mut self, now_ms: i64, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        self.sync_definitions(txn)?;
        let deadline = Instant::now() + TICK_BUDGET;
        self.fire_timers(now_ms, deadline, txn, out)?;
        self.backfill(now_ms, deadline, txn, out)?;
        self.fit_models(now_ms, txn, out)?;
        self.forget_expired_messages(now_ms, txn)
    }

    fn processed(&mut self) -> Option<runner::AfterCommit> {
        Some(Box::new(self.changes.take()))
    }
}

impl ProfilesProcessor {
    /// Drops the de-duplication entries whose window is over, at most 10,000 per tick.
    /// They are kept in expiry order; pages grow from a few rows, so a tick with nothing
    /// expired (most ticks) reads one small page, where it read 10,000 rows.
    fn forget_expired_messages(&self, now_ms: i64, txn: &mut Txn<'_>) -> Result<()> {
        let prefix = SEEN_EXP_PREFIX.as_bytes();
        let (mut start, mut page, mut left) = (prefix.to_vec(), 4, 10_000usize);
        while left > 0 {
            let rows = txn.scan_committed_from(prefix, &start, page.min(left))?;
            let last_page = rows.len() < page.min(left);
            for (k, _) in rows {
                left -= 1;
                start.clone_from(&k);
                start.push(0);
                let rest = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let Some((expiry, id)) = rest.split_once('/') else {
                    continue;
                };
                if expiry.parse::<i64>().unwrap_or(i64::MAX) > now_ms {
                    return Ok(());
                }
                txn.delete(seen_key(id));
                txn.delete(k);
            }
            if last_page {
                break;
            }
            page = (page * 4).min(1000);
        }
        Ok(())
    }
}

#[cfg(test)]
mod predict_tests;
#[cfg(test)]
mod tests;
