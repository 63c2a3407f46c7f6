//! The profiles processor's metrics (`tessera_profiles_*`).

use super::*;

#[derive(Clone)]
pub struct ProfilesMetrics {
    pub applied: IntCounter,
    pub timers: IntCounter,
    pub backfilled: IntCounter,
    pub model_fits: IntCounter,
    pub splits: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub membership: IntCounterVec,
    pub triggers: IntCounterVec,
    pub event_latency: Histogram,
    pub erased_dropped: IntCounter,
}

impl ProfilesMetrics {
    pub fn new(admin: &Admin) -> Self {
        ProfilesMetrics {
            erased_dropped: admin.register(
                &IntCounter::new(
                    "tessera_profiles_erased_records_dropped_total",
                    "Records about an erased person that were sent before the erasure and \
                     arrived after it, dropped",
                )
                .unwrap(),
            ),
            splits: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_profiles_splits_total",
                        "Profiles re-derived after an identity split; complete=false when \
                         the profile had more events than its kept history",
                    ),
                    &["complete"],
                )
                .unwrap(),
            ),
            applied: admin.register(
                &IntCounter::new(
                    "tessera_profiles_events_applied_total",
                    "Events applied to a profile",
                )
                .unwrap(),
            ),
            timers: admin.register(
                &IntCounter::new(
                    "tessera_profiles_timers_fired_total",
                    "Profiles re-evaluated because a windowed value left its window",
                )
                .unwrap(),
            ),
            model_fits: admin.register(
                &IntCounter::new(
                    "tessera_profiles_model_fits_total",
                    "Predictive models fitted and published (one per trait and fit)",
                )
                .unwrap(),
            ),
            backfilled: admin.register(
                &IntCounter::new(
                    "tessera_profiles_backfilled_profiles_total",
                    "Profiles re-evaluated by a back-fill after a definition change",
                )
                .unwrap(),
            ),
            duplicates: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_profiles_duplicates_dropped_total",
                        "Records dropped as already seen within the window",
                    ),
                    &["kind"],
                )
                .unwrap(),
            ),
            membership: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_profiles_membership_changes_total",
                        "Segment enter/exit records emitted",
                    ),
                    &["segment", "change"],
                )
                .unwrap(),
            ),
            triggers: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_profiles_triggers_total",
                        "Trigger outcomes: started (waiting), cancelled, fired",
                    ),
                    &["trigger", "outcome"],
                )
                .unwrap(),
            ),
            event_latency: admin.register(
                &Histogram::with_opts(
                    HistogramOpts::new(
                        "tessera_profiles_event_latency_seconds",
                        "From ingest accepting an event to its profile update",
                    )
                    .buckets(vec![
                        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                    ]),
                )
                .unwrap(),
            ),
        }
    }
}
