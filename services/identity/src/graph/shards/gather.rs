//! Gathering a part of the graph across shards: asking each owner for what it holds,
//! following the facts, deciding once nothing is unanswered.

use super::*;

impl Shard<'_> {
    /// Everything this shard holds about one of its identifiers.
    pub(super) fn entry(&self, txn: &Txn<'_>, i: &Identifier) -> Result<Entry> {
        let prefix = if_prefix(i);
        let mut facts = Vec::new();
        for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
            let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let Some(f) = txn.get_json::<Fact>(&fact_key(&key))? {
                facts.push(f);
            }
        }
        let separations = self
            .graph
            .load_separations(txn, std::slice::from_ref(i))?
            .into_values()
            .collect();
        let profile = lookup(txn, i)?;
        let node = match &profile {
            Some(p) => txn.get_json::<Node>(&node_key(p))?,
            None => None,
        };
        Ok(Entry {
            id: i.clone(),
            generation: generation(txn, i)?,
            erasures: get_num::<u64>(txn, &vep_key(i))?,
            seen: seen(txn, i)?,
            detached: txn.get(&detached_key(i))?.is_some(),
            facts,
            separations,
            profile,
            node,
        })
    }

    /// The entries of `ids` and of every identifier of this shard connected to them
    /// through this shard's facts and profiles: one answer per shard crossed, not one per
    /// step of the part.
    pub(super) fn closure(&self, txn: &Txn<'_>, ids: &[Identifier]) -> Result<Vec<Entry>> {
        let mut done: BTreeSet<Identifier> = BTreeSet::new();
        let mut queue: Vec<Identifier> = ids.to_vec();
        let mut out = Vec::new();
        while let Some(i) = queue.pop() {
            if !self.owns(&i) || !done.insert(i.clone()) {
                continue;
            }
            let e = self.entry(txn, &i)?;
            queue.extend(e.facts.iter().flat_map(|f| f.ids.iter().cloned()));
            if let Some(n) = &e.node {
                queue.extend(n.identifiers.iter().cloned());
            }
            out.push(e);
        }
        Ok(out)
    }

    /// Gathers a part again after a decision missed inputs held here, unless a gathering
    /// of this shard still in progress read each of those identifiers as it is now.
    /// They then join that gathering, and so do waiting events. Its decision places only
    /// what its start's facts connect: a joined identifier it read through a profile's
    /// copy alone is gathered again from itself once that decision is applied.
    pub(super) fn gather_again(
        &self,
        txn: &mut Txn<'_>,
        stale: Vec<Identifier>,
        cause: Fact,
        waiting: Vec<(String, Identifier)>,
        out: &mut Handled,
    ) -> Result<()> {
        let mut covering: Option<String> = None;
        for i in &stale {
            let current = generation(txn, i)?;
            let read = txn
                .get(&gat_key(i))?
                .map(|v| String::from_utf8_lossy(&v).into_owned());
            let by = read.and_then(|r| {
                let (id, g) = r.split_once(' ')?;
                (g.parse::<u64>().ok()? == current).then(|| id.to_string())
            });
            match by {
                Some(id) if txn.get(&gathering_key(&id))?.is_some() => {
                    covering.get_or_insert(id);
                }
                _ => return self.gather(txn, stale, cause, waiting, out),
            }
        }
        let id = covering.expect("stale is not empty");
        let mut g: Gathering = txn.get_json(&gathering_key(&id))?.expect("in progress");
        g.waiting.extend(waiting);
        for i in stale {
            if !g.joined.contains(&i) {
                g.joined.push(i);
            }
        }
        txn.put_json(gathering_key(&id), &g)?;
        Ok(())
    }

    /// A new gathering's id. It holds the shard's epoch: a shard that restarts counts
    /// its gatherings again from its last commit, and answers to one it started before
    /// must not reach another that took the same number (they would mix two parts in
    /// one decision, which an owner refuses whole when one part went stale).
    pub(super) fn next_gathering(&self, txn: &mut Txn<'_>) -> Result<String> {
        let seq = get_num::<u64>(txn, GATHER_SEQ)? + 1;
        txn.put(GATHER_SEQ.to_vec(), seq.to_string().into_bytes());
        Ok(format!("{}-{}-{seq}", self.me, self.epoch))
    }

    /// Starts gathering the part around `start`.
    pub(super) fn gather(
        &self,
        txn: &mut Txn<'_>,
        start: Vec<Identifier>,
        cause: Fact,
        waiting: Vec<(String, Identifier)>,
        out: &mut Handled,
    ) -> Result<()> {
        let id = self.next_gathering(txn)?;
        let g = Gathering {
            cause: Some(cause),
            start,
            waiting,
            ..Gathering::default()
        };
        self.follow(txn, &id, g, out)
    }

    /// Reads or asks for the identifiers the gathering reached and has not got yet;
    /// decides once nothing is unanswered.
    pub(super) fn follow(
        &self,
        txn: &mut Txn<'_>,
        id: &str,
        mut g: Gathering,
        out: &mut Handled,
    ) -> Result<()> {
        loop {
            let have: BTreeSet<&Identifier> = g.entries.iter().map(|e| &e.id).collect();
            let mut reached: BTreeSet<Identifier> = g.start.iter().cloned().collect();
            for e in &g.entries {
                reached.extend(e.facts.iter().flat_map(|f| f.ids.iter().cloned()));
                if let Some(n) = &e.node {
                    reached.extend(n.identifiers.iter().cloned());
                }
                // An un-merge's sides: it placed them all (see `decide`).
                for s in &e.separations {
                    reached.extend(s.left.iter().chain(&s.right).cloned());
                }
            }
            let new: Vec<Identifier> = reached
                .into_iter()
                .filter(|i| !have.contains(i) && !g.asked.contains(i))
                .collect();
            if new.is_empty() {
                break;
            }
            let mut ask: BTreeMap<u32, Vec<Identifier>> = BTreeMap::new();
            let mut local = Vec::new();
            for i in new {
                if self.owns(&i) {
                    let e = self.entry(txn, &i)?;
                    // An erasure's gathering decides nothing: it covers no identifier a
                    // stale decision gathers again (`gather_again`). Nor is a mark left
                    // for an identifier not in the graph here (an erased one, say).
                    let known = e.seen.is_some()
                        || e.profile.is_some()
                        || !e.facts.is_empty()
                        || e.detached
                        || !e.separations.is_empty();
                    if g.erase.is_none() && known {
                        txn.put(gat_key(&i), format!("{id} {}", e.generation).into_bytes());
                    }
                    local.push(e);
                } else {
                    ask.entry(owner(&i, self.n)).or_default().push(i);
                }
            }
            for (o, ids) in ask {
                g.asked.extend(ids.iter().cloned());
                out.links.push((
                    o,
                    Link::Ask {
                        gathering: id.to_string(),
                        from: self.me,
                        ids,
                    },
                ));
            }
            g.entries.extend(local);
        }
        if !g.asked.is_empty() {
            txn.put_json(gathering_key(id), &g)?;
            return Ok(());
        }
        txn.delete(gathering_key(id));
        // Its marks go with it: a mark only lets a stale identifier join a gathering
        // still in progress. One a later gathering has taken is that one's.
        for e in g.entries.iter().filter(|e| self.owns(&e.id)) {
            let key = gat_key(&e.id);
            if txn
                .get(&key)?
                .is_some_and(|v| v.split(|b| *b == b' ').next() == Some(id.as_bytes()))
            {
                txn.delete(key);
            }
        }
        if let Some(p) = g.erase.clone() {
            return self.erase_gathered(&g, &p, out);
        }
        let d = self.decide(txn, &g)?;
        let mut owners: BTreeSet<u32> = d.placed.iter().map(|x| owner(&x.id, self.n)).collect();
        owners.remove(&self.me);
        for o in owners {
            out.links.push((o, Link::Decide(d.clone())));
        }
        let stale = self.apply(txn, &d, out)?;
        // The waiting events take their identifier's profile as it is now here. One
        // whose identifier has none yet waits for the gathering that follows: the one
        // this decision's staleness starts or joins, or one from its identifier (it
        // joined a gathering that no longer reaches it: a shard restarted in between
        // and had not yet stored again the fact that connected them).
        let mut still = Vec::new();
        for (msg, i) in g.waiting {
            match lookup(txn, &i)? {
                Some(p) => out.resolved.push((msg, p)),
                None => still.push((msg, i)),
            }
        }
        // Joined identifiers this decision does not place are gathered from themselves.
        let unplaced: Vec<Identifier> = g
            .joined
            .into_iter()
            .filter(|i| !d.placed.iter().any(|x| x.id == *i))
            .collect();
        if !stale.is_empty() {
            self.gather_again(txn, stale, d.cause.clone(), still, out)?;
            if !unplaced.is_empty() {
                self.gather(txn, unplaced, d.cause.clone(), Vec::new(), out)?;
            }
        } else {
            let mut start = unplaced;
            start.extend(still.iter().map(|(_, i)| i.clone()));
            if !start.is_empty() {
                self.gather(txn, start, d.cause.clone(), still, out)?;
            }
        }
        Ok(())
    }
}
