//! Corrections and privacy: un-merge (a separation), detach, and erasure of a person
//! with every key and value of theirs.

use super::*;

/// What erasing a person removed from the graph (counts and ids, never values).
#[derive(Debug, Default, PartialEq, Serialize)]
pub struct Erased {
    pub profile_id: String,
    /// Profiles merged into it over time.
    pub merged_profiles: Vec<String>,
    pub identifiers: usize,
    pub facts: usize,
    pub merges: usize,
    pub fuzzy_records: usize,
    pub separations: usize,
    /// The ingest subjects of its events.
    #[serde(skip)]
    pub subjects: Vec<String>,
    /// Its identifiers, for the suppression that may follow.
    #[serde(skip)]
    pub erased_identifiers: Vec<Identifier>,
    /// Its fuzzy records' keys, for the matcher's log.
    #[serde(skip)]
    pub fuzzy_keys: Vec<String>,
    /// Other people's parts recomputed without the erased facts (a link only the
    /// person's events made is gone): merges and splits to report.
    #[serde(skip)]
    pub changes: Changes,
}

/// The source an erasure's recomputation names as its cause's.
pub(crate) const ERASE_SOURCE: &str = "erase";

impl Graph<'_> {
    /// Undoes a merge: from now on no profile holds identifiers of both sides, and the
    /// part of the graph around them is recomputed. The sides come with the command
    /// (so a replay that reads the command before the events works the same), else from
    /// the stored merge. `None` when neither knows them.
    pub fn unmerge(
        &self,
        txn: &mut Txn<'_>,
        merge_id: &str,
        sides: (&[Identifier], &[Identifier]),
        at: (i64, &str),
    ) -> Result<Option<Changes>> {
        let info = txn.get_json::<MergeInfo>(&merge_info_key(merge_id))?;
        let (left, right) = match (&info, sides) {
            (_, (l, r)) if !l.is_empty() && !r.is_empty() => (l.to_vec(), r.to_vec()),
            (Some(i), _) => (i.survivor_identifiers.clone(), i.merged_identifiers.clone()),
            (None, _) => return Ok(None),
        };
        if let Some(mut i) = info {
            i.undone = true;
            txn.put_json(merge_info_key(merge_id), &i)?;
        }
        let sep = Separation {
            id: deterministic_id("separation", &[merge_id]),
            left,
            right,
            merge: Some(merge_id.to_string()),
        };
        if txn.get(&sep_key(&sep.id))?.is_some() {
            return Ok(Some(Changes::default()));
        }
        for i in sep.left.iter().chain(&sep.right) {
            txn.put(
                format!("{}{}", sepidx_prefix(i), sep.id).into_bytes(),
                Vec::new(),
            );
        }
        txn.put_json(sep_key(&sep.id), &sep)?;
        let start: Vec<Identifier> = sep.left.iter().chain(&sep.right).cloned().collect();
        let cause = Fact::new(self.rules, &[], at.0, at.1, "unmerge", None);
        Ok(Some(self.recompute(txn, &start, &cause)?))
    }

    /// Erases a person: the profile `profile` (or the one it was merged into), every
    /// identifier, sighting, fact, fuzzy record, merge, separation side and ingest
    /// subject of it and of the profiles it absorbed. `None` when there is no such
    /// profile. Facts shared with identifiers of other profiles go too, and those
    /// identifiers' parts are recomputed without them, so the graph stays a function of
    /// the facts it keeps.
    pub fn erase(&self, txn: &mut Txn<'_>, profile: &str) -> Result<Option<Erased>> {
        let live = live_profile(txn, profile)?;
        let Some(node) = txn.get_json::<Node>(&node_key(&live))? else {
            return Ok(None);
        };
        let mut e = Erased {
            profile_id: live.clone(),
            identifiers: node.identifiers.len(),
            ..Default::default()
        };
        // Identifiers of other profiles whose facts with the person's go.
        let mut others: Vec<Identifier> = Vec::new();
        // The profiles it absorbed, through the merge history: read whole before
        // anything is deleted, as the chains of `mergedinto/` decide what is the person's.
        let mut queue = vec![live.clone()];
        let mut profiles: Vec<String> = Vec::new();
        let mut history = Vec::new();
        while let Some(p) = queue.pop() {
            if profiles.contains(&p) {
                continue;
            }
            let prefix = history_prefix(&p);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                let merge_id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let info = txn.get_json::<MergeInfo>(&merge_info_key(&merge_id))?;
                // A profile merged in and since split back out (an un-merge) lives
                // again, as someone else: it is not the person's.
                if let Some(m) = &info
                    && live_profile(txn, &m.merged)? == live
                {
                    queue.push(m.merged.clone());
                }
                history.push((k, info));
            }
            profiles.push(p);
        }
        for (k, info) in history {
            if let Some(m) = info {
                forget_merge(txn, &m);
                e.merges += 1;
            }
            txn.delete(k);
        }
        for p in profiles.iter().filter(|p| **p != live) {
            txn.delete(merged_key(p));
            txn.delete(node_key(p));
            e.merged_profiles.push(p.clone());
        }
        for p in &profiles {
            let prefix = subjects_prefix(p);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                e.subjects
                    .push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
                txn.delete(k);
            }
        }
        for i in &node.identifiers {
            // Merges naming them, kept with any profile (one later split may be
            // another person's now).
            for m in merges_naming(txn, i)? {
                forget_merge(txn, &m);
                e.merges += 1;
            }
            txn.delete(id_key(i));
            txn.delete(seen_key(i));
            txn.delete(detached_key(i));
            let prefix = if_prefix(i);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if let Some(f) = txn.get_json::<Fact>(&fact_key(&key))? {
                    for j in &f.ids {
                        txn.delete(format!("{}{key}", if_prefix(j)).into_bytes());
                        if !node.identifiers.contains(j) && !others.contains(j) {
                            others.push(j.clone());
                        }
                    }
                    txn.delete(fact_key(&key));
                    e.facts += 1;
                }
                txn.delete(k);
            }
            let prefix = sepidx_prefix(i);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if let Some(mut sep) = txn.get_json::<Separation>(&sep_key(&id))? {
                    sep.left.retain(|x| !node.identifiers.contains(x));
                    sep.right.retain(|x| !node.identifiers.contains(x));
                    if sep.left.is_empty() || sep.right.is_empty() {
                        // Nothing left to keep apart.
                        for x in sep.left.iter().chain(&sep.right) {
                            txn.delete(format!("{}{id}", sepidx_prefix(x)).into_bytes());
                        }
                        txn.delete(sep_key(&id));
                    } else {
                        txn.put_json(sep_key(&id), &sep)?;
                    }
                    e.separations += 1;
                }
                txn.delete(k);
            }
            let records = crate::fuzzy::erase(txn, self.rules.fuzzy.as_ref(), i)?;
            e.fuzzy_records += records.len();
            e.fuzzy_keys.extend(records);
        }
        txn.delete(node_key(&live));
        if !others.is_empty() {
            e.changes = self.recompute(txn, &others, &self.erasure_cause(&live))?;
        }
        e.erased_identifiers = node.identifiers;
        Ok(Some(e))
    }

    /// The cause an erasure's recomputation names (no identifiers: a command).
    pub(crate) fn erasure_cause(&self, profile: &str) -> Fact {
        Fact::new(
            self.rules,
            &[],
            self.received_at,
            &format!("erase-{profile}"),
            ERASE_SOURCE,
            None,
        )
    }

    /// Takes an identifier out of its profile: it never links to anything again.
    pub fn detach(&self, txn: &mut Txn<'_>, i: &Identifier, at: (i64, &str)) -> Result<Changes> {
        txn.put(detached_key(i), Vec::new());
        let cause = Fact::new(self.rules, &[], at.0, at.1, "detach", None);
        self.recompute(txn, std::slice::from_ref(i), &cause)
    }
}
