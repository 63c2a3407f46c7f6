//! The charts' figures: every `sample_every_ms` the console reads each service's
//! `/metrics` and the segment list, as Prometheus and any client would, and keeps the
//! last `keep_samples` readings of each series in memory:
//!
//! - `events.accepted`, `events.rejected.<reason>`: events per second at ingest;
//! - `latency.p50`, `latency.p99`: milliseconds from ingest accepting an event to its
//!   profile update, over the events of the interval (profiles' histogram);
//! - `activation_latency.p50`, `.p99`: the same to the activation record;
//! - `lag.<service>`: records the service's consumer group is behind;
//! - `up.<service>`: 1 when the service answered;
//! - `segment.size.<id>`, `segment.enter.<id>`, `segment.exit.<id>` (per second);
//! - `activation.<destination>.<outcome>`: activation records per second.
//!
//! Counter totals since the services started (for tables) are kept beside.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value as Metric};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::upstream::{Service, Upstream};

/// The most readings of one series sent to a page.
pub const MAX_POINTS: usize = 300;

#[derive(Default)]
struct Inner {
    series: BTreeMap<String, VecDeque<(i64, f64)>>,
    /// The previous reading of each counter (and histogram bucket).
    previous: HashMap<String, f64>,
    last_at: Option<Instant>,
    totals: Value,
}

#[derive(Clone)]
pub struct Samples {
    inner: Arc<Mutex<Inner>>,
    keep: usize,
}

/// One reading of everything: counters by key (for rates), gauges, histogram buckets.
#[derive(Default, Debug)]
pub struct Reading {
    pub counters: BTreeMap<String, f64>,
    pub gauges: BTreeMap<String, f64>,
    /// `(series, buckets)`: cumulative counts by upper bound, summed over labels.
    pub histograms: Vec<(&'static str, Vec<(f64, f64)>)>,
    pub totals: Value,
}

impl Samples {
    pub fn new(keep: usize) -> Samples {
        Samples {
            inner: Arc::default(),
            keep: keep.max(2),
        }
    }

    /// The series whose names start with one of `prefixes`, as `[[ms, value], ...]`.
    /// Each series keeps at most [`MAX_POINTS`] readings, evenly spread, the newest always
    /// included (a chart is a few hundred pixels wide; the page asks every second).
    pub fn series(&self, prefixes: &[&str]) -> Value {
        let inner = self.inner.lock().expect("samples");
        let map: serde_json::Map<String, Value> = inner
            .series
            .iter()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| {
                let step = v.len().div_ceil(MAX_POINTS).max(1);
                // Counted back from the newest, so it is always shown.
                let mut points: Vec<Value> = v
                    .iter()
                    .rev()
                    .step_by(step)
                    .map(|(t, x)| json!([t, x]))
                    .collect();
                points.reverse();
                (k.clone(), Value::Array(points))
            })
            .collect();
        Value::Object(map)
    }

    /// The newest value of a series.
    #[cfg(test)]
    pub fn latest(&self, name: &str) -> Option<f64> {
        let inner = self.inner.lock().expect("samples");
        inner
            .series
            .get(name)
            .and_then(|s| s.back())
            .map(|(_, v)| *v)
    }

    pub fn totals(&self) -> Value {
        self.inner.lock().expect("samples").totals.clone()
    }

    fn push(inner: &mut Inner, keep: usize, name: String, at: i64, v: f64) {
        let s = inner.series.entry(name).or_default();
        s.push_back((at, v));
        while s.len() > keep {
            s.pop_front();
        }
    }

    /// Adds a reading taken at `at_ms`: counters become rates over the time since the
    /// previous reading (a counter that went down restarted from zero), histograms
    /// become quantiles of the interval's observations.
    pub fn record(&self, at_ms: i64, now: Instant, r: Reading) {
        let mut inner = self.inner.lock().expect("samples");
        let elapsed = inner.last_at.map(|t| now.duration_since(t).as_secs_f64());
        inner.last_at = Some(now);
        // After the first reading, a series seen for the first time started from zero (a
        // labelled counter or histogram appears with its first observation).
        let start = |v: f64| if elapsed.is_some() { 0.0 } else { v };
        for (name, v) in &r.gauges {
            Self::push(&mut inner, self.keep, name.clone(), at_ms, *v);
        }
        for (name, v) in &r.counters {
            let before = inner.previous.insert(name.clone(), *v).unwrap_or(start(*v));
            if let Some(secs) = elapsed.filter(|s| *s > 0.0) {
                let delta = if *v >= before { v - before } else { *v };
                Self::push(&mut inner, self.keep, name.clone(), at_ms, delta / secs);
            }
        }
        for (name, buckets) in &r.histograms {
            let mut deltas = Vec::with_capacity(buckets.len());
            for (le, count) in buckets {
                let key = format!("{name}/{le}");
                let before = inner.previous.insert(key, *count).unwrap_or(start(*count));
                deltas.push((
                    *le,
                    if *count >= before {
                        count - before
                    } else {
                        *count
                    },
                ));
            }
            if elapsed.is_none() {
                continue;
            }
            for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
                if let Some(v) = quantile(q, &deltas) {
                    Self::push(
                        &mut inner,
                        self.keep,
                        format!("{name}.{label}"),
                        at_ms,
                        v * 1000.0,
                    );
                }
            }
        }
        inner.totals = r.totals;
    }
}

/// The `q` quantile of a histogram's observations (cumulative counts by upper bound),
/// interpolated inside its bucket as Prometheus' `histogram_quantile` does; `None`
/// without observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if *count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * frac);
        }
        (lower, below) = (*le, *count);
    }
    Some(lower)
}

fn label<'a>(s: &'a Sample, name: &str) -> &'a str {
    s.labels.get(name).unwrap_or("")
}

fn scalar(s: &Sample) -> Option<f64> {
    match s.value {
        Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => Some(v),
        _ => None,
    }
}

/// Adds the cumulative bucket counts of every histogram sample named `metric` to `into`.
fn add_histogram(samples: &[Sample], metric: &str, into: &mut BTreeMap<u64, (f64, f64)>) {
    for s in samples.iter().filter(|s| s.metric == metric) {
        if let Metric::Histogram(buckets) = &s.value {
            for b in buckets {
                let e = into
                    .entry(b.less_than.to_bits())
                    .or_insert((b.less_than, 0.0));
                e.1 += b.count;
            }
        }
    }
}

fn sorted(buckets: BTreeMap<u64, (f64, f64)>) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = buckets.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// What one round of scrapes says. `metrics` holds each service's parsed `/metrics`
/// (absent when it did not answer); `segments` the profiles API's segment list.
pub fn read(metrics: &[(Service, Option<Scrape>)], segments: Option<&Value>) -> Reading {
    let mut r = Reading::default();
    let mut accepted = 0.0;
    let mut rejected: BTreeMap<String, f64> = BTreeMap::new();
    let mut activations: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let mut latency = BTreeMap::new();
    let mut activation_latency = BTreeMap::new();
    for (service, scrape) in metrics {
        let name = service.name();
        r.gauges.insert(
            format!("up.{name}"),
            if scrape.is_some() { 1.0 } else { 0.0 },
        );
        let Some(scrape) = scrape else { continue };
        let lag_metric = format!("tessera_{name}_consumer_lag_records");
        let mut lag = None;
        for s in &scrape.samples {
            let Some(v) = scalar(s) else { continue };
            match s.metric.as_str() {
                "tessera_ingest_events_accepted_total" => accepted += v,
                "tessera_ingest_events_rejected_total" => {
                    *rejected.entry(label(s, "reason").to_string()).or_default() += v
                }
                "tessera_profiles_membership_changes_total" => {
                    let change = match label(s, "change") {
                        "enter" => "enter",
                        "exit" => "exit",
                        _ => continue,
                    };
                    *r.counters
                        .entry(format!("segment.{change}.{}", label(s, "segment")))
                        .or_default() += v;
                }
                "tessera_activation_records_total" => {
                    *activations
                        .entry(label(s, "destination").to_string())
                        .or_default()
                        .entry(label(s, "outcome").to_string())
                        .or_default() += v;
                }
                m if m == lag_metric => *lag.get_or_insert(0.0) += v,
                _ => {}
            }
        }
        if let Some(lag) = lag {
            r.gauges.insert(format!("lag.{name}"), lag);
        }
        add_histogram(
            &scrape.samples,
            "tessera_profiles_event_latency_seconds",
            &mut latency,
        );
        add_histogram(
            &scrape.samples,
            "tessera_activation_event_to_activation_seconds",
            &mut activation_latency,
        );
    }
    if metrics
        .iter()
        .any(|(s, m)| *s == Service::Ingest && m.is_some())
    {
        r.counters.insert("events.accepted".into(), accepted);
        for (reason, v) in &rejected {
            r.counters.insert(format!("events.rejected.{reason}"), *v);
        }
    }
    for (dest, outcomes) in &activations {
        for (outcome, v) in outcomes {
            r.counters
                .insert(format!("activation.{dest}.{outcome}"), *v);
        }
    }
    if !latency.is_empty() {
        r.histograms.push(("latency", sorted(latency)));
    }
    if !activation_latency.is_empty() {
        r.histograms
            .push(("activation_latency", sorted(activation_latency)));
    }
    if let Some(list) = segments.and_then(|s| s["segments"].as_array()) {
        for s in list {
            if let (Some(id), Some(size)) = (s["id"].as_str(), s["size"].as_f64()) {
                r.gauges.insert(format!("segment.size.{id}"), size);
            }
        }
    }
    r.totals = json!({"accepted": accepted, "rejected": rejected, "activations": activations});
    r
}

fn parse(text: &str) -> Option<Scrape> {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).ok()
}

/// Reads the services every `every` until shutdown.
pub async fn run(
    upstream: Upstream,
    samples: Samples,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let scrapes = futures::future::join_all(Service::ALL.iter().map(|s| {
            let upstream = upstream.clone();
            async move {
                (
                    *s,
                    upstream.metrics(*s).await.ok().as_deref().and_then(parse),
                )
            }
        }));
        let (scrapes, segments) = tokio::join!(
            scrapes,
            upstream.get(Service::Profiles, "/v1/segments", &[])
        );
        let reading = read(&scrapes, segments.ok().as_ref());
        samples.record(tessera_common::now_ms(), Instant::now(), reading);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 100 observations: 50 up to 10 ms, 40 more up to 20 ms, 10 more up to 50 ms.
        let b = [
            (0.01, 50.0),
            (0.02, 90.0),
            (0.05, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((quantile(0.5, &b).unwrap() - 0.01).abs() < 1e-9);
        assert!((quantile(0.7, &b).unwrap() - 0.015).abs() < 1e-9);
        assert!((quantile(0.99, &b).unwrap() - 0.047).abs() < 1e-9);
        assert_eq!(quantile(0.5, &[(0.01, 0.0), (f64::INFINITY, 0.0)]), None);
        // Beyond the last finite bound: that bound.
        assert_eq!(
            quantile(0.99, &[(0.01, 1.0), (f64::INFINITY, 10.0)]),
            Some(0.01)
        );
    }

    const INGEST: &str = "\
# TYPE tessera_ingest_events_accepted_total counter
tessera_ingest_events_accepted_total{origin=\"http\",source=\"demo\"} 10
tessera_ingest_events_accepted_total{origin=\"kafka\",source=\"raw\"} 5
# TYPE tessera_ingest_events_rejected_total counter
tessera_ingest_events_rejected_total{origin=\"http\",reason=\"invalid_event\"} 2
";
    const PROFILES: &str = "\
# TYPE tessera_profiles_membership_changes_total counter
tessera_profiles_membership_changes_total{change=\"enter\",segment=\"buyers\"} 4
tessera_profiles_membership_changes_total{change=\"exit\",segment=\"buyers\"} 1
# TYPE tessera_profiles_consumer_lag_records gauge
tessera_profiles_consumer_lag_records{partition=\"0\",topic=\"t\"} 3
tessera_profiles_consumer_lag_records{partition=\"1\",topic=\"t\"} 4
# TYPE tessera_profiles_event_latency_seconds histogram
tessera_profiles_event_latency_seconds_bucket{le=\"0.01\"} 9
tessera_profiles_event_latency_seconds_bucket{le=\"0.1\"} 10
tessera_profiles_event_latency_seconds_bucket{le=\"+Inf\"} 10
tessera_profiles_event_latency_seconds_sum 0.1
tessera_profiles_event_latency_seconds_count 10
";

    fn reading(ingest: &str, profiles: &str) -> Reading {
        let segments = json!({"segments": [{"id": "buyers", "size": 7}]});
        read(
            &[
                (Service::Ingest, parse(ingest)),
                (Service::Identity, None),
                (Service::Profiles, parse(profiles)),
            ],
            Some(&segments),
        )
    }

    #[test]
    fn readings_become_rates_sizes_lag_and_latency() {
        let samples = Samples::new(10);
        let t0 = Instant::now();
        samples.record(1_000, t0, reading(INGEST, PROFILES));
        assert_eq!(samples.latest("segment.size.buyers"), Some(7.0));
        assert_eq!(samples.latest("lag.profiles"), Some(7.0));
        assert_eq!(samples.latest("up.identity"), Some(0.0));
        assert_eq!(
            samples.latest("events.accepted"),
            None,
            "a rate needs two readings"
        );
        let later = INGEST.replace("} 10\n", "} 30\n");
        let profiles = PROFILES
            .replace("le=\"0.01\"} 9", "le=\"0.01\"} 19")
            .replace("le=\"0.1\"} 10", "le=\"0.1\"} 30")
            .replace("le=\"+Inf\"} 10", "le=\"+Inf\"} 30");
        samples.record(
            3_000,
            t0 + Duration::from_secs(2),
            reading(&later, &profiles),
        );
        assert_eq!(
            samples.latest("events.accepted"),
            Some(10.0),
            "20 more in 2 s"
        );
        assert_eq!(samples.latest("events.rejected.invalid_event"), Some(0.0));
        assert_eq!(samples.latest("segment.enter.buyers"), Some(0.0));
        // The interval's 20 observations: 10 up to 10 ms, 10 up to 100 ms.
        let p50 = samples.latest("latency.p50").unwrap();
        assert!((p50 - 10.0).abs() < 1e-6, "{p50}");
        let p99 = samples.latest("latency.p99").unwrap();
        assert!(p99 > 90.0 && p99 <= 100.0, "{p99}");
        assert_eq!(samples.totals()["accepted"], json!(35.0));
        assert_eq!(samples.totals()["rejected"]["invalid_event"], json!(2.0));
        let s = samples.series(&["segment."]);
        assert!(s.get("segment.size.buyers").is_some() && s.get("lag.profiles").is_none());
    }

    #[test]
    fn a_long_series_is_thinned_for_the_page_and_keeps_its_newest_reading() {
        let samples = Samples::new(1000);
        let t0 = Instant::now();
        for i in 0..1000u64 {
            let text = format!(
                "tessera_ingest_events_accepted_total{{source=\"d\"}} {}\n",
                i * i
            );
            let at = t0 + Duration::from_secs(i);
            samples.record(
                i as i64 * 1000,
                at,
                read(&[(Service::Ingest, parse(&text))], None),
            );
        }
        let sent = samples.series(&["events.accepted"]);
        let points = sent["events.accepted"].as_array().unwrap();
        assert!(
            points.len() <= MAX_POINTS && points.len() >= MAX_POINTS / 2,
            "{}",
            points.len()
        );
        assert_eq!(
            points.last().unwrap()[0],
            json!(999_000),
            "the newest reading"
        );
        assert_eq!(samples.latest("events.accepted"), Some(1997.0));
    }

    #[test]
    fn a_series_that_appears_later_counts_from_zero() {
        let samples = Samples::new(10);
        let t0 = Instant::now();
        let quiet = "tessera_ingest_events_accepted_total{source=\"d\"} 7\n";
        samples.record(0, t0, read(&[(Service::Ingest, parse(quiet))], None));
        let rejected =
            format!("{quiet}tessera_ingest_events_rejected_total{{reason=\"too_large\"}} 4\n");
        let later = t0 + Duration::from_secs(2);
        samples.record(
            2000,
            later,
            read(&[(Service::Ingest, parse(&rejected))], None),
        );
        assert_eq!(
            samples.latest("events.rejected.too_large"),
            Some(2.0),
            "4 in 2 s"
        );
        let activation = "tessera_activation_event_to_activation_seconds_bucket{source=\"segment\",le=\"0.05\"} 3\n\
            tessera_activation_event_to_activation_seconds_bucket{source=\"segment\",le=\"+Inf\"} 3\n";
        let text = format!(
            "# TYPE tessera_activation_event_to_activation_seconds histogram\n{activation}"
        );
        let at = later + Duration::from_secs(1);
        samples.record(3000, at, read(&[(Service::Activation, parse(&text))], None));
        assert!(
            samples.latest("activation_latency.p50").is_some(),
            "its first observations count"
        );
    }

    #[test]
    fn a_restarted_service_counts_from_zero_and_old_readings_fall_off() {
        let samples = Samples::new(2);
        let t0 = Instant::now();
        for (i, n) in ["10", "20", "5"].iter().enumerate() {
            let text = format!("tessera_ingest_events_accepted_total{{source=\"d\"}} {n}\n");
            let at = t0 + Duration::from_secs(i as u64);
            samples.record(
                i as i64 * 1000,
                at,
                read(&[(Service::Ingest, parse(&text))], None),
            );
        }
        assert_eq!(
            samples.latest("events.accepted"),
            Some(5.0),
            "restart: 5 new"
        );
        assert_eq!(
            samples.series(&["events."])["events.accepted"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
