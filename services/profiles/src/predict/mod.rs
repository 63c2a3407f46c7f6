//! Predictive traits: each profile keeps its purchase days ([`Purchases`]); the
//! population's model ([`Fitted`]: BG/NBD and Gamma–Gamma) is fitted on the tick (see
//! `state::fit`) and published, versioned, on the definitions topic; a trait's value is
//! the model applied to the profile's summary on the day it is evaluated.
//!
//! Time is counted in whole UTC days: a purchase day is the day of the event's time,
//! and a value is evaluated for the day of the record that caused it (a timer at each
//! midnight moves it on without events). So a value changes at most once a day, and a
//! replay of the same records with the same model versions gives the same values.

pub mod math;
pub mod models;
pub mod propensity;

pub use models::{BgNbd, FitReport, GammaGamma, Summary};
pub use propensity::{Activity, Example, Logistic};

use serde::{Deserialize, Serialize};

pub const DAY_MS: i64 = 86_400_000;
/// Purchase days kept per profile and trait. Beyond it the second-oldest day is folded
/// into a count (the first day and the latest ones stay exact), and merging two such
/// profiles may count a shared day twice: the value then says it is approximate.
pub const MAX_PURCHASE_DAYS: usize = 2000;
/// Model versions kept on the topic per trait: values evaluated in the past name the
/// version they used, and a replay picks the version in force at each record's time.
pub const VERSIONS_KEPT: usize = 8;

/// Repeat customers a Gamma–Gamma fit reads at most.
pub const GAMMA_GAMMA_ROWS: usize = 100_000;

/// The UTC day of a time in ms.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// A profile's purchases for one predictive trait: one entry per UTC day with a
/// purchase, with that day's summed value (0 without a value property).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Purchases {
    /// (day, value), in day order.
    pub days: Vec<(i64, f64)>,
    /// Days folded away beyond [`MAX_PURCHASE_DAYS`], and their value.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub folded: u64,
    #[serde(default, skip_serializing_if = "is_zero_f")]
    pub folded_value: f64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_f(n: &f64) -> bool {
    *n == 0.0
}

impl Purchases {
    /// Counts a purchase at `t_ms` worth `value`.
    pub fn add(&mut self, t_ms: i64, value: f64) {
        self.add_day(day_of(t_ms), value);
    }

    fn add_day(&mut self, day: i64, value: f64) {
        match self.days.binary_search_by_key(&day, |(d, _)| *d) {
            Ok(i) => self.days[i].1 += value,
            Err(i) => {
                self.days.insert(i, (day, value));
                if self.days.len() > MAX_PURCHASE_DAYS {
                    let (_, v) = self.days.remove(1);
                    self.folded += 1;
                    self.folded_value += v;
                }
            }
        }
    }

    /// Adds another profile's purchases (a merge): days are a union, a day's values add.
    pub fn absorb(&mut self, other: &Purchases) {
        for (d, v) in &other.days {
            self.add_day(*d, *v);
        }
        self.folded += other.folded;
        self.folded_value += other.folded_value;
    }

    /// Whether days were folded away (a merge may then count one twice).
    pub fn approximate(&self) -> bool {
        self.folded > 0
    }

    /// The summary the models read, as of `today` (a day number); None before the first
    /// purchase. `valued`: the mean value of the repeat purchases is wanted.
    pub fn summary(&self, today: i64, valued: bool) -> Option<Summary> {
        let (first, _) = *self.days.first()?;
        let (last, _) = *self.days.last()?;
        let x = (self.days.len() as u64 - 1 + self.folded) as u32;
        let repeat_value: f64 =
            self.days[1..].iter().map(|(_, v)| v).sum::<f64>() + self.folded_value;
        let t_x = (last - first) as f64;
        Some(Summary {
            x,
            t_x,
            // A purchase stamped after today (a client's clock) counts as today.
            t: ((today - first) as f64).max(t_x),
            m: (valued && x > 0).then(|| repeat_value / x as f64),
        })
    }
}

/// One fitted version of a trait's model, as published on the definitions topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fitted {
    pub version: u32,
    /// When the fit's population was read (ms): the version is in force for
    /// evaluations at or after it.
    pub fitted_at: i64,
    /// The day the customers' ages were measured to.
    pub as_of_day: i64,
    /// The customer-base model (p_alive, predicted_purchases, expected_value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgnbd: Option<BgNbd>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgnbd_fit: Option<FitReport>,
    /// Fitted when at least 10 customers have repeat purchases with a value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma_gamma: Option<GammaGamma>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma_gamma_fit: Option<FitReport>,
    /// Customers with at least one purchase, and with a repeat purchase.
    pub customers: u64,
    pub repeat_customers: u64,
    /// How long the fit took (ms), after the population was read.
    pub fit_ms: u64,
    /// Which instance's profiles it was fitted on (every instance's when one runs).
    pub partitions: Vec<i32>,
    /// The propensity model, for a propensity trait (with its quality on held-back
    /// people).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propensity: Option<Logistic>,
}

/// The versions of one trait's model, oldest first (at most [`VERSIONS_KEPT`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelHistory {
    pub versions: Vec<Fitted>,
}

impl ModelHistory {
    pub fn latest(&self) -> Option<&Fitted> {
        self.versions.last()
    }

    /// A version by its number (the one a value records).
    pub fn version(&self, version: Option<u32>) -> Option<&Fitted> {
        self.versions.iter().find(|f| Some(f.version) == version)
    }

    /// The version in force at `at` (ms): the latest fitted at or before it.
    pub fn in_force(&self, at: i64) -> Option<&Fitted> {
        self.versions.iter().rev().find(|f| f.fitted_at <= at)
    }

    /// The history with `fitted` added as the next version.
    pub fn with(&self, mut fitted: Fitted) -> ModelHistory {
        fitted.version = self.latest().map_or(1, |l| l.version + 1);
        let mut versions = self.versions.clone();
        versions.push(fitted);
        let extra = versions.len().saturating_sub(VERSIONS_KEPT);
        versions.drain(..extra);
        ModelHistory { versions }
    }
}

/// Fits both models on a population read at `as_of_day` (time `fitted_at`).
pub fn fit(summaries: &[Summary], fitted_at: i64, as_of_day: i64, partitions: Vec<i32>) -> Fitted {
    let started = std::time::Instant::now();
    // Customers with the same (x, t_x, T) count once, with their number.
    let mut counted: std::collections::BTreeMap<(u32, u64, u64), u64> = Default::default();
    for s in summaries {
        *counted
            .entry((s.x, s.t_x.to_bits(), s.t.to_bits()))
            .or_default() += 1;
    }
    let rows: Vec<(Summary, u64)> = counted
        .into_iter()
        .map(|((x, t_x, t), n)| {
            let s = Summary {
                x,
                t_x: f64::from_bits(t_x),
                t: f64::from_bits(t),
                m: None,
            };
            (s, n)
        })
        .collect();
    let (bgnbd, bgnbd_fit) = BgNbd::fit(&rows);
    // Order values are continuous (no two rows alike): at most a sample of
    // GAMMA_GAMMA_ROWS, every k-th, so a fit stays seconds at millions of buyers.
    let valued: Vec<(Summary, u64)> = summaries
        .iter()
        .filter(|s| s.m.is_some())
        .collect::<Vec<_>>()
        .into_iter()
        .map(|s| (*s, 1))
        .collect();
    let every = valued.len().div_ceil(GAMMA_GAMMA_ROWS).max(1);
    let valued: Vec<(Summary, u64)> = valued.into_iter().step_by(every).collect();
    let gg = GammaGamma::fit(&valued);
    Fitted {
        version: 0,
        fitted_at,
        as_of_day,
        bgnbd: Some(bgnbd),
        bgnbd_fit: Some(bgnbd_fit),
        gamma_gamma: gg.as_ref().map(|g| g.0),
        gamma_gamma_fit: gg.map(|g| g.1),
        customers: summaries.len() as u64,
        repeat_customers: summaries.iter().filter(|s| s.x > 0).count() as u64,
        fit_ms: started.elapsed().as_millis() as u64,
        partitions,
        propensity: None,
    }
}

/// Fits a propensity model on resolved examples (each with whether its person is held
/// back); None without both outcomes among the fitted ones.
pub fn fit_propensity(
    examples: &[(Example, bool)],
    fitted_at: i64,
    as_of_day: i64,
    partitions: Vec<i32>,
) -> Option<Fitted> {
    let started = std::time::Instant::now();
    let refs: Vec<(&Example, bool)> = examples.iter().map(|(e, h)| (e, *h)).collect();
    let model = Logistic::fit(&refs)?;
    Some(Fitted {
        version: 0,
        fitted_at,
        as_of_day,
        bgnbd: None,
        bgnbd_fit: None,
        gamma_gamma: None,
        gamma_gamma_fit: None,
        customers: examples.len() as u64,
        repeat_customers: 0,
        fit_ms: started.elapsed().as_millis() as u64,
        partitions,
        propensity: Some(model),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purchases_count_days_and_merge_exactly() {
        let day = |d: i64| d * DAY_MS + 3_600_000;
        let mut a = Purchases::default();
        let mut b = Purchases::default();
        let mut whole = Purchases::default();
        // Two purchases on day 10 are one purchase day worth both.
        for (d, v, left) in [
            (10, 5.0, true),
            (10, 7.0, false),
            (14, 3.0, true),
            (20, 9.0, false),
        ] {
            whole.add(day(d), v);
            if left {
                a.add(day(d), v)
            } else {
                b.add(day(d), v)
            }
        }
        a.absorb(&b);
        assert_eq!(a, whole);
        let s = whole.summary(30, true).unwrap();
        assert_eq!((s.x, s.t_x, s.t), (2, 10.0, 20.0));
        assert_eq!(s.m, Some(6.0));
        assert_eq!(whole.summary(30, false).unwrap().m, None);
        assert_eq!(Purchases::default().summary(30, true), None);
    }

    #[test]
    fn folding_keeps_the_first_day_and_the_count() {
        let mut p = Purchases::default();
        for d in 0..(MAX_PURCHASE_DAYS as i64 + 5) {
            p.add(d * DAY_MS, 1.0);
        }
        assert_eq!(p.days.len(), MAX_PURCHASE_DAYS);
        assert!(p.approximate());
        let s = p.summary(5000, true).unwrap();
        assert_eq!(s.x as usize, MAX_PURCHASE_DAYS + 4);
        assert_eq!(s.t_x, (MAX_PURCHASE_DAYS + 4) as f64);
        assert_eq!(s.m, Some(1.0));
    }

    #[test]
    fn the_version_in_force_is_the_latest_fitted_before() {
        let f = |at: i64| {
            fit(
                &[Summary {
                    x: 1,
                    t_x: 1.0,
                    t: 2.0,
                    m: None,
                }],
                at,
                0,
                vec![0],
            )
        };
        let mut h = ModelHistory::default();
        for at in 1..=10 {
            h = h.with(f(at * 100));
        }
        assert_eq!(h.versions.len(), VERSIONS_KEPT);
        assert_eq!(h.latest().unwrap().version, 10);
        assert_eq!(h.in_force(550).unwrap().version, 5);
        assert_eq!(h.in_force(100), None);
    }
}
