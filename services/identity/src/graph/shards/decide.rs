//! Deciding a gathered part with the graph's own rules, and applying a decision to a
//! shard's identifiers.

use tessera_common::store::MemStore;

use super::*;

impl Shard<'_> {
    /// Recomputes the gathered part with the graph's rules, on a scratch store.
    pub(super) fn decide(&self, txn: &Txn<'_>, g: &Gathering) -> Result<Decision> {
        // The part: what the gathered facts connect to the start. Only it goes on the
        // scratch store, and the profiles' copies only with its identifiers: a copy older
        // than the facts (a shard restarted and has not stored a fact again yet) must not
        // pull in identifiers no gathered fact connects, or a decision could hold more
        // than a complete one and outrank it.
        let mut facts: BTreeMap<&str, &Fact> = BTreeMap::new();
        let mut of: HashMap<&Identifier, Vec<&Fact>> = HashMap::new();
        for f in g.entries.iter().flat_map(|e| &e.facts) {
            if facts.insert(&f.key, f).is_none() {
                for i in &f.ids {
                    of.entry(i).or_default().push(f);
                }
            }
        }
        // The start, and the sides of the un-merges gathered: one instance's un-merge
        // places every identifier it names, one no event carried too, and a decision
        // gathered again after a stale one must still do so.
        let mut start: BTreeSet<&Identifier> = g.start.iter().collect();
        for e in &g.entries {
            for s in &e.separations {
                start.extend(s.left.iter().chain(&s.right));
            }
        }
        let mut part: BTreeSet<&Identifier> = start.clone();
        let mut queue: Vec<&Identifier> = start.iter().copied().collect();
        while let Some(i) = queue.pop() {
            for f in of.get(i).into_iter().flatten() {
                for x in &f.ids {
                    if part.insert(x) {
                        queue.push(x);
                    }
                }
            }
        }
        let scratch = MemStore::default();
        let mut t = Txn::new(&scratch);
        // Merges decided here come after every merge the owners had seen.
        observe_merge_clock(&mut t, merge_clock(txn)?.max(g.clock))?;
        for f in facts.values() {
            if f.ids.iter().any(|i| part.contains(i)) {
                t.put_json(fact_key(&f.key), *f)?;
                for i in &f.ids {
                    t.put(
                        format!("{}{}", if_prefix(i), f.key).into_bytes(),
                        Vec::new(),
                    );
                }
            }
        }
        for e in g.entries.iter().filter(|e| part.contains(&e.id)) {
            if let Some(s) = &e.seen {
                t.put_json(seen_key(&e.id), s)?;
            }
            if e.detached {
                t.put(detached_key(&e.id), Vec::new());
            }
            for s in &e.separations {
                t.put_json(sep_key(&s.id), s)?;
                t.put(
                    format!("{}{}", sepidx_prefix(&e.id), s.id).into_bytes(),
                    Vec::new(),
                );
            }
            if let Some(p) = &e.profile {
                t.put(id_key(&e.id), p.as_bytes().to_vec());
            }
            if let Some(n) = &e.node {
                let mut n = n.clone();
                n.identifiers.retain(|i| part.contains(i));
                t.put_json(node_key(&n.id), &n)?;
            }
        }
        let graph = Graph {
            rules: self.graph.rules,
            max_component_facts: 1_000_000,
            received_at: self.graph.received_at,
        };
        let cause = g.cause.clone().expect("a gathering has a cause");
        let old: BTreeMap<Identifier, String> = g
            .entries
            .iter()
            .filter_map(|e| Some((e.id.clone(), e.profile.clone()?)))
            .collect();
        let start: Vec<Identifier> = start.into_iter().cloned().collect();
        let changes = graph.recompute(&mut t, &start, &cause)?;
        // Components of the part, by the facts that connect them: each has its own
        // version (see `Placed`).
        let mut root: HashMap<&Identifier, &Identifier> = HashMap::new();
        fn find<'a>(
            root: &mut HashMap<&'a Identifier, &'a Identifier>,
            i: &'a Identifier,
        ) -> &'a Identifier {
            let mut r = i;
            while let Some(&up) = root.get(r).filter(|up| **up != r) {
                r = up;
            }
            root.insert(i, r);
            r
        }
        for f in facts
            .values()
            .filter(|f| f.ids.iter().any(|i| part.contains(i)))
        {
            let Some((first, rest)) = f.ids.split_first() else {
                continue;
            };
            let first = find(&mut root, first);
            for i in rest {
                let r = find(&mut root, i);
                if r != first {
                    root.insert(r, first);
                }
            }
        }
        // An entry is part of the decision if the recomputation placed it. One gathered
        // through a copy of a profile older than the facts seen is not, when no fact seen
        // connects it: it keeps what it has.
        let mut placed = Vec::new();
        let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
        let mut sums: HashMap<&Identifier, (u64, u128)> = HashMap::new();
        for e in g.entries.iter().filter(|e| part.contains(&e.id)) {
            let c = sums.entry(find(&mut root, &e.id)).or_default();
            // Erasures first: a part recomputed after one outranks what came before it.
            c.0 = c.0.max(e.erasures);
        }
        for e in &g.entries {
            let Some(p) = lookup(&t, &e.id)? else {
                continue;
            };
            let Some(n) = t.get_json::<Node>(&node_key(&p))? else {
                continue;
            };
            if !n.identifiers.contains(&e.id) {
                continue;
            }
            nodes.entry(p.clone()).or_insert(n);
            sums.entry(find(&mut root, &e.id)).or_default().1 += u128::from(e.generation);
            placed.push(Placed {
                id: e.id.clone(),
                generation: e.generation,
                profile: p,
                version: 0,
            });
        }
        for x in &mut placed {
            let (erasures, sum) = sums[find(&mut root, &x.id)];
            x.version = (u128::from(erasures) << 96) | sum;
        }
        let gone: Vec<String> = old
            .iter()
            .filter(|(i, _)| placed.iter().any(|x| x.id == **i))
            .map(|(_, p)| p)
            .filter(|p| !nodes.contains_key(*p))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut merged_into = Vec::new();
        for p in &gone {
            if let Some(to) = t.get(&merged_key(p))? {
                merged_into.push((p.clone(), String::from_utf8_lossy(&to).into_owned()));
            }
        }
        let mut merge_infos = Vec::new();
        for m in &changes.merges {
            if let Some(info) = t.get_json::<MergeInfo>(&merge_info_key(&m.merge_id))? {
                merge_infos.push(info);
            }
        }
        Ok(Decision {
            clock: merge_clock(&t)?,
            cause,
            placed,
            nodes: nodes.into_values().collect(),
            gone,
            merges: changes.merges,
            splits: changes
                .splits
                .into_iter()
                .map(|s| (s.profile, s.assignments))
                .collect(),
            merged_into,
            merge_infos,
        })
    }

    /// Applies a decision to this shard's identifiers. A decision that missed an input
    /// held here is not applied: this shard's identifiers it places are returned, to be
    /// gathered again. All of them, not only those whose inputs it missed: a decision
    /// may span several parts (the others' parts after an erasure), and a part it
    /// missed nothing of would otherwise never be decided here.
    pub(super) fn apply(
        &self,
        txn: &mut Txn<'_>,
        d: &Decision,
        out: &mut Handled,
    ) -> Result<Vec<Identifier>> {
        observe_merge_clock(txn, d.clock)?;
        let mine: Vec<&Placed> = d.placed.iter().filter(|x| self.owns(&x.id)).collect();
        let mut stale = Vec::new();
        for x in &mine {
            if generation(txn, &x.id)? > x.generation {
                stale.push(x.id.clone());
            }
        }
        if !stale.is_empty() {
            return Ok(mine.iter().map(|x| x.id.clone()).collect());
        }
        let nodes: BTreeMap<&str, &Node> = d.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
        let mut before: BTreeMap<&Identifier, Option<String>> = BTreeMap::new();
        let mut old_nodes: BTreeMap<String, Node> = BTreeMap::new();
        for Placed {
            id: i,
            profile: p,
            version,
            ..
        } in mine
        {
            if *version < get_num::<u128>(txn, &ver_key(i))? {
                continue;
            }
            let was = lookup(txn, i)?;
            if let Some(w) = &was
                && !old_nodes.contains_key(w)
                && let Some(n) = txn.get_json::<Node>(&node_key(w))?
            {
                old_nodes.insert(w.clone(), n);
            }
            before.insert(i, was);
            txn.put(id_key(i), p.as_bytes().to_vec());
            // A profile the decision places identifiers on lives: one merged away before
            // (an un-merge split it back out) is no longer merged.
            if let Some(to) = txn.get(&merged_key(p))? {
                let to = String::from_utf8_lossy(&to).into_owned();
                txn.delete(merged_key(p));
                txn.delete(format!("{}{p}", merged_from_prefix(&to)).into_bytes());
            }
            txn.put(ver_key(i), version.to_string().into_bytes());
            // A part recomputed right after an erasure still holds links of profiles'
            // copies that the erased facts made; the decisions after it, without them,
            // have smaller parts: they outrank it by one more erasure.
            let erasures = (version >> 96) as u64 + u64::from(d.cause.source == ERASE_SOURCE);
            if erasures > get_num::<u64>(txn, &vep_key(i))? {
                txn.put(vep_key(i), erasures.to_string().into_bytes());
            }
            if let Some(n) = nodes.get(p.as_str()) {
                txn.put_json(node_key(p), *n)?;
            }
        }
        if before.is_empty() {
            return Ok(stale);
        }
        // A shard that moves one of its identifiers off a profile reports what became of
        // that profile: events may have gone out on it from here. Several shards may so
        // report one change; each reports the same record (its id is the decision's).
        let left = |p: &str| before.values().any(|w| w.as_deref() == Some(p));
        for m in d.merges.iter().filter(|m| left(&m.merged)) {
            // Its `mergedinto/` comes with the decision's `merged_into` below.
            if let Some(info) = d.merge_infos.iter().find(|x| x.merge_id == m.merge_id) {
                keep_merge(txn, info)?;
            }
            out.changes.merges.push(m.clone());
        }
        for (profile, assignments) in d.splits.iter().filter(|(p, _)| left(p)) {
            out.changes.splits.push(Split {
                profile: profile.clone(),
                assignments: assignments.clone(),
            });
        }
        for (p, to) in &d.merged_into {
            txn.put(merged_key(p), to.as_bytes().to_vec());
            txn.put(
                format!("{}{p}", merged_from_prefix(to)).into_bytes(),
                Vec::new(),
            );
        }
        self.report_unseen(txn, d, &before, &old_nodes, out)?;
        // A profile this shard's identifiers all left keeps no copy here, gone or not
        // (it may live on with others' identifiers, and its copy would go stale, with
        // the values of identifiers that are elsewhere now). One skipped above, on a
        // newer decision, may still be on it.
        for w in d.gone.iter().chain(old_nodes.keys()) {
            let Some(n) = txn.get_json::<Node>(&node_key(w))? else {
                continue;
            };
            let mut kept = false;
            for i in n.identifiers.iter().filter(|i| self.owns(i)) {
                kept |= lookup(txn, i)?.as_deref() == Some(w.as_str());
            }
            if !kept {
                txn.delete(node_key(w));
            }
        }
        Ok(stale)
    }

    /// Reports the profiles this decision takes identifiers of this shard from that its
    /// gathering did not see: a decision applied here after the gathering read them had
    /// put them there (and its anchor's owner may never have applied it). Events went
    /// out on such a profile, so it is merged into where its members go, or split among
    /// them; one the decision keeps is reported split by what left it from here (its
    /// other members' owners may skip the decision, and then nobody holds it).
    fn report_unseen(
        &self,
        txn: &mut Txn<'_>,
        d: &Decision,
        before: &BTreeMap<&Identifier, Option<String>>,
        old_nodes: &BTreeMap<String, Node>,
        out: &mut Handled,
    ) -> Result<()> {
        let placed: BTreeMap<&Identifier, &String> =
            d.placed.iter().map(|x| (&x.id, &x.profile)).collect();
        let nodes: BTreeMap<&str, &Node> = d.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
        let mut reported: BTreeSet<&String> = BTreeSet::new();
        for (i, was) in before {
            let Some(was) = was else { continue };
            let Some(old) = old_nodes.get(was) else {
                continue;
            };
            let now = placed.get(i).copied();
            let seen =
                d.merges.iter().any(|m| &m.merged == was) || d.splits.iter().any(|(p, _)| p == was);
            if now == Some(was) || seen || !reported.insert(was) {
                continue;
            }
            if nodes.contains_key(was.as_str()) {
                // The decision keeps the profile, for identifiers whose owners may skip
                // it: what left it from here is reported split off.
                let left: Vec<(Identifier, String)> = before
                    .iter()
                    .filter(|(_, w)| w.as_ref() == Some(was))
                    .filter_map(|(x, _)| {
                        let p = *placed.get(x)?;
                        (p != was).then(|| ((*x).clone(), p.clone()))
                    })
                    .collect();
                out.changes.splits.push(Split {
                    profile: was.clone(),
                    assignments: left,
                });
                continue;
            }
            let moved: Vec<(Identifier, String)> = old
                .identifiers
                .iter()
                .filter_map(|m| Some((m.clone(), (*placed.get(m)?).clone())))
                .collect();
            let to: BTreeSet<&String> = moved.iter().map(|(_, p)| p).collect();
            if to.len() == 1 && moved.len() == old.identifiers.len() {
                let survivor = moved[0].1.clone();
                let survivor_ids = nodes
                    .get(survivor.as_str())
                    .map(|n| n.identifiers.clone())
                    .unwrap_or_default();
                self.graph.record_merge(
                    txn,
                    was,
                    &survivor,
                    old.identifiers.clone(),
                    survivor_ids,
                    &d.cause,
                    &mut out.changes,
                )?;
            } else {
                out.changes.splits.push(Split {
                    profile: was.clone(),
                    assignments: moved,
                });
            }
        }
        Ok(())
    }
}
