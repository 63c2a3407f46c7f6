//! Fuzzy matching of records that share no identifier.
//!
//! A record is an event's fuzzy fields (names, birth date, address, phone) under its
//! highest-priority identifier. It is stored with an index entry per blocking key, and
//! compared only with the records that share one of its keys (bounded: a key shared by
//! more than `max_block_size` records is skipped). A pair matches when a rule matches
//! (all of its criteria) or the Fellegi–Sunter score reaches the threshold without a
//! `required` field disagreeing. A match becomes a fuzzy fact in the graph, with the
//! rule and score that decided it.
//!
//! Keys: `fz/<record key>` → [`FuzzyRecord`]; `blk/<hash of key and value>/<record key>`;
//! `fza/<hash of the anchor>/<record key>` (a person's records, for erasure).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use tessera_common::Result;
use tessera_common::ids::deterministic_id;
use tessera_common::records::Identifier;
use tessera_common::store::Txn;

use crate::rules::{Criterion, Fuzzy, Method};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuzzyRecord {
    pub key: String,
    pub anchor: Identifier,
    pub fields: BTreeMap<String, String>,
    /// The earliest event that carried it.
    pub t: i64,
    pub msg: String,
}

/// A stored record that matches a new one.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub other: FuzzyRecord,
    pub rule: String,
    pub score: f64,
}

/// What one record's matching did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub matches: Vec<Match>,
    pub compared: usize,
    pub oversized_blocks: usize,
}

impl FuzzyRecord {
    pub fn new(
        anchor: &Identifier,
        fields: BTreeMap<String, String>,
        t: i64,
        msg: &str,
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
        }
    }
}

fn record_key(key: &str) -> Vec<u8> {
    format!("fz/{key}").into_bytes()
}

fn anchor_prefix(anchor: &Identifier) -> String {
    format!("fza/{}/", crate::graph::ident_hash(anchor))
}

/// Removes every record anchored on `anchor` with its index entries; returns how many.
/// Without fuzzy rules the blocking entries cannot be named; they hold only hashes.
pub fn erase(txn: &mut Txn<'_>, f: Option<&Fuzzy>, anchor: &Identifier) -> Result<usize> {
    let prefix = anchor_prefix(anchor);
    let mut n = 0;
    for (k, _) in txn.scan(prefix.as_bytes(), usize::MAX)? {
        let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        if let Some(rec) = txn.get_json::<FuzzyRecord>(&record_key(&key))? {
            for b in f
                .map(|f| blocking_values(f, &rec.fields))
                .unwrap_or_default()
            {
                txn.delete(format!("{b}{key}").into_bytes());
            }
            txn.delete(record_key(&key));
            n += 1;
        }
        txn.delete(k);
    }
    Ok(n)
}

/// The blocking values of a record: one per key whose fields it has.
pub fn blocking_values(f: &Fuzzy, fields: &BTreeMap<String, String>) -> Vec<String> {
    f.blocking_keys
        .iter()
        .filter_map(|k| {
            let mut v = format!("{}=", k.spec);
            for (field, len) in &k.parts {
                let x = fields.get(field)?;
                let x: String = match len {
                    Some(n) => x.chars().take(*n).collect(),
                    None => x.clone(),
                };
                v.push_str(&x);
                v.push('\u{1f}');
            }
            Some(format!("blk/{}/", deterministic_id("block", &[&v])))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Level {
    Agree,
    /// Between `partial` and `min` (Jaro–Winkler): neither evidence for nor against.
    Partial,
    Disagree,
}

fn level(c: &Criterion, a: &str, b: &str) -> Level {
    match c.method {
        Method::Exact if a == b => Level::Agree,
        Method::Exact => Level::Disagree,
        Method::JaroWinkler => {
            let sim = strsim::jaro_winkler(a, b);
            if sim >= c.min.unwrap_or(1.0) {
                Level::Agree
            } else if c.partial.is_some_and(|p| sim >= p) {
                Level::Partial
            } else {
                Level::Disagree
            }
        }
        Method::Levenshtein if strsim::levenshtein(a, b) <= c.max.unwrap_or(0) => Level::Agree,
        Method::Levenshtein => Level::Disagree,
    }
}

fn agrees(c: &Criterion, a: &str, b: &str) -> bool {
    level(c, a, b) == Level::Agree
}

/// Whether two records match, and by which rule (or "score"), with the score.
pub fn compare(
    f: &Fuzzy,
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
) -> Option<(String, f64)> {
    let score = score(f, a, b);
    for rule in &f.rules {
        let all = rule
            .criteria
            .iter()
            .all(|c| match (a.get(&c.field), b.get(&c.field)) {
                (Some(x), Some(y)) => agrees(c, x, y),
                _ => false,
            });
        if all {
            return Some((rule.name.clone(), score.unwrap_or(0.0)));
        }
    }
    let s = f.score.as_ref()?;
    let vetoed = s.required.iter().any(|r| {
        let c = s.fields.iter().find(|c| &c.field == r).expect("validated");
        matches!((a.get(r), b.get(r)), (Some(x), Some(y)) if level(c, x, y) == Level::Disagree)
    });
    let score = score?;
    (!vetoed && score >= s.threshold).then(|| ("score".to_string(), score))
}

/// The Fellegi–Sunter log-likelihood score of a pair (`None` without a score rule).
pub fn score(f: &Fuzzy, a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Option<f64> {
    let s = f.score.as_ref()?;
    let mut total = 0.0;
    for c in &s.fields {
        let (Some(m), Some(u)) = (c.m, c.u) else {
            continue;
        };
        if let (Some(x), Some(y)) = (a.get(&c.field), b.get(&c.field)) {
            total += match level(c, x, y) {
                Level::Agree => (m / u).log2(),
                Level::Partial => 0.0,
                Level::Disagree => ((1.0 - m) / (1.0 - u)).log2(),
            };
        }
    }
    Some((total * 1000.0).round() / 1000.0)
}

/// Stores a record (keeping its earliest sighting) and finds the stored records it
/// matches.
pub fn upsert_and_match(
    txn: &mut Txn<'_>,
    f: &Fuzzy,
    mut rec: FuzzyRecord,
) -> Result<(FuzzyRecord, Outcome)> {
    let mut out = Outcome::default();
    let blocks = blocking_values(f, &rec.fields);
    if blocks.is_empty() {
        return Ok((rec, out));
    }
    match txn.get_json::<FuzzyRecord>(&record_key(&rec.key))? {
        Some(old) if (old.t, &old.msg) <= (rec.t, &rec.msg) => rec = old,
        _ => {
            txn.put_json(record_key(&rec.key), &rec)?;
            txn.put(
                format!("{}{}", anchor_prefix(&rec.anchor), rec.key).into_bytes(),
                Vec::new(),
            );
            for b in &blocks {
                txn.put(format!("{b}{}", rec.key).into_bytes(), Vec::new());
            }
        }
    }
    let mut candidates: BTreeMap<String, ()> = BTreeMap::new();
    for b in &blocks {
        let found = txn.scan(b.as_bytes(), f.max_block_size + 1)?;
        if found.len() > f.max_block_size {
            out.oversized_blocks += 1;
            continue;
        }
        for (k, _) in found {
            let key = String::from_utf8_lossy(&k[b.len()..]).into_owned();
            if key != rec.key {
                candidates.insert(key, ());
            }
        }
    }
    for key in candidates.keys() {
        let Some(other) = txn.get_json::<FuzzyRecord>(&record_key(key))? else {
            continue;
        };
        if other.anchor == rec.anchor {
            continue;
        }
        out.compared += 1;
        if let Some((rule, score)) = compare(f, &rec.fields, &other.fields) {
            out.matches.push(Match { other, rule, score });
        }
    }
    Ok((rec, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{DEFAULT_RULES, Rules};

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_same_person_with_typos_matches_and_household_members_do_not() {
        let rules = Rules::parse(DEFAULT_RULES, "t").unwrap();
        let f = rules.fuzzy.as_ref().unwrap();
        let crm = fields(&[
            ("first_name", "katherine"),
            ("last_name", "johnson"),
            ("birthday", "1981-04-12"),
            ("street", "12 oak st"),
            ("postcode", "90210"),
            ("city", "springfield"),
        ]);
        let shop = fields(&[
            ("first_name", "katharine"),
            ("last_name", "jonson"),
            ("birthday", "1981-04-12"),
            ("street", "12 oak st 3"),
            ("postcode", "90210"),
        ]);
        let (rule, _) = compare(f, &crm, &shop).expect("a typo'd record of the same person");
        assert_eq!(rule, "name+birthday+postcode");
        let spouse = fields(&[
            ("first_name", "michael"),
            ("last_name", "johnson"),
            ("birthday", "1979-09-30"),
            ("street", "12 oak st"),
            ("postcode", "90210"),
            ("city", "springfield"),
        ]);
        assert_eq!(compare(f, &crm, &spouse), None);
        let twin = fields(&[
            ("first_name", "caroline"),
            ("last_name", "johnson"),
            ("birthday", "1981-04-12"),
            ("street", "12 oak st"),
            ("postcode", "90210"),
            ("city", "springfield"),
        ]);
        assert_eq!(
            compare(f, &crm, &twin),
            None,
            "a twin differs by first name"
        );
        // The score alone: a moved person with a phone still matches.
        let moved = fields(&[
            ("first_name", "katherine"),
            ("last_name", "johnson"),
            ("birthday", "1981-04-12"),
            ("phone", "+14155552671"),
        ]);
        let mut crm_phone = crm.clone();
        crm_phone.insert("phone".into(), "+14155552671".into());
        assert!(compare(f, &crm_phone, &moved).is_some());
        assert!(score(f, &crm, &shop).unwrap() > score(f, &crm, &spouse).unwrap());
    }

    #[test]
    fn records_are_compared_within_blocks_only() {
        use tessera_common::store::{MemStore, Store};
        let rules = Rules::parse(DEFAULT_RULES, "t").unwrap();
        let f = rules.fuzzy.as_ref().unwrap();
        let s = MemStore::default();
        let a = FuzzyRecord::new(
            &Identifier {
                kind: "crm_id".into(),
                value: "1".into(),
            },
            fields(&[
                ("first_name", "ann"),
                ("last_name", "lee"),
                ("birthday", "1990-01-01"),
                ("postcode", "10001"),
            ]),
            1,
            "m1",
        );
        let mut txn = Txn::new(&s);
        let (_, o) = upsert_and_match(&mut txn, f, a).unwrap();
        assert_eq!(o.compared, 0);
        s.write(txn.into_batch()).unwrap();
        let b = FuzzyRecord::new(
            &Identifier {
                kind: "loyalty_id".into(),
                value: "9".into(),
            },
            fields(&[
                ("first_name", "ann"),
                ("last_name", "lee"),
                ("birthday", "1990-01-01"),
                ("postcode", "10001"),
            ]),
            2,
            "m2",
        );
        let far = FuzzyRecord::new(
            &Identifier {
                kind: "loyalty_id".into(),
                value: "8".into(),
            },
            fields(&[
                ("first_name", "bob"),
                ("last_name", "ng"),
                ("birthday", "1970-05-05"),
                ("postcode", "60601"),
            ]),
            3,
            "m3",
        );
        let mut txn = Txn::new(&s);
        let (_, o) = upsert_and_match(&mut txn, f, far).unwrap();
        assert_eq!(o.compared, 0, "nothing shares a block with it");
        let (_, o) = upsert_and_match(&mut txn, f, b).unwrap();
        assert_eq!(o.compared, 1);
        assert_eq!(o.matches.len(), 1);
        assert_eq!(o.matches[0].other.anchor.value, "1");
    }
}
