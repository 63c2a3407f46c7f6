//! Erasing a person across shards: the owner of the identifier the request names
//! gathers the part around it and sends the erasure to every shard (itself included,
//! through its own partition); each removes what it holds of the person, and the
//! gatherer then has the other people's parts recomputed without the person's facts.

use super::*;

/// A person erased: their profile, the identifiers on it (as their owners held them when
/// gathered), and every fact that carried one of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Erasure {
    pub profile: String,
    pub ids: Vec<Identifier>,
    pub facts: Vec<Fact>,
    /// The rest of the part gathered: it lost inputs (a decision's version, a sum over
    /// its part, would now be smaller than those before), so its owners count the
    /// erasure for it (`vep_key`).
    #[serde(default)]
    pub part: Vec<Identifier>,
    /// The shard that gathered it: once it applied it, it gathers the others' parts.
    #[serde(default)]
    pub from: u32,
    /// What the recomputation of the others' parts names as its cause.
    pub cause: Fact,
    /// The privacy request.
    #[serde(default)]
    pub request: String,
}

/// What one shard removed of an erased person. The keys of these subjects and
/// profiles are destroyed; the shard that gathered the erasure adds up every shard's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErasedHere {
    pub request: String,
    pub from: u32,
    pub profile: String,
    /// The person's identifiers and facts, as gathered.
    pub identifiers: usize,
    pub facts: usize,
    /// Their profile and the profiles merged into it, as far as this shard knew them.
    pub profiles: BTreeSet<String>,
    /// The ingest subjects of the events their identifiers resolved here.
    pub subjects: BTreeSet<String>,
    /// The merge records naming them that this shard kept.
    pub merges: BTreeSet<String>,
}

impl ErasedHere {
    /// Adds what another message about the same shard's erasure found (a shard may
    /// apply it twice: what the second time finds is added to the first's).
    fn absorb(&mut self, other: ErasedHere) {
        self.identifiers = self.identifiers.max(other.identifiers);
        self.facts = self.facts.max(other.facts);
        self.profiles.extend(other.profiles);
        self.subjects.extend(other.subjects);
        self.merges.extend(other.merges);
    }
}

/// An erasure done on every shard: what the privacy report says identity removed, and
/// every subject whose key was destroyed (for no value: they are hashes and ids).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErasureReport {
    pub request: String,
    pub profile: String,
    pub merged_profiles: BTreeSet<String>,
    pub identifiers: usize,
    pub facts: usize,
    pub merges: usize,
    pub subjects: BTreeSet<String>,
}

fn erased_piece_key(request: &str, from: u32) -> Vec<u8> {
    format!("erp/{request}/{from}").into_bytes()
}
/// An erasure reported: pieces that arrive later (a shard applied it again) are dropped.
fn erasure_reported_key(request: &str) -> Vec<u8> {
    format!("erd/{request}").into_bytes()
}

/// Above the highest `gen` an erased identifier had here (see `generation`).
pub(super) const GEN_FLOOR: &[u8] = b"genfloor";

impl Shard<'_> {
    /// Starts erasing the person whose identifier `id` is (at its owner).
    pub(super) fn start_erasure(
        &self,
        txn: &mut Txn<'_>,
        id: Identifier,
        request: &str,
        out: &mut Handled,
    ) -> Result<()> {
        let Some(p) = lookup(txn, &id)? else {
            return Ok(()); // nobody to erase
        };
        let gathering = self.next_gathering(txn)?;
        let g = Gathering {
            cause: Some(Fact::new(
                self.graph.rules,
                &[],
                0,
                request,
                ERASE_SOURCE,
                None,
            )),
            start: vec![id],
            erase: Some(p),
            ..Gathering::default()
        };
        self.follow(txn, &gathering, g, out)
    }

    /// The part is gathered: the person is what its owners hold on their profile.
    pub(super) fn erase_gathered(
        &self,
        g: &Gathering,
        profile: &str,
        out: &mut Handled,
    ) -> Result<()> {
        let ids: Vec<Identifier> = g
            .entries
            .iter()
            .filter(|e| e.profile.as_deref() == Some(profile))
            .map(|e| e.id.clone())
            .collect();
        let mut facts: BTreeMap<&str, &Fact> = BTreeMap::new();
        for f in g.entries.iter().flat_map(|e| &e.facts) {
            if f.ids.iter().any(|i| ids.contains(i)) {
                facts.insert(&f.key, f);
            }
        }
        let part = g
            .entries
            .iter()
            .map(|e| e.id.clone())
            .filter(|i| !ids.contains(i))
            .collect();
        let e = Erasure {
            profile: profile.to_string(),
            ids,
            facts: facts.into_values().cloned().collect(),
            part,
            from: self.me,
            cause: self.graph.erasure_cause(profile),
            request: g
                .cause
                .as_ref()
                .map(|c| c.order.msg.clone())
                .unwrap_or_default(),
        };
        // To every shard: any may keep a merge record naming the person (it reported
        // that merge), not only the owners of their identifiers. Erasures are rare.
        // This one too, through its own partition: applied here in place, a restart
        // before the commit would undo it while the others keep it, and the request,
        // consumed again, would find less of the person.
        for o in 0..self.n {
            out.links.push((o, Link::Erase(e.clone())));
        }
        Ok(())
    }

    /// An erasure arrived: applied, and at the shard that gathered it the others'
    /// parts are gathered, without the person's facts (as one instance recomputes them),
    /// after every shard applied it (the questions follow the erasure on each channel).
    pub(super) fn on_erasure(
        &self,
        txn: &mut Txn<'_>,
        e: &Erasure,
        out: &mut Handled,
    ) -> Result<()> {
        let here = self.apply_erasure(txn, e)?;
        out.erased = Some(here.clone());
        if e.from != self.me {
            out.links.push((e.from, Link::Erased(here)));
            return Ok(());
        }
        self.on_erased(txn, here, out)?;
        let mut others: Vec<Identifier> = Vec::new();
        for i in e.facts.iter().flat_map(|f| &f.ids) {
            if !e.ids.contains(i) && !others.contains(i) {
                others.push(i.clone());
            }
        }
        if others.is_empty() {
            return Ok(());
        }
        self.gather(txn, others, e.cause.clone(), Vec::new(), out)
    }

    /// Removes what this shard holds of an erased person: their identifiers with their
    /// sightings, facts, separations and counters, the facts' index entries of other
    /// identifiers (whose `gen` rises: their inputs changed), and the profile with the
    /// profiles merged into it, as far as this shard knows them.
    pub(super) fn apply_erasure(&self, txn: &mut Txn<'_>, e: &Erasure) -> Result<ErasedHere> {
        let mut here = ErasedHere {
            request: e.request.clone(),
            from: self.me,
            profile: e.profile.clone(),
            identifiers: e.ids.len(),
            facts: e.facts.len(),
            ..ErasedHere::default()
        };
        let erased: BTreeSet<&Identifier> = e.ids.iter().collect();
        let mut facts: BTreeMap<String, Fact> =
            e.facts.iter().map(|f| (f.key.clone(), f.clone())).collect();
        // Facts stored here since the gathering read them go too.
        for i in e.ids.iter().filter(|i| self.owns(i)) {
            let prefix = if_prefix(i);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if let Some(f) = txn.get_json::<Fact>(&fact_key(&key))? {
                    facts.entry(key).or_insert(f);
                }
                txn.delete(k);
            }
        }
        for (key, f) in &facts {
            txn.delete(fact_key(key));
            for j in f.ids.iter().filter(|j| self.owns(j)) {
                let k = format!("{}{key}", if_prefix(j)).into_bytes();
                if txn.get(&k)?.is_some() {
                    txn.delete(k);
                    if !erased.contains(j) {
                        self.bump(txn, j)?;
                    }
                }
            }
        }
        // The part lost inputs: decisions from now on outrank those made before.
        for j in e.part.iter().filter(|j| self.owns(j)) {
            // Only an identifier still in the graph here (a replayed erasure may name
            // one a first run erased).
            if lookup(txn, j)?.is_some() {
                let n = get_num::<u64>(txn, &vep_key(j))? + 1;
                txn.put(vep_key(j), n.to_string().into_bytes());
            }
        }
        let mut floor = get_num::<u64>(txn, GEN_FLOOR)?;
        // Merge records naming them, wherever this shard keeps them.
        for i in &e.ids {
            for m in merges_naming(txn, i)? {
                forget_merge(txn, &m);
                here.merges.insert(m.merge_id);
            }
        }
        for i in e.ids.iter().filter(|i| self.owns(i)) {
            // Above what any decision gathered before the erasure saw of it.
            floor = floor.max(generation(txn, i)? + 1);
            for k in [
                id_key(i),
                seen_key(i),
                detached_key(i),
                gen_key(i),
                ver_key(i),
                vep_key(i),
                gat_key(i),
            ] {
                txn.delete(k);
            }
            let prefix = sepidx_prefix(i);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                txn.delete(k);
            }
            let prefix = identifier_subjects_prefix(i);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                here.subjects
                    .insert(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
                txn.delete(k);
            }
        }
        // Separations naming them, held here for either side (un-merges are rare: all
        // of them are read).
        for (k, v) in txn.scan(SEP_PREFIX, usize::MAX)? {
            let Ok(mut sep) = serde_json::from_slice::<Separation>(&v) else {
                continue;
            };
            let before = sep.left.len() + sep.right.len();
            sep.left.retain(|x| !erased.contains(x));
            sep.right.retain(|x| !erased.contains(x));
            if sep.left.is_empty() || sep.right.is_empty() {
                // Nothing left to keep apart.
                for x in sep.left.iter().chain(&sep.right).filter(|x| self.owns(x)) {
                    txn.delete(format!("{}{}", sepidx_prefix(x), sep.id).into_bytes());
                }
                txn.delete(k);
            } else if sep.left.len() + sep.right.len() < before {
                txn.put_json(sep_key(&sep.id), &sep)?;
            }
        }
        txn.put(GEN_FLOOR.to_vec(), floor.to_string().into_bytes());
        // The profiles merged into it, read whole before anything is deleted: the
        // chains of `mergedinto/` decide what is still the person's. One merged in and
        // since split back out (an un-merge) lives again, as someone else.
        let mut queue = vec![e.profile.clone()];
        let mut profiles: Vec<String> = Vec::new();
        let mut found: Vec<Vec<u8>> = Vec::new();
        while let Some(p) = queue.pop() {
            if profiles.contains(&p) {
                continue;
            }
            let mut merged = Vec::new();
            let prefix = history_prefix(&p);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                let merge_id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if let Some(m) = txn.get_json::<MergeInfo>(&merge_info_key(&merge_id))? {
                    forget_merge(txn, &m);
                    here.merges.insert(merge_id);
                    merged.push(m.merged);
                }
                found.push(k);
            }
            let prefix = merged_from_prefix(&p);
            for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
                merged.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
                found.push(k);
            }
            for m in merged {
                if live_profile(txn, &m)? == e.profile {
                    queue.push(m);
                }
            }
            profiles.push(p);
        }
        for k in found {
            txn.delete(k);
        }
        for p in &profiles {
            if *p != e.profile {
                txn.delete(merged_key(p));
            }
            txn.delete(node_key(p));
        }
        here.profiles.extend(profiles);
        Ok(here)
    }

    /// A shard's piece of an erasure, at the shard that gathered it: kept until every
    /// shard's is in, then reported once.
    pub(super) fn on_erased(
        &self,
        txn: &mut Txn<'_>,
        piece: ErasedHere,
        out: &mut Handled,
    ) -> Result<()> {
        let request = piece.request.clone();
        if txn.get(&erasure_reported_key(&request))?.is_some() {
            return Ok(());
        }
        let key = erased_piece_key(&request, piece.from);
        let mut kept: ErasedHere = txn.get_json(&key)?.unwrap_or_else(|| ErasedHere {
            request: request.clone(),
            from: piece.from,
            profile: piece.profile.clone(),
            ..ErasedHere::default()
        });
        kept.absorb(piece);
        txn.put_json(key, &kept)?;
        let prefix = format!("erp/{request}/");
        let pieces = txn.scan(prefix.as_bytes(), usize::MAX)?;
        if pieces.len() < self.n as usize {
            return Ok(());
        }
        // Every shard's piece, this one's as just stored among them.
        let mut all = ErasedHere {
            profile: kept.profile,
            ..ErasedHere::default()
        };
        for (k, v) in pieces {
            all.absorb(serde_json::from_slice(&v)?);
            txn.delete(k);
        }
        txn.put(erasure_reported_key(&request), Vec::new());
        let mut merged_profiles = all.profiles;
        merged_profiles.remove(&all.profile);
        out.report = Some(ErasureReport {
            request,
            profile: all.profile,
            merged_profiles,
            identifiers: all.identifiers,
            facts: all.facts,
            merges: all.merges.len(),
            subjects: all.subjects,
        });
        Ok(())
    }
}

/// The profiles this shard knows merged into `survivor` (it applied the decisions that
/// did so, whether or not it reported them), for an erasure to find.
pub(super) fn merged_from_prefix(survivor: &str) -> String {
    format!("mf/{survivor}/")
}
