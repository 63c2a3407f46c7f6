//! Fuzzy matching of records that share no identifier.
//!
//! A record is an event's fuzzy fields (names, birth date, address, phone) under its
//! highest-priority identifier, with its source. It is stored with an index entry per
//! blocking key and compared only with the records that share one of its keys. A
//! block is bounded by event time rather than arrival: it holds the first
//! `max_block_size` records by event time (then record key), and a record beyond them
//! is not compared through that key (counted as an oversized block). So the pairs
//! compared do not depend on the order records arrive in, with one exception: a record
//! that arrives after later ones filled its block pushes the last of them out, but the
//! links that one made while it was inside stay.
//!
//! A pair matches when the probabilistic model ([`model`]) gives it a match probability
//! of at least the threshold (per source pair) **and** a discriminating field (not a
//! name, a postcode or a city) agrees: names alone never link two records. In the
//! declarative mode (`fuzzy.rules` given) a pair matches when all criteria of a rule
//! agree. A match becomes a fuzzy fact in the graph, with the rule ("probabilistic")
//! or the rule's name, the weight and the explanation.
//!
//! Keys: `fz/<record key>` → [`FuzzyRecord`]; `blk/<hash of key and value>/<event
//! time>/<record key>`; `fza/<hash of the anchor>/<record key>` (a person's records,
//! for erasure); the model's own under `fzm/`.

pub mod compare;
pub mod log;
pub mod model;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use tessera_common::Result;
use tessera_common::ids::deterministic_id;
use tessera_common::records::Identifier;
use tessera_common::store::Txn;

use crate::rules::{Criterion, Fuzzy, KeyPart, Method};
use model::Explanation;

/// The rule name of a link the probabilistic model made.
pub const PROBABILISTIC: &str = "probabilistic";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuzzyRecord {
    pub key: String,
    pub anchor: Identifier,
    pub fields: BTreeMap<String, String>,
    /// The earliest event that carried it.
    pub t: i64,
    pub msg: String,
    /// The source (write key) of that event.
    #[serde(default)]
    pub source: String,
}

/// A stored record that matches a new one.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub other: FuzzyRecord,
    pub rule: String,
    pub score: f64,
    pub explain: Option<Explanation>,
}

/// What one record's matching did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub matches: Vec<Match>,
    pub compared: usize,
    pub oversized_blocks: usize,
    /// Pairs that scored above the threshold but had no discriminating field in common.
    pub names_only: usize,
    /// Records for the matcher's log ([`log`]): this record's decisions, a new version.
    pub log: Vec<log::LogRecord>,
}

impl FuzzyRecord {
    pub fn new(
        anchor: &Identifier,
        fields: BTreeMap<String, String>,
        t: i64,
        msg: &str,
        source: &str,
    ) -> FuzzyRecord {
        let mut parts = vec![anchor.kind.as_str(), anchor.value.as_str()];
        for (k, v) in &fields {
            parts.push(k);
            parts.push(v);
        }
        FuzzyRecord {
            key: deterministic_id("fuzzy-record", &parts),
            anchor: anchor.clone(),
            fields,
            t,
            msg: msg.to_string(),
            source: source.to_string(),
        }
    }
}

fn record_key(key: &str) -> Vec<u8> {
    format!("fz/{key}").into_bytes()
}

fn anchor_prefix(anchor: &Identifier) -> String {
    // The graph's hash of an identifier (`graph::ident_hash`), named without it.
    format!(
        "fza/{}/",
        tessera_common::suppressions::identifier_hash(&anchor.kind, &anchor.value)
    )
}

/// A record's entry in a block: ordered by event time, then record key.
fn block_entry(block: &str, rec: &FuzzyRecord) -> Vec<u8> {
    // Flipping the sign bit orders negative times before positive ones.
    format!("{block}{:016x}/{}", (rec.t as u64) ^ (1 << 63), rec.key).into_bytes()
}

fn index(txn: &mut Txn<'_>, f: &Fuzzy, rec: &FuzzyRecord, add: bool) {
    for b in blocking_values(f, &rec.fields) {
        if add {
            txn.put(block_entry(&b, rec), Vec::new());
        } else {
            txn.delete(block_entry(&b, rec));
        }
    }
}

/// Removes every record anchored on `anchor` with its index entries and counts;
/// returns their keys (for the matcher's log, [`log::forget`]). Without fuzzy rules the blocking entries cannot be named; they
/// hold only hashes.
pub fn erase(txn: &mut Txn<'_>, f: Option<&Fuzzy>, anchor: &Identifier) -> Result<Vec<String>> {
    let prefix = anchor_prefix(anchor);
    let mut erased = Vec::new();
    let mut acc = model::accumulators(txn)?;
    for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
        let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        if let Some(rec) = txn.get_json::<FuzzyRecord>(&record_key(&key))? {
            if let Some(f) = f {
                index(txn, f, &rec, false);
                if f.rules.is_empty() {
                    model::count_record(txn, &mut acc, &rec.fields, -1)?;
                }
            }
            txn.delete(record_key(&key));
            erased.push(key);
        }
        txn.delete(k);
    }
    if !erased.is_empty() {
        model::save(txn, &acc)?;
    }
    Ok(erased)
}

/// The blocking values of a record: one per key whose fields it has.
pub fn blocking_values(f: &Fuzzy, fields: &BTreeMap<String, String>) -> Vec<String> {
    f.blocking_keys
        .iter()
        .filter_map(|k| {
            let mut v = format!("{}=", k.spec);
            for (field, how) in &k.parts {
                let x = fields.get(field)?;
                let x: String = match how {
                    KeyPart::Whole => x.clone(),
                    KeyPart::Prefix(n) => x.chars().take(*n).collect(),
                    KeyPart::Phonetic => compare::phonetic(x),
                    KeyPart::Number => compare::split_street(x).0?.to_string(),
                };
                if x.is_empty() {
                    return None;
                }
                v.push_str(&x);
                v.push('\u{1f}');
            }
            Some(format!("blk/{}/", deterministic_id("block", &[&v])))
        })
        .collect()
}

fn agrees(c: &Criterion, a: &str, b: &str) -> bool {
    match c.method {
        Method::Exact => a == b,
        Method::JaroWinkler => strsim::jaro_winkler(a, b) >= c.min.unwrap_or(1.0),
        Method::Levenshtein => strsim::levenshtein(a, b) <= c.max.unwrap_or(0),
    }
}

/// The declarative rule two records match by, if any.
pub fn rule_match(
    f: &Fuzzy,
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
) -> Option<String> {
    f.rules
        .iter()
        .find(|rule| {
            rule.criteria
                .iter()
                .all(|c| match (a.get(&c.field), b.get(&c.field)) {
                    (Some(x), Some(y)) => agrees(c, x, y),
                    _ => false,
                })
        })
        .map(|r| r.name.clone())
}

/// Stores a record (keeping its earliest sighting), learns from it when it is new, and
/// finds the stored records it matches. `linked` tells whether two anchors already
/// share a profile (such a pair teaches the model what a match looks like). A
/// `replayed` record (a rebuild) whose decisions are logged takes its links from the
/// log ([`log`]) and learns nothing.
pub fn upsert_and_match(
    txn: &mut Txn<'_>,
    f: &Fuzzy,
    mut rec: FuzzyRecord,
    linked: &dyn Fn(&Txn<'_>, &Identifier, &Identifier) -> Result<bool>,
    replayed: bool,
) -> Result<(FuzzyRecord, Outcome)> {
    let mut out = Outcome::default();
    let blocks = blocking_values(f, &rec.fields);
    if blocks.is_empty() {
        return Ok((rec, out));
    }
    let probabilistic = f.rules.is_empty();
    let mut acc = model::accumulators(txn)?;
    let mut new = false;
    match txn.get_json::<FuzzyRecord>(&record_key(&rec.key))? {
        Some(old) if (old.t, &old.msg) <= (rec.t, &rec.msg) => rec = old,
        old => {
            if let Some(old) = &old {
                index(txn, f, old, false);
            } else {
                new = true;
                txn.put(
                    format!("{}{}", anchor_prefix(&rec.anchor), rec.key).into_bytes(),
                    Vec::new(),
                );
                if probabilistic {
                    model::count_record(txn, &mut acc, &rec.fields, 1)?;
                }
            }
            txn.put_json(record_key(&rec.key), &rec)?;
            index(txn, f, &rec, true);
        }
    }
    if replayed && log::is_logged(txn, &rec.key)? {
        out.matches = log::logged_matches(txn, &rec)?;
        if new && probabilistic {
            model::save(txn, &acc)?;
        }
        return Ok((rec, out));
    }
    if new && probabilistic && f.learn {
        // A random pair, to learn how often different people agree.
        let seek = format!("fz/{}", deterministic_id("random-pair", &[&rec.key]));
        let mut found = txn.scan_from(b"fz/", seek.as_bytes(), 2)?;
        if found.iter().all(|(k, _)| k[3..] == *rec.key.as_bytes()) {
            found = txn.scan(b"fz/", 2)?;
        }
        if let Some((_, v)) = found.iter().find(|(k, _)| k[3..] != *rec.key.as_bytes())
            && let Ok(other) = serde_json::from_slice::<FuzzyRecord>(v)
        {
            model::learn_random(f, &mut acc, &rec.fields, &other.fields);
        }
    }
    let mut candidates: BTreeSet<String> = BTreeSet::new();
    for b in &blocks {
        let found = txn.scan(b.as_bytes(), f.max_block_size + 1)?;
        let keys: Vec<String> = found
            .iter()
            .take(f.max_block_size)
            .filter_map(|(k, _)| {
                let rest = std::str::from_utf8(&k[b.len()..]).ok()?;
                Some(rest.split_once('/')?.1.to_string())
            })
            .collect();
        if !keys.contains(&rec.key) {
            out.oversized_blocks += 1;
            continue;
        }
        candidates.extend(keys.into_iter().filter(|k| *k != rec.key));
    }
    let params = model::current(txn, f)?;
    for key in &candidates {
        let Some(other) = txn.get_json::<FuzzyRecord>(&record_key(key))? else {
            continue;
        };
        if other.anchor == rec.anchor {
            continue;
        }
        out.compared += 1;
        if !probabilistic {
            if let Some(rule) = rule_match(f, &rec.fields, &other.fields) {
                out.matches.push(Match {
                    other,
                    rule,
                    score: 0.0,
                    explain: None,
                });
            }
            continue;
        }
        let threshold = f.threshold_for(&rec.source, &other.source);
        let pair = model::levels(f, &rec.fields, &other.fields);
        let e = model::score_levels(txn, f, &params, &acc, &rec.fields, &pair, threshold)?;
        if new && f.learn {
            let p = if linked(txn, &rec.anchor, &other.anchor)? {
                1.0
            } else {
                e.probability
            };
            // Only pairs more likely than not to match teach m: millions of unlikely
            // pairs, each a little overconfident, would otherwise drag m towards u.
            if p >= 0.5 {
                model::learn_candidate(f, &mut acc, &pair.0, p);
            }
            acc.candidate_pairs += 1;
            acc.since_refresh += 1;
        }
        if e.links() {
            out.matches.push(Match {
                other,
                rule: PROBABILISTIC.to_string(),
                score: e.weight,
                explain: Some(e),
            });
        } else if e.probability >= threshold && !e.discriminating {
            out.names_only += 1;
        }
    }
    let decided: Vec<&Match> = out.matches.iter().collect();
    out.log
        .extend(log::decided(txn, &rec.key, &decided, replayed)?);
    if new && probabilistic {
        if let Some(p) = model::refresh(txn, f, &mut acc)? {
            out.log.extend(log::version_records(&p, &acc)?);
        }
        model::save(txn, &acc)?;
    }
    Ok((rec, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{DEFAULT_RULES, Rules};
    use tessera_common::store::{MemStore, Store};

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn record(id: &str, t: i64, f: &[(&str, &str)]) -> FuzzyRecord {
        let anchor = Identifier {
            kind: "crm_id".into(),
            value: id.into(),
        };
        FuzzyRecord::new(&anchor, fields(f), t, &format!("m{t}"), "crm")
    }

    fn unlinked(_: &Txn<'_>, _: &Identifier, _: &Identifier) -> Result<bool> {
        Ok(false)
    }

    /// Stores the records in order; the anchors each one was linked to.
    fn link(f: &Fuzzy, records: &[FuzzyRecord]) -> Vec<Vec<String>> {
        let s = MemStore::default();
        let mut out = Vec::new();
        for r in records {
            let mut txn = Txn::new(&s);
            let (_, o) = upsert_and_match(&mut txn, f, r.clone(), &unlinked, false).unwrap();
            out.push(
                o.matches
                    .iter()
                    .map(|m| m.other.anchor.value.clone())
                    .collect(),
            );
            s.write(txn.into_batch()).unwrap();
        }
        out
    }

    fn embedded() -> Fuzzy {
        Rules::parse(DEFAULT_RULES, "t").unwrap().fuzzy.unwrap()
    }

    /// Katherine (below) as a shop knows her: typos, a flat number, no city.
    fn katherine_at_the_shop() -> FuzzyRecord {
        record(
            "shop",
            2,
            &[
                ("first_name", "katharine"),
                ("last_name", "jonson"),
                ("birthday", "1981-04-12"),
                ("street", "12 oak st 3"),
                ("postcode", "90210"),
            ],
        )
    }

    const KATHERINE: &[(&str, &str)] = &[
        ("first_name", "katherine"),
        ("last_name", "johnson"),
        ("birthday", "1981-04-12"),
        ("street", "12 oak st"),
        ("postcode", "90210"),
        ("city", "springfield"),
    ];

    /// Links as (record, record, explanation) triples, whichever side made them.
    type Links = BTreeSet<(String, String, String)>;

    /// Stores the records in order, replayed or not; the links made and the log records.
    fn run(
        f: &Fuzzy,
        s: &MemStore,
        records: &[FuzzyRecord],
        replayed: bool,
    ) -> (Links, Vec<log::LogRecord>) {
        let (mut links, mut logged) = (Links::new(), Vec::new());
        for r in records {
            let mut txn = Txn::new(s);
            let (rec, o) = upsert_and_match(&mut txn, f, r.clone(), &unlinked, replayed).unwrap();
            for m in &o.matches {
                let (a, b) = (
                    rec.key.clone().min(m.other.key.clone()),
                    rec.key.clone().max(m.other.key.clone()),
                );
                links.insert((a, b, serde_json::to_string(&m.explain).unwrap()));
            }
            logged.extend(o.log);
            s.write(txn.into_batch()).unwrap();
        }
        (links, logged)
    }

    /// A rebuild replays the events in another order, and parameters learned in that
    /// order (here: a matcher that would decide otherwise) must not change what was
    /// decided: a replayed record takes its links, with their explanations, from the
    /// log. Seen failing before the log: the replay re-decided every pair.
    #[test]
    fn a_replay_decides_as_the_original_run_did_whatever_its_parameters() {
        let f = Fuzzy {
            refresh_every: 1,
            ..embedded()
        };
        let mut records = vec![record("crm", 1, KATHERINE)];
        records.push(katherine_at_the_shop());
        records.push(record(
            "web",
            3,
            &[
                ("first_name", "kathy"),
                ("last_name", "johnson"),
                ("birthday", "1981-04-21"),
                ("postcode", "90210"),
            ],
        ));
        let original_store = MemStore::default();
        let (original, logged) = run(&f, &original_store, &records, false);
        assert!(
            !original.is_empty(),
            "the original run links the typo'd record"
        );
        assert!(
            logged.iter().any(|(k, _)| k.starts_with(b"version/")),
            "versions are logged"
        );
        let strict = Fuzzy {
            threshold: 1.0,
            ..f.clone()
        };
        let reversed: Vec<FuzzyRecord> = records.iter().rev().cloned().collect();
        // Without the log the replay decides again, otherwise.
        let (redecided, _) = run(&strict, &MemStore::default(), &reversed, true);
        assert_ne!(redecided, original);
        // With it, it decides as the original run did.
        let replay_store = MemStore::default();
        let loaded = load(
            &replay_store,
            logged.iter().map(|(k, v)| (k.clone(), Some(v.clone()))),
        )
        .unwrap();
        assert_eq!(loaded.records, records.len());
        let (replayed, again) = run(&strict, &replay_store, &reversed, true);
        assert_eq!(replayed, original);
        assert!(again.is_empty(), "a replay logs nothing again: {again:?}");
        let txn = (Txn::new(&original_store), Txn::new(&replay_store));
        assert_eq!(
            model::current(&txn.1, &f).unwrap(),
            model::current(&txn.0, &f).unwrap(),
            "the parameters are restored from the log"
        );
        // A store seeded once is not seeded again.
        assert!(load(&replay_store, Vec::new()).is_none());
    }

    /// An erased record leaves the log: its entry is tombstoned, and the entry of the
    /// record it was linked with is written again without it.
    #[test]
    fn an_erased_record_leaves_the_log() {
        let f = embedded();
        let s = MemStore::default();
        let shop = katherine_at_the_shop();
        let (links, _) = run(&f, &s, &[record("crm", 1, KATHERINE), shop.clone()], false);
        assert_eq!(links.len(), 1);
        let mut txn = Txn::new(&s);
        let erased = erase(&mut txn, Some(&f), &shop.anchor).unwrap();
        assert_eq!(erased, vec![shop.key.clone()]);
        let records = log::forget(&mut txn, &erased).unwrap();
        s.write(txn.into_batch()).unwrap();
        let shop_entry = format!("record/{}", shop.key).into_bytes();
        assert!(
            records
                .iter()
                .any(|(k, v)| *k == shop_entry && v.is_empty()),
            "the erased record's entry is tombstoned: {records:?}"
        );
        assert!(
            !Txn::new(&s)
                .scan(b"fzd/", usize::MAX)
                .unwrap()
                .iter()
                .any(|(k, _)| contains(k, shop.key.as_bytes())),
            "no link of the erased record is left"
        );
    }

    /// Seeds a store from log records as identity does at start (once in its life):
    /// `None` when it was seeded already.
    fn load(
        store: &MemStore,
        records: impl IntoIterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
    ) -> Option<log::LoadCounts> {
        if log::is_loaded(store).unwrap() {
            return None;
        }
        for (k, v) in records {
            log::stage(store, &k, v.as_deref()).unwrap();
        }
        Some(log::finish_load(store).unwrap())
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_same_person_with_typos_links_and_her_household_does_not() {
        let f = embedded();
        let shop = katherine_at_the_shop();
        let got = link(&f, &[record("crm", 1, KATHERINE), shop]);
        assert_eq!(got[1], vec!["crm"], "a typo'd record of the same person");
        let spouse = record(
            "spouse",
            2,
            &[
                ("first_name", "michael"),
                ("last_name", "johnson"),
                ("birthday", "1979-09-30"),
                ("street", "12 oak st"),
                ("postcode", "90210"),
                ("city", "springfield"),
            ],
        );
        let twin = record(
            "twin",
            3,
            &[
                ("first_name", "caroline"),
                ("last_name", "johnson"),
                ("birthday", "1981-04-12"),
                ("street", "12 oak st"),
                ("postcode", "90210"),
                ("city", "springfield"),
            ],
        );
        let got = link(&f, &[record("crm", 1, KATHERINE), spouse, twin]);
        assert!(got[1].is_empty(), "her husband: {:?}", got[1]);
        assert!(got[2].is_empty(), "her twin sister: {:?}", got[2]);
    }

    /// Found by the outside review: two people with the same names and nothing else in
    /// common were merged, and so were neighbours in one street with similar names.
    #[test]
    fn namesakes_and_neighbours_stay_apart() {
        let f = embedded();
        let web = record(
            "web",
            1,
            &[
                ("first_name", "louis"),
                ("last_name", "leroy"),
                ("postcode", "33000"),
            ],
        );
        let shop = record(
            "shop",
            2,
            &[
                ("first_name", "louis"),
                ("last_name", "leroy"),
                ("postcode", "33000"),
                ("birthday", "1970-01-02"),
            ],
        );
        assert!(link(&f, &[web, shop])[1].is_empty(), "names alone");
        let a = record(
            "a",
            1,
            &[
                ("first_name", "louis"),
                ("last_name", "lreoy"),
                ("street", "199 cedar ln"),
                ("postcode", "33000"),
            ],
        );
        let b = record(
            "b",
            2,
            &[
                ("first_name", "louise"),
                ("last_name", "leroy"),
                ("street", "259 cedar ln"),
                ("postcode", "33000"),
            ],
        );
        assert!(link(&f, &[a, b])[1].is_empty(), "another house number");
    }

    #[test]
    fn swapped_names_and_a_missing_field_still_link_with_an_explanation() {
        let f = embedded();
        let s = MemStore::default();
        let mut txn = Txn::new(&s);
        upsert_and_match(&mut txn, &f, record("crm", 1, KATHERINE), &unlinked, false).unwrap();
        let swapped = record(
            "shop",
            2,
            &[
                ("first_name", "johnson"),
                ("last_name", "katherine"),
                ("birthday", "1981-04-12"),
                ("street", "12 oak st"),
            ],
        );
        let (_, o) = upsert_and_match(&mut txn, &f, swapped, &unlinked, false).unwrap();
        assert_eq!(o.matches.len(), 1);
        let e = o.matches[0].explain.as_ref().unwrap();
        assert!(e.names_swapped && e.discriminating, "{e:?}");
        assert!(e.probability >= 0.999);
        let fields: Vec<&str> = e.fields.iter().map(|x| x.field.as_str()).collect();
        assert_eq!(fields, ["first_name", "last_name", "birthday", "street"]);
        assert_eq!(e.fields[2].level, "exact");
        assert!(e.fields.iter().all(|x| x.weight > 0.0), "{e:?}");
    }

    #[test]
    fn records_are_compared_within_blocks_only() {
        let f = embedded();
        let ann = &[
            ("first_name", "ann"),
            ("last_name", "lee"),
            ("birthday", "1990-01-01"),
            ("postcode", "10001"),
        ];
        let far = record(
            "far",
            2,
            &[
                ("first_name", "bob"),
                ("last_name", "ng"),
                ("birthday", "1970-05-05"),
                ("postcode", "60601"),
            ],
        );
        let s = MemStore::default();
        let mut txn = Txn::new(&s);
        let (_, o) = upsert_and_match(&mut txn, &f, record("1", 1, ann), &unlinked, false).unwrap();
        assert_eq!(o.compared, 0);
        let (_, o) = upsert_and_match(&mut txn, &f, far, &unlinked, false).unwrap();
        assert_eq!(o.compared, 0, "nothing shares a block with it");
        let (_, o) = upsert_and_match(&mut txn, &f, record("9", 3, ann), &unlinked, false).unwrap();
        assert_eq!(o.compared, 1);
        assert_eq!(o.matches.len(), 1);
        assert_eq!(o.matches[0].other.anchor.value, "1");
    }

    /// A block holds the first records by event time whatever the arrival order: the
    /// pairs compared there are the same when its first records come in any order. (A
    /// record that arrives after later ones filled its block leaves the links they
    /// made: a known limit, see the module's comment.)
    #[test]
    fn a_full_block_compares_the_same_pairs_in_any_order() {
        let mut f = embedded();
        f.max_block_size = 2;
        f.blocking_keys.truncate(1); // first_name:dm+last_name:dm
        let ann = |id: &str, t: i64| {
            record(
                id,
                t,
                &[
                    ("first_name", "ann"),
                    ("last_name", "lee"),
                    ("birthday", "1990-01-01"),
                ],
            )
        };
        let (a, b, c) = (ann("a", 1), ann("b", 2), ann("c", 3));
        let pairs = |order: &[&FuzzyRecord]| {
            let records: Vec<FuzzyRecord> = order.iter().map(|r| (*r).clone()).collect();
            let got = link(&f, &records);
            let mut pairs = BTreeSet::new();
            for (r, linked) in records.iter().zip(got) {
                for o in linked {
                    let mut p = [r.anchor.value.clone(), o];
                    p.sort();
                    pairs.insert(p);
                }
            }
            pairs
        };
        let want = pairs(&[&a, &b, &c]);
        assert_eq!(want.len(), 1, "{want:?}");
        assert!(want.contains(&["a".to_string(), "b".to_string()]));
        assert_eq!(pairs(&[&b, &a, &c]), want);
    }

    #[test]
    fn the_model_learns_versions_and_term_frequencies() {
        let mut f = embedded();
        f.refresh_every = 5;
        let s = MemStore::default();
        let mut txn = Txn::new(&s);
        for n in 0..40 {
            let r = record(
                &format!("p{n}"),
                n,
                &[
                    ("first_name", if n % 2 == 0 { "ann" } else { "anna" }),
                    ("last_name", "smith"),
                    ("birthday", &format!("19{:02}-01-01", 50 + n % 20)),
                    ("postcode", "10001"),
                ],
            );
            upsert_and_match(&mut txn, &f, r, &unlinked, false).unwrap();
        }
        let p = model::current(&txn, &f).unwrap();
        assert!(p.version >= 1, "{p:?}");
        assert_eq!(
            model::version(&txn, &f, p.version).unwrap(),
            Some(p.clone())
        );
        assert!(p.candidate_pairs > 0 && p.random_pairs > 0);
        let acc = model::accumulators(&txn).unwrap();
        assert_eq!(acc.records, 40);
        let pair = |last: &str| {
            let a = fields(&[("last_name", last), ("birthday", "1950-01-01")]);
            model::score(&txn, &f, &p, &acc, &a, &a.clone(), 0.999)
                .unwrap()
                .fields[0]
                .weight
        };
        assert!(
            pair("smith") < pair("zorglub"),
            "agreeing on a common name says less"
        );
    }

    /// Parameters learned under one rules file stay in the store when an operator adds a
    /// field or changes how one is compared: the new rules must score with them (the
    /// missing field from its priors), not panic on every event.
    #[test]
    fn parameters_learned_under_other_rules_still_score() {
        let mut old = embedded();
        old.refresh_every = 1;
        old.fields.retain(|f| f.name != "national_id");
        old.fields
            .iter_mut()
            .find(|f| f.name == "birthday")
            .unwrap()
            .compare = crate::rules::Compare::Postcode;
        let s = MemStore::default();
        let mut txn = Txn::new(&s);
        let ann = |id: &str, t: i64, birthday: &str| {
            record(
                id,
                t,
                &[
                    ("first_name", "ann"),
                    ("last_name", "lee"),
                    ("birthday", birthday),
                    ("city", "paris"),
                    ("national_id", "123"),
                ],
            )
        };
        for n in 0..4 {
            upsert_and_match(
                &mut txn,
                &old,
                ann(&format!("c{n}"), n, "1990-01-01"),
                &unlinked,
                false,
            )
            .unwrap();
        }
        assert!(model::current(&txn, &old).unwrap().version > 0);
        let (_, o) = upsert_and_match(
            &mut txn,
            &embedded(),
            ann("c9", 9, "1975-09-30"),
            &unlinked,
            false,
        )
        .unwrap();
        assert!(o.compared > 0);
    }
}
