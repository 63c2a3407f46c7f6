//! Reads for the API: a profile with its timeline, lookups by identifier, segment
//! sizes and members, groups, the back-fill, and a dry run of definitions. The API
//! reads the store through these only.

use super::*;

/// A profile as this instance knows it.
pub enum Loaded {
    Found(Box<Profile>, Vec<ResolvedEvent>),
    /// Not here (or not at all, if this instance serves its partition).
    Missing,
    /// Merged into this profile, whose partition another instance serves.
    Elsewhere(String),
}

/// The live profile (following merges) and its newest `recent` kept events, for
/// profiles of the partitions this instance serves.
pub fn load_live(
    store: &dyn Store,
    placement: &Placement,
    id: &str,
    recent: usize,
) -> Result<Loaded> {
    if !placement.serves(id) {
        return Ok(Loaded::Missing);
    }
    let live = live_id(|k| store.get(k), id)?;
    if !placement.serves(&live) {
        return Ok(Loaded::Elsewhere(live));
    }
    let Some(b) = store.get(&profile_key(&live))? else {
        return Ok(Loaded::Missing);
    };
    let p: Profile = serde_json::from_slice(&b)?;
    let events = match recent {
        0 => Vec::new(),
        n => recent_events(store, &live, n)?,
    };
    Ok(Loaded::Found(Box::new(p), events))
}

/// The profile an identifier (already normalised) belongs to, if this instance serves
/// it: an index entry left behind by a partition that moved counts as none.
pub fn profile_of(
    store: &dyn Store,
    placement: &Placement,
    kind: &str,
    value: &str,
) -> Result<Option<String>> {
    Ok(store
        .get(&index_key(kind, value))?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .filter(|id| placement.serves(id)))
}

/// A segment's members in the partitions this instance serves.
pub fn segment_size(store: &dyn Store, placement: &Placement, segment: &str) -> Result<i64> {
    sum_partitions(
        |k| store.get(k),
        &placement.serving(),
        |p| segment_size_key(segment, p),
    )
}

/// Up to `limit + 1` members of a segment (profile id, entry time) after `after`, in id
/// order, from the partitions this instance serves (one more than asked tells that a
/// next page exists).
pub fn segment_members(
    store: &dyn Store,
    placement: &Placement,
    segment: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, i64)>> {
    let prefix = member_key_prefix(segment);
    let serving = placement.serving();
    let mut start = match after {
        Some(after) => format!("{prefix}{after}\0"),
        None => prefix.clone(),
    }
    .into_bytes();
    let mut rows = Vec::new();
    loop {
        let page = store.scan_from(prefix.as_bytes(), &start, 1000)?;
        for (k, v) in &page {
            start = k.clone();
            start.push(0);
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if serving.contains(&placement.partition(&id)) {
                let entered: i64 = String::from_utf8_lossy(v).parse().unwrap_or(0);
                rows.push((id, entered));
                if rows.len() > limit {
                    return Ok(rows);
                }
            }
        }
        if page.len() < 1000 {
            return Ok(rows);
        }
    }
}

/// Profile ids of a household (`hh`) or an account (`acct`) in the partitions this
/// instance serves (at most 1000).
pub fn group_members(
    store: &dyn Store,
    placement: &Placement,
    kind: &str,
    group: &str,
) -> Result<Vec<String>> {
    let prefix = member_prefix(kind, group);
    let serving = placement.serving();
    Ok(store
        .scan_prefix(prefix.as_bytes(), 1000)?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
        .filter(|id| serving.contains(&placement.partition(id)))
        .collect())
}

/// The back-fill in progress or last finished.
pub fn backfill_job(store: &dyn Store) -> Result<Option<Backfill>> {
    Ok(store
        .get(META_BACKFILL)?
        .and_then(|b| serde_json::from_slice::<Backfill>(&b).ok()))
}

/// A profile's newest kept events, newest first (its timeline).
pub fn recent_events(store: &dyn Store, id: &str, limit: usize) -> Result<Vec<ResolvedEvent>> {
    store
        .scan_last(log_prefix(id).as_bytes(), limit)?
        .iter()
        .map(|(_, v)| ResolvedEvent::from_avro(v))
        .collect()
}

/// How many profiles a candidate segment would hold now, without changing anything:
/// each profile is evaluated with the candidate's definitions (computed traits the
/// profiles lack are derived from their kept history).
#[derive(Debug, serde::Serialize)]
pub struct DryRun {
    /// Members among the profiles scanned.
    pub size: u64,
    pub scanned: u64,
    /// Profiles on this instance.
    pub total: u64,
    /// Up to ten members.
    pub sample: Vec<String>,
}

/// Evaluates `segment` of `defs` on the stored profiles, at most `limit` of them (in key
/// order: profile ids are hashes, so the first ones are a fair sample).
pub fn dry_run(
    store: &dyn Store,
    defs: &DefinitionSet,
    segment: &str,
    history_limit: usize,
    now: i64,
    limit: Option<u64>,
    placement: &Placement,
) -> Result<DryRun> {
    let txn = Txn::new(store);
    let serving = placement.serving();
    let mut res = DryRun {
        size: 0,
        scanned: 0,
        total: sum_partitions(|k| store.get(k), &serving, profiles_count_key)? as u64,
        sample: Vec::new(),
    };
    let mut start = b"p/".to_vec();
    loop {
        let rows = store.scan_from(b"p/", &start, 1000)?;
        for (k, v) in &rows {
            if limit.is_some_and(|l| res.scanned >= l) {
                return Ok(res);
            }
            start = k.clone();
            start.push(0);
            if !serving.contains(&placement.partition(&String::from_utf8_lossy(&k[2..]))) {
                continue;
            }
            let mut p: Profile = serde_json::from_slice(v)?;
            ensure_computed(&txn, &mut p, defs, history_limit)?;
            p.refresh_computed(defs, now, &mut Touched::default());
            transitions(defs, &mut p, now, Why::DryRun, &Touched::all());
            res.scanned += 1;
            if p.segments.contains_key(segment) {
                res.size += 1;
                if res.sample.len() < 10 {
                    res.sample.push(p.id.clone());
                }
            }
        }
        if rows.len() < 1000 {
            return Ok(res);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_common::store::MemStore;

    /// Two partitions, of which this instance serves only `served`.
    fn serving(served: i32) -> Placement {
        let ownership = Ownership::default();
        ownership.set_assigned([("t".to_string(), served)]);
        Placement {
            topic: "t".into(),
            partitions: 2,
            ownership: Some(ownership),
        }
    }

    /// Ids of the profiles that land on partition `p` of 2.
    fn ids_on(p: i32, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("p{i:03}"))
            .filter(|id| tessera_common::kafka::partition_of(id.as_bytes(), 2) == p)
            .take(n)
            .collect()
    }

    #[test]
    fn members_and_lookups_answer_for_the_served_partitions_only_and_page_in_id_order() {
        let s = MemStore::default();
        let placement = serving(0);
        let (mine, theirs) = (ids_on(0, 5), ids_on(1, 3));
        let mut txn = Txn::new(&s);
        for (i, id) in mine.iter().chain(&theirs).enumerate() {
            txn.put(
                format!("{}{id}", member_key_prefix("vip")).into_bytes(),
                (1000 + i as i64).to_string().into_bytes(),
            );
            txn.put(index_key("email", &format!("{id}@x.test")), id.clone());
        }
        s.write(txn.into_batch()).unwrap();

        let page = segment_members(&s, &placement, "vip", None, 2).unwrap();
        let ids: Vec<&str> = page.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, [&mine[0], &mine[1], &mine[2]], "two and one more");
        let next = segment_members(&s, &placement, "vip", Some(&mine[1]), 10).unwrap();
        assert_eq!(next.len(), 3, "the rest after the cursor: {next:?}");
        assert_eq!(next[0], (mine[2].clone(), 1002));

        let email = |id: &str| format!("{id}@x.test");
        assert_eq!(
            profile_of(&s, &placement, "email", &email(&mine[0])).unwrap(),
            Some(mine[0].clone())
        );
        assert_eq!(
            profile_of(&s, &placement, "email", &email(&theirs[0])).unwrap(),
            None,
            "an index entry of a partition served elsewhere counts as none"
        );
        assert!(matches!(
            load_live(&s, &placement, &theirs[0], 0).unwrap(),
            Loaded::Missing
        ));
    }
}
