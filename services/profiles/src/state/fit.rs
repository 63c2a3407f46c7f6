//! Fitting the predictive traits' models: on the tick, the instance that serves
//! partition 0 reads its profiles' purchase summaries a chunk at a time (a bounded
//! share of each tick), fits the models on a thread of their own (events keep flowing)
//! and publishes each trait's new version on the definitions topic. Every instance
//! reads it back from there like a definition, and its back-fill re-evaluates the
//! profiles with it.
//!
//! With several instances the fit sees the leader's partitions only: profiles are
//! spread over partitions by a hash of their id, so that is a uniform sample of the
//! population (all of it with one instance). The version names the partitions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::*;
use crate::computed::Aggregate;
use crate::computed::ComputedTrait;
use crate::predict::{self, Example, Fitted, Purchases, Summary, day_of};

/// Reading profiles for a fit takes at most this much of a tick.
const READ_BUDGET: Duration = Duration::from_millis(20);
const READ_CHUNK: usize = 500;
/// Customers with a repeat purchase a customer-base model needs.
const MIN_REPEAT: usize = 10;
/// A trait with too few customers is tried again after this long (not a whole period;
/// each try reads every profile), and a fitted one is not fitted again before the
/// catalog has its new version back.
const RETRY_MS: i64 = 60 * 60 * 1000;

/// How often the models are fitted, and on how many customers at least.
#[derive(Debug, Clone)]
pub struct FitPolicy {
    pub every_ms: i64,
    pub min_customers: u64,
}

impl From<&tessera_common::config::ProfilesConfig> for FitPolicy {
    fn from(c: &tessera_common::config::ProfilesConfig) -> FitPolicy {
        FitPolicy {
            every_ms: c.predict_refit_ms,
            min_customers: c.predict_min_customers,
        }
    }
}

/// What the API shows of the fitting.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FitStatus {
    /// `idle`, `reading` or `fitting`.
    pub phase: String,
    /// Traits being fitted now.
    pub traits: Vec<String>,
    pub profiles_read: u64,
    pub started_at: Option<i64>,
    /// Why the last attempt fitted nothing, per trait (too few customers).
    pub skipped: BTreeMap<String, String>,
    /// Whether this instance fits (it serves partition 0).
    pub leader: bool,
}

enum Phase {
    Idle,
    Reading {
        traits: Vec<ComputedTrait>,
        cursor: Vec<u8>,
        today: i64,
        started_at: i64,
        rows: BTreeMap<String, Population>,
    },
    Fitting {
        done: mpsc::Receiver<Vec<(String, Option<Fitted>, u64)>>,
    },
}

/// The processor's fitting: its policy, its phase, the API's request for a fit now,
/// and the status it shows.
pub struct Fitting {
    pub policy: FitPolicy,
    pub requested: Arc<AtomicBool>,
    pub status: Arc<Mutex<FitStatus>>,
    phase: Phase,
    /// When each trait was last fitted or attempted here.
    tried: BTreeMap<String, i64>,
}

impl Fitting {
    pub fn new(policy: FitPolicy) -> Fitting {
        Fitting {
            policy,
            requested: Arc::default(),
            status: Arc::new(Mutex::new(FitStatus {
                phase: "idle".into(),
                ..Default::default()
            })),
            phase: Phase::Idle,
            tried: BTreeMap::new(),
        }
    }

    fn show(&self, f: impl FnOnce(&mut FitStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
}

/// What a fit reads of the profiles, per trait: customers' summaries, or propensity
/// examples with whether their person is held back.
#[derive(Default)]
struct Population {
    customers: Vec<Summary>,
    examples: Vec<(Example, bool)>,
}

/// Only the fields a fit reads of a stored profile.
#[derive(Deserialize)]
struct PurchasesOnly {
    #[serde(default)]
    computed: BTreeMap<String, PurchasesOf>,
}

#[derive(Deserialize)]
struct PurchasesOf {
    #[serde(default)]
    purchases: Option<Purchases>,
    #[serde(default)]
    activity: Option<ExamplesOf>,
}

#[derive(Deserialize)]
struct ExamplesOf {
    #[serde(default)]
    examples: Vec<Example>,
}

impl ProfilesProcessor {
    /// Moves the fitting on: starts reading when a model is due, reads a chunk, or
    /// publishes what a finished fit gave.
    pub(crate) fn fit_models(
        &mut self,
        now: i64,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let leader = self.placement.serving().contains(&0);
        self.fitting.show(|s| s.leader = leader);
        match std::mem::replace(&mut self.fitting.phase, Phase::Idle) {
            Phase::Idle if leader => self.start_fit(now),
            Phase::Idle => Ok(()),
            Phase::Reading {
                traits,
                cursor,
                today,
                started_at,
                rows,
            } => self.read_for_fit(traits, cursor, today, started_at, rows, txn),
            Phase::Fitting { done } => match done.try_recv() {
                Ok(results) => self.publish_fits(now, results, out),
                Err(mpsc::TryRecvError::Empty) => {
                    self.fitting.phase = Phase::Fitting { done };
                    Ok(())
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    tracing::error!("the model fit stopped without a result");
                    self.fitting.show(|s| s.phase = "idle".into());
                    Ok(())
                }
            },
        }
    }

    /// Starts reading when a predictive trait has no model, its model is older than
    /// the policy's period, or the API asked for a fit.
    fn start_fit(&mut self, now: i64) -> Result<()> {
        let asked = self.fitting.requested.swap(false, Ordering::SeqCst);
        let every = self.fitting.policy.every_ms;
        let traits: Vec<ComputedTrait> = self
            .rules
            .defs
            .computed
            .iter()
            .filter(|d| d.aggregate.predictive())
            .filter(|d| {
                let last = self.rules.defs.model(&d.id).and_then(|h| h.latest());
                let tried = self.fitting.tried.get(&d.id).copied();
                asked
                    || match (last, tried) {
                        (_, Some(t)) if now < t + RETRY_MS => false,
                        (None, _) => true,
                        (Some(f), _) => now >= f.fitted_at + every,
                    }
            })
            .cloned()
            .collect();
        if traits.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = traits.iter().map(|t| t.id.clone()).collect();
        tracing::info!(traits = ?names, "reading profiles to fit the predictive models");
        self.fitting.show(|s| {
            s.phase = "reading".into();
            s.traits = names;
            s.profiles_read = 0;
            s.started_at = Some(now);
        });
        self.fitting.phase = Phase::Reading {
            traits,
            cursor: PROFILE_PREFIX.to_vec(),
            today: day_of(now),
            started_at: now,
            rows: BTreeMap::new(),
        };
        Ok(())
    }

    fn read_for_fit(
        &mut self,
        traits: Vec<ComputedTrait>,
        mut cursor: Vec<u8>,
        today: i64,
        started_at: i64,
        mut rows: BTreeMap<String, Population>,
        txn: &mut Txn<'_>,
    ) -> Result<()> {
        let deadline = Instant::now() + READ_BUDGET;
        let mut read = 0u64;
        let mut finished = false;
        while Instant::now() < deadline {
            let page = txn.scan_committed_from(PROFILE_PREFIX, &cursor, READ_CHUNK)?;
            finished = page.len() < READ_CHUNK;
            for (k, v) in &page {
                cursor.clone_from(k);
                cursor.push(0);
                let id = String::from_utf8_lossy(&k[PROFILE_PREFIX.len()..]);
                if !self.placement.owns(&id) {
                    continue;
                }
                read += 1;
                let Ok(mut p) = serde_json::from_slice::<PurchasesOnly>(v) else {
                    continue;
                };
                let held = predict::propensity::held_back(&id);
                for t in &traits {
                    let Some(state) = p.computed.get_mut(&t.id) else {
                        continue;
                    };
                    let population = rows.entry(t.id.clone()).or_default();
                    let valued = t.property.is_some();
                    if let Some(s) = state
                        .purchases
                        .as_ref()
                        .and_then(|p| p.summary(today, valued))
                    {
                        population.customers.push(s);
                    }
                    if let Some(a) = state.activity.as_mut() {
                        population
                            .examples
                            .extend(a.examples.drain(..).map(|e| (e, held)));
                    }
                }
            }
            if finished {
                break;
            }
        }
        self.fitting.show(|s| s.profiles_read += read);
        if !finished {
            self.fitting.phase = Phase::Reading {
                traits,
                cursor,
                today,
                started_at,
                rows,
            };
            return Ok(());
        }
        let min = self.fitting.policy.min_customers;
        let partitions = self.placement.serving();
        let (tx, done) = mpsc::channel();
        self.fitting.show(|s| s.phase = "fitting".into());
        // The fit is CPU work of seconds at a million profiles: a thread of its own.
        std::thread::Builder::new()
            .name("model-fit".into())
            .spawn(move || {
                let results = traits
                    .iter()
                    .map(|t| {
                        let population = rows.remove(&t.id).unwrap_or_default();
                        if t.aggregate == Aggregate::Propensity {
                            let n = population.examples.len() as u64;
                            let fitted = (n >= min)
                                .then(|| {
                                    predict::fit_propensity(
                                        &population.examples,
                                        started_at,
                                        today,
                                        partitions.clone(),
                                    )
                                })
                                .flatten();
                            return (t.id.clone(), fitted, n);
                        }
                        // Without repeat purchases the likelihood has no maximum (the
                        // rates run off to zero): MIN_REPEAT customers need one.
                        let n = population.customers.len() as u64;
                        let repeat = population.customers.iter().filter(|s| s.x > 0).count();
                        let fitted = (n >= min && repeat >= MIN_REPEAT).then(|| {
                            predict::fit(
                                &population.customers,
                                started_at,
                                today,
                                partitions.clone(),
                            )
                        });
                        (t.id.clone(), fitted, n)
                    })
                    .collect();
                let _ = tx.send(results);
            })
            .map_err(|e| Error::Internal(format!("cannot start the model fit: {e}")))?;
        self.fitting.phase = Phase::Fitting { done };
        Ok(())
    }

    /// Publishes each new version on the definitions topic (it comes back through the
    /// catalog, on every instance).
    fn publish_fits(
        &mut self,
        now: i64,
        results: Vec<(String, Option<Fitted>, u64)>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let min = self.fitting.policy.min_customers;
        let mut skipped = BTreeMap::new();
        for (id, fitted, customers) in results {
            // Not again before the catalog has the new version back (or, without one,
            // before more customers may have come).
            self.fitting.tried.insert(id.clone(), now);
            let Some(fitted) = fitted else {
                skipped.insert(
                    id,
                    format!(
                        "{customers} customers with a purchase (propensity: resolved examples); a fit needs {min}, {MIN_REPEAT} of them with a repeat purchase (a propensity: both outcomes)"
                    ),
                );
                continue;
            };
            let history = self
                .rules
                .defs
                .model(&id)
                .cloned()
                .unwrap_or_default()
                .with(fitted);
            let latest = history.latest().expect("a version was just added");
            tracing::info!(
                trait_id = %id,
                version = latest.version,
                customers = latest.customers,
                fit_ms = latest.fit_ms,
                "predictive model fitted"
            );
            self.metrics.model_fits.inc();
            let record = Catalog::model_record(&id, &history);
            let key = format!("{}/{}", record.kind, record.id);
            out.push(Output::plain(
                self.topics.definitions(),
                key.into_bytes(),
                record.to_avro()?,
            ));
        }
        self.fitting.show(|s| {
            s.phase = "idle".into();
            s.traits.clear();
            s.skipped = skipped;
        });
        Ok(())
    }
}
