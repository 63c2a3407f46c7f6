//! # tessera-identity
//!
//! Consumes `events.ingested` and `identity.commands`; resolves each event's identifiers
//! ([`rules`]) to one profile in the identity graph ([`graph`], RocksDB), links records
//! that share no identifier by fuzzy matching ([`fuzzy`]), and produces the event with
//! its profile id to `events.resolved`, a record per merge to `identity.merges` and per
//! split to `identity.splits`. Serves the identity API ([`api`]). Offsets are stored in
//! the same RocksDB write batch as the graph changes.
//!
//! Runs as one active consumer (a merge can touch any two identifiers); the scale-out
//! design is in docs/design.md.

pub mod api;
pub mod fuzzy;
pub mod graph;
pub mod privacy;
pub mod privacy_api;
pub mod reports;
pub mod rules;

use std::sync::Arc;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tessera_common::admin::{self, Admin};
use tessera_common::config::Config;
use tessera_common::ids::deterministic_id;
use tessera_common::ids::subject_hash;
use tessera_common::kafka::{self, TopicKind};
use tessera_common::message::{Message, Output};
use tessera_common::records::{
    Assignment, AvroRecord, Identifier, IdentityCommand, IngestedEvent, ProfileSplit, ResolvedEvent,
};
use tessera_common::runner::{self, Processor, RunnerSpec};
use tessera_common::service;
use tessera_common::store::{SharedStore, Txn};
use tessera_common::suppressions::Suppressions;
use tessera_common::topics::{Routes, Topics};
use tessera_common::vault::Vault;
use tessera_common::{Error, Result};

use crate::graph::{Changes, Fact, Graph};
use crate::rules::Rules;

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let listener = admin::bind(&config.identity.http_listen).await?;
    run_with_listener(config, listener, shutdown).await
}

pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let rules = Arc::new(Rules::load(&config.identity.rules_file)?);
    info!(
        identifier_types = rules.identifiers.len(),
        fuzzy = rules.fuzzy.is_some(),
        "identity rules loaded"
    );
    let topics = Topics::new(&config.topics);
    let produced = [
        topics.ingested(),
        topics.commands(),
        topics.resolved(),
        topics.merges(),
        topics.splits(),
        topics.deadletter(),
    ];
    let parts = service::prepare(
        &config,
        "identity",
        &config.identity.state_dir,
        &produced,
        &shutdown,
    )
    .await?;
    kafka::ensure_topics(
        &config.kafka,
        &config.topics,
        &[(topics.matches(), TopicKind::Erasable)],
    )
    .await?;
    load_matcher_log(&config, &topics, &parts.store, &shutdown).await?;
    // Identity runs one instance: it sweeps the deployment's expired subject keys.
    service::sweep_expired_keys(parts.vault.clone(), shutdown.clone());
    let mut processor = IdentityProcessor::new(topics.clone(), rules.clone(), &parts.admin);
    processor.vault = Some(parts.vault.clone());
    processor.suppressed = Suppressions::follow(
        &config.kafka,
        &topics.suppressions(),
        "tessera-identity",
        shutdown.clone(),
    )
    .await?;
    let spec = RunnerSpec {
        // The graph spans every partition: one instance consumes them all.
        sole_consumer: true,
        ..RunnerSpec::new(
            "identity",
            &topics,
            vec![topics.ingested(), topics.commands()],
        )
    };
    let state = api::ApiState {
        store: parts.store.clone(),
        producer: parts.producer.clone(),
        rules,
        commands_topic: topics.commands(),
        audit: tessera_common::audit::Audit::new(parts.producer.clone(), &topics, "identity"),
        vault: parts.vault.clone(),
        reports: reports::Reports::follow(
            &config.kafka,
            &topics.privacy_reports(),
            shutdown.clone(),
        )
        .await?,
        reports_topic: topics.privacy_reports(),
        labels: config.privacy.clone(),
    };
    let routes = service::ApiRoutes {
        api: api::router(state.clone()),
        privacy: privacy_api::router(state),
    };
    service::run(&config, parts, listener, routes, spec, processor, shutdown).await
}

/// Seeds a new store from the fuzzy matcher's log (`identity.matches`), once, before its
/// first event: a store rebuilt by replay then decides as the original run did
/// ([`fuzzy::log`]).
async fn load_matcher_log(
    config: &Config,
    topics: &Topics,
    store: &SharedStore,
    shutdown: &CancellationToken,
) -> Result<()> {
    if fuzzy::log::is_loaded(store.as_ref())? {
        return Ok(());
    }
    let failed: Arc<std::sync::Mutex<Option<Error>>> = Arc::default();
    let (st, fail) = (store.clone(), failed.clone());
    let done = shutdown.child_token();
    tessera_common::table::follow(
        &config.kafka,
        &topics.matches(),
        "tessera-identity-matches",
        move |m| {
            if let Err(e) = fuzzy::log::stage(
                st.as_ref(),
                m.key.as_deref().unwrap_or_default(),
                m.payload.as_deref(),
            ) {
                fail.lock().expect("load errors").get_or_insert(e);
            }
        },
        done.clone(),
    )
    .await?;
    done.cancel();
    if let Some(e) = failed.lock().expect("load errors").take() {
        return Err(e);
    }
    let counts = fuzzy::log::finish_load(store.as_ref())?;
    info!(
        records = counts.records,
        versions = counts.versions,
        "fuzzy matcher's log loaded into a new store"
    );
    Ok(())
}

/// What resolving one event did.
#[derive(Debug, Default)]
pub struct Resolution {
    pub profile_id: String,
    /// The event's identifiers that belong to its profile.
    pub identifiers: Vec<Identifier>,
    pub changes: Changes,
    pub blocked: Vec<String>,
    pub fuzzy_compared: usize,
    pub fuzzy_oversized_blocks: usize,
    pub fuzzy_names_only: usize,
    /// Records for the fuzzy matcher's log (`identity.matches`).
    pub fuzzy_log: Vec<fuzzy::log::LogRecord>,
}

/// Resolves one event: records its fact (and fuzzy facts), updates the graph, and
/// answers with its profile. Deterministic in the set of events applied so far.
pub fn resolve_event(
    rules: &Rules,
    txn: &mut Txn<'_>,
    event: &IngestedEvent,
    payload: &Value,
) -> Result<Resolution> {
    let (ids, blocked) = event_identifiers(rules, event, payload);
    resolve_identifiers(rules, txn, event, payload, ids, blocked, false)
}

/// An event's identifiers as the rules extract them (with an alias's previousId), and
/// the types of those refused by the blocked-value rules.
pub fn event_identifiers(
    rules: &Rules,
    event: &IngestedEvent,
    payload: &Value,
) -> (Vec<Identifier>, Vec<String>) {
    let (mut ids, blocked) = rules.extract(payload);
    if event.kind == "alias" {
        // previousId is the id the user was known by before: an anonymous id.
        let prev = match &payload["previousId"] {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        if let Some(v) = prev.and_then(|p| rules.normalise("anonymous_id", &p))
            && !rules.is_blocked(&v)
        {
            let i = Identifier {
                kind: "anonymous_id".into(),
                value: v,
            };
            if !ids.contains(&i) {
                ids.push(i);
            }
        }
    }
    (ids, blocked)
}

/// [`resolve_event`] with the event's identifiers already extracted; `replayed`: the
/// event is replayed to rebuild the state (fuzzy decisions come from the matcher's log).
pub fn resolve_identifiers(
    rules: &Rules,
    txn: &mut Txn<'_>,
    event: &IngestedEvent,
    payload: &Value,
    ids: Vec<Identifier>,
    blocked: Vec<String>,
    replayed: bool,
) -> Result<Resolution> {
    let g = Graph::new(rules, event.received_at);
    let mut res = Resolution {
        blocked,
        ..Default::default()
    };
    let Some(first) = ids.first().cloned() else {
        // Every identifier was blocked: a profile of its own, keyed by the message.
        res.profile_id = deterministic_id("profile-unidentified", &[&event.message_id]);
        return Ok(res);
    };
    let fact = Fact::new(
        rules,
        &ids,
        event.event_time,
        &event.message_id,
        &event.source,
        None,
    );
    res.changes = g.add_fact(txn, fact)?;
    if let Some(f) = &rules.fuzzy {
        let fields = rules.fuzzy_fields(payload);
        if fields.len() >= 2 {
            let rec = fuzzy::FuzzyRecord::new(
                &first,
                fields,
                event.event_time,
                &event.message_id,
                &event.source,
            );
            let linked = |txn: &Txn<'_>, a: &Identifier, b: &Identifier| -> Result<bool> {
                Ok(graph::lookup(txn, a)?.is_some_and(|p| {
                    graph::lookup(txn, b).ok().flatten().as_deref() == Some(p.as_str())
                }))
            };
            let (rec, outcome) = fuzzy::upsert_and_match(txn, f, rec, &linked, replayed)?;
            res.fuzzy_log = outcome.log;
            res.fuzzy_compared = outcome.compared;
            res.fuzzy_oversized_blocks = outcome.oversized_blocks;
            res.fuzzy_names_only = outcome.names_only;
            for m in outcome.matches {
                // The link exists from when the later of the two records was seen.
                let (t, msg) = std::cmp::max((rec.t, &rec.msg), (m.other.t, &m.other.msg));
                let mut link = Fact::new(
                    rules,
                    &[rec.anchor.clone(), m.other.anchor.clone()],
                    t,
                    msg,
                    &event.source,
                    Some((m.rule, m.score)),
                );
                link.explain = m.explain;
                res.changes.extend(g.add_fact(txn, link)?);
            }
        }
    }
    res.profile_id = graph::lookup(txn, &first)?.unwrap_or_default();
    let mut rest = ids.into_iter();
    res.identifiers.extend(rest.next());
    for i in rest {
        if graph::lookup(txn, &i)?.as_deref() == Some(res.profile_id.as_str()) {
            res.identifiers.push(i);
        }
    }
    Ok(res)
}

/// What a record identity consumes is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Input {
    Events,
    Commands,
}

pub struct IdentityProcessor {
    topics: Topics,
    /// The input topics, resolved once.
    inputs: Routes<Input>,
    rules: Arc<Rules>,
    /// The subject keys, to name the keys an erasure destroys.
    pub vault: Option<Arc<Vault>>,
    /// Suppressed identifiers (the `privacy.suppressions` table).
    pub suppressed: Suppressions,
    dropped: IntCounterVec,
    privacy: IntCounterVec,
    resolved: IntCounter,
    merges: IntCounterVec,
    splits: IntCounter,
    created: IntCounter,
    blocked: IntCounterVec,
    recomputed: IntCounter,
    too_large: IntCounter,
    fuzzy_compared: IntCounter,
    fuzzy_oversized: IntCounter,
    fuzzy_names_only: IntCounter,
    commands: IntCounterVec,
    undecodable: IntCounterVec,
    latency: Histogram,
}

fn counter(admin: &Admin, name: &str, help: &str) -> IntCounter {
    admin.register(&IntCounter::new(name, help).expect("valid metric"))
}
fn counter_vec(admin: &Admin, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    admin.register(&IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

impl IdentityProcessor {
    pub fn new(topics: Topics, rules: Arc<Rules>, admin: &Admin) -> Self {
        IdentityProcessor {
            inputs: Routes::new([
                (topics.ingested(), Input::Events),
                (topics.commands(), Input::Commands),
            ]),
            topics,
            rules,
            vault: None,
            suppressed: Suppressions::default(),
            dropped: counter_vec(
                admin,
                "tessera_identity_events_dropped_total",
                "Events not resolved, by reason (suppressed: they carry a suppressed identifier)",
                &["reason"],
            ),
            privacy: counter_vec(
                admin,
                "tessera_identity_privacy_requests_total",
                "Privacy requests applied to the graph, by action and outcome (done, not_found)",
                &["action", "outcome"],
            ),
            resolved: counter(
                admin,
                "tessera_identity_events_resolved_total",
                "Events resolved to a profile",
            ),
            merges: counter_vec(
                admin,
                "tessera_identity_merges_total",
                "Profiles merged into another, by what linked them (identifier, or the fuzzy rule)",
                &["cause"],
            ),
            splits: counter(
                admin,
                "tessera_identity_splits_total",
                "Profiles whose identifiers were split across profiles (un-merge, detach, late event)",
            ),
            created: counter(
                admin,
                "tessera_identity_profiles_created_total",
                "Profiles created",
            ),
            blocked: counter_vec(
                admin,
                "tessera_identity_blocked_identifiers_total",
                "Identifier values refused by the blocked-value rules",
                &["kind"],
            ),
            recomputed: counter(
                admin,
                "tessera_identity_recomputations_total",
                "Late events and commands that recomputed part of the graph",
            ),
            too_large: counter(
                admin,
                "tessera_identity_recompute_skipped_total",
                "Late events in a part of the graph too large to recompute, applied in arrival order",
            ),
            fuzzy_compared: counter(
                admin,
                "tessera_identity_fuzzy_comparisons_total",
                "Fuzzy candidate pairs scored",
            ),
            fuzzy_oversized: counter(
                admin,
                "tessera_identity_fuzzy_oversized_blocks_total",
                "Blocking keys skipped because too many records share them",
            ),
            fuzzy_names_only: counter(
                admin,
                "tessera_identity_fuzzy_names_only_total",
                "Fuzzy pairs likely enough to link but with no discriminating field in common (kept apart: names alone never link)",
            ),
            commands: counter_vec(
                admin,
                "tessera_identity_commands_total",
                "Un-merge and detach commands applied",
                &["action", "outcome"],
            ),
            undecodable: counter_vec(
                admin,
                "tessera_identity_records_deadlettered_total",
                "Input records that could not be decoded",
                &["topic"],
            ),
            latency: admin.register(
                &Histogram::with_opts(
                    HistogramOpts::new(
                        "tessera_identity_resolve_seconds",
                        "Time to resolve one event in the graph (state reads and writes, no Kafka)",
                    )
                    .buckets(vec![
                        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
                    ]),
                )
                .expect("valid metric"),
            ),
        }
    }

    /// The fuzzy matcher's log records (record keys, levels and weights: nobody's data).
    pub(crate) fn log_decisions(&self, records: Vec<fuzzy::log::LogRecord>, out: &mut Vec<Output>) {
        for (key, value) in records {
            out.push(Output::plain(self.topics.matches(), key, value));
        }
    }

    fn emit_changes(
        &self,
        changes: &Changes,
        cause: &str,
        event_time: i64,
        received_at: i64,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        self.created.inc_by(changes.created as u64);
        self.recomputed.inc_by(changes.recomputed as u64);
        self.too_large.inc_by(changes.too_large as u64);
        for m in &changes.merges {
            self.merges
                .with_label_values(&[m.rule.as_deref().unwrap_or("identifier")])
                .inc();
            info!(survivor = %m.survivor, merged = %m.merged, rule = ?m.rule, "profiles merged");
            out.push(Output::plain(
                self.topics.merges(),
                m.merged.clone().into_bytes(),
                m.to_avro()?,
            ));
        }
        for s in &changes.splits {
            self.splits.inc();
            let parts: Vec<String> = s
                .assignments
                .iter()
                .map(|(i, p)| format!("{}={}>{p}", i.kind, i.value))
                .collect();
            let mut id_parts: Vec<&str> = vec![&s.profile, cause];
            id_parts.extend(parts.iter().map(String::as_str));
            let split = ProfileSplit {
                split_id: deterministic_id("split", &id_parts),
                profile_id: s.profile.clone(),
                assignments: s
                    .assignments
                    .iter()
                    .map(|(i, p)| Assignment {
                        kind: i.kind.clone(),
                        value: i.value.clone(),
                        profile_id: p.clone(),
                    })
                    .collect(),
                cause: cause.to_string(),
                event_time,
                received_at,
            };
            info!(profile = %s.profile, parts = s.assignments.len(), "profile split");
            out.push(Output::sealed(
                self.topics.splits(),
                s.profile.clone().into_bytes(),
                split.to_avro()?,
                &s.profile,
            ));
        }
        Ok(())
    }

    fn on_event(
        &self,
        event: IngestedEvent,
        subject: Option<&str>,
        replayed: bool,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let payload: Value = event.payload_json();
        // Extracted once: for the suppression check and for resolving.
        let (ids, blocked) = event_identifiers(&self.rules, &event, &payload);
        if !self.suppressed.is_empty()
            && ids
                .iter()
                .any(|i| self.suppressed.contains(&graph::ident_hash(i)))
        {
            // Suppressed: neither linked nor passed on. Its visitor's key is
            // destroyed too (the record on events.ingested becomes noise) unless the
            // visitor is known: a shared device's other events stay readable.
            self.dropped.with_label_values(&["suppressed"]).inc();
            let visitor_known = ids
                .iter()
                .filter(|i| matches!(i.kind.as_str(), "anonymous_id" | "user_id"))
                .map(|i| graph::lookup(txn, i).map(|p| p.is_some()))
                .collect::<Result<Vec<bool>>>()?
                .contains(&true);
            if let Some(s) = subject
                && !visitor_known
            {
                self.destroy_keys(&[subject_hash(s)], event.received_at, out)?;
            }
            return Ok(());
        }
        let res = resolve_identifiers(&self.rules, txn, &event, &payload, ids, blocked, replayed)?;
        if let Some(s) = subject
            && !res.profile_id.is_empty()
        {
            graph::note_subject(txn, &res.profile_id, s)?;
        }
        self.latency.observe(started.elapsed().as_secs_f64());
        for kind in &res.blocked {
            self.blocked.with_label_values(&[kind.as_str()]).inc();
        }
        self.fuzzy_compared.inc_by(res.fuzzy_compared as u64);
        self.fuzzy_oversized
            .inc_by(res.fuzzy_oversized_blocks as u64);
        self.fuzzy_names_only.inc_by(res.fuzzy_names_only as u64);
        self.log_decisions(res.fuzzy_log, out);
        self.emit_changes(
            &res.changes,
            &event.message_id,
            event.event_time,
            event.received_at,
            out,
        )?;
        let resolved = ResolvedEvent {
            profile_id: res.profile_id.clone(),
            identifiers: res.identifiers,
            event,
        };
        out.push(Output::sealed(
            self.topics.resolved(),
            res.profile_id.clone().into_bytes(),
            resolved.to_avro()?,
            &res.profile_id,
        ));
        self.resolved.inc();
        Ok(())
    }

    fn on_command(
        &self,
        cmd: IdentityCommand,
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let g = Graph::new(&self.rules, cmd.requested_at);
        let at = (cmd.requested_at, cmd.command_id.as_str());
        let changes = match (cmd.action.as_str(), &cmd.merge_id, &cmd.kind, &cmd.value) {
            ("unmerge", Some(merge_id), _, _) => g.unmerge(
                txn,
                merge_id,
                (&cmd.survivor_identifiers, &cmd.merged_identifiers),
                at,
            )?,
            ("detach", _, Some(kind), Some(value)) => Some(g.detach(
                txn,
                &Identifier {
                    kind: kind.clone(),
                    value: value.clone(),
                },
                at,
            )?),
            _ => None,
        };
        let outcome = if changes.is_some() {
            "applied"
        } else {
            "refused"
        };
        self.commands
            .with_label_values(&[cmd.action.as_str(), outcome])
            .inc();
        match changes {
            Some(c) => {
                info!(command = %cmd.command_id, action = %cmd.action, splits = c.splits.len(), merges = c.merges.len(), "identity command applied");
                self.emit_changes(&c, &cmd.command_id, cmd.requested_at, cmd.requested_at, out)
            }
            None => {
                warn!(command = %cmd.command_id, action = %cmd.action, "identity command refused: unknown merge or incomplete command");
                Ok(())
            }
        }
    }
}

impl Processor for IdentityProcessor {
    fn process(&mut self, msg: &Message, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        let bytes = msg.payload.as_deref().unwrap_or_default();
        let key = msg.key.as_deref().map(String::from_utf8_lossy);
        let applied = match self.inputs.of(&msg.topic) {
            Some(Input::Commands) => {
                IdentityCommand::from_avro(bytes).map(|c| match c.action.as_str() {
                    "delete" | "suppress" | "unsuppress" | "export" => {
                        self.on_privacy(&c, key.as_deref().unwrap_or(&c.command_id), txn, out)
                    }
                    _ => self.on_command(c, txn, out),
                })
            }
            Some(Input::Events) => IngestedEvent::from_avro(bytes)
                .map(|e| self.on_event(e, key.as_deref(), msg.replayed, txn, out)),
            None => Err(Error::Internal(format!("unexpected topic {}", msg.topic))),
        };
        if runner::handled_or_dead_letter(&self.topics.deadletter(), msg, applied, out)? {
            self.undecodable
                .with_label_values(&[msg.topic.as_str()])
                .inc();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
