//! Computed traits: declarative aggregates of event properties, over all time or a
//! sliding window that expires exactly.
//!
//! ```json
//! {"id": "order_total_30d", "name": "Spend in the last 30 days",
//!  "event": "Order Completed", "where": [{"property": "total", "gt": 0}],
//!  "aggregate": "sum", "property": "total", "window": "30d"}
//! ```
//!
//! A windowed trait keeps each contributing value with its event time; a value leaves
//! the window when its time plus the window has passed. The profile's next expiry is a
//! durable timer in RocksDB (see `state`), so the value changes on time even when no
//! event arrives. All-time traits keep a running accumulator.
//!
//! Predictive traits (`p_alive`, `predicted_purchases`, `expected_value`) keep the
//! profile's purchase days, and `propensity` its recent activity; each applies the
//! population's fitted model (see `predict`):
//!
//! ```json
//! {"id": "clv_90d", "event": "Order Completed", "aggregate": "expected_value",
//!  "property": "total", "horizon": "90d"}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::predict::{Activity, DAY_MS, Fitted, ModelHistory, Purchases, day_of};

/// At most this many contributions are kept per windowed trait and profile (the oldest
/// go first; the value is then approximate and says so), and at most this many distinct
/// values are counted for most frequent and unique.
pub const MAX_WINDOW_ENTRIES: usize = 2000;
pub const MAX_DISTINCT: usize = 200;

const MINUTE_MS: i64 = 60_000;
/// The longest window: a leap year.
const MAX_WINDOW_MS: i64 = 366 * 24 * 60 * MINUTE_MS;
/// The most tests one `where` holds.
pub const MAX_TESTS: usize = 16;

/// Checks every test of a `where` list, and that there are at most [`MAX_TESTS`].
pub fn validate_tests(tests: &[Test], what: &str) -> Result<(), String> {
    if tests.len() > MAX_TESTS {
        return Err(format!("{what}: at most {MAX_TESTS} tests"));
    }
    tests.iter().try_for_each(|t| t.validate(what))
}

/// A duration written `15m`, `12h`, `30d` or `8w`: whole minutes to 366 days.
pub fn parse_window(text: &str) -> Result<i64, String> {
    let t = text.trim();
    // The unit is the last character, whatever its width.
    let (digits, unit) = t.split_at(t.char_indices().last().map_or(0, |(i, _)| i));
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("window {text:?}: write a number and a unit, like 30d"))?;
    let unit_ms = match unit {
        "m" => MINUTE_MS,
        "h" => 60 * MINUTE_MS,
        "d" => 24 * 60 * MINUTE_MS,
        "w" => 7 * 24 * 60 * MINUTE_MS,
        _ => return Err(format!("window {text:?}: the unit must be m, h, d or w")),
    };
    let ms = n.saturating_mul(unit_ms);
    if !(MINUTE_MS..=MAX_WINDOW_MS).contains(&ms) {
        return Err(format!("window {text:?} must be between 1m and 366d"));
    }
    Ok(ms)
}

/// A test of one value: a trait, a computed trait or an event property. Exactly one
/// operator. Numbers compare as numbers; `equals` compares JSON values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Test {
    /// The trait or computed trait; for an event property, its dotted path.
    #[serde(alias = "property")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_equals: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gte: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lte: Option<f64>,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
    /// Substring of a string, or element of a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
}

impl Test {
    pub fn validate(&self, what: &str) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err(format!("{what}: the name is empty"));
        }
        let ops = [
            self.equals.is_some(),
            self.not_equals.is_some(),
            self.gt.is_some(),
            self.gte.is_some(),
            self.lt.is_some(),
            self.lte.is_some(),
            self.one_of.is_some(),
            self.contains.is_some(),
            self.exists.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if ops > 1 {
            return Err(format!(
                "{what} {:?}: give one operator (equals, not_equals, gt, gte, lt, lte, in, contains or exists)",
                self.name
            ));
        }
        Ok(())
    }

    /// Whether `v` (None or null: absent) passes. Without an operator: present.
    pub fn passes(&self, v: Option<&Value>) -> bool {
        let v = v.filter(|v| !v.is_null());
        let num = v.and_then(as_number);
        let cmp = |bound: Option<f64>, f: fn(f64, f64) -> bool| {
            bound.map(|b| num.is_some_and(|n| f(n, b)))
        };
        if let Some(r) = cmp(self.gt, |n, b| n > b)
            .or_else(|| cmp(self.gte, |n, b| n >= b))
            .or_else(|| cmp(self.lt, |n, b| n < b))
            .or_else(|| cmp(self.lte, |n, b| n <= b))
        {
            return r;
        }
        if let Some(want) = &self.equals {
            return v.is_some_and(|v| same(v, want));
        }
        if let Some(want) = &self.not_equals {
            return v.is_none_or(|v| !same(v, want));
        }
        if let Some(list) = &self.one_of {
            return v.is_some_and(|v| list.iter().any(|w| same(v, w)));
        }
        if let Some(part) = &self.contains {
            return match (v, part) {
                (Some(Value::String(s)), Value::String(p)) => s.contains(p.as_str()),
                (Some(Value::Array(a)), p) => a.iter().any(|x| same(x, p)),
                _ => false,
            };
        }
        match self.exists {
            Some(want) => v.is_some() == want,
            None => v.is_some(),
        }
    }
}

/// JSON equality where numbers compare by value (`2` equals `2.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (as_number(a), as_number(b)) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

/// A number, or a string that is one (SDKs send `"49.90"` as often as `49.9`).
pub fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

/// The value at a dotted path (`items.0.sku` indexes lists too).
pub fn lookup<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(root, |v, part| match v {
        Value::Object(m) => m.get(part),
        Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    Count,
    Sum,
    Min,
    Max,
    Average,
    First,
    Last,
    MostFrequent,
    UniqueList,
    UniqueCount,
    /// The probability the customer is still active (BG/NBD).
    PAlive,
    /// The purchases expected within `horizon` (BG/NBD).
    PredictedPurchases,
    /// The value expected within `horizon`: expected purchases times the expected
    /// order value of `property` (Gamma–Gamma).
    ExpectedValue,
    /// The probability of the event within `horizon` (a logistic regression on recent
    /// activity, trained on the outcomes the stream reveals).
    Propensity,
}

impl Aggregate {
    /// Whether the value comes from the population's fitted model.
    pub fn predictive(self) -> bool {
        self.customer_model() || self == Aggregate::Propensity
    }

    /// The name definitions use (`p_alive`).
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    /// Whether the model is the customer-base one (BG/NBD, Gamma–Gamma).
    pub fn customer_model(self) -> bool {
        matches!(
            self,
            Aggregate::PAlive | Aggregate::PredictedPurchases | Aggregate::ExpectedValue
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputedTrait {
    pub id: String,
    /// Set by the catalog: 1 on creation, one more on each change.
    #[serde(default)]
    pub version: i32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The track event counted; absent: every track event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Conditions on the event's properties, all of which must hold.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<Test>,
    pub aggregate: Aggregate,
    /// The property aggregated (a dotted path in `properties`); not for `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub property: Option<String>,
    /// `30d`, `12h`...; absent: all time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Parsed `window`.
    #[serde(skip)]
    pub window_ms: Option<i64>,
    /// How far a prediction looks ahead (`90d`); for `predicted_purchases`,
    /// `expected_value` and `propensity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizon: Option<String>,
    /// Parsed `horizon`, in days.
    #[serde(skip)]
    pub horizon_days: Option<f64>,
}

/// Letters, digits, `-` and `_`: ids appear in keys and URLs.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl ComputedTrait {
    /// Checks the definition and parses its window.
    pub fn validate(&mut self) -> Result<(), String> {
        if !valid_id(&self.id) {
            return Err(format!(
                "computed trait id {:?} must be 1 to 100 letters, digits, '-' or '_'",
                self.id
            ));
        }
        let what = format!("computed trait {}", self.id);
        if self.event.as_deref().is_some_and(|e| e.trim().is_empty()) {
            return Err(format!(
                "{what}: event is empty (leave it out for any event)"
            ));
        }
        validate_tests(&self.filter, &format!("{what}: where"))?;
        if self.aggregate.predictive() {
            return self.validate_predictive(&what);
        }
        if self.horizon.is_some() {
            return Err(format!(
                "{what}: horizon is for predicted_purchases, expected_value and propensity"
            ));
        }
        match (&self.aggregate, &self.property) {
            (Aggregate::Count, Some(_)) => {
                return Err(format!("{what}: count takes no property"));
            }
            (Aggregate::Count, None) => {}
            (a, None) => return Err(format!("{what}: {} needs a property", a.name())),
            (_, Some(p)) if p.trim().is_empty() => {
                return Err(format!("{what}: property is empty"));
            }
            _ => {}
        }
        self.window_ms = match &self.window {
            Some(w) => Some(parse_window(w).map_err(|e| format!("{what}: {e}"))?),
            None => None,
        };
        Ok(())
    }

    /// A predictive trait names its purchase (or target) event; `expected_value` its
    /// value property; all but `p_alive` look `horizon` ahead; none has a window (the
    /// model sees all of a customer's purchases, a propensity the last 30 days).
    fn validate_predictive(&mut self, what: &str) -> Result<(), String> {
        let agg = self.aggregate;
        if self.event.is_none() {
            return Err(format!(
                "{what}: a prediction needs the purchase event (event: Order Completed)"
            ));
        }
        if self.window.is_some() {
            return Err(format!(
                "{what}: a prediction takes no window (use horizon for how far it looks ahead)"
            ));
        }
        match (agg, &self.property) {
            (Aggregate::ExpectedValue, None) => {
                return Err(format!(
                    "{what}: expected_value needs the order's value property (property: total)"
                ));
            }
            (Aggregate::ExpectedValue, Some(p)) if p.trim().is_empty() => {
                return Err(format!("{what}: property is empty"));
            }
            (
                Aggregate::PAlive | Aggregate::PredictedPurchases | Aggregate::Propensity,
                Some(_),
            ) => {
                return Err(format!("{what}: {} takes no property", agg.name()));
            }
            _ => {}
        }
        self.horizon_days = match (agg, &self.horizon) {
            (Aggregate::PAlive, Some(_)) => {
                return Err(format!("{what}: p_alive takes no horizon"));
            }
            (Aggregate::PAlive, None) => None,
            (_, None) => {
                return Err(format!("{what}: {} needs a horizon (like 90d)", agg.name()));
            }
            (_, Some(h)) => {
                if !(h.trim_end().ends_with('d') || h.trim_end().ends_with('w')) {
                    return Err(format!(
                        "{what}: the horizon is in days or weeks (like 90d or 12w)"
                    ));
                }
                let ms = parse_window(h).map_err(|e| format!("{what}: horizon: {e}"))?;
                if agg == Aggregate::Propensity && ms > crate::predict::propensity::LOOKBACK_MS {
                    return Err(format!("{what}: a propensity's horizon is at most 30d"));
                }
                Some((ms / crate::predict::DAY_MS) as f64)
            }
        };
        Ok(())
    }

    /// The value this event contributes, if it counts (`Null` for `count`; for a
    /// propensity, every track, page and screen event counts, with whether it is the
    /// target).
    pub fn contribution(&self, kind: &str, event: Option<&str>, props: &Value) -> Option<Value> {
        if self.aggregate == Aggregate::Propensity {
            if !matches!(kind, "track" | "page" | "screen") {
                return None;
            }
            let hit = kind == "track"
                && self.event.as_deref() == event
                && self.filter.iter().all(|t| t.passes(lookup(props, &t.name)));
            return Some(Value::Bool(hit));
        }
        if kind != "track" || self.event.as_deref().is_some_and(|e| Some(e) != event) {
            return None;
        }
        if !self.filter.iter().all(|t| t.passes(lookup(props, &t.name))) {
            return None;
        }
        match &self.property {
            None => Some(Value::Null),
            // A purchase counts without its value (it adds nothing to the value).
            Some(p) if self.aggregate.predictive() => {
                Some(lookup(props, p).cloned().unwrap_or(Value::Null))
            }
            Some(p) => lookup(props, p).filter(|v| !v.is_null()).cloned(),
        }
    }
}

/// One contribution to a windowed trait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub t: i64,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub v: Value,
}

/// A running aggregate; only the fields its aggregate needs are filled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Acc {
    #[serde(default)]
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum: Option<f64>,
    /// Numeric values counted in `sum` (for the average).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numbers: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<Value>,
    /// Event time of `best`, for first and last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_t: Option<i64>,
    /// Value (as JSON text) → count, for most frequent and unique.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, u64>,
}

impl Acc {
    pub fn add(&mut self, agg: Aggregate, t: i64, v: &Value, times: u64) {
        self.count += times;
        match agg {
            // Predictive traits keep purchases, not an accumulator.
            Aggregate::Count
            | Aggregate::PAlive
            | Aggregate::PredictedPurchases
            | Aggregate::ExpectedValue
            | Aggregate::Propensity => {}
            Aggregate::Sum | Aggregate::Average => {
                if let Some(n) = as_number(v) {
                    *self.sum.get_or_insert(0.0) += n * times as f64;
                    *self.numbers.get_or_insert(0) += times;
                }
            }
            Aggregate::Min | Aggregate::Max => {
                let better = match (self.best.as_ref().and_then(as_number), as_number(v)) {
                    (_, None) => false,
                    (None, Some(_)) => true,
                    (Some(old), Some(new)) => {
                        (agg == Aggregate::Min && new < old) || (agg == Aggregate::Max && new > old)
                    }
                };
                if better {
                    self.best = Some(v.clone());
                }
            }
            Aggregate::First | Aggregate::Last => {
                let better = match self.best_t {
                    None => true,
                    Some(old) if agg == Aggregate::First => t < old,
                    Some(old) => t >= old,
                };
                if better {
                    self.best = Some(v.clone());
                    self.best_t = Some(t);
                }
            }
            Aggregate::MostFrequent | Aggregate::UniqueList | Aggregate::UniqueCount => {
                let key = v.to_string();
                if self.counts.len() < MAX_DISTINCT || self.counts.contains_key(&key) {
                    *self.counts.entry(key).or_default() += times;
                }
            }
        }
    }

    /// Adds another accumulator of the same aggregate (a merge of two profiles).
    pub fn absorb(&mut self, agg: Aggregate, other: &Acc) {
        let extra = other.count;
        match agg {
            Aggregate::Count
            | Aggregate::PAlive
            | Aggregate::PredictedPurchases
            | Aggregate::ExpectedValue
            | Aggregate::Propensity => self.count += extra,
            Aggregate::Sum | Aggregate::Average => {
                self.count += extra;
                if let Some(s) = other.sum {
                    *self.sum.get_or_insert(0.0) += s;
                    *self.numbers.get_or_insert(0) += other.numbers.unwrap_or(0);
                }
            }
            Aggregate::Min | Aggregate::Max | Aggregate::First | Aggregate::Last => {
                if let Some(v) = &other.best {
                    self.count = self.count.saturating_sub(1);
                    self.add(agg, other.best_t.unwrap_or(0), v, 1);
                }
                self.count += extra;
            }
            Aggregate::MostFrequent | Aggregate::UniqueList | Aggregate::UniqueCount => {
                self.count += extra;
                for (k, n) in &other.counts {
                    if self.counts.len() < MAX_DISTINCT || self.counts.contains_key(k) {
                        *self.counts.entry(k.clone()).or_default() += n;
                    }
                }
            }
        }
    }

    pub fn value(&self, agg: Aggregate) -> Value {
        match agg {
            Aggregate::Count => json!(self.count),
            Aggregate::Sum => json!(self.sum.unwrap_or(0.0)),
            Aggregate::Average => match (self.sum, self.numbers) {
                (Some(s), Some(n)) if n > 0 => json!(s / n as f64),
                _ => Value::Null,
            },
            Aggregate::Min | Aggregate::Max | Aggregate::First | Aggregate::Last => {
                self.best.clone().unwrap_or(Value::Null)
            }
            Aggregate::MostFrequent => self
                .counts
                .iter()
                // Highest count; ties to the smallest value, so the answer is stable.
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .and_then(|(k, _)| serde_json::from_str(k).ok())
                .unwrap_or(Value::Null),
            Aggregate::UniqueList => Value::Array(
                self.counts
                    .keys()
                    .filter_map(|k| serde_json::from_str(k).ok())
                    .collect(),
            ),
            Aggregate::UniqueCount => json!(self.counts.len()),
            Aggregate::PAlive
            | Aggregate::PredictedPurchases
            | Aggregate::ExpectedValue
            | Aggregate::Propensity => Value::Null,
        }
    }
}

/// A profile's state for one computed trait.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ComputedState {
    /// The definition version this state was built for.
    pub version: i32,
    pub value: Value,
    /// All time: the running aggregate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc: Option<Acc>,
    /// Windowed: the contributions still in the window, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<Entry>,
    /// Contributions were dropped beyond [`MAX_WINDOW_ENTRIES`]: the value is approximate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Predictive: the purchase days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purchases: Option<Purchases>,
    /// Propensity: recent activity, snapshots awaiting their outcome and examples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<Activity>,
    /// Predictive: the model version and the day the value was evaluated with and for
    /// (so a replay with the same versions gives the same value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<i64>,
    /// A contribution came in since the value was last computed (not stored: a stored
    /// value is always current).
    #[serde(skip)]
    pub(crate) dirty: bool,
}

impl ComputedState {
    pub fn new(def: &ComputedTrait) -> ComputedState {
        let predictive = def.aggregate.predictive();
        let mut s = ComputedState {
            version: def.version,
            acc: (def.window_ms.is_none() && !predictive).then(Acc::default),
            purchases: def.aggregate.customer_model().then(Purchases::default),
            activity: (def.aggregate == Aggregate::Propensity).then(Activity::default),
            ..Default::default()
        };
        s.value = Acc::default().value(def.aggregate);
        s
    }

    pub fn add(&mut self, def: &ComputedTrait, t: i64, v: Value) {
        self.dirty = true;
        if let Some(p) = &mut self.purchases {
            p.add(t, as_number(&v).unwrap_or(0.0));
            return;
        }
        if let Some(a) = &mut self.activity {
            a.add(t, v == Value::Bool(true));
            return;
        }
        match &mut self.acc {
            Some(acc) => acc.add(def.aggregate, t, &v, 1),
            None => {
                let at = self.entries.partition_point(|e| e.t <= t);
                self.entries.insert(at, Entry { t, v });
                if self.entries.len() > MAX_WINDOW_ENTRIES {
                    self.entries.remove(0);
                    self.truncated = true;
                }
            }
        }
    }

    pub fn absorb(&mut self, def: &ComputedTrait, other: &ComputedState) {
        self.dirty = true;
        if let (Some(mine), Some(theirs)) = (&mut self.purchases, &other.purchases) {
            mine.absorb(theirs);
            return;
        }
        if let (Some(mine), Some(theirs)) = (&mut self.activity, &other.activity) {
            mine.absorb(theirs);
            return;
        }
        match (&mut self.acc, &other.acc) {
            (Some(a), Some(b)) => a.absorb(def.aggregate, b),
            _ => {
                for e in &other.entries {
                    self.add(def, e.t, e.v.clone());
                }
                self.truncated |= other.truncated;
            }
        }
    }

    /// Drops contributions that left the window by `now` and recomputes the value.
    /// Returns whether the value changed and when the next contribution leaves (for a
    /// prediction: the next midnight, when the customer's age moves on). `model`: the
    /// trait's fitted versions, for a prediction.
    pub fn refresh(
        &mut self,
        def: &ComputedTrait,
        now: i64,
        model: Option<&ModelHistory>,
    ) -> (bool, Option<i64>) {
        if let Some(activity) = &mut self.activity {
            // Outcomes resolve and today's snapshot is taken whatever the model; the
            // value needs the model in force.
            let horizon = def.horizon_days.unwrap_or(1.0) as i64 * DAY_MS;
            let deadline = activity.settle(now, horizon);
            let fitted = model.and_then(|m| m.in_force(now));
            let value = fitted
                .and_then(|f| f.propensity.as_ref())
                .map(|l| l.predict(&activity.features(now)))
                .filter(|v| v.is_finite())
                .map_or(Value::Null, |v| json!(rounded(v)));
            // Each midnight moves the features on, until a year of silence stops them.
            let midnight = (!activity.dormant(now)).then_some((day_of(now) + 1) * DAY_MS);
            let next = earliest(deadline, midnight);
            let changed = value != self.value;
            self.value = value;
            (self.model, self.day, self.dirty) =
                (fitted.map(|f| f.version), Some(day_of(now)), false);
            return (changed, next);
        }
        if let Some(purchases) = &self.purchases {
            let today = day_of(now);
            let fitted = model.and_then(|m| m.in_force(now));
            let version = fitted.map(|f| f.version);
            let next =
                (fitted.is_some() && !purchases.days.is_empty()).then_some((today + 1) * DAY_MS);
            if !self.dirty && self.day == Some(today) && self.model == version {
                return (false, next);
            }
            let value = fitted
                .and_then(|f| predicted(def, f, purchases, today))
                .map_or(Value::Null, |v| json!(v));
            let changed = value != self.value;
            self.value = value;
            (self.model, self.day, self.dirty) = (version, Some(today), false);
            return (changed, next);
        }
        let (value, next) = match (&self.acc, def.window_ms) {
            (Some(_), _) if !self.dirty => return (false, None),
            (Some(acc), _) => (acc.value(def.aggregate), None),
            (None, Some(w)) => {
                let gone = self
                    .entries
                    .partition_point(|e| e.t.saturating_add(w) <= now);
                let next = |entries: &[Entry]| entries.first().map(|e| e.t.saturating_add(w));
                if gone == 0 && !self.dirty {
                    // Nothing came in and nothing left: the value stands.
                    return (false, next(&self.entries));
                }
                self.entries.drain(..gone);
                let mut acc = Acc::default();
                for e in &self.entries {
                    acc.add(def.aggregate, e.t, &e.v, 1);
                }
                (acc.value(def.aggregate), next(&self.entries))
            }
            (None, None) => (Value::Null, None),
        };
        let changed = value != self.value;
        self.value = value;
        self.dirty = false;
        (changed, next)
    }
}

/// A predictive trait's value for a customer on `today`, rounded to six significant
/// decimals (a probability, a count, an amount); None before the first purchase or
/// without a model for the value.
pub fn predicted(def: &ComputedTrait, f: &Fitted, p: &Purchases, today: i64) -> Option<f64> {
    let valued = def.aggregate == Aggregate::ExpectedValue;
    let s = p.summary(today, valued)?;
    let horizon = def.horizon_days.unwrap_or(0.0);
    let bgnbd = f.bgnbd?;
    let v = match def.aggregate {
        Aggregate::PAlive => bgnbd.p_alive(&s),
        Aggregate::PredictedPurchases => bgnbd.expected_purchases(&s, horizon),
        Aggregate::ExpectedValue => {
            bgnbd.expected_purchases(&s, horizon) * f.gamma_gamma?.expected_order_value(&s)?
        }
        _ => return None,
    };
    v.is_finite().then(|| rounded(v))
}

/// A prediction to six decimals: what a replay gives back exactly.
fn rounded(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// The earlier of two times, either of which may be absent (the next timer).
pub fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(text: &str) -> ComputedTrait {
        let mut d: ComputedTrait = serde_json::from_str(text).unwrap();
        d.version = 1;
        d.validate().unwrap();
        d
    }

    #[test]
    fn windows_parse_and_refuse() {
        assert_eq!(parse_window("30d").unwrap(), 30 * 86_400_000);
        assert_eq!(parse_window("15m").unwrap(), 900_000);
        for bad in ["30", "d", "0m", "400d", "3y", "-5m", ""] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }

    /// Found by schemathesis: a window ending in a multi-byte character panicked the
    /// definitions API (the unit was cut at a byte, not a character).
    #[test]
    fn a_window_ending_in_a_wide_character_is_refused() {
        for bad in ["1\u{80}", "12\u{130f6}", "\u{130f6}", "5 \u{e9}"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_aggregate_over_all_time_and_merged_halves() {
        let values = [json!(5), json!("7.5"), json!(2), json!(5), json!("x")];
        let expect = [
            (Aggregate::Count, json!(5)),
            (Aggregate::Sum, json!(19.5)),
            (Aggregate::Average, json!(4.875)),
            (Aggregate::Min, json!(2)),
            (Aggregate::Max, json!("7.5")),
            (Aggregate::First, json!(5)),
            (Aggregate::Last, json!("x")),
            (Aggregate::MostFrequent, json!(5)),
            (Aggregate::UniqueCount, json!(4)),
        ];
        for (agg, want) in expect {
            let property = if agg == Aggregate::Count {
                String::new()
            } else {
                r#","property":"v""#.to_string()
            };
            let d = def(&format!(
                r#"{{"id":"x","aggregate":{}{property}}}"#,
                serde_json::to_string(&agg).unwrap()
            ));
            let mut whole = ComputedState::new(&d);
            let (mut left, mut right) = (ComputedState::new(&d), ComputedState::new(&d));
            for (i, v) in values.iter().enumerate() {
                whole.add(&d, i as i64, v.clone());
                let half = if i % 2 == 0 { &mut left } else { &mut right };
                half.add(&d, i as i64, v.clone());
            }
            whole.refresh(&d, 0, None);
            left.absorb(&d, &right);
            left.refresh(&d, 0, None);
            assert_eq!(whole.value, want, "{agg:?}");
            assert_eq!(left.value, want, "{agg:?} after a merge");
        }
    }

    #[test]
    fn a_window_expires_exactly_and_says_when() {
        let d = def(
            r#"{"id":"orders","event":"Order Completed","where":[{"property":"total","gt":50}],"aggregate":"count","window":"1h"}"#,
        );
        let hour = 3_600_000;
        let props = |total: i64| json!({ "total": total });
        assert_eq!(
            d.contribution("track", Some("Order Completed"), &props(60)),
            Some(Value::Null)
        );
        assert_eq!(
            d.contribution("track", Some("Order Completed"), &props(40)),
            None
        );
        assert_eq!(d.contribution("track", Some("Refund"), &props(60)), None);
        let mut s = ComputedState::new(&d);
        s.add(&d, 1000, Value::Null);
        s.add(&d, 5000, Value::Null);
        assert_eq!(s.refresh(&d, 2000, None), (true, Some(1000 + hour)));
        assert_eq!(s.value, json!(2));
        // One millisecond before the edge it counts; at the edge it is gone.
        assert_eq!(
            s.refresh(&d, 1000 + hour - 1, None),
            (false, Some(1000 + hour))
        );
        assert_eq!(s.refresh(&d, 1000 + hour, None), (true, Some(5000 + hour)));
        assert_eq!(s.value, json!(1));
        assert_eq!(s.refresh(&d, 5000 + hour, None), (true, None));
        assert_eq!(s.value, json!(0));
    }

    #[test]
    fn tests_compare_numbers_strings_and_lists() {
        let t = |text: &str| serde_json::from_str::<Test>(text).unwrap();
        assert!(t(r#"{"name":"a","gt":5}"#).passes(Some(&json!("6"))));
        assert!(!t(r#"{"name":"a","gt":5}"#).passes(None));
        assert!(t(r#"{"name":"a","equals":2}"#).passes(Some(&json!(2.0))));
        assert!(t(r#"{"name":"a","in":["x","y"]}"#).passes(Some(&json!("y"))));
        assert!(t(r#"{"name":"a","contains":"ell"}"#).passes(Some(&json!("hello"))));
        assert!(t(r#"{"name":"a","contains":"b"}"#).passes(Some(&json!(["a", "b"]))));
        assert!(t(r#"{"name":"a","not_equals":"x"}"#).passes(None));
        assert!(t(r#"{"name":"a","exists":false}"#).passes(Some(&Value::Null)));
        assert!(
            t(r#"{"name":"a","gt":1,"lt":3}"#)
                .validate("x")
                .unwrap_err()
                .contains("one operator")
        );
        assert_eq!(lookup(&json!({"a": [{"b": 3}]}), "a.0.b"), Some(&json!(3)));
    }
}
