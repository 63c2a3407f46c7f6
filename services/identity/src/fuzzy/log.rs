//! The matcher's log: what it decided, so that a replay decides as the original run did.
//!
//! With learning on, a pair is decided with the parameters current when it is compared,
//! and those depend on the order records arrived in. A rebuild replays the events in
//! another order (the partitions interleave differently), so it would decide some pairs
//! near the threshold otherwise. Every decision is therefore logged on
//! `identity.matches` (compacted), and a replayed record takes its links from the log
//! instead of scoring:
//!
//! - `record/<record key>` → [`Entry`]: the links decided while that record was
//!   processed, none being an entry too ("decided: nothing matched"). Written again,
//!   whole, when a later sighting adds a link; a tombstone when the record is erased.
//! - `version/<n>` → [`Version`]: a version of the parameters with what it was learned
//!   from; versions older than the kept ones are tombstoned.
//!
//! The log holds record keys (keyed hashes), levels and weights, never a value.
//!
//! In RocksDB: `fzd/<a>/<b>` → [`Stored`] for both orders of each linked pair; `fzl/<record
//! key>`: the record's decisions are logged; `fzm/log-loaded`: the store was seeded from
//! the log (once, before it processed its first event, [`stage`] then [`finish_load`]);
//! `fzm/log-staged/`: the
//! log's records while seeding.
//!
//! A replayed record whose decisions are logged applies its logged links whose other
//! record is present (a record replayed later finds the link from its side) and learns
//! nothing. A record the log does not know (decided before the log existed) is scored as
//! before. Seeding restores the versions and what they were learned from, so matching
//! goes on after a rebuild as it would have, less the pairs since the last version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use tessera_common::Result;
use tessera_common::store::{Store, Txn};

use super::model::{self, Accumulators, Explanation, Params};
use super::{FuzzyRecord, Match};

/// One link a record's processing decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The other record's key.
    pub other: String,
    pub rule: String,
    pub score: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Explanation>,
}

/// The links decided while one record was processed (`record/<key>`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub links: Vec<Decision>,
}

/// A version of the parameters with what it was learned from (`version/<n>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub params: Params,
    /// The pairs learned from (the record counts are recounted by the replay).
    pub learned: Accumulators,
}

/// A linked pair in RocksDB: the decision and the record whose processing made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub by: String,
    pub rule: String,
    pub score: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Explanation>,
}

/// A record for the log topic: its key and value (an empty value is a tombstone).
pub type LogRecord = (Vec<u8>, Vec<u8>);

const LOADED: &[u8] = b"fzm/log-loaded";
/// The log's records while seeding, by their key on the topic.
const STAGED: &[u8] = b"fzm/log-staged/";

fn pair_key(a: &str, b: &str) -> Vec<u8> {
    format!("fzd/{a}/{b}").into_bytes()
}

fn pairs_prefix(a: &str) -> String {
    format!("fzd/{a}/")
}

fn logged_key(rec: &str) -> Vec<u8> {
    format!("fzl/{rec}").into_bytes()
}

fn entry_key(rec: &str) -> Vec<u8> {
    format!("record/{rec}").into_bytes()
}

/// Whether the record's decisions are in the log.
pub fn is_logged(txn: &Txn<'_>, rec: &str) -> Result<bool> {
    Ok(txn.get(&logged_key(rec))?.is_some())
}

/// Whether the pair was linked already.
pub fn linked(txn: &Txn<'_>, a: &str, b: &str) -> Result<bool> {
    Ok(txn.get(&pair_key(a, b))?.is_some())
}

/// The logged links of a replayed record whose other record is present.
pub fn logged_matches(txn: &Txn<'_>, rec: &FuzzyRecord) -> Result<Vec<Match>> {
    let prefix = pairs_prefix(&rec.key);
    let mut out = Vec::new();
    for (k, v) in txn.scan(prefix.as_bytes(), usize::MAX)? {
        let other_key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        let Some(other) = txn.get_json::<FuzzyRecord>(&super::record_key(&other_key))? else {
            continue;
        };
        if other.anchor == rec.anchor {
            continue;
        }
        let s: Stored = serde_json::from_slice(&v)?;
        out.push(Match {
            other,
            rule: s.rule,
            score: s.score,
            explain: s.explain,
        });
    }
    Ok(out)
}

/// Keeps the links `rec`'s processing decided now (`new`: pairs not linked before) and
/// gives the log record to produce, if the log does not have it all yet. A `replayed`
/// record's outputs are not produced (the runner drops them), so it is not marked as
/// logged: its next live sighting logs it.
pub fn decided(
    txn: &mut Txn<'_>,
    rec: &str,
    new: &[&Match],
    replayed: bool,
) -> Result<Option<LogRecord>> {
    let logged = is_logged(txn, rec)?;
    if logged && new.is_empty() {
        return Ok(None);
    }
    for m in new {
        let s = Stored {
            by: rec.to_string(),
            rule: m.rule.clone(),
            score: m.score,
            explain: m.explain.clone(),
        };
        txn.put_json(pair_key(rec, &m.other.key), &s)?;
        txn.put_json(pair_key(&m.other.key, rec), &s)?;
    }
    if replayed {
        return Ok(None);
    }
    txn.put(logged_key(rec), Vec::new());
    Ok(Some(entry_record(txn, rec)?))
}

/// `rec`'s entry as the log holds it: the links its processing decided.
fn entry_record(txn: &Txn<'_>, rec: &str) -> Result<LogRecord> {
    let prefix = pairs_prefix(rec);
    let mut entry = Entry::default();
    for (k, v) in txn.scan(prefix.as_bytes(), usize::MAX)? {
        let s: Stored = serde_json::from_slice(&v)?;
        if s.by == rec {
            entry.links.push(Decision {
                other: String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                rule: s.rule,
                score: s.score,
                explain: s.explain,
            });
        }
    }
    Ok((entry_key(rec), serde_json::to_vec(&entry)?))
}

/// A new version of the parameters for the log, and the tombstone of the one it
/// pushes out of the kept versions.
pub fn version_records(params: &Params, acc: &Accumulators) -> Result<Vec<LogRecord>> {
    let learned = Accumulators {
        present: BTreeMap::new(),
        records: 0,
        since_refresh: 0,
        ..acc.clone()
    };
    let mut out = vec![(
        format!("version/{}", params.version).into_bytes(),
        serde_json::to_vec(&Version {
            params: params.clone(),
            learned,
        })?,
    )];
    if let Some(old) = params.version.checked_sub(model::KEPT_VERSIONS) {
        out.push((format!("version/{old}").into_bytes(), Vec::new()));
    }
    Ok(out)
}

/// Forgets erased records: their links leave RocksDB and the log (the entries of the
/// records they were linked with are written again without them).
pub fn forget(txn: &mut Txn<'_>, erased: &[String]) -> Result<Vec<LogRecord>> {
    let mut rewrite = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for rec in erased {
        let logged = is_logged(txn, rec)?;
        let prefix = pairs_prefix(rec);
        for (k, v) in txn.scan(prefix.as_bytes(), usize::MAX)? {
            let other = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let s: Stored = serde_json::from_slice(&v)?;
            txn.delete(k);
            txn.delete(pair_key(&other, rec));
            if s.by == other {
                rewrite.insert(other);
            }
        }
        txn.delete(logged_key(rec));
        if logged {
            out.push((entry_key(rec), Vec::new()));
        }
    }
    for other in rewrite.iter().filter(|o| !erased.contains(o)) {
        if is_logged(txn, other)? {
            out.push(entry_record(txn, other)?);
        }
    }
    Ok(out)
}

/// Whether the store was seeded from the log already (it is seeded once in its life).
pub fn is_loaded(store: &dyn Store) -> Result<bool> {
    Ok(Txn::new(store).get(LOADED)?.is_some())
}

/// Takes in one record of the log, in the topic's order, while seeding: kept
/// aside as it is, a later record of the same key replacing it, so the log's latest
/// state is what [`finish_load`] expands, however long the log.
pub fn stage(store: &dyn Store, key: &[u8], value: Option<&[u8]>) -> Result<()> {
    let mut txn = Txn::new(store);
    let mut staged = STAGED.to_vec();
    staged.extend_from_slice(key);
    match value.filter(|v| !v.is_empty()) {
        Some(v) => txn.put(staged, v.to_vec()),
        None => txn.delete(staged),
    }
    store.write(txn.into_batch())
}

/// Expands what [`stage`] kept into the matcher's state: the logged links of each
/// record, the kept versions, and the latest version with what it was learned from.
/// Marks the store as seeded.
pub fn finish_load(store: &dyn Store) -> Result<LoadCounts> {
    let mut counts = LoadCounts::default();
    let mut last: Option<Version> = None;
    let mut from = STAGED.to_vec();
    loop {
        let chunk = Txn::new(store).scan_from(STAGED, &from, 10_000)?;
        let Some((last_key, _)) = chunk.last() else {
            break;
        };
        from = last_key.clone();
        from.push(0);
        let mut txn = Txn::new(store);
        for (k, v) in chunk {
            txn.delete(k.clone());
            let key = String::from_utf8_lossy(&k[STAGED.len()..]).into_owned();
            if let Some(rec) = key.strip_prefix("record/") {
                let entry: Entry = serde_json::from_slice(&v)?;
                for d in entry.links {
                    let s = Stored {
                        by: rec.to_string(),
                        rule: d.rule,
                        score: d.score,
                        explain: d.explain,
                    };
                    txn.put_json(pair_key(rec, &d.other), &s)?;
                    txn.put_json(pair_key(&d.other, rec), &s)?;
                }
                txn.put(logged_key(rec), Vec::new());
                counts.records += 1;
            } else if key.starts_with("version/") {
                let version: Version = serde_json::from_slice(&v)?;
                model::keep_version(&mut txn, &version.params)?;
                if last
                    .as_ref()
                    .is_none_or(|l| l.params.version < version.params.version)
                {
                    last = Some(version);
                }
                counts.versions += 1;
            }
        }
        store.write(txn.into_batch())?;
    }
    let mut txn = Txn::new(store);
    if let Some(v) = last {
        model::restore(&mut txn, &v.params, &v.learned)?;
    }
    txn.put(LOADED.to_vec(), Vec::new());
    store.write(txn.into_batch())?;
    Ok(counts)
}

/// What [`finish_load`] took from the log.
#[derive(Debug, Default, PartialEq)]
pub struct LoadCounts {
    pub records: usize,
    pub versions: usize,
}
