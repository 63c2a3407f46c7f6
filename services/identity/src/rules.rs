//! The identity rules: which identifiers an event carries, how they are normalised, which
//! values are blocked, their priority and per-profile limits, and the fuzzy matching
//! fields, rules and score. Declared in TOML (`rules.toml` is the embedded default),
//! validated when loaded: every mistake is reported with where it is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::str::FromStr;

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use tessera_common::records::Identifier;
use tessera_common::{Error, Result, text};

pub const DEFAULT_RULES: &str = include_str!("../rules.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    phone_default_region: String,
    #[serde(default)]
    blocked_values: Vec<String>,
    identifiers: Vec<IdentifierRule>,
    #[serde(default)]
    fuzzy: Option<FuzzyFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifierRule {
    pub kind: String,
    pub limit: usize,
    /// A fuzzy match may join two values of this type in one profile (duplicates of a
    /// person within a source), beyond `limit`.
    #[serde(default)]
    pub dedupe: bool,
    #[serde(default)]
    pub normalise: Normalise,
    pub paths: Vec<MessagePath>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalise {
    #[default]
    Trim,
    Lowercase,
    Email,
    Phone,
    Name,
    Text,
    Date,
    Postcode,
    Address,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FuzzyFile {
    enabled: bool,
    max_block_size: usize,
    blocking_keys: Vec<String>,
    fields: Vec<FieldFile>,
    /// Declarative mode: when rules are given, a pair matches on a rule and the
    /// probabilistic model is not used.
    #[serde(default)]
    rules: Vec<MatchRule>,
    #[serde(default = "default_threshold")]
    threshold: f64,
    #[serde(default)]
    thresholds: Vec<SourcePair>,
    #[serde(default = "default_prior_population")]
    prior_population: u64,
    #[serde(default = "default_learn")]
    learn: bool,
    #[serde(default = "default_refresh_every")]
    refresh_every: u64,
}

fn default_threshold() -> f64 {
    0.999
}
fn default_prior_population() -> u64 {
    1000
}
fn default_learn() -> bool {
    true
}
fn default_refresh_every() -> u64 {
    1000
}

/// A match-probability threshold for the pairs of records of two sources (in either
/// order; the same source twice is deduplication within it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePair {
    pub sources: [String; 2],
    pub threshold: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldFile {
    name: String,
    normalise: Normalise,
    paths: Vec<MessagePath>,
    #[serde(default)]
    compare: Option<Compare>,
    #[serde(default)]
    discriminating: Option<bool>,
}

/// How a field's values are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// Given or family names: exact, Jaro–Winkler ≥ 0.92, sounds alike (Double Metaphone)
    /// or Jaro–Winkler ≥ 0.85, an initial against its name, different.
    Name,
    /// Dates as YYYY-MM-DD: exact, one character off, day and month swapped, two
    /// characters off, different.
    Date,
    /// A street address: the house number is compared exactly as a token (two numbers
    /// that differ are different addresses), the street by similarity.
    Street,
    /// Postcodes: exact, one character off, different.
    Postcode,
    /// Phone numbers (E.164): exact, one digit off, different.
    Phone,
    /// Emails: exact, the same local part, different.
    Email,
    /// Identifiers typed by people (a national id, a member number): exact, one edit or
    /// two characters swapped, different.
    Id,
    /// Free text such as a city: exact, Jaro–Winkler ≥ 0.88, different.
    Text,
}

impl Compare {
    /// Whether agreeing on this field tells people apart on its own (a birth date, an
    /// address with its number, a phone, an email, an id) rather than naming them (a
    /// name) or placing them among thousands (a postcode, a city).
    pub fn discriminating(self) -> bool {
        matches!(
            self,
            Compare::Date | Compare::Street | Compare::Phone | Compare::Email | Compare::Id
        )
    }
}

#[derive(Debug, Clone)]
pub struct FuzzyField {
    pub name: String,
    pub normalise: Normalise,
    pub paths: Vec<MessagePath>,
    pub compare: Compare,
    /// Agreeing on it tells people apart: a fuzzy link needs one such field to agree.
    pub discriminating: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchRule {
    pub name: String,
    pub criteria: Vec<Criterion>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criterion {
    pub field: String,
    pub method: Method,
    /// jaro_winkler: the lowest similarity that agrees.
    #[serde(default)]
    pub min: Option<f64>,
    /// levenshtein: the most edits that agree.
    #[serde(default)]
    pub max: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Exact,
    JaroWinkler,
    Levenshtein,
}

/// A blocking key: fields, each transformed.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockingKey {
    pub spec: String,
    pub parts: Vec<(String, KeyPart)>,
}

/// What a blocking key takes of a field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyPart {
    Whole,
    /// The first N characters.
    Prefix(usize),
    /// The Double Metaphone code (`:dm`).
    Phonetic,
    /// A street's house number (`:number`).
    Number,
}

#[derive(Debug, Clone)]
pub struct Fuzzy {
    pub max_block_size: usize,
    pub blocking_keys: Vec<BlockingKey>,
    pub fields: Vec<FuzzyField>,
    /// Declarative rules; when empty, the probabilistic model decides.
    pub rules: Vec<MatchRule>,
    /// The match probability a link needs (default 0.999).
    pub threshold: f64,
    pub thresholds: Vec<SourcePair>,
    /// The prior odds of two records matching are 1 / max(records, this).
    pub prior_population: u64,
    /// Whether m and u are learned from the stream (else the priors stay).
    pub learn: bool,
    /// Candidate pairs between two versions of the parameters.
    pub refresh_every: u64,
}

impl Fuzzy {
    /// The threshold for a pair of records from sources `a` and `b`.
    pub fn threshold_for(&self, a: &str, b: &str) -> f64 {
        self.thresholds
            .iter()
            .find(|p| {
                (p.sources[0] == a && p.sources[1] == b) || (p.sources[0] == b && p.sources[1] == a)
            })
            .map_or(self.threshold, |p| p.threshold)
    }
}

/// Validated rules, ready to use.
#[derive(Debug, Clone)]
pub struct Rules {
    pub identifiers: Vec<IdentifierRule>,
    pub region: phonenumber::country::Id,
    blocked: Vec<Regex>,
    /// `None` when fuzzy matching is off.
    pub fuzzy: Option<Fuzzy>,
}

impl Rules {
    /// Loads the rules from a file, or the embedded default when `path` is empty.
    pub fn load(path: &Path) -> Result<Rules> {
        if path.as_os_str().is_empty() {
            return Rules::parse(DEFAULT_RULES, "embedded rules.toml");
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("identity rules file {}: {e}", path.display())))?;
        Rules::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Rules> {
        let bad = |msg: String| Error::Config(format!("identity rules ({origin}): {msg}"));
        let file: RulesFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let region =
            phonenumber::country::Id::from_str(&file.phone_default_region).map_err(|_| {
                bad(format!(
                    "phone_default_region {:?} is not an ISO 3166 region code",
                    file.phone_default_region
                ))
            })?;
        let blocked = file
            .blocked_values
            .iter()
            .map(|r| Regex::new(r).map_err(|e| bad(format!("blocked_values {r:?}: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        if file.identifiers.is_empty() {
            return Err(bad("at least one identifier type is needed".into()));
        }
        let mut kinds = BTreeSet::new();
        for (n, i) in file.identifiers.iter().enumerate() {
            let at = format!("identifiers[{n}] ({})", i.kind);
            if i.kind.is_empty()
                || !i
                    .kind
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(bad(format!(
                    "{at}: kind must be lower-case letters, digits and '_'"
                )));
            }
            if !kinds.insert(i.kind.clone()) {
                return Err(bad(format!("{at}: kind is declared twice")));
            }
            if i.limit == 0 {
                return Err(bad(format!("{at}: limit must be at least 1")));
            }
            if !matches!(
                i.normalise,
                Normalise::Trim | Normalise::Lowercase | Normalise::Email | Normalise::Phone
            ) {
                return Err(bad(format!(
                    "{at}: normalise must be trim, lowercase, email or phone"
                )));
            }
            if i.paths.is_empty() {
                return Err(bad(format!("{at}: paths is empty")));
            }
        }
        let fuzzy = match file.fuzzy {
            Some(f) if f.enabled => Some(validate_fuzzy(f).map_err(bad)?),
            _ => None,
        };
        Ok(Rules {
            identifiers: file.identifiers,
            region,
            blocked,
            fuzzy,
        })
    }

    /// Priority of a kind: 0 is the highest; unknown kinds come last.
    pub fn priority(&self, kind: &str) -> usize {
        self.identifiers
            .iter()
            .position(|i| i.kind == kind)
            .unwrap_or(usize::MAX)
    }

    pub fn limit(&self, kind: &str) -> usize {
        self.identifiers
            .iter()
            .find(|i| i.kind == kind)
            .map_or(usize::MAX, |i| i.limit)
    }

    /// Whether a fuzzy match may join two values of a kind beyond its limit.
    pub fn dedupes(&self, kind: &str) -> bool {
        self.kind(kind).is_some_and(|k| k.dedupe)
    }

    pub fn kind(&self, kind: &str) -> Option<&IdentifierRule> {
        self.identifiers.iter().find(|i| i.kind == kind)
    }

    pub fn is_blocked(&self, value: &str) -> bool {
        self.blocked.iter().any(|r| r.is_match(value))
    }

    /// Normalises a raw value for an identifier kind; `None` when it is not a valid
    /// value of that kind.
    pub fn normalise(&self, kind: &str, raw: &str) -> Option<String> {
        let how = self.kind(kind).map_or(Normalise::Trim, |k| k.normalise);
        normalise(how, raw, self.region)
    }

    /// The identifiers an event carries: normalised, deduplicated, in priority order
    /// (then by value). Blocked values are left out and returned apart, by kind.
    pub fn extract(&self, message: &Value) -> (Vec<Identifier>, Vec<String>) {
        let mut ids = BTreeSet::new();
        let mut blocked = Vec::new();
        for (prio, rule) in self.identifiers.iter().enumerate() {
            for path in &rule.paths {
                for raw in lookup(message, path) {
                    let Some(value) = normalise(rule.normalise, &raw, self.region) else {
                        continue;
                    };
                    if self.is_blocked(&value) {
                        blocked.push(rule.kind.clone());
                        continue;
                    }
                    ids.insert((prio, value, rule.kind.clone()));
                }
            }
        }
        let ids = ids
            .into_iter()
            .map(|(_, value, kind)| Identifier { kind, value })
            .collect();
        (ids, blocked)
    }

    /// The fuzzy matching fields an event carries, normalised.
    pub fn fuzzy_fields(&self, message: &Value) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(f) = &self.fuzzy else {
            return out;
        };
        for field in &f.fields {
            let found = field.paths.iter().find_map(|p| {
                lookup(message, p)
                    .into_iter()
                    .find_map(|raw| normalise(field.normalise, &raw, self.region))
            });
            if let Some(v) = found.filter(|v| !v.is_empty() && !self.is_blocked(v)) {
                out.insert(field.name.clone(), v);
            }
        }
        out
    }
}

fn validate_fuzzy(f: FuzzyFile) -> std::result::Result<Fuzzy, String> {
    let names: BTreeSet<&str> = f.fields.iter().map(|x| x.name.as_str()).collect();
    if names.len() != f.fields.len() {
        return Err("fuzzy.fields: a field name is declared twice".into());
    }
    for (n, field) in f.fields.iter().enumerate() {
        if field.paths.is_empty() {
            return Err(format!(
                "fuzzy.fields[{n}] ({}): paths is empty",
                field.name
            ));
        }
    }
    let known = |field: &str, at: &str| {
        if names.contains(field) {
            Ok(())
        } else {
            Err(format!(
                "{at}: field {field:?} is not declared in fuzzy.fields"
            ))
        }
    };
    for (n, r) in f.rules.iter().enumerate() {
        let at = format!("fuzzy.rules[{n}] ({})", r.name);
        if r.criteria.is_empty() {
            return Err(format!("{at}: no criteria"));
        }
        for c in &r.criteria {
            known(&c.field, &at)?;
            match c.method {
                Method::JaroWinkler if !c.min.is_some_and(|t| (0.0..=1.0).contains(&t)) => {
                    return Err(format!("{at}: jaro_winkler needs min between 0 and 1"));
                }
                Method::Levenshtein if c.max.is_none() => {
                    return Err(format!("{at}: levenshtein needs max (edits)"));
                }
                _ => {}
            }
        }
    }
    let probability = |x: f64| x > 0.0 && x < 1.0;
    if !probability(f.threshold) {
        return Err("fuzzy.threshold: a match probability, between 0 and 1 (excluded)".into());
    }
    for p in &f.thresholds {
        if !probability(p.threshold) {
            return Err(format!(
                "fuzzy.thresholds {:?}: a match probability, between 0 and 1 (excluded)",
                p.sources
            ));
        }
    }
    if f.refresh_every == 0 {
        return Err("fuzzy.refresh_every must be at least 1".into());
    }
    if f.blocking_keys.is_empty() {
        return Err("fuzzy.blocking_keys: at least one key is needed (no scans)".into());
    }
    let mut keys = Vec::new();
    for spec in &f.blocking_keys {
        let mut parts = Vec::new();
        for part in spec.split('+') {
            let (field, how) = match part.split_once(':') {
                Some((field, "dm")) => (field, KeyPart::Phonetic),
                Some((field, "number")) => (field, KeyPart::Number),
                Some((field, n)) => (
                    field,
                    KeyPart::Prefix(n.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(
                        || {
                            format!(
                                "fuzzy.blocking_keys {spec:?}: {n:?} is not a length, dm or number"
                            )
                        },
                    )?),
                ),
                None => (part, KeyPart::Whole),
            };
            known(field, &format!("fuzzy.blocking_keys {spec:?}"))?;
            parts.push((field.to_string(), how));
        }
        keys.push(BlockingKey {
            spec: spec.clone(),
            parts,
        });
    }
    if f.max_block_size == 0 {
        return Err("fuzzy.max_block_size must be at least 1".into());
    }
    let fields: Vec<FuzzyField> = f
        .fields
        .into_iter()
        .map(|x| {
            let compare = x.compare.unwrap_or(match x.normalise {
                Normalise::Name => Compare::Name,
                Normalise::Date => Compare::Date,
                Normalise::Address => Compare::Street,
                Normalise::Postcode => Compare::Postcode,
                Normalise::Phone => Compare::Phone,
                Normalise::Email => Compare::Email,
                Normalise::Text => Compare::Text,
                Normalise::Trim | Normalise::Lowercase => Compare::Id,
            });
            FuzzyField {
                discriminating: x.discriminating.unwrap_or(compare.discriminating()),
                name: x.name,
                normalise: x.normalise,
                paths: x.paths,
                compare,
            }
        })
        .collect();
    if f.rules.is_empty() && !fields.iter().any(|x| x.discriminating) {
        return Err(
            "fuzzy.fields: the model never links on names alone, so at least one field must \
             be discriminating (a date, street, phone, email or id)"
                .into(),
        );
    }
    Ok(Fuzzy {
        max_block_size: f.max_block_size,
        blocking_keys: keys,
        fields,
        rules: f.rules,
        threshold: f.threshold,
        thresholds: f.thresholds,
        prior_population: f.prior_population,
        learn: f.learn,
        refresh_every: f.refresh_every,
    })
}

/// A dotted path into a Segment message, parsed once when the rules load.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct MessagePath {
    steps: Vec<Step>,
}

/// One step of a path: a key, or an array filtered by `type`.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Typed(String, String),
}

impl TryFrom<String> for MessagePath {
    type Error = String;

    fn try_from(path: String) -> std::result::Result<MessagePath, String> {
        let bad = |e: String| format!("path {path:?}: {e}");
        if path.is_empty() {
            return Err(bad("empty path".into()));
        }
        let steps = path
            .split('.')
            .map(|seg| {
                if seg.is_empty() {
                    return Err(bad("empty segment".to_string()));
                }
                match seg.split_once('[') {
                    None => Ok(Step::Key(seg.to_string())),
                    Some((name, rest)) => {
                        let filter = rest
                            .strip_suffix(']')
                            .and_then(|f| f.strip_prefix("type="))
                            .filter(|t| !t.is_empty())
                            .ok_or_else(|| bad(format!("{seg:?}: use name[type=value]")))?;
                        Ok(Step::Typed(name.to_string(), filter.to_string()))
                    }
                }
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(MessagePath { steps })
    }
}

/// The scalar values (strings and numbers) found at a path.
fn lookup<'m>(message: &'m Value, path: &MessagePath) -> Vec<String> {
    let mut cur: Vec<&'m Value> = vec![message];
    for step in &path.steps {
        let mut next = Vec::new();
        for v in cur {
            match step {
                Step::Key(k) => {
                    if let Some(x) = v.get(k.as_str()) {
                        next.push(x);
                    }
                }
                Step::Typed(k, t) => {
                    if let Some(items) = v.get(k.as_str()).and_then(Value::as_array) {
                        next.extend(
                            items
                                .iter()
                                .filter(|i| i["type"].as_str() == Some(t.as_str()))
                                .map(|i| &i["id"]),
                        );
                    }
                }
            }
        }
        cur = next;
    }
    cur.into_iter()
        .filter_map(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

/// The normalised form of `raw`, or `None` when it is not valid for `how` or nothing of
/// it is left (a name of digits only): an empty value is an absent one.
pub fn normalise(how: Normalise, raw: &str, region: phonenumber::country::Id) -> Option<String> {
    let t = raw.trim();
    if t.is_empty() {
        return None;
    }
    let v = match how {
        Normalise::Trim => t.to_string(),
        Normalise::Lowercase => t.to_lowercase(),
        Normalise::Email => {
            let e = t.to_lowercase();
            let (local, domain) = e.split_once('@')?;
            if local.is_empty()
                || !domain.contains('.')
                || domain.starts_with('.')
                || domain.ends_with('.')
                || e.contains(char::is_whitespace)
                || domain.contains('@')
            {
                return None;
            }
            e
        }
        Normalise::Phone => {
            // An event's phone is read for its identifier and again for the fuzzy field:
            // parsing it (up to three times, below) is the costly part of an identify.
            if let Some(known) = LAST_PHONE.with_borrow(|last| {
                last.as_ref()
                    .filter(|(r, raw, _)| *r == region && raw == t)
                    .map(|(_, _, v)| v.clone())
            }) {
                return known;
            }
            let v = normalise_phone(t, region);
            LAST_PHONE.set(Some((region, t.to_string(), v.clone())));
            return v;
        }
        Normalise::Name => text::fold(t, false),
        Normalise::Text => t
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase(),
        Normalise::Date => normalise_date(t)?,
        Normalise::Postcode => text::normalise_postcode(t),
        Normalise::Address => text::normalise_address(t),
    };
    (!v.is_empty()).then_some(v)
}

thread_local! {
    /// The last phone number normalised on this thread, with its region and result.
    static LAST_PHONE: std::cell::RefCell<Option<(phonenumber::country::Id, String, Option<String>)>> =
        const { std::cell::RefCell::new(None) };
}

/// A phone number in E.164, if it is valid and its stored form reads back as itself.
fn normalise_phone(t: &str, region: phonenumber::country::Id) -> Option<String> {
    let e164 = |n: &phonenumber::PhoneNumber| {
        phonenumber::is_valid(n).then(|| n.format().mode(phonenumber::Mode::E164).to_string())
    };
    let stored = e164(&phonenumber::parse(Some(region), t).ok()?)?;
    // Only a number whose stored form reads back as itself, with or without the
    // region: an odd input (letters, national prefixes) can be valid as typed but
    // not as stored, and could then never be looked up again.
    let reads_back = |r: Option<phonenumber::country::Id>| -> Option<bool> {
        Some(e164(&phonenumber::parse(r, &stored).ok()?)? == stored)
    };
    // Typed as stored already (the usual E.164 input): read back with the region
    // is the parse just done.
    let with_region = stored == t || reads_back(Some(region))?;
    (reads_back(None)? && with_region).then_some(stored.clone())
}

/// A birth date as YYYY-MM-DD from ISO dates and timestamps, YYYYMMDD, or D/M/Y (the
/// day first when it cannot be a month).
/// Only years 1 to 9999: they are the ones written with four digits, so the result reads
/// back as itself.
fn normalise_date(t: &str) -> Option<String> {
    use chrono::Datelike;
    let date = t.get(..10).unwrap_or(t);
    let parsed = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d")
        .ok()
        .or_else(|| {
            ["%Y%m%d", "%m/%d/%Y", "%d/%m/%Y", "%d.%m.%Y"]
                .iter()
                .find_map(|fmt| chrono::NaiveDate::parse_from_str(t, fmt).ok())
        })?;
    (1..=9999)
        .contains(&parsed.year())
        .then(|| parsed.format("%Y-%m-%d").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> Rules {
        Rules::parse(DEFAULT_RULES, "test").unwrap()
    }

    /// Found by fuzzing (identifiers): a name of digits and punctuation normalised to an
    /// empty string, which counted as a value (so a later path with a real name was not
    /// looked at, and an identifier could be empty).
    #[test]
    fn a_value_with_nothing_left_after_normalising_is_absent() {
        let region = phonenumber::country::Id::US;
        assert_eq!(normalise(Normalise::Name, "1990-02-28", region), None);
        assert_eq!(normalise(Normalise::Postcode, "--", region), None);
        assert_eq!(normalise(Normalise::Address, "#", region), None);
        // Also found by fuzzing: a phone number valid as typed whose stored form is not.
        assert_eq!(
            normalise(
                Normalise::Phone,
                "0000379B9B4A+",
                phonenumber::country::Id::JP
            ),
            None
        );
        assert_eq!(
            normalise(Normalise::Phone, "(415) 555-0100", region).as_deref(),
            Some("+14155550100")
        );
        assert_eq!(
            normalise(Normalise::Phone, "+44 20 7946 0958", region).as_deref(),
            Some("+442079460958")
        );
        // Also found by fuzzing: a negative year read back as another date.
        assert_eq!(normalise(Normalise::Date, "-190-02-2811", region), None);
        assert_eq!(
            normalise(Normalise::Date, "1990-02-28T10:00:00Z", region).as_deref(),
            Some("1990-02-28")
        );
        assert_eq!(
            normalise(Normalise::Name, " José ", region).as_deref(),
            Some("jose")
        );
    }

    /// The last phone number is remembered (an identify reads it twice); the memory is
    /// the input's and the region's, so another region reads it afresh.
    #[test]
    fn a_remembered_phone_number_is_reread_under_another_region() {
        use phonenumber::country::Id;
        for _ in 0..2 {
            assert_eq!(
                normalise(Normalise::Phone, "020 7946 0958", Id::GB).as_deref(),
                Some("+442079460958")
            );
            assert_eq!(normalise(Normalise::Phone, "020 7946 0958", Id::US), None);
            assert_eq!(
                normalise(Normalise::Phone, " 020 7946 0958 ", Id::GB).as_deref(),
                Some("+442079460958")
            );
        }
    }

    #[test]
    fn the_default_rules_load() {
        let r = rules();
        assert_eq!(r.identifiers[0].kind, "user_id");
        assert!(r.fuzzy.is_some());
        assert!(r.priority("user_id") < r.priority("anonymous_id"));
    }

    #[test]
    fn identifiers_come_from_the_standard_places_normalised_and_in_priority_order() {
        let r = rules();
        let msg = json!({
            "userId": " u-1 ",
            "anonymousId": "a-1",
            "traits": {"email": " Ann@Shop.IO ", "phone": "(415) 555-2671", "crm_id": 42},
            "context": {
                "device": {"id": "dev-1"},
                "traits": {"email": "ann@shop.io"},
                "externalIds": [{"id": "L-7", "type": "loyalty_id", "collection": "users"}]
            }
        });
        let (ids, blocked) = r.extract(&msg);
        let got: Vec<(&str, &str)> = ids
            .iter()
            .map(|i| (i.kind.as_str(), i.value.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("user_id", "u-1"),
                ("email", "ann@shop.io"),
                ("phone", "+14155552671"),
                ("crm_id", "42"),
                ("loyalty_id", "L-7"),
                ("device_id", "dev-1"),
                ("anonymous_id", "a-1"),
            ]
        );
        assert!(blocked.is_empty());
    }

    #[test]
    fn blocked_and_invalid_values_are_never_identifiers() {
        let r = rules();
        let msg = json!({
            "userId": "undefined",
            "anonymousId": "00000000-0000-0000-0000-000000000000",
            "traits": {"email": "not-an-email", "phone": "12"},
            "context": {"traits": {"email": "test@example.com"}}
        });
        let (ids, blocked) = r.extract(&msg);
        assert!(ids.is_empty(), "{ids:?}");
        assert_eq!(blocked, vec!["user_id", "email", "anonymous_id"]);
        for v in ["null", "NULL", "--", "0", "N/A", "[object Object]"] {
            assert!(r.is_blocked(v), "{v}");
        }
        assert!(!r.is_blocked("u-0"));
    }

    #[test]
    fn phones_use_the_default_region_and_keep_explicit_country_codes() {
        let r = rules();
        assert_eq!(
            r.normalise("phone", "415-555-2671").as_deref(),
            Some("+14155552671")
        );
        assert_eq!(
            r.normalise("phone", "+44 20 7946 0958").as_deref(),
            Some("+442079460958")
        );
        assert_eq!(r.normalise("phone", "555"), None);
        // Found by the fuzzer: valid as typed in Germany, but the stored form did not
        // normalise to itself there. Whatever is stored must.
        let de = phonenumber::country::Id::DE;
        if let Some(stored) = normalise(Normalise::Phone, "003900039B7B9+", de) {
            assert_eq!(
                normalise(Normalise::Phone, &stored, de).as_deref(),
                Some(stored.as_str())
            );
        }
    }

    #[test]
    fn fuzzy_fields_are_normalised() {
        let r = rules();
        let msg = json!({"traits": {
            "firstName": "  José ", "last_name": "O'Brien-Smith",
            "birthday": "1980-02-03T00:00:00Z",
            "address": {"street": "12 North Main Street, Apt 4", "postalCode": "sw1a 1aa"}
        }});
        let f = r.fuzzy_fields(&msg);
        assert_eq!(f["first_name"], "jose");
        assert_eq!(f["last_name"], "obrien smith");
        assert_eq!(f["birthday"], "1980-02-03");
        assert_eq!(f["street"], "12 n main st 4");
        assert_eq!(f["postcode"], "SW1A1AA");
        assert_eq!(normalise_date("03/02/1980").as_deref(), Some("1980-03-02"));
        assert_eq!(normalise_date("25/12/1980").as_deref(), Some("1980-12-25"));
    }

    #[test]
    fn mistakes_are_reported_with_where_they_are() {
        let err = |text: &str| Rules::parse(text, "t").unwrap_err().to_string();
        let base = "phone_default_region = \"US\"\n";
        assert!(
            err(&format!(
                "{base}[[identifiers]]\nkind=\"a\"\nlimit=0\npaths=[\"x\"]"
            ))
            .contains("identifiers[0] (a): limit must be at least 1")
        );
        assert!(
            err(&format!("{base}[[identifiers]]\nkind=\"a\"\nlimit=1\npaths=[\"x\"]\n[[identifiers]]\nkind=\"a\"\nlimit=1\npaths=[\"y\"]"))
                .contains("declared twice")
        );
        assert!(
            err(
                "phone_default_region = \"XX\"\n[[identifiers]]\nkind=\"a\"\nlimit=1\npaths=[\"x\"]"
            )
            .contains("not an ISO 3166")
        );
        assert!(
            err(&format!(
                "{base}blocked_values=[\"(\"]\n[[identifiers]]\nkind=\"a\"\nlimit=1\npaths=[\"x\"]"
            ))
            .contains("blocked_values")
        );
        assert!(
            err(&format!(
                "{base}[[identifiers]]\nkind=\"a\"\nlimit=1\npaths=[\"x[crm]\"]"
            ))
            .contains("use name[type=value]")
        );
        let fuzzy = format!(
            "{base}[[identifiers]]\nkind=\"a\"\nlimit=1\npaths=[\"x\"]\n[fuzzy]\nenabled=true\nmax_block_size=5\nblocking_keys=[\"nme:2\"]\n[[fuzzy.fields]]\nname=\"name\"\nnormalise=\"name\"\npaths=[\"n\"]\n[[fuzzy.rules]]\nname=\"r\"\ncriteria=[{{field=\"name\",method=\"jaro_winkler\"}}]"
        );
        assert!(err(&fuzzy).contains("jaro_winkler needs min"));
        assert!(
            err(&fuzzy.replace("method=\"jaro_winkler\"", "method=\"exact\""))
                .contains("\"nme\" is not declared")
        );
        assert!(
            err("phone_default_region = \"US\"\nidentifiers = []\nextra = 1").contains("extra")
        );
    }
}
