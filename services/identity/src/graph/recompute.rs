//! Recomputing a part of the graph from its facts (a late event, a correction), and
//! writing the result: nodes, index entries, merges and splits.

use super::*;

impl Graph<'_> {
    /// Recomputes the connected part of the graph around `start` from its facts.
    pub fn recompute(
        &self,
        txn: &mut Txn<'_>,
        start: &[Identifier],
        cause: &Fact,
    ) -> Result<Changes> {
        // An identifier no event carried (a command named it: an un-merge's side, a
        // detach) is not part of the graph and gets no profile; what the command stored
        // for it holds when an event brings it ([`Graph::apply_in_order`]). Otherwise
        // the graph would depend on whether the command came first.
        let mut known = Vec::with_capacity(start.len());
        for i in start {
            if seen(txn, i)?.is_some()
                || lookup(txn, i)?.is_some()
                || !txn.scan(if_prefix(i).as_bytes(), 1)?.is_empty()
            {
                known.push(i.clone());
            }
        }
        let start = known.as_slice();
        let mut facts: BTreeMap<String, Fact> = BTreeMap::new();
        let mut ids: BTreeSet<Identifier> = start.iter().cloned().collect();
        let mut queue: Vec<Identifier> = start.to_vec();
        while let Some(i) = queue.pop() {
            let prefix = if_prefix(&i);
            for (k, _) in txn.scan(prefix.as_bytes(), self.max_component_facts + 1)? {
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if facts.contains_key(&key) {
                    continue;
                }
                let Some(f) = txn.get_json::<Fact>(&fact_key(&key))? else {
                    continue;
                };
                for x in &f.ids {
                    if ids.insert(x.clone()) {
                        queue.push(x.clone());
                    }
                }
                facts.insert(key, f);
            }
            // Identifiers of the same profile belong to the part even when the facts
            // that linked them are gone from view (nothing is ever deleted, but be safe).
            if let Some(p) = lookup(txn, &i)?
                && let Some(n) = txn.get_json::<Node>(&node_key(&p))?
            {
                for x in n.identifiers {
                    if ids.insert(x.clone()) {
                        queue.push(x);
                    }
                }
            }
            // An event in a too-large part is applied in arrival order; a command (no
            // identifiers of its own: an un-merge, a detach) is rare and always recomputes.
            if facts.len() > self.max_component_facts && !cause.ids.is_empty() {
                let mut nodes = Vec::new();
                for i in &cause.ids {
                    if let Some(p) = lookup(txn, i)?
                        && !nodes.iter().any(|n: &Node| n.id == p)
                        && let Some(n) = txn.get_json::<Node>(&node_key(&p))?
                    {
                        nodes.push(n);
                    }
                }
                let mut c = self.apply_in_order(txn, cause, nodes)?;
                c.too_large += 1;
                return Ok(c);
            }
        }
        let ids: Vec<Identifier> = ids.into_iter().collect();
        let separations = self.load_separations(txn, &ids)?;
        let mut detached = BTreeSet::new();
        let mut old = BTreeMap::new();
        for i in &ids {
            if txn.get(&detached_key(i))?.is_some() {
                detached.insert(i.clone());
            }
            if let Some(p) = lookup(txn, i)? {
                old.insert(i.clone(), p);
            }
        }
        let ctx = Context {
            rules: self.rules,
            separations: &separations,
            detached: &detached,
        };
        let mut sorted: Vec<&Fact> = facts.values().collect();
        sorted.sort_by(|a, b| a.order.cmp(&b.order));
        // First sightings come from `seen/`: they include the one-identifier events,
        // which are not stored as facts.
        let mut first_seen: HashMap<&Identifier, (i64, String)> = HashMap::new();
        for i in &ids {
            if let Some(s) = seen(txn, i)? {
                first_seen.insert(i, (s.event_time, s.message_id));
            }
        }
        for f in &sorted {
            for i in &f.ids {
                first_seen
                    .entry(i)
                    .or_insert_with(|| (f.order.t, f.order.msg.clone()));
            }
        }
        let mut clusters = Clusters::default();
        let first = |i: &Identifier| {
            first_seen
                .get(i)
                .cloned()
                .unwrap_or((i64::MAX, String::new()))
        };
        for f in &sorted {
            clusters.step(&ctx, f, &first);
        }
        for i in &ids {
            clusters.cluster_of(&ctx, i, first(i));
        }
        let mut changes = self.write(txn, &old, clusters.nodes(), cause)?;
        changes.recomputed += 1;
        Ok(changes)
    }

    /// Stores new nodes and assignments; reports merges and splits against `old`.
    pub(crate) fn write(
        &self,
        txn: &mut Txn<'_>,
        old: &BTreeMap<Identifier, String>,
        nodes: Vec<Node>,
        cause: &Fact,
    ) -> Result<Changes> {
        let mut changes = Changes::default();
        let mut new_of: BTreeMap<&Identifier, &str> = BTreeMap::new();
        for n in &nodes {
            for i in &n.identifiers {
                new_of.insert(i, &n.id);
            }
        }
        // Old profiles and where their identifiers went.
        let mut old_profiles: BTreeMap<&str, BTreeMap<&str, Vec<&Identifier>>> = BTreeMap::new();
        for (i, p) in old {
            let to = new_of.get(i).copied().unwrap_or(p.as_str());
            old_profiles
                .entry(p.as_str())
                .or_default()
                .entry(to)
                .or_default()
                .push(i);
        }
        let old_nodes: BTreeMap<&str, Option<Node>> = old_profiles
            .keys()
            .map(|p| Ok((*p, txn.get_json::<Node>(&node_key(p))?)))
            .collect::<Result<_>>()?;
        let new_ids: BTreeSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        for (p, targets) in &old_profiles {
            let survives = new_ids.contains(p);
            if targets.len() == 1 && !survives {
                let survivor = *targets.keys().next().expect("one target");
                let merged_ids: Vec<Identifier> = old_nodes[p]
                    .as_ref()
                    .map(|n| n.identifiers.clone())
                    .unwrap_or_default();
                let survivor_ids: Vec<Identifier> = nodes
                    .iter()
                    .find(|n| n.id == survivor)
                    .map(|n| {
                        n.identifiers
                            .iter()
                            .filter(|i| !merged_ids.contains(i))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                self.record_merge(
                    txn,
                    p,
                    survivor,
                    merged_ids,
                    survivor_ids,
                    cause,
                    &mut changes,
                )?;
            } else if targets.len() > 1 || (!survives && !targets.is_empty()) {
                let mut assignments: Vec<(Identifier, String)> = targets
                    .iter()
                    .flat_map(|(to, ids)| ids.iter().map(|i| ((*i).clone(), to.to_string())))
                    .collect();
                assignments.sort();
                if !survives {
                    // Late lookups of the old id follow its anchor.
                    if let Some(n) = &old_nodes[p]
                        && let Some(to) = new_of.get(&n.anchor)
                    {
                        txn.put(merged_key(p), to.as_bytes().to_vec());
                    }
                }
                changes.splits.push(Split {
                    profile: p.to_string(),
                    assignments,
                });
            }
            if !survives {
                txn.delete(node_key(p));
            }
        }
        let existed: BTreeSet<&str> = old.values().map(String::as_str).collect();
        for n in &nodes {
            if !existed.contains(n.id.as_str()) {
                changes.created += 1;
                txn.delete(merged_key(&n.id));
            }
            for i in &n.identifiers {
                if old.get(i).map(String::as_str) != Some(n.id.as_str()) {
                    txn.put(id_key(i), n.id.as_bytes().to_vec());
                }
            }
            txn.put_json(node_key(&n.id), n)?;
        }
        Ok(changes)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_merge(
        &self,
        txn: &mut Txn<'_>,
        merged: &str,
        survivor: &str,
        merged_identifiers: Vec<Identifier>,
        survivor_identifiers: Vec<Identifier>,
        cause: &Fact,
        changes: &mut Changes,
    ) -> Result<()> {
        let merge_id = deterministic_id("merge", &[survivor, merged, &cause.order.msg, &cause.key]);
        let version = next_merge_version(txn, self.received_at)?;
        txn.put(merged_key(merged), survivor.as_bytes().to_vec());
        let info = MergeInfo {
            merge_id: merge_id.clone(),
            survivor: survivor.to_string(),
            merged: merged.to_string(),
            survivor_identifiers,
            merged_identifiers,
            cause_message_id: cause.order.msg.clone(),
            rule: cause.rule.clone(),
            score: cause.score,
            explain: cause.explain.clone(),
            event_time: cause.order.t,
            undone: false,
        };
        keep_merge(txn, &info)?;
        changes.merges.push(ProfileMerge {
            merge_id,
            survivor: survivor.to_string(),
            merged: merged.to_string(),
            cause_message_id: cause.order.msg.clone(),
            event_time: cause.order.t,
            received_at: self.received_at,
            rule: cause.rule.clone(),
            score: cause.score,
            version,
        });
        Ok(())
    }
}
