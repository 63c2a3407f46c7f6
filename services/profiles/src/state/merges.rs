//! Merges, splits and transfers: a merged profile's state leaves as a transfer keyed by
//! the survivor and is absorbed there; a split re-derives each part from its own events.

use super::*;

/// A profile's state on the transfer topic, with its kept events.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Moved {
    #[serde(flatten)]
    pub(crate) profile: Profile,
    #[serde(default)]
    pub(crate) history: Vec<ResolvedEvent>,
    /// Set by a split: the survivor id is live again (its redirect goes).
    #[serde(default)]
    pub(crate) revive: bool,
    /// The version of the merge that sent it (0 for a split's or a late event's): a
    /// survivor merged away by an older merge is live again for it.
    #[serde(default)]
    pub(crate) version: i64,
}

impl ProfilesProcessor {
    pub(crate) fn transfer(
        &self,
        survivor: &str,
        state: &Profile,
        history: Vec<ResolvedEvent>,
        revive: bool,
        version: i64,
        cause: &Cause<'_>,
    ) -> Result<Output> {
        let moved = Moved {
            profile: state.clone(),
            history,
            revive,
            version,
        };
        let t = ProfileTransfer {
            transfer_id: deterministic_id("transfer", &[survivor, &state.id, cause.id]),
            survivor: survivor.to_string(),
            from_profile: state.id.clone(),
            state: serde_json::to_string(&moved)?,
            received_at: cause.received_at,
        };
        Ok(Output::sealed(
            self.topics.transfers(),
            survivor.as_bytes().to_vec(),
            t.to_avro()?,
            survivor,
        ))
    }

    /// Rebuilds a profile from events: what it would be had only these events been its.
    pub(crate) fn rebuild(
        &self,
        id: &str,
        events: &[ResolvedEvent],
        owner: &BTreeMap<Identifier, String>,
    ) -> Profile {
        let mut p = Profile::new(id);
        for r in events {
            p.apply(r, &self.rules);
        }
        p.identifiers
            .retain(|i| owner.get(i).is_none_or(|o| o == id));
        p.identifiers.extend(
            owner
                .iter()
                .filter(|(_, o)| *o == id)
                .map(|(i, _)| i.clone()),
        );
        p
    }

    /// Removes a profile with its group indexes and timer (not its memberships).
    pub(crate) fn forget_profile(&self, txn: &mut Txn<'_>, p: &Profile) -> Result<()> {
        index_groups(
            txn,
            &p.id,
            (p.household.clone(), p.accounts.clone()),
            &Profile::new(&p.id),
        );
        if let Some(due) = p.timer {
            txn.delete(timer_key(self.placement.partition(&p.id), due, &p.id));
        }
        txn.delete(profile_key(&p.id));
        txn.delete(survived_key(&p.id));
        self.changes.touch(&p.id);
        self.count_profiles(txn, &p.id, -1)
    }

    /// A profile leaves: its memberships end and its indexes go.
    pub(crate) fn remove(
        &self,
        txn: &mut Txn<'_>,
        p: &Profile,
        reason: &str,
        cause: &Cause<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let exits: Vec<Change> = p
            .segments
            .iter()
            .map(|(id, mem)| Change::new(id, mem.version, Transition::Exit, reason.to_string()))
            .collect();
        // The records carry the profile as it is after: in no segment.
        let gone = Profile {
            segments: BTreeMap::new(),
            ..p.clone()
        };
        self.emit(txn, &gone, &exits, cause, out)?;
        self.forget_profile(txn, p)
    }

    pub(crate) fn on_merge(
        &self,
        m: ProfileMerge,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if self.sent_before_erasure(txn, &[&m.survivor, &m.merged], m.received_at)?
            || self.seen_before(txn, &m.merge_id, m.received_at, "merge")?
        {
            return Ok(());
        }
        // The merged profile absorbed a later merge (identity merged it away, then its
        // survivor back into it): this older merge is undone already, and reading it
        // would take the profile out of its segments and back in.
        if get_version(txn, &survived_key(&m.merged))? > m.version {
            return Ok(());
        }
        let cause = Cause {
            id: &m.merge_id,
            why: Why::Merge,
            event_time: m.event_time,
            received_at: m.received_at,
            event: None,
        };
        txn.put(
            redirect_key(&m.merged),
            redirect_value(&m.survivor, m.version),
        );
        self.changes.touch(&m.merged);
        let Some(mut merged) = txn.get_json::<Profile>(&profile_key(&m.merged))? else {
            return Ok(());
        };
        // The merged profile leaves its segments; the survivor is re-evaluated on arrival.
        self.remove(txn, &merged, "profile merged", &cause, out)?;
        merged.segments.clear();
        // The identifiers are the survivor's now. In the survivor's partition they point
        // to it; in another, the survivor's transfer indexes them where it lives (an
        // index left here would outlive the person's erasure there). An entry that
        // already names another profile (the survivor's own events) is not touched.
        let here = self.placement.partition(&m.merged) == self.placement.partition(&m.survivor);
        for i in &merged.identifiers {
            let key = index_key(&i.kind, &i.value);
            if txn.get(&key)?.is_some_and(|v| v != m.merged.as_bytes()) {
                continue;
            }
            if here {
                txn.put(key, m.survivor.as_bytes().to_vec());
            } else {
                txn.delete(key);
            }
        }
        let history = self.take_log(txn, &m.merged)?;
        out.push(self.transfer(&m.survivor, &merged, history, false, m.version, &cause)?);
        Ok(())
    }

    /// A profile's identifiers now belong to several profiles: each is re-derived from
    /// the kept events that belong to it (an event belongs where its highest-priority
    /// identifier went). With more events than the kept history, the profile that keeps
    /// the id keeps its older totals too.
    pub(crate) fn on_split(
        &self,
        s: ProfileSplit,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if self.sent_before_erasure(txn, &[&s.profile_id], s.received_at)?
            || self.seen_before(txn, &s.split_id, s.received_at, "split")?
        {
            return Ok(());
        }
        let cause = Cause {
            id: &s.split_id,
            why: Why::Split,
            event_time: s.event_time,
            received_at: s.received_at,
            event: None,
        };
        let Some(old) = txn.get_json::<Profile>(&profile_key(&s.profile_id))? else {
            return Ok(());
        };
        let owner: BTreeMap<Identifier, String> = s
            .assignments
            .iter()
            .map(|a| {
                (
                    Identifier {
                        kind: a.kind.clone(),
                        value: a.value.clone(),
                    },
                    a.profile_id.clone(),
                )
            })
            .collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for t in owner.values() {
            *counts.entry(t.as_str()).or_default() += 1;
        }
        let survives = counts.contains_key(s.profile_id.as_str());
        let default_target = if survives {
            s.profile_id.clone()
        } else {
            counts
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map_or(s.profile_id.clone(), |(t, _)| t.to_string())
        };
        let history = self.take_log(txn, &s.profile_id)?;
        let complete = history.len() as u64 >= old.events_total;
        self.metrics
            .splits
            .with_label_values(&[if complete { "true" } else { "false" }])
            .inc();
        let mut by_target: BTreeMap<String, Vec<ResolvedEvent>> = BTreeMap::new();
        for t in counts.keys() {
            by_target.entry(t.to_string()).or_default();
        }
        for r in history {
            let t = r
                .identifiers
                .iter()
                .find_map(|i| owner.get(i))
                .cloned()
                .unwrap_or_else(|| default_target.clone());
            by_target.entry(t).or_default().push(r);
        }
        for (t, events) in &by_target {
            if *t == s.profile_id {
                continue;
            }
            let state = if !complete && *t == default_target {
                // The older totals have no events to re-derive them from: they go along.
                let mut all = old.clone();
                all.segments.clear();
                all.identifiers
                    .retain(|i| owner.get(i).is_none_or(|o| o == t));
                all
            } else {
                // Rebuilt for `t` (its identifiers), sent as coming from the split profile.
                let mut r = self.rebuild(t, events, &owner);
                r.id = s.profile_id.clone();
                r
            };
            out.push(self.transfer(t, &state, events.clone(), true, 0, &cause)?);
        }
        if survives {
            let events = by_target.remove(&s.profile_id).unwrap_or_default();
            let rebuilt = complete.then(|| self.rebuild(&s.profile_id, &events, &owner));
            self.update(txn, &s.profile_id, &cause, out, |p, t| {
                *t = Touched::all();
                match rebuilt {
                    Some(mut r) => {
                        r.segments = std::mem::take(&mut p.segments);
                        r.pending = std::mem::take(&mut p.pending);
                        r.merged_from = p.merged_from.clone();
                        *p = r;
                    }
                    None => p
                        .identifiers
                        .retain(|i| owner.get(i).is_none_or(|o| *o == s.profile_id)),
                }
                true
            })?;
            self.log_events(txn, &s.profile_id, &events)?;
        } else {
            self.remove(txn, &old, "profile split", &cause, out)?;
            txn.put(
                redirect_key(&s.profile_id),
                redirect_value(&default_target, 0),
            );
        }
        Ok(())
    }

    pub(crate) fn on_transfer(
        &self,
        t: ProfileTransfer,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if self.sent_before_erasure(txn, &[&t.survivor, &t.from_profile], t.received_at)?
            || self.seen_before(txn, &t.transfer_id, t.received_at, "transfer")?
        {
            return Ok(());
        }
        let Moved {
            profile: moved,
            history,
            revive,
            version,
        } = serde_json::from_str(&t.state)?;
        let cause = Cause {
            id: &t.transfer_id,
            why: Why::Merge,
            event_time: moved.last_seen.max(0),
            received_at: t.received_at,
            event: None,
        };
        if revive {
            // A split brings a merged-away profile back.
            txn.delete(redirect_key(&t.survivor));
        }
        let (live, stale) = live_since(|k| txn.get(k), &t.survivor, version)?;
        if live != t.survivor {
            out.push(self.transfer(&live, &moved, history, false, version, &cause)?);
            return Ok(());
        }
        if stale.is_some() {
            // Merged away by an older merge than this one, which names it survivor.
            txn.delete(redirect_key(&live));
        }
        self.update(txn, &live, &cause, out, |p, t| {
            *t = Touched::all();
            p.absorb(&moved, &self.rules)
        })?;
        if version > get_version(txn, &survived_key(&live))? {
            txn.put(survived_key(&live), version.to_string().into_bytes());
        }
        // The moved identifiers find this profile now. The merged side dropped its own
        // entries (or a late event of the merged profile pointed one back to it), so
        // they are written here even when the survivor already had them.
        for i in &moved.identifiers {
            txn.put(index_key(&i.kind, &i.value), live.as_bytes().to_vec());
        }
        self.log_events(txn, &live, &history)
    }
}
