//! The probabilistic matcher: Fellegi–Sunter weights over comparison levels
//! ([`super::compare`]), learned from the stream with no labels and no batch job.
//!
//! - A pair's weight is the sum over the fields both records have of
//!   `log2(m[level] / u[level])`; a missing field adds nothing. Its match probability is
//!   that weight added to the prior odds of two records matching, `1 / N` for `N`
//!   records (at least `prior_population`).
//! - **u** (how often two different people agree at a level) comes from random pairs:
//!   each new record is also compared with one stored record picked by its hash, as
//!   Splink samples random pairs. On an exact agreement u is the value's own frequency
//!   (**term-frequency adjustment**: agreeing on "smith" says less than on "zorglub").
//! - **m** (how often the same person agrees at a level) comes from expectation–
//!   maximisation over the blocked candidate pairs: each pair more likely than not to
//!   match adds its match probability to the levels it showed (the unlikely ones, by the
//!   million, would drag m towards u); a pair whose records already share a profile
//!   through an identifier counts as a match (a seed).
//! - Both start from priors (pseudo-counts, so a new deployment behaves sensibly) and
//!   are refreshed into a new **version** of the parameters every `refresh_every`
//!   candidate pairs. Decisions use the current version; each link records it with
//!   the fields' levels and weights (the explanation).
//! - Within one household (the same street and house number) fields are not
//!   independent: the postcode and city add nothing more, a shared family name counts
//!   as one household member's in two, and a first name at "different" keeps the pair
//!   apart (a twin shares everything else) unless a personal identifier (an id, a
//!   phone, an email) agrees.
//! - With `learn = false` the priors decide alone, with no term frequencies and a fixed
//!   population: a pair's decision then depends on the two records only, and the graph
//!   on the set of events only, whatever their order. With learning, a pair is decided
//!   with the parameters current when it is compared (recorded in its explanation); the
//!   decision is kept as a fact.
//!
//! Keys: `fzm/params` → [`Params`] (current); `fzm/v/<version>` → the last
//! [`KEPT_VERSIONS`] versions;
//! `fzm/acc` → [`Accumulators`]; `fzm/tf/<field>/<hash of value>` → count.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use tessera_common::Result;
use tessera_common::ids::deterministic_id;
use tessera_common::store::Txn;

use crate::rules::{Compare, Fuzzy};

/// Pseudo-counts of the priors: how many pairs' worth of evidence they are.
const M_PRIOR_PAIRS: f64 = 200.0;
const U_PRIOR_PAIRS: f64 = 1000.0;
/// Pseudo-records behind a value's prior frequency (term-frequency adjustment).
const TF_PRIOR_RECORDS: f64 = 200.0;
/// No level is certain: m and u stay within these bounds.
const FLOOR: f64 = 1e-6;
/// Versions of the parameters kept for the API (each link records its version).
pub const KEPT_VERSIONS: u64 = 1000;
/// How often two different people of one household share a family name.
const HOUSEHOLD: f64 = 0.5;

/// The prior m and u of each level of a kind of comparison.
pub fn priors(c: Compare) -> (&'static [f64], &'static [f64]) {
    match c {
        Compare::Name => (
            &[0.85, 0.07, 0.03, 0.01, 0.04],
            &[0.005, 0.003, 0.01, 0.002, 0.98],
        ),
        Compare::Date => (
            &[0.85, 0.08, 0.01, 0.02, 0.04],
            &[0.0001, 0.0008, 0.00002, 0.005, 0.99408],
        ),
        Compare::Street => (&[0.75, 0.12, 0.05, 0.08], &[0.0005, 0.0002, 0.0005, 0.9988]),
        Compare::Postcode => (&[0.85, 0.07, 0.08], &[0.002, 0.02, 0.978]),
        Compare::Phone => (&[0.85, 0.05, 0.1], &[0.00001, 0.0001, 0.99989]),
        Compare::Email => (&[0.85, 0.05, 0.1], &[0.00001, 0.00005, 0.99994]),
        Compare::Id => (&[0.85, 0.08, 0.07], &[0.00001, 0.0001, 0.99989]),
        Compare::Text => (&[0.8, 0.08, 0.12], &[0.01, 0.01, 0.98]),
    }
}

/// The parameters decisions are made with: one version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub version: u64,
    /// Per field, per level: P(level | same person).
    pub m: BTreeMap<String, Vec<f64>>,
    /// Per field, per level: P(level | different people).
    pub u: BTreeMap<String, Vec<f64>>,
    /// Candidate pairs and random pairs behind this version.
    pub candidate_pairs: u64,
    pub random_pairs: u64,
}

impl Params {
    /// A field's weight at each level, log2(m / u) in bits (before term frequencies).
    pub fn weights(&self, field: &str) -> Vec<f64> {
        self.m[field]
            .iter()
            .zip(&self.u[field])
            .map(|(m, u)| round((m / u).log2()))
            .collect()
    }
}

/// What is being learned, summed since the start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Accumulators {
    /// Per field, per level: summed match probabilities of candidate pairs.
    pub m: BTreeMap<String, Vec<f64>>,
    /// Per field, per level: random pairs.
    pub u: BTreeMap<String, Vec<f64>>,
    /// Per field: records that have it (the term frequencies' denominator).
    pub present: BTreeMap<String, u64>,
    pub records: u64,
    pub candidate_pairs: u64,
    pub random_pairs: u64,
    /// Candidate pairs since the last version.
    pub since_refresh: u64,
}

/// One field's part in a decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldAgreement {
    pub field: String,
    pub level: String,
    /// log2(m / u), in bits.
    pub weight: f64,
}

/// Why two records were (or were not) linked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub fields: Vec<FieldAgreement>,
    /// The fields' weights and the prior, in bits.
    pub weight: f64,
    pub probability: f64,
    pub threshold: f64,
    pub params_version: u64,
    /// Whether a field that tells people apart (not a name, postcode or city) agreed.
    pub discriminating: bool,
    /// The first and last names matched crosswise.
    #[serde(default)]
    pub names_swapped: bool,
    /// What keeps the pair apart whatever its weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veto: Option<String>,
}

const PARAMS: &[u8] = b"fzm/params";
const ACC: &[u8] = b"fzm/acc";

fn version_key(v: u64) -> Vec<u8> {
    format!("fzm/v/{v:016x}").into_bytes()
}

fn tf_key(field: &str, value: &str) -> Vec<u8> {
    format!("fzm/tf/{field}/{}", deterministic_id("tf", &[field, value])).into_bytes()
}

/// The priors as version 0.
pub fn initial(f: &Fuzzy) -> Params {
    let mut p = Params {
        version: 0,
        m: BTreeMap::new(),
        u: BTreeMap::new(),
        candidate_pairs: 0,
        random_pairs: 0,
    };
    for field in &f.fields {
        let (m, u) = priors(field.compare);
        p.m.insert(field.name.clone(), m.to_vec());
        p.u.insert(field.name.clone(), u.to_vec());
    }
    p
}

/// The current parameters (the priors until the first refresh).
pub fn current(txn: &Txn<'_>, f: &Fuzzy) -> Result<Params> {
    Ok(txn
        .get_json(PARAMS)?
        .map_or_else(|| initial(f), |p| fitted(f, p)))
}

/// A stored version, for the API.
pub fn version(txn: &Txn<'_>, f: &Fuzzy, v: u64) -> Result<Option<Params>> {
    if v == 0 {
        return Ok(Some(initial(f)));
    }
    Ok(txn
        .get_json::<Params>(&version_key(v))?
        .map(|p| fitted(f, p)))
}

/// Parameters learned under other rules, fitted to these: a field that was added, or
/// whose comparison (hence levels) changed, starts again from its priors.
fn fitted(f: &Fuzzy, mut p: Params) -> Params {
    for field in &f.fields {
        let (m, u) = priors(field.compare);
        for (learned, prior) in [(&mut p.m, m), (&mut p.u, u)] {
            if learned.get(&field.name).map(Vec::len) != Some(prior.len()) {
                learned.insert(field.name.clone(), prior.to_vec());
            }
        }
    }
    p
}

pub fn accumulators(txn: &Txn<'_>) -> Result<Accumulators> {
    Ok(txn.get_json(ACC)?.unwrap_or_default())
}

fn count(txn: &Txn<'_>, field: &str, value: &str) -> Result<u64> {
    Ok(txn
        .get(&tf_key(field, value))?
        .and_then(|b| b.try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0))
}

/// Counts a new record's values (or, with `delta` -1, forgets an erased one's).
pub fn count_record(
    txn: &mut Txn<'_>,
    acc: &mut Accumulators,
    fields: &BTreeMap<String, String>,
    delta: i64,
) -> Result<()> {
    for (field, value) in fields {
        let n = count(txn, field, value)?.saturating_add_signed(delta);
        if n == 0 {
            txn.delete(tf_key(field, value));
        } else {
            txn.put(tf_key(field, value), n.to_be_bytes().to_vec());
        }
        let p = acc.present.entry(field.clone()).or_default();
        *p = p.saturating_add_signed(delta);
    }
    acc.records = acc.records.saturating_add_signed(delta);
    Ok(())
}

/// The levels of a pair, per field both have; `names_swapped` when the first and last
/// names agree better crosswise.
pub fn levels(
    f: &Fuzzy,
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
) -> (Vec<(usize, usize)>, bool) {
    let mut out = Vec::new();
    for (i, field) in f.fields.iter().enumerate() {
        if let (Some(x), Some(y)) = (a.get(&field.name), b.get(&field.name)) {
            out.push((i, field.compare.level(x, y)));
        }
    }
    // First and last names swapped on one side.
    let pos = |n: &str| f.fields.iter().position(|x| x.name == n);
    let (Some(fi), Some(li)) = (pos("first_name"), pos("last_name")) else {
        return (out, false);
    };
    let get = |r: &BTreeMap<String, String>, i: usize| r.get(&f.fields[i].name).cloned();
    if let (Some(fa), Some(la), Some(fb), Some(lb)) =
        (get(a, fi), get(a, li), get(b, fi), get(b, li))
    {
        let direct = Compare::Name.level(&fa, &fb) + Compare::Name.level(&la, &lb);
        let (cf, cl) = (Compare::Name.level(&fa, &lb), Compare::Name.level(&la, &fb));
        if cf <= 1 && cl <= 1 && cf + cl < direct {
            for (i, l) in out.iter_mut() {
                if *i == fi {
                    *l = cf;
                } else if *i == li {
                    *l = cl;
                }
            }
            return (out, true);
        }
    }
    (out, false)
}

/// Scores a pair with `params`: its explanation (weights, probability, whether a
/// discriminating field agreed).
pub fn score(
    txn: &Txn<'_>,
    f: &Fuzzy,
    params: &Params,
    acc: &Accumulators,
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
    threshold: f64,
) -> Result<Explanation> {
    score_levels(txn, f, params, acc, a, &levels(f, a, b), threshold)
}

/// [`score`] of a pair whose [`levels`] are known (`a`: one side, for its values'
/// frequencies).
pub fn score_levels(
    txn: &Txn<'_>,
    f: &Fuzzy,
    params: &Params,
    acc: &Accumulators,
    a: &BTreeMap<String, String>,
    pair: &(Vec<(usize, usize)>, bool),
    threshold: f64,
) -> Result<Explanation> {
    let (levels, names_swapped) = (pair.0.iter().copied(), pair.1);
    let population = if f.learn {
        (acc.records as f64).max(f.prior_population as f64)
    } else {
        f.prior_population as f64
    };
    let mut weight = -(population - 1.0).max(1.0).log2();
    let mut fields = Vec::with_capacity(pair.0.len());
    let mut discriminating = false;
    // One household: the same house (street and number). Fields are not independent
    // there: its postcode and city follow from the street, its people share a family
    // name, and only a first name tells them apart.
    let household = levels
        .clone()
        .any(|(i, l)| f.fields[i].compare == Compare::Street && l <= 1);
    let (mut first_differs, mut personal) = (false, false);
    for (i, level) in levels {
        let field = &f.fields[i];
        let m = params.m[&field.name][level].max(FLOOR);
        let mut u = params.u[&field.name][level].max(FLOOR);
        if level == 0 && f.learn {
            // Term-frequency adjustment: the value's frequency among the other records,
            // drawn towards the level's average while few records have the field.
            let value = &a[&field.name];
            let n = acc.present.get(&field.name).copied().unwrap_or(0);
            let c = count(txn, &field.name, value)?;
            u = ((c.saturating_sub(2) as f64 + TF_PRIOR_RECORDS * u)
                / (n.saturating_sub(2) as f64 + TF_PRIOR_RECORDS))
                .max(FLOOR);
        }
        let mut w = (m / u).log2();
        let last = field.compare.levels().len() - 1;
        if household {
            match (field.compare, field.name.as_str()) {
                (Compare::Postcode | Compare::Text, _) => w = w.min(0.0),
                (Compare::Name, "last_name") if level <= 1 => {
                    let m0 = params.m[&field.name][0];
                    w = w.min((m0 / HOUSEHOLD).log2()).max(0.0)
                }
                (Compare::Name, "first_name") if level == last => first_differs = true,
                _ => {}
            }
        }
        if field.discriminating && w > 0.0 {
            discriminating = true;
            personal |= matches!(field.compare, Compare::Id | Compare::Phone | Compare::Email);
        }
        weight += w;
        fields.push(FieldAgreement {
            field: field.name.clone(),
            level: field.compare.levels()[level].to_string(),
            weight: round(w),
        });
    }
    // A twin shares the house, the family name and the birth date: within a household
    // a first name that differs keeps two records apart, unless something only one
    // person has (an id, a phone, an email) agrees.
    let veto = (household && first_differs && !personal)
        .then(|| "a first name differs within one household".to_string());
    let probability = 1.0 / (1.0 + (-weight).exp2());
    Ok(Explanation {
        fields,
        weight: round(weight),
        probability,
        threshold,
        params_version: params.version,
        discriminating,
        names_swapped,
        veto,
    })
}

impl Explanation {
    /// Whether the pair links: likely enough, a discriminating field agreed, no veto.
    pub fn links(&self) -> bool {
        self.probability >= self.threshold && self.discriminating && self.veto.is_none()
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Adds `weight` to each level a pair showed (its [`levels`]), per field, in `into`.
fn add_levels(
    f: &Fuzzy,
    into: &mut BTreeMap<String, Vec<f64>>,
    levels: &[(usize, usize)],
    weight: f64,
) {
    for &(i, level) in levels {
        let field = &f.fields[i];
        let n = field.compare.levels().len();
        let v = into.entry(field.name.clone()).or_default();
        if v.len() != n {
            // New, or counted under another comparison: start again.
            *v = vec![0.0; n];
        }
        v[level] += weight;
    }
}

/// Learns from a random pair: its levels are those of different people.
pub fn learn_random(
    f: &Fuzzy,
    acc: &mut Accumulators,
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
) {
    add_levels(f, &mut acc.u, &levels(f, a, b).0, 1.0);
    acc.random_pairs += 1;
}

/// Learns from a likely match among the candidate pairs (the E step): each level it
/// showed gains its match probability `p` (1 for a pair already linked by an
/// identifier).
pub fn learn_candidate(f: &Fuzzy, acc: &mut Accumulators, levels: &[(usize, usize)], p: f64) {
    add_levels(f, &mut acc.m, levels, p);
}

/// The M step, when due: a new version of the parameters from the priors and what was
/// learned. Returns it when one was made.
pub fn refresh(txn: &mut Txn<'_>, f: &Fuzzy, acc: &mut Accumulators) -> Result<Option<Params>> {
    if !f.learn || acc.since_refresh < f.refresh_every {
        return Ok(None);
    }
    let old = current(txn, f)?;
    let mut p = Params {
        version: old.version + 1,
        m: BTreeMap::new(),
        u: BTreeMap::new(),
        candidate_pairs: acc.candidate_pairs,
        random_pairs: acc.random_pairs,
    };
    for field in &f.fields {
        let (m0, u0) = priors(field.compare);
        let estimate = |prior: &[f64], seen: Option<&Vec<f64>>, strength: f64| {
            let seen = seen.filter(|s| s.len() == prior.len());
            let total: f64 = seen.map_or(0.0, |s| s.iter().sum());
            prior
                .iter()
                .enumerate()
                .map(|(l, p)| {
                    let s = seen.and_then(|s| s.get(l)).copied().unwrap_or(0.0);
                    ((s + strength * p) / (total + strength)).max(FLOOR)
                })
                .collect::<Vec<f64>>()
        };
        p.m.insert(
            field.name.clone(),
            estimate(m0, acc.m.get(&field.name), M_PRIOR_PAIRS),
        );
        p.u.insert(
            field.name.clone(),
            estimate(u0, acc.u.get(&field.name), U_PRIOR_PAIRS),
        );
    }
    acc.since_refresh = 0;
    txn.put_json(PARAMS.to_vec(), &p)?;
    txn.put_json(version_key(p.version), &p)?;
    if let Some(old) = p.version.checked_sub(KEPT_VERSIONS) {
        txn.delete(version_key(old));
    }
    Ok(Some(p))
}

/// Keeps a version read from the matcher's log ([`super::log`]), for the API.
pub fn keep_version(txn: &mut Txn<'_>, p: &Params) -> Result<()> {
    txn.put_json(version_key(p.version), p)
}

/// Makes a version read from the log the current one, with what it was learned from.
/// The record counts stay the store's own: the replay counts the records again.
pub fn restore(txn: &mut Txn<'_>, p: &Params, learned: &Accumulators) -> Result<()> {
    txn.put_json(PARAMS.to_vec(), p)?;
    let mut acc = accumulators(txn)?;
    acc.m = learned.m.clone();
    acc.u = learned.u.clone();
    acc.candidate_pairs = learned.candidate_pairs;
    acc.random_pairs = learned.random_pairs;
    acc.since_refresh = 0;
    save(txn, &acc)
}

pub fn save(txn: &mut Txn<'_>, acc: &Accumulators) -> Result<()> {
    txn.put_json(ACC.to_vec(), acc)
}
