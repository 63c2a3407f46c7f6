//! Privacy requests in profiles (`privacy.actions`, stage `profiles`, from identity):
//!
//! - `delete`: the profile and those merged into it leave every store: the profile with
//!   its traits, computed traits, consent and waiting triggers, its timer, its segment
//!   memberships (member index and sizes), household and account indexes, identifier
//!   index, kept events and their de-duplication entries, merge redirects. No
//!   membership record goes out (it would carry the person's data again): activation
//!   gets the request next and withdraws the person from every destination.
//! - `export`: the profile and its kept events, in a report sealed with its key.
//! - `suppress` / `unsuppress`: nothing kept here changes; handed on to activation.
//!
//! Each reports on `privacy.reports` (counts; an export's data, sealed). An erased
//! profile id is remembered with the request's time (`erased/<profile>`): records about
//! it received before then, still on their way, are dropped.

use serde_json::{Value, json};
use tracing::info;

use tessera_common::Result;
use tessera_common::erasure;
use tessera_common::message::Output;
use tessera_common::records::{AvroRecord, PrivacyAction, PrivacyReport};
use tessera_common::store::Txn;

use crate::profile::Profile;
use crate::state::{
    ProfilesProcessor, index_key, live_id, member_key_prefix, profile_key, redirect_key,
};

impl ProfilesProcessor {
    /// Whether a record received at `received_at` about these profiles was sent before
    /// one of them was erased (it was on its way): then it is dropped and counted. A
    /// person who comes back after an erasure (not suppressed) starts afresh.
    pub(crate) fn sent_before_erasure(
        &self,
        txn: &Txn<'_>,
        profiles: &[&str],
        received_at: i64,
    ) -> Result<bool> {
        for p in profiles {
            if erasure::sent_before(txn, p, received_at)? {
                self.metrics.erased_dropped.inc();
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub(crate) fn on_privacy(
        &self,
        a: PrivacyAction,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if a.stage != "profiles" {
            return Ok(());
        }
        let live = live_id(|k| txn.get(k), &a.profile_id)?;
        let detail = match a.action.as_str() {
            "delete" => {
                txn.purge_on_commit();
                let mut ids = vec![live.clone()];
                ids.extend(a.merged_profiles.iter().cloned());
                if live != a.profile_id {
                    ids.push(a.profile_id.clone());
                }
                let mut removed = Removed::default();
                for id in &ids {
                    self.erase(txn, id, &mut removed)?;
                    // Records about them sent before now may still be on their way.
                    erasure::mark(txn, id, a.requested_at)?;
                }
                info!(request = %a.request_id, profiles = removed.profiles, "profile erased");
                serde_json::to_value(&removed)?
            }
            "export" => {
                let profile: Option<Profile> = txn.get_json(&profile_key(&live))?;
                let events: Vec<Value> = self
                    .read_history(txn, &live)?
                    .iter()
                    .map(|r| r.payload())
                    .collect();
                json!({"profile": profile, "events": events})
            }
            _ => json!({}),
        };
        let next = PrivacyAction {
            stage: "activation".into(),
            ..a.clone()
        };
        out.push(Output::plain(
            self.topics.privacy_actions(),
            live.as_bytes().to_vec(),
            next.to_avro()?,
        ));
        let r = PrivacyReport {
            request_id: a.request_id.clone(),
            service: "profiles".into(),
            action: a.action.clone(),
            status: "done".into(),
            profile_id: Some(live.clone()),
            at: a.requested_at,
            detail: detail.to_string(),
        };
        out.push(r.output(self.topics.privacy_reports())?);
        Ok(())
    }

    /// Removes everything kept of one profile id.
    fn erase(&self, txn: &mut Txn<'_>, id: &str, removed: &mut Removed) -> Result<()> {
        if let Some(p) = txn.get_json::<Profile>(&profile_key(id))? {
            for segment in p.segments.keys() {
                self.count_member(txn, segment, id, -1)?;
                txn.delete(format!("{}{id}", member_key_prefix(segment)).into_bytes());
                removed.memberships += 1;
            }
            for i in &p.identifiers {
                txn.delete(index_key(&i.kind, &i.value));
            }
            removed.pending_triggers += p.pending.len();
            self.forget_profile(txn, &p)?;
            removed.profiles += 1;
        }
        for r in self.take_history(txn, id)? {
            removed.events += 1;
            if self.forget_message(txn, &r.event.message_id)? {
                removed.dedup_entries += 1;
            }
        }
        txn.delete(redirect_key(id));
        Ok(())
    }
}

/// What a delete removed from profiles' store.
#[derive(Debug, Default, serde::Serialize)]
struct Removed {
    profiles: usize,
    memberships: usize,
    pending_triggers: usize,
    events: usize,
    dedup_entries: usize,
}
