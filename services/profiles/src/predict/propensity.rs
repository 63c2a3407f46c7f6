//! Propensity: the probability that a person does an event (the target) within a
//! horizon, from a logistic regression on their recent activity.
//!
//! Each profile keeps its activity of the last 30 days (times of its events and of its
//! target events) and, once a day, a snapshot of its features. The stream reveals each
//! snapshot's outcome: a target event within the horizon after it makes it a positive
//! example, the horizon passing without one a negative. The last resolved examples stay
//! on the profile; the model fit reads them from every profile (as it reads purchase
//! summaries), fits by Newton's method with a small ridge on a fifth of the people held
//! back (by a hash of the profile id), and reports AUC and calibration on that fifth.

use serde::{Deserialize, Serialize};

use super::DAY_MS;

/// The features, in the order of the weights.
pub const FEATURES: [&str; 9] = [
    "bias",
    "ln1p_target_7d",
    "ln1p_target_30d",
    "ln1p_events_1d",
    "ln1p_events_7d",
    "ln1p_events_30d",
    "ln1p_days_since_event",
    "ln1p_days_since_target",
    "ever_target",
];
const N: usize = FEATURES.len();
/// A snapshot keeps the counts and hours the features are made of (compact in the
/// profile): target events in 7 and 30 days, events in 1, 7 and 30 days, hours since the
/// last event and the last target event, ever a target event. (How long a person has
/// been known is left out: it grows with the platform's own age, so a model fitted early
/// would meet values later that it never saw.)
const RAW: usize = N - 1;
/// How far back activity is kept, and the longest horizon.
pub const LOOKBACK_MS: i64 = 30 * DAY_MS;
const MAX_EVENTS: usize = 500;
const MAX_HITS: usize = 200;
/// Snapshots awaiting their outcome, and resolved examples kept, per profile.
pub const MAX_PENDING: usize = 8;
pub const MAX_EXAMPLES: usize = 16;
/// "Never" or "long ago", in days.
const FAR_DAYS: f64 = 365.0;

/// A person's activity at a time (what the features are made of), awaiting the outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub at: i64,
    pub raw: Vec<u32>,
}

/// A snapshot with its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub at: i64,
    pub raw: Vec<u32>,
    pub y: bool,
}

/// The features of a snapshot's counts and hours (see [`FEATURES`]); None if malformed.
pub fn features(raw: &[u32]) -> Option<Vec<f64>> {
    if raw.len() != RAW {
        return None;
    }
    let c = |i: usize| (raw[i] as f64).ln_1p();
    let days = |i: usize| (raw[i] as f64 / 24.0).ln_1p();
    Some(vec![
        1.0,
        c(0),
        c(1),
        c(2),
        c(3),
        c(4),
        days(5),
        days(6),
        raw[7].min(1) as f64,
    ])
}

/// A profile's activity for one propensity trait.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// Times of its events (track, page, screen) and of its target events in the last
    /// 30 days, in order.
    #[serde(default)]
    pub events: Vec<i64>,
    #[serde(default)]
    pub hits: Vec<i64>,
    /// The last event and target event, also once they left the 30 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_hit: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Snapshot>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<Example>,
    /// The day of the last snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_day: Option<i64>,
}

fn insert_sorted(v: &mut Vec<i64>, t: i64, cap: usize) {
    let at = v.partition_point(|x| *x <= t);
    v.insert(at, t);
    if v.len() > cap {
        v.remove(0);
    }
}

fn count_since(v: &[i64], from: i64, to: i64) -> u32 {
    (v.partition_point(|x| *x <= to) - v.partition_point(|x| *x <= from)) as u32
}

impl Activity {
    /// An event at `t`; `hit`: it is a target event.
    pub fn add(&mut self, t: i64, hit: bool) {
        insert_sorted(&mut self.events, t, MAX_EVENTS);
        self.last_event = Some(self.last_event.map_or(t, |l| l.max(t)));
        if hit {
            insert_sorted(&mut self.hits, t, MAX_HITS);
            self.last_hit = Some(self.last_hit.map_or(t, |l| l.max(t)));
        }
    }

    /// Another profile's activity (a merge): times are a union, snapshots and examples
    /// are kept with theirs (the newest within the caps).
    pub fn absorb(&mut self, other: &Activity) {
        for t in &other.events {
            insert_sorted(&mut self.events, *t, MAX_EVENTS);
        }
        for t in &other.hits {
            insert_sorted(&mut self.hits, *t, MAX_HITS);
        }
        self.last_event = self.last_event.max(other.last_event);
        self.last_hit = self.last_hit.max(other.last_hit);
        self.pending.extend(other.pending.iter().cloned());
        self.pending.sort_by_key(|s| s.at);
        let extra = self.pending.len().saturating_sub(MAX_PENDING);
        self.pending.drain(..extra);
        self.examples.extend(other.examples.iter().cloned());
        self.examples.sort_by_key(|e| e.at);
        let extra = self.examples.len().saturating_sub(MAX_EXAMPLES);
        self.examples.drain(..extra);
    }

    /// The counts and hours the features are made of, as of `now`, from the activity at
    /// or before it.
    pub fn raw(&self, now: i64) -> Vec<u32> {
        let hours = |ms: i64| (ms / 3_600_000).clamp(0, FAR_DAYS as i64 * 24) as u32;
        let last_event = self.events[..self.events.partition_point(|x| *x <= now)]
            .last()
            .copied()
            .or(self.last_event.filter(|t| *t <= now));
        let last_hit = self.hits[..self.hits.partition_point(|x| *x <= now)]
            .last()
            .copied()
            .or(self.last_hit.filter(|t| *t <= now));
        let since = |t: Option<i64>| t.map_or(FAR_DAYS as u32 * 24, |t| hours(now - t));
        vec![
            count_since(&self.hits, now - 7 * DAY_MS, now),
            count_since(&self.hits, now - 30 * DAY_MS, now),
            count_since(&self.events, now - DAY_MS, now),
            count_since(&self.events, now - 7 * DAY_MS, now),
            count_since(&self.events, now - 30 * DAY_MS, now),
            since(last_event),
            since(last_hit),
            u32::from(last_hit.is_some()),
        ]
    }

    /// The features as of `now`.
    pub fn features(&self, now: i64) -> Vec<f64> {
        features(&self.raw(now)).expect("raw has its length")
    }

    /// Whether nothing happened for a year: the features no longer change, so neither
    /// snapshots nor a midnight evaluation are needed until the next event.
    pub fn dormant(&self, now: i64) -> bool {
        let long_ago = |t: Option<i64>| t.is_none_or(|t| now - t >= FAR_DAYS as i64 * DAY_MS);
        self.pending.is_empty() && long_ago(self.last_event) && long_ago(self.last_hit)
    }

    /// At `now`: resolves the snapshots whose outcome is known, takes today's snapshot
    /// (one a day, at most [`MAX_PENDING`] waiting, none while dormant) and forgets
    /// activity older than the look-back. Returns the next deadline of a waiting
    /// snapshot.
    pub fn settle(&mut self, now: i64, horizon_ms: i64) -> Option<i64> {
        let hits = &self.hits;
        let mut resolved = Vec::new();
        self.pending.retain(|s| {
            let end = s.at.saturating_add(horizon_ms);
            let y = if hits.iter().any(|t| *t > s.at && *t <= end) {
                Some(true)
            } else if now >= end {
                Some(false)
            } else {
                None
            };
            match y {
                Some(y) => {
                    resolved.push(Example {
                        at: s.at,
                        raw: s.raw.clone(),
                        y,
                    });
                    false
                }
                None => true,
            }
        });
        self.examples.extend(resolved);
        let extra = self.examples.len().saturating_sub(MAX_EXAMPLES);
        self.examples.drain(..extra);
        let today = now.div_euclid(DAY_MS);
        if self.snapshot_day != Some(today)
            && self.pending.len() < MAX_PENDING
            && !self.dormant(now)
        {
            self.pending.push(Snapshot {
                at: now,
                raw: self.raw(now),
            });
            self.snapshot_day = Some(today);
        }
        let keep_from = now - LOOKBACK_MS;
        let old = self.events.partition_point(|t| *t < keep_from);
        self.events.drain(..old);
        let old = self.hits.partition_point(|t| *t < keep_from);
        self.hits.drain(..old);
        self.pending
            .iter()
            .map(|s| s.at.saturating_add(horizon_ms))
            .min()
    }
}

/// One bin of the calibration table: the examples whose predicted probability fell in
/// it, their mean prediction and how many had the outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    pub from: f64,
    pub to: f64,
    pub count: u64,
    pub predicted: f64,
    pub observed: f64,
}

/// How well the model does on the held-back people (or, with too few of them, on the
/// examples it was fitted on: `held_back` says which).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub held_back: bool,
    pub examples: u64,
    pub positive_rate: f64,
    pub auc: f64,
    pub log_loss: f64,
    pub brier: f64,
    pub calibration: Vec<Bin>,
}

/// A fitted logistic regression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logistic {
    pub features: Vec<String>,
    pub weights: Vec<f64>,
    pub trained_on: u64,
    pub iterations: u32,
    pub converged: bool,
    pub quality: Quality,
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

impl Logistic {
    pub fn predict(&self, x: &[f64]) -> f64 {
        sigmoid(self.weights.iter().zip(x).map(|(w, x)| w * x).sum())
    }

    /// Fits on `examples` (each with whether its person is held back): Newton's method
    /// with a ridge of `RIDGE` on every weight but the bias. None without both outcomes
    /// among the fitted examples.
    // Matrix arithmetic reads clearest by index.
    #[allow(clippy::needless_range_loop)]
    pub fn fit(examples: &[(&Example, bool)]) -> Option<Logistic> {
        const RIDGE: f64 = 1.0;
        let of = |held_back: bool| -> Vec<(Vec<f64>, bool)> {
            examples
                .iter()
                .filter(|(_, held)| *held == held_back)
                .filter_map(|(e, _)| Some((features(&e.raw)?, e.y)))
                .collect()
        };
        let train = of(false);
        let positives = train.iter().filter(|e| e.1).count();
        if positives == 0 || positives == train.len() {
            return None;
        }
        let mut w = vec![0.0; N];
        let (mut iterations, mut converged) = (0, false);
        while iterations < 50 && !converged {
            iterations += 1;
            // Gradient and Hessian of the penalised negative log-likelihood.
            let mut g = [0.0; N];
            let mut h = [[0.0; N]; N];
            for (x, y) in &train {
                let p = sigmoid(w.iter().zip(x).map(|(w, x)| w * x).sum());
                let r = p - if *y { 1.0 } else { 0.0 };
                let s = p * (1.0 - p);
                for i in 0..N {
                    g[i] += r * x[i];
                    for j in 0..=i {
                        h[i][j] += s * x[i] * x[j];
                    }
                }
            }
            for i in 0..N {
                for j in 0..i {
                    h[j][i] = h[i][j];
                }
                if i > 0 {
                    g[i] += RIDGE * w[i];
                    h[i][i] += RIDGE;
                }
            }
            let step = solve(h, g)?;
            let largest = step.iter().fold(0.0f64, |m, s| m.max(s.abs()));
            for (w, s) in w.iter_mut().zip(&step) {
                *w -= s;
            }
            converged = largest < 1e-9;
        }
        let mut model = Logistic {
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
            weights: w,
            trained_on: train.len() as u64,
            iterations,
            converged,
            quality: Quality {
                held_back: false,
                examples: 0,
                positive_rate: 0.0,
                auc: 0.0,
                log_loss: 0.0,
                brier: 0.0,
                calibration: Vec::new(),
            },
        };
        let held = of(true);
        let held_positives = held.iter().filter(|e| e.1).count();
        let enough = held.len() >= 50 && held_positives > 0 && held_positives < held.len();
        let scored: Vec<(f64, bool)> = if enough { &held } else { &train }
            .iter()
            .map(|(x, y)| (model.predict(x), *y))
            .collect();
        model.quality = quality(&scored, enough);
        Some(model)
    }
}

/// Solves `a · x = b` (a symmetric positive definite) by Gaussian elimination with
/// partial pivoting; None if singular.
#[allow(clippy::needless_range_loop)]
fn solve(mut a: [[f64; N]; N], mut b: [f64; N]) -> Option<[f64; N]> {
    for col in 0..N {
        let pivot = (col..N).max_by(|i, j| a[*i][col].abs().total_cmp(&a[*j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..N {
            let f = a[row][col] / a[col][col];
            for k in col..N {
                a[row][k] -= f * a[col][k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; N];
    for row in (0..N).rev() {
        let rest: f64 = (row + 1..N).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - rest) / a[row][row];
    }
    Some(x)
}

/// AUC (the probability a positive scores above a negative, ties counting half), log
/// loss, Brier score and ten equal-width calibration bins.
pub fn quality(scored: &[(f64, bool)], held_back: bool) -> Quality {
    let mut sorted: Vec<(f64, bool)> = scored.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let positives = sorted.iter().filter(|s| s.1).count() as f64;
    let negatives = sorted.len() as f64 - positives;
    // Rank sum of the positives, ties given their mean rank.
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < sorted.len() {
        let j = (i..sorted.len())
            .find(|j| sorted[*j].0 != sorted[i].0)
            .unwrap_or(sorted.len());
        let mean_rank = (i + 1 + j) as f64 / 2.0;
        rank_sum += mean_rank * sorted[i..j].iter().filter(|s| s.1).count() as f64;
        i = j;
    }
    let auc = if positives > 0.0 && negatives > 0.0 {
        (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
    } else {
        0.5
    };
    let n = scored.len().max(1) as f64;
    let eps = 1e-12;
    let log_loss = -scored
        .iter()
        .map(|(p, y)| {
            if *y {
                (p + eps).ln()
            } else {
                (1.0 - p + eps).ln()
            }
        })
        .sum::<f64>()
        / n;
    let brier = scored
        .iter()
        .map(|(p, y)| (p - if *y { 1.0 } else { 0.0 }).powi(2))
        .sum::<f64>()
        / n;
    let calibration = (0..10)
        .filter_map(|b| {
            let (from, to) = (b as f64 / 10.0, (b + 1) as f64 / 10.0);
            let inside: Vec<&(f64, bool)> = scored
                .iter()
                .filter(|(p, _)| *p >= from && (*p < to || (b == 9 && *p <= to)))
                .collect();
            (!inside.is_empty()).then(|| {
                let c = inside.len() as f64;
                Bin {
                    from,
                    to,
                    count: inside.len() as u64,
                    predicted: inside.iter().map(|s| s.0).sum::<f64>() / c,
                    observed: inside.iter().filter(|s| s.1).count() as f64 / c,
                }
            })
        })
        .collect();
    Quality {
        held_back,
        examples: scored.len() as u64,
        positive_rate: positives / n,
        auc,
        log_loss,
        brier,
        calibration,
    }
}

/// Whether a person is held back from fitting (a fifth of them, by a hash of the id).
pub fn held_back(profile_id: &str) -> bool {
    // FNV-1a: the same on every instance and run.
    let h = profile_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    h % 5 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_resolve_by_the_stream_and_features_read_the_past() {
        let day = DAY_MS;
        let mut a = Activity::default();
        a.add(0, false);
        a.add(day / 2, true);
        // The first evaluation snapshots; a target event within the horizon makes it a
        // positive, the horizon passing without one a negative.
        assert_eq!(a.settle(day, 7 * day), Some(8 * day));
        let x = a.features(day);
        assert_eq!(x[0], 1.0);
        assert_eq!(x[1], 1f64.ln_1p(), "one target event in 7 days");
        assert_eq!(x[4], 2f64.ln_1p(), "two events in 7 days");
        assert_eq!(x[7], 0.5f64.ln_1p(), "half a day since the target event");
        assert_eq!(x[8], 1.0);
        a.add(3 * day, true);
        a.settle(3 * day + 1, 7 * day);
        assert_eq!(a.examples.len(), 1);
        assert!(a.examples[0].y);
        // A snapshot on day 3 resolves negative on day 10 with no target event.
        assert_eq!(a.pending.len(), 1);
        assert_eq!(a.settle(10 * day + 1, 7 * day), Some(17 * day + 1));
        assert_eq!(a.examples.len(), 2);
        assert!(!a.examples[1].y);
        assert_eq!(a.pending.len(), 1, "today's snapshot");
        // Activity older than 30 days is forgotten; the last target event is not.
        a.settle(40 * day, 7 * day);
        assert!(a.events.is_empty() && a.hits.is_empty());
        assert_eq!(a.features(40 * day)[8], 1.0);
    }

    /// Time since the last event keeps counting after the event leaves the 30 days of
    /// kept activity (it jumped to "long ago").
    #[test]
    fn time_since_the_last_event_counts_past_the_look_back() {
        let day = DAY_MS;
        let mut a = Activity::default();
        a.add(0, false);
        a.settle(40 * day, 7 * day);
        assert!(a.events.is_empty(), "forgotten after 30 days");
        assert_eq!(a.raw(40 * day)[5], 40 * 24, "hours since the last event");
        // A year on, nothing changes any more: no snapshot, and (see `computed`) no
        // midnight timer.
        a.pending.clear();
        assert!(!a.dormant(364 * day) && a.dormant(365 * day));
        a.settle(400 * day, 7 * day);
        assert!(a.pending.is_empty());
    }

    #[test]
    fn merging_keeps_both_histories() {
        let mut a = Activity::default();
        let mut b = Activity::default();
        a.add(10, false);
        b.add(5, true);
        b.add(20, false);
        a.absorb(&b);
        assert_eq!(a.events, vec![5, 10, 20]);
        assert_eq!((a.last_event, a.last_hit), (Some(20), Some(5)));
    }

    /// A model fitted on examples drawn from a known logistic model recovers it, and
    /// its held-back examples are ranked and calibrated as that model would.
    #[test]
    fn logistic_recovers_a_known_model_and_reports_its_quality() {
        let truth = [-1.0, 1.2, 0.0, 0.5, 0.0, 0.0, -0.4, 0.0, 0.6];
        let mut seed = 11u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed >> 11
        };
        let examples: Vec<(Example, bool)> = (0..20_000)
            .map(|i| {
                let raw: Vec<u32> = [5, 10, 8, 20, 50, 2000, 2000, 2]
                    .iter()
                    .map(|top| (next() % top) as u32)
                    .collect();
                let x = features(&raw).unwrap();
                let p = sigmoid(truth.iter().zip(&x).map(|(w, x)| w * x).sum());
                let u = (next() % 1_000_000) as f64 / 1e6;
                let e = Example {
                    at: i,
                    raw,
                    y: u < p,
                };
                (e, i % 5 == 0)
            })
            .collect();
        let refs: Vec<(&Example, bool)> = examples.iter().map(|(e, h)| (e, *h)).collect();
        let m = Logistic::fit(&refs).unwrap();
        assert!(m.converged);
        for (w, t) in m.weights.iter().zip(truth) {
            assert!((w - t).abs() < 0.2, "{:?}", m.weights);
        }
        let q = &m.quality;
        assert!(q.held_back && q.examples == 4000);
        assert!(q.auc > 0.7, "{q:?}");
        for b in &q.calibration {
            if b.count >= 200 {
                assert!((b.predicted - b.observed).abs() < 0.06, "{b:?}");
            }
        }
        // AUC: perfect ranking is 1, ties are a half.
        assert_eq!(quality(&[(0.1, false), (0.9, true)], true).auc, 1.0);
        assert_eq!(quality(&[(0.5, false), (0.5, true)], true).auc, 0.5);
    }
}
