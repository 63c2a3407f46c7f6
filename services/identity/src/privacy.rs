//! Privacy requests in the graph (they come as commands, in order with the events):
//!
//! - `delete`: erases the person from the graph ([`Graph::erase`]), destroys the keys of
//!   every subject of theirs (their events' ingest subjects, their profile ids, the
//!   request itself), optionally suppresses their identifiers first, and hands the
//!   request to profiles;
//! - `suppress` / `unsuppress`: writes the profile's identifiers (hashes) to the
//!   `privacy.suppressions` table that ingest and identity read, so their events are
//!   dropped, or lifts it;
//! - `export`: reports the person's identifiers and merges, sealed with the profile's key.
//!
//! Each step reports on `privacy.reports` (counts and ids; only an export's report holds
//! personal data, sealed). A request id is applied once (`preq/<request id>`).

use serde_json::{Value, json};
use tracing::info;

use tessera_common::Result;
use tessera_common::ids::{SubjectHash, subject_hash};
use tessera_common::message::Output;
use tessera_common::records::{
    AvroRecord, Identifier, IdentityCommand, PrivacyAction, PrivacyReport, Suppression,
};
use tessera_common::store::Txn;
use tessera_common::vault::Vault;

use crate::IdentityProcessor;
use crate::graph::{self, Graph};

impl IdentityProcessor {
    /// Overwrites every key of these subjects with its erasure marker: what was sealed
    /// with them is noise, and is known to be erased, not lost. `at`: when (the
    /// request's time, the same in a replay).
    pub(crate) fn destroy_keys(
        &self,
        subjects: &[SubjectHash],
        at: i64,
        out: &mut Vec<Output>,
    ) -> Result<usize> {
        let Some(vault) = &self.vault else {
            return Ok(0);
        };
        let keys = vault.keys_of(subjects)?;
        for k in &keys {
            out.push(Output::plain(
                self.topics.keys(),
                k.clone().into_bytes(),
                Vault::erasure_record(k)?,
            ));
        }
        // Keys made elsewhere meanwhile (a timer, a visitor's next event) are erased too.
        for s in subjects {
            let (key, marker) = Vault::subject_erasure(s, at);
            out.push(Output::plain(self.topics.keys(), key.into_bytes(), marker));
        }
        Ok(keys.len())
    }

    pub(crate) fn on_privacy(
        &self,
        cmd: &IdentityCommand,
        request_subject: &str,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        // A request is applied once, even if it was written twice (a client retrying).
        let applied = format!("preq/{}", cmd.command_id).into_bytes();
        if txn.get(&applied)?.is_some() {
            return Ok(());
        }
        txn.put(applied, Vec::new());
        let (Some(kind), Some(value)) = (&cmd.kind, &cmd.value) else {
            return self.report(
                cmd,
                None,
                "refused",
                json!({"reason": "no identifier"}),
                out,
            );
        };
        let asked = Identifier {
            kind: kind.clone(),
            value: value.clone(),
        };
        let profile = match graph::lookup(txn, &asked)? {
            Some(p) => Some(graph::live_profile(txn, &p)?),
            None => None,
        };
        let action = cmd.action.as_str();
        let outcome = if profile.is_some() {
            "done"
        } else {
            "not_found"
        };
        self.privacy.with_label_values(&[action, outcome]).inc();
        info!(request = %cmd.command_id, action, found = profile.is_some(), "privacy request applied to the graph");
        match action {
            "delete" => {
                txn.purge_on_commit();
                let erased = match &profile {
                    Some(p) => Graph::new(&self.rules, cmd.requested_at).erase(txn, p)?,
                    None => None,
                };
                if let Some(e) = &erased {
                    self.log_decisions(crate::fuzzy::log::forget(txn, &e.fuzzy_keys)?, out);
                    // Other people's parts recomputed without the person's facts.
                    let t = cmd.requested_at;
                    self.emit_changes(&e.changes, &cmd.command_id, t, t, out)?;
                }
                let suppressed = if cmd.suppress {
                    let ids = erased
                        .as_ref()
                        .map(|e| e.erased_identifiers.clone())
                        .unwrap_or_else(|| vec![asked.clone()]);
                    self.suppress(cmd, &ids, out)?
                } else {
                    0
                };
                // The request's own key (it holds the identifier) and, for a person
                // found, their profile ids and their events' subjects.
                let mut subjects = vec![subject_hash(request_subject)];
                if let Some(e) = &erased {
                    subjects.push(subject_hash(&e.profile_id));
                    subjects.extend(e.merged_profiles.iter().map(|p| subject_hash(p)));
                    subjects.extend(e.subjects.iter().map(|s| subject_hash(s)));
                }
                let keys = self.destroy_keys(&subjects, cmd.requested_at, out)?;
                let Some(e) = erased else {
                    return self.report(
                        cmd,
                        None,
                        "not_found",
                        json!({"suppressed_identifiers": suppressed, "keys_destroyed": keys}),
                        out,
                    );
                };
                let mut detail = serde_json::to_value(&e)?;
                detail["subjects"] = json!(e.subjects.len());
                detail["keys_destroyed"] = json!(keys);
                detail["suppressed_identifiers"] = json!(suppressed);
                self.hand_on(cmd, &e.profile_id, e.merged_profiles.clone(), out)?;
                self.report(cmd, Some(&e.profile_id), "done", detail, out)
            }
            "suppress" => {
                let ids = match &profile {
                    Some(p) => node_identifiers(txn, p)?,
                    None => vec![asked.clone()],
                };
                let n = self.suppress(cmd, &ids, out)?;
                let detail = json!({"suppressed_identifiers": n});
                match &profile {
                    Some(p) => {
                        self.hand_on(cmd, p, Vec::new(), out)?;
                        self.report(cmd, Some(p), "done", detail, out)
                    }
                    None => self.report(cmd, None, "not_found", detail, out),
                }
            }
            "unsuppress" => {
                let n = self.unsuppress(&asked, out);
                let detail = json!({"unsuppressed_identifiers": n});
                match &profile {
                    Some(p) => {
                        self.hand_on(cmd, p, Vec::new(), out)?;
                        self.report(cmd, Some(p), "done", detail, out)
                    }
                    None if n > 0 => self.report(cmd, None, "done", detail, out),
                    None => self.report(cmd, None, "not_found", detail, out),
                }
            }
            "export" => match &profile {
                Some(p) => {
                    let view = crate::api::view_in(txn, p)?.unwrap_or(Value::Null);
                    self.hand_on(cmd, p, Vec::new(), out)?;
                    self.report(cmd, Some(p), "done", json!({"graph": view}), out)
                }
                None => self.report(cmd, None, "not_found", json!({}), out),
            },
            _ => Ok(()),
        }
    }

    /// Suppresses identifiers for the request: returns how many were not already.
    fn suppress(
        &self,
        cmd: &IdentityCommand,
        ids: &[Identifier],
        out: &mut Vec<Output>,
    ) -> Result<usize> {
        let mut n = 0;
        for i in ids {
            let h = graph::ident_hash(i);
            if self.suppressed.contains(&h) {
                continue;
            }
            n += 1;
            self.suppressed.insert(&h, &cmd.command_id);
            let record = Suppression {
                identifier: h.clone(),
                kind: i.kind.clone(),
                request_id: cmd.command_id.clone(),
                at: cmd.requested_at,
            };
            out.push(Output::plain(
                self.topics.suppressions(),
                h.into_bytes(),
                record.to_avro()?,
            ));
        }
        Ok(n)
    }

    /// Lifts the suppression that covers `i`: every identifier that request suppressed.
    fn unsuppress(&self, i: &Identifier, out: &mut Vec<Output>) -> usize {
        let Some(request) = self.suppressed.request_of(&graph::ident_hash(i)) else {
            return 0;
        };
        let lifted = self.suppressed.of_request(&request);
        for h in &lifted {
            self.suppressed.remove(h);
            out.push(Output::plain(
                self.topics.suppressions(),
                h.clone().into_bytes(),
                Vec::new(),
            ));
        }
        lifted.len()
    }

    /// Passes the request on to profiles.
    fn hand_on(
        &self,
        cmd: &IdentityCommand,
        profile: &str,
        merged_profiles: Vec<String>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let action = PrivacyAction {
            request_id: cmd.command_id.clone(),
            action: cmd.action.clone(),
            stage: "profiles".into(),
            profile_id: profile.to_string(),
            merged_profiles,
            requested_at: cmd.requested_at,
        };
        out.push(Output::plain(
            self.topics.privacy_actions(),
            profile.as_bytes().to_vec(),
            action.to_avro()?,
        ));
        Ok(())
    }

    /// Reports what the graph did. An export's report carries personal data: it is
    /// sealed with the profile's key.
    fn report(
        &self,
        cmd: &IdentityCommand,
        profile: Option<&str>,
        status: &str,
        detail: Value,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let r = PrivacyReport {
            request_id: cmd.command_id.clone(),
            service: "identity".into(),
            action: cmd.action.clone(),
            status: status.into(),
            profile_id: profile.map(str::to_string),
            at: cmd.requested_at,
            detail: detail.to_string(),
        };
        out.push(r.output(self.topics.privacy_reports())?);
        Ok(())
    }
}

fn node_identifiers(txn: &Txn<'_>, profile: &str) -> Result<Vec<Identifier>> {
    Ok(txn
        .get_json::<graph::Node>(&graph::node_key(profile))?
        .map(|n| n.identifiers)
        .unwrap_or_default())
}
