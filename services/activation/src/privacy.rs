//! Privacy requests in activation (`privacy.actions`, stage `activation`, from
//! profiles), the last stage:
//!
//! - `delete`: every destination gets a `delete` record for the profile id (and each id
//!   merged into it): downstream systems know people by profile id and erase them; what
//!   activation kept (what each audience last received, recent sends) goes.
//! - `suppress`: the person leaves every audience (`remove`, as for any removal) and
//!   nothing more is activated for them (counted as `person_suppressed`) until an
//!   `unsuppress`.
//! - `export`: what each audience last received, in a report sealed with the profile's
//!   key.
//!
//! State: `sup/<profile>` marks a suppressed person; `erased/<profile>` the time a
//! profile id was erased (records about it received before then, still on their way,
//! are refused as `erased`).

use serde_json::{Map, Value, json};
use tracing::info;

use tessera_common::Result;
use tessera_common::erasure;
use tessera_common::ids::deterministic_id;
use tessera_common::message::Output;
use tessera_common::records::{PrivacyAction, PrivacyReport};
use tessera_common::store::Txn;

use crate::policy::Outcome;
use crate::{ActivationProcessor, Origin, sends_key, sent_key};

fn suppressed_key(profile: &str) -> Vec<u8> {
    format!("sup/{profile}").into_bytes()
}

/// An activation caused by a privacy request, its id derived from `parts`.
fn origin<'a>(a: &'a PrivacyAction, profile: &'a str, parts: &[&str]) -> Origin<'a> {
    Origin {
        activation_id: deterministic_id("activation", parts),
        profile_id: profile,
        source: "privacy",
        source_id: &a.request_id,
        source_version: 0,
        event_time: a.requested_at,
        received_at: a.requested_at,
    }
}

impl ActivationProcessor {
    /// Whether the person is suppressed, or was erased after this record (received at
    /// `received_at`) was sent; if so each destination counts the refusal.
    pub(crate) fn person_suppressed(
        &self,
        txn: &Txn<'_>,
        profile: &str,
        received_at: i64,
        action: &str,
    ) -> Result<bool> {
        let outcome = if txn.get(&suppressed_key(profile))?.is_some() {
            Outcome::PersonSuppressed
        } else if erasure::sent_before(txn, profile, received_at)? {
            Outcome::Erased
        } else {
            return Ok(false);
        };
        for d in &self.destinations {
            self.count(d, action, outcome.as_str());
        }
        Ok(true)
    }

    pub(crate) fn on_privacy(
        &self,
        a: PrivacyAction,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if a.stage != "activation" {
            return Ok(());
        }
        let mut ids = vec![a.profile_id.clone()];
        ids.extend(a.merged_profiles.iter().cloned());
        let mut audiences = Vec::new();
        let mut notices = 0;
        let mut removed = 0;
        for d in &self.destinations {
            for id in &ids {
                for seg in &d.config.segments {
                    let key = sent_key(d.id(), seg, id);
                    let Some(last) = txn.get(&key)? else {
                        continue;
                    };
                    let last: Map<String, Value> =
                        serde_json::from_slice(&last).unwrap_or_default();
                    match a.action.as_str() {
                        "delete" => {
                            txn.delete(key);
                            removed += 1;
                        }
                        "suppress" => {
                            txn.delete(key);
                            removed += 1;
                            let o = origin(&a, id, &[d.id(), seg, id, &a.request_id]);
                            let why = format!("privacy request {}: suppressed", a.request_id);
                            out.push(self.emit(d, o, "remove", why, &json!({}), &last)?);
                        }
                        "export" => audiences.push(json!({
                            "destination": d.id(), "segment": seg, "last_sent": last,
                        })),
                        _ => {}
                    }
                }
                if a.action == "delete" {
                    let o = origin(&a, id, &[d.id(), id, &a.request_id]);
                    let why = format!(
                        "privacy request {}: erase everything about this profile",
                        a.request_id
                    );
                    out.push(self.emit(d, o, "delete", why, &json!({}), &Map::new())?);
                    notices += 1;
                }
            }
        }
        let detail = match a.action.as_str() {
            "delete" => {
                txn.purge_on_commit();
                for id in &ids {
                    txn.delete(sends_key(id));
                    txn.delete(suppressed_key(id));
                    erasure::mark(txn, id, a.requested_at)?;
                }
                json!({"audience_entries": removed, "deletion_notices": notices})
            }
            "suppress" => {
                txn.put(suppressed_key(&a.profile_id), Vec::new());
                json!({"audience_removals": removed})
            }
            "unsuppress" => {
                txn.delete(suppressed_key(&a.profile_id));
                json!({})
            }
            "export" => {
                let sends: Option<Value> = txn.get_json(&sends_key(&a.profile_id))?;
                json!({"audiences": audiences, "recent_sends": sends})
            }
            _ => json!({}),
        };
        info!(request = %a.request_id, action = %a.action, "privacy request applied to activation");
        let r = PrivacyReport {
            request_id: a.request_id.clone(),
            service: "activation".into(),
            action: a.action.clone(),
            status: "done".into(),
            profile_id: Some(a.profile_id.clone()),
            at: a.requested_at,
            detail: detail.to_string(),
        };
        out.push(r.output(self.topics.privacy_reports())?);
        Ok(())
    }
}
