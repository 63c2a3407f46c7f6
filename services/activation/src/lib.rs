//! # tessera-activation
//!
//! Consumes `segments.membership` and `profiles.triggers` and writes what downstream
//! systems consume on `activation.<destination>`:
//! - audiences: for each destination that syncs a segment, a member becomes `add`, a
//!   former member `remove`, and a change of what the destination may see `update`. A
//!   membership record re-checks its segment's audiences, and those its segment
//!   suppresses, against the profile it carries, so a consent withdrawal (which profiles
//!   sends for every segment) or a suppression removes people at once and its end adds
//!   them back;
//! - triggers: each firing of a trigger a destination serves becomes a `send`.
//!
//! Every activation is checked at that moment ([`policy`]): consent per purpose and
//! channel, suppressions, a contact address, and for sends frequency caps. Payloads hold
//! only the fields the destination may receive, ad identifiers hashed by the
//! platform's rules ([`hashing`]). Every record has a deterministic `activation_id`,
//! the same after any replay, so downstream systems can de-duplicate.

pub mod hashing;
pub mod policy;
pub mod privacy;

use axum::Router;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use tessera_common::admin::{self, Admin};
use tessera_common::config::{
    ActivationConfig, Config, DestinationKind, PayloadFormat, PrivacyConfig,
};
use tessera_common::ids::deterministic_id;
use tessera_common::message::{Message, Output};
use tessera_common::records::{
    Activation, AvroRecord, MembershipChange, PrivacyAction, TriggerFired,
};
use tessera_common::runner::{self, Processor, RunnerSpec};
use tessera_common::store::Txn;
use tessera_common::topics::{Routes, Topics};
use tessera_common::{Error, Result, service};

use hashing::Platform;
use policy::{Destination, Outcome, Policy, Refusal, Sends, View};

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let listener = admin::bind(&config.activation.http_listen).await?;
    run_with_listener(config, listener, shutdown).await
}

pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let topics = Topics::new(&config.topics);
    let destinations = &config.activation.destinations;
    let mut needed = vec![topics.membership(), topics.triggers(), topics.deadletter()];
    needed.extend(destinations.iter().map(|d| topics.activation(&d.id)));
    let parts = service::prepare(
        &config,
        "activation",
        &config.activation.state_dir,
        &needed,
        &shutdown,
    )
    .await?;
    info!(destinations = destinations.len(), "destinations configured");
    let mut processor = ActivationProcessor::new(topics.clone(), &config.activation, &parts.admin)?;
    processor.labels = config.privacy.clone();
    let spec = RunnerSpec::new(
        "activation",
        &topics,
        vec![
            topics.membership(),
            topics.triggers(),
            topics.privacy_actions(),
        ],
    );
    service::run(
        &config,
        parts,
        listener,
        Router::new(),
        spec,
        processor,
        shutdown,
    )
    .await
}

/// Sends are remembered at least this long, to recognise a firing seen twice.
const REPEAT_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// What a record activation consumes is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Input {
    Membership,
    Triggers,
    PrivacyActions,
}

pub struct ActivationProcessor {
    topics: Topics,
    /// The input topics, resolved once.
    inputs: Routes<Input>,
    pub(crate) destinations: Vec<Destination>,
    /// Data classification: what each destination may receive of event properties.
    pub labels: PrivacyConfig,
    policy: Policy,
    region: phonenumber::country::Id,
    /// The longest frequency cap window, at least a day (older sends are forgotten).
    longest_cap: i64,
    activations: IntCounterVec,
    latency: HistogramVec,
}

impl ActivationProcessor {
    pub fn new(topics: Topics, cfg: &ActivationConfig, admin: &Admin) -> Result<Self> {
        let destinations = cfg
            .destinations
            .iter()
            .map(|d| Destination::new(d.clone(), topics.activation(&d.id)))
            .collect::<Result<Vec<_>>>()?;
        let global_cap = policy::cap(&cfg.frequency_cap)?;
        let longest_cap = destinations
            .iter()
            .filter_map(|d| d.cap)
            .chain(global_cap)
            .map(|(_, w)| w)
            .max()
            .unwrap_or(0)
            .max(REPEAT_WINDOW_MS);
        let region = cfg.phone_default_region.parse().map_err(|_| {
            Error::Config(format!(
                "activation.phone_default_region {:?} is not an ISO 3166 region code",
                cfg.phone_default_region
            ))
        })?;
        Ok(ActivationProcessor {
            inputs: Routes::new([
                (topics.membership(), Input::Membership),
                (topics.triggers(), Input::Triggers),
                (topics.privacy_actions(), Input::PrivacyActions),
            ]),
            topics,
            destinations,
            labels: PrivacyConfig::default(),
            policy: Policy {
                suppressions: cfg.suppressions.clone(),
                opt_in: cfg
                    .opt_in_purposes
                    .iter()
                    .map(|p| p.to_lowercase())
                    .collect(),
                global_cap,
            },
            region,
            longest_cap,
            activations: admin.register(
                &IntCounterVec::new(
                    Opts::new(
                        "tessera_activation_records_total",
                        "Activations by destination, action and outcome (sent, suppressed, \
                         no_consent, no_address, capped, unchanged)",
                    ),
                    &["destination", "action", "outcome"],
                )
                .unwrap(),
            ),
            latency: admin.register(
                &HistogramVec::new(
                    HistogramOpts::new(
                        "tessera_activation_event_to_activation_seconds",
                        "From ingest accepting the causing event (for a waiting trigger: \
                         its deadline) to the activation record",
                    )
                    .buckets(vec![
                        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                    ]),
                    &["source"],
                )
                .unwrap(),
            ),
        })
    }

    pub(crate) fn count(&self, d: &Destination, action: &str, outcome: &str) {
        self.activations
            .with_label_values(&[d.id(), action, outcome])
            .inc();
    }

    fn refused(&self, d: &Destination, action: &str, (outcome, why): &Refusal) {
        debug!(destination = d.id(), action, outcome = outcome.as_str(), reason = %why, "activation refused");
        self.count(d, action, outcome.as_str());
    }

    /// What a destination receives of a profile: the allowed fields, or for an ads
    /// destination the hashed identifiers among them.
    fn payload(&self, d: &Destination, fields: &Map<String, Value>) -> Map<String, Value> {
        let allowed = |f: &str| d.config.fields.iter().any(|x| x == f);
        let text = |f: &str| fields.get(f).and_then(Value::as_str).filter(|_| allowed(f));
        let (platform, email_key, phone_key) = match d.config.kind {
            DestinationKind::GoogleAds => (Platform::Google, "hashed_email", "hashed_phone_number"),
            DestinationKind::MetaAds => (Platform::Meta, "EMAIL", "PHONE"),
            _ => {
                return d
                    .config
                    .fields
                    .iter()
                    .filter_map(|f| fields.get(f).map(|v| (f.clone(), v.clone())))
                    .collect();
            }
        };
        let mut out = Map::new();
        if let Some(h) = text("email").and_then(hashing::email) {
            out.insert(email_key.into(), Value::String(h));
        }
        if let Some(h) = text("phone").and_then(|p| hashing::phone(platform, p, self.region)) {
            out.insert(phone_key.into(), Value::String(h));
        }
        out
    }

    /// An event's properties less those whose labels the destination does not allow.
    fn allowed_properties(&self, d: &Destination, properties: &Value) -> Value {
        match properties {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| d.config.allows(&self.labels.labels_of(k)))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// Consent, suppressions and an address; for ads, at least one usable identifier.
    fn allowed(
        &self,
        d: &Destination,
        v: &View,
    ) -> std::result::Result<(Value, Map<String, Value>), Refusal> {
        let consent = self.policy.check(d, v)?;
        let payload = self.payload(d, &v.fields);
        if d.config.kind.is_ads() && payload.is_empty() {
            return Err((Outcome::NoAddress, "no email or phone to match on".into()));
        }
        Ok((consent, payload))
    }

    /// The record for `d`, in its format; counted as sent.
    pub(crate) fn emit(
        &self,
        d: &Destination,
        o: Origin<'_>,
        action: &str,
        reason: String,
        consent: &Value,
        payload: &Map<String, Value>,
    ) -> Result<Output> {
        let a = Activation {
            activation_id: o.activation_id,
            destination: d.id().to_string(),
            kind: d.config.kind.as_str().to_string(),
            profile_id: o.profile_id.to_string(),
            action: action.to_string(),
            source: o.source.to_string(),
            source_id: o.source_id.to_string(),
            source_version: o.source_version,
            reason,
            consent: consent.to_string(),
            event_time: o.event_time,
            received_at: o.received_at,
            payload: Value::Object(payload.clone()).to_string(),
        };
        self.count(d, action, "sent");
        let latency_ms = (tessera_common::now_ms() - o.received_at).max(0);
        self.latency
            .with_label_values(&[o.source])
            .observe(latency_ms as f64 / 1000.0);
        let payload = match d.config.format {
            PayloadFormat::Json => a.to_json()?,
            PayloadFormat::Avro => a.to_avro()?,
        };
        // Destinations read their topic in clear: it is the hand-off.
        Ok(Output::plain(
            d.topic.clone(),
            a.profile_id.clone().into_bytes(),
            payload,
        ))
    }

    /// Brings the audiences this record can change in line with the profile it
    /// carries: members who may receive it are added (or updated when what the
    /// destination sees changed), the others removed.
    fn on_membership(
        &self,
        (m, view): (MembershipChange, View),
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if self.person_suppressed(txn, &m.profile_id, m.received_at, "add")? {
            return Ok(());
        }
        for d in &self.destinations {
            // Profiles sends a record for every segment of a profile whose fields or
            // consent changed, so only two kinds of audience can change here: this
            // segment's, and those this segment suppresses (a record of the first
            // schema tells only about its own segment).
            let suppresses = !m.is_legacy() && self.policy.suppresses(&m.segment_id, d.id());
            for seg in &d.config.segments {
                let about_this = &m.segment_id == seg;
                if !about_this && !suppresses {
                    continue;
                }
                // An exit record's own segment is left, whatever else it carries.
                let member = view.segments.contains(seg) && !(about_this && m.change == "exit");
                let sent = sent_key(d.id(), seg, &m.profile_id);
                let last = txn.get(&sent)?;
                let decision = match (member, &last) {
                    (false, None) => continue,
                    (false, Some(_)) => None,
                    // Added before and this record is about another segment: only
                    // whether it may still receive it matters (its fields come with
                    // this segment's own update records).
                    (true, Some(_)) if !about_this => match self.policy.check(d, &view) {
                        Ok(_) => continue,
                        Err(r) => Some(Err(r)),
                    },
                    (true, _) => Some(self.allowed(d, &view)),
                };
                let reason =
                    |what: &str| format!("segment {} {}: {}", m.segment_id, m.change, what);
                let origin = || Origin {
                    activation_id: deterministic_id("activation", &[d.id(), seg, &m.record_id]),
                    profile_id: &m.profile_id,
                    source: "segment",
                    source_id: seg,
                    source_version: m.segment_version,
                    event_time: m.event_time,
                    received_at: m.received_at,
                };
                match (decision, last) {
                    (Some(Ok((consent, payload))), last) => {
                        let body = Value::Object(payload.clone()).to_string();
                        let action = match &last {
                            None => "add",
                            Some(l) if l.as_slice() == body.as_bytes() => {
                                self.count(d, "update", "unchanged");
                                continue;
                            }
                            Some(_) => "update",
                        };
                        txn.put(sent, body.into_bytes());
                        let why = reason(&m.reason);
                        out.push(self.emit(d, origin(), action, why, &consent, &payload)?);
                    }
                    (Some(Err(refusal)), None) => {
                        if about_this && m.change != "update" {
                            self.refused(d, "add", &refusal);
                        }
                    }
                    (decision, Some(last)) => {
                        // No longer a member, or no longer allowed: remove, with what
                        // the destination last received (ads match on it).
                        let why = match &decision {
                            Some(Err((outcome, why))) => {
                                self.refused(d, "update", &(*outcome, why.clone()));
                                reason(&format!("{}: {why}", outcome.as_str()))
                            }
                            _ => reason(&m.reason),
                        };
                        txn.delete(sent);
                        let payload: Map<String, Value> =
                            serde_json::from_slice(&last).unwrap_or_default();
                        out.push(self.emit(d, origin(), "remove", why, &json!({}), &payload)?);
                    }
                    (None, None) => {}
                }
            }
        }
        Ok(())
    }

    /// A trigger firing becomes a `send` to each destination serving it, if consent,
    /// suppressions and the frequency caps allow.
    fn on_trigger(
        &self,
        (t, view): (TriggerFired, View),
        txn: &mut Txn<'_>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if self.person_suppressed(txn, &t.profile_id, t.received_at, "send")? {
            return Ok(());
        }
        let properties: Value = serde_json::from_str(&t.properties).unwrap_or(Value::Null);
        let key = sends_key(&t.profile_id);
        let mut sends: Sends = txn.get_json(&key)?.unwrap_or_default();
        let mut changed = false;
        for d in self
            .destinations
            .iter()
            .filter(|d| d.config.triggers.contains(&t.trigger_id))
        {
            let activation_id = deterministic_id("activation", &[d.id(), &t.record_id]);
            if sends.contains(&activation_id) {
                // The same firing again (an upstream replay): already sent.
                continue;
            }
            let (consent, mut payload) = match self.allowed(d, &view) {
                Ok(x) => x,
                Err(r) => {
                    self.refused(d, "send", &r);
                    continue;
                }
            };
            // Caps count by the firing's time, so a replay decides the same way.
            let at = t.received_at;
            if let Err(r) = sends.allows(d, self.policy.global_cap, at) {
                self.refused(d, "send", &r);
                continue;
            }
            sends.record(at, d.id(), &activation_id, self.longest_cap);
            changed = true;
            if !t.event.is_empty() {
                payload.insert(
                    "event".into(),
                    json!({"name": t.event, "properties": self.allowed_properties(d, &properties)}),
                );
            }
            let origin = Origin {
                activation_id,
                profile_id: &t.profile_id,
                source: "trigger",
                source_id: &t.trigger_id,
                source_version: t.trigger_version,
                event_time: t.event_time,
                received_at: t.received_at,
            };
            out.push(self.emit(d, origin, "send", t.reason.clone(), &consent, &payload)?);
        }
        if changed {
            txn.put_json(key, &sends)?;
        }
        Ok(())
    }
}

/// What an activation comes from: its id (derived from the destination and the input
/// record, so a replay repeats it) and the input record's profile, source and times.
pub(crate) struct Origin<'a> {
    pub activation_id: String,
    pub profile_id: &'a str,
    pub source: &'static str,
    pub source_id: &'a str,
    pub source_version: i32,
    pub event_time: i64,
    pub received_at: i64,
}

/// What a destination last received for a profile in a segment.
pub(crate) fn sent_key(destination: &str, segment: &str, profile: &str) -> Vec<u8> {
    format!("sent/{destination}/{segment}/{profile}").into_bytes()
}

/// A profile's recent sends (frequency caps).
pub(crate) fn sends_key(profile: &str) -> Vec<u8> {
    format!("sends/{profile}").into_bytes()
}

impl Processor for ActivationProcessor {
    fn process(&mut self, msg: &Message, txn: &mut Txn<'_>, out: &mut Vec<Output>) -> Result<()> {
        let bytes = msg.payload.as_deref().unwrap_or_default();
        // Undecodable or unreadable records go to the dead-letter topic with the reason.
        let handled = match self.inputs.of(&msg.topic) {
            Some(Input::Membership) => MembershipChange::from_avro(bytes)
                .and_then(|m| {
                    if !matches!(m.change.as_str(), "enter" | "exit" | "update") {
                        return Err(Error::Data(format!(
                            "unknown membership change {:?}",
                            m.change
                        )));
                    }
                    let mut view = View::parse(&m.traits, &m.consent, &m.segments)?;
                    if m.is_legacy() && m.change != "exit" {
                        view.segments.insert(m.segment_id.clone());
                    }
                    Ok((m, view))
                })
                .map(|x| self.on_membership(x, txn, out)),
            Some(Input::Triggers) => TriggerFired::from_avro(bytes)
                .and_then(|t| {
                    let view = View::parse(&t.traits, &t.consent, &t.segments)?;
                    Ok((t, view))
                })
                .map(|x| self.on_trigger(x, txn, out)),
            Some(Input::PrivacyActions) => {
                PrivacyAction::from_avro(bytes).map(|a| self.on_privacy(a, txn, out))
            }
            None => Err(Error::Internal(format!("unexpected topic {}", msg.topic))),
        };
        runner::handled_or_dead_letter(&self.topics.deadletter(), msg, handled, out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_common::store::{MemStore, Store};

    fn processor() -> ActivationProcessor {
        let cfg: ActivationConfig = serde_json::from_value(json!({
            "http_listen": "127.0.0.1:0",
            "state_dir": "/unused",
            "destinations": [
                {"id": "news", "kind": "email", "segments": ["buyers"],
                 "fields": ["email", "first_name"]},
                {"id": "ads", "kind": "google_ads", "segments": ["buyers"],
                 "fields": ["email", "phone"]},
                {"id": "meta", "kind": "meta_ads", "segments": ["buyers"],
                 "fields": ["email", "phone"], "format": "avro"},
                {"id": "cart", "kind": "email", "triggers": ["abandoned-cart"],
                 "fields": ["email"], "frequency_cap": {"max": 1, "per": "1h"}},
            ],
            "suppressions": [{"id": "no-ads-for-recent-buyers", "segment": "recent-buyers",
                              "destinations": ["ads", "meta"]}],
            "opt_in_purposes": ["advertising"],
            "frequency_cap": {"max": 5, "per": "24h"},
            "phone_default_region": "US",
        }))
        .unwrap();
        let topics = Topics::new(&Config::demo().topics);
        ActivationProcessor::new(topics, &cfg, &Admin::new()).unwrap()
    }

    fn membership(
        rid: &str,
        change: &str,
        traits: Value,
        consent: Value,
        segs: &[&str],
    ) -> Message {
        let m = MembershipChange {
            record_id: rid.into(),
            profile_id: "p1".into(),
            segment_id: "buyers".into(),
            segment_version: 1,
            change: change.into(),
            reason: "event: event_count(Order Completed)".into(),
            event_time: 1,
            received_at: 2,
            traits: traits.to_string(),
            consent: consent.to_string(),
            segments: segs.iter().map(|s| s.to_string()).collect(),
        };
        Message {
            topic: "tessera.segments.membership".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(m.to_avro().unwrap()),
            timestamp_ms: None,
            replayed: false,
        }
    }

    fn step(p: &mut ActivationProcessor, s: &MemStore, m: &Message) -> Vec<Activation> {
        let mut out = Vec::new();
        let mut txn = Txn::new(s);
        p.process(m, &mut txn, &mut out).unwrap();
        s.write(txn.into_batch()).unwrap();
        out.iter()
            .map(|o| Activation::decode(&o.payload).unwrap())
            .collect()
    }

    fn actions(v: &[Activation]) -> Vec<(String, String)> {
        v.iter()
            .map(|a| (a.destination.clone(), a.action.clone()))
            .collect()
    }

    fn pair(d: &str, a: &str) -> (String, String) {
        (d.to_string(), a.to_string())
    }

    #[test]
    fn an_audience_gets_only_allowed_fields_updates_only_when_they_change_and_ids_are_stable() {
        let mut p = processor();
        let s = MemStore::default();
        let traits = json!({"email": "a@b.co", "phone": "+14155552671", "first_name": "Ann"});
        let enter = membership("r1", "enter", traits.clone(), json!({}), &["buyers"]);
        let out = step(&mut p, &s, &enter);
        // Advertising is opt-in and was never granted: only the email destination adds.
        assert_eq!(actions(&out), vec![pair("news", "add")]);
        assert_eq!(out[0].payload, r#"{"email":"a@b.co","first_name":"Ann"}"#);
        assert_eq!(out[0].source_id, "buyers");
        assert_eq!(
            out[0].consent,
            r#"{"marketing":{"decision":"default","granted":true,"note":"opt-out purpose, never refused"}}"#
        );
        // The same record again (a replay) repeats the id.
        let again = step(&mut processor(), &MemStore::default(), &enter);
        assert_eq!(again[0].activation_id, out[0].activation_id);
        // A change the destination cannot see sends nothing; one it can, an update.
        let phone = json!({"email": "a@b.co", "phone": "+1", "first_name": "Ann"});
        assert!(
            step(
                &mut p,
                &s,
                &membership("r2", "update", phone, json!({}), &["buyers"])
            )
            .is_empty()
        );
        let renamed = json!({"email": "a@b.co", "first_name": "Anne"});
        let out = step(
            &mut p,
            &s,
            &membership("r3", "update", renamed, json!({}), &["buyers"]),
        );
        assert_eq!(actions(&out), vec![pair("news", "update")]);
    }

    #[test]
    fn ads_audiences_follow_consent_and_suppressions_with_hashed_identifiers() {
        let mut p = processor();
        let s = MemStore::default();
        let traits = json!({"email": " John_Smith@gmail.com", "phone": "(650)555-1212"});
        let yes = json!({"Advertising": {"granted": true, "event_time": 1, "source": "web", "via": "context.consent"}});
        let out = step(
            &mut p,
            &s,
            &membership("r1", "enter", traits.clone(), yes.clone(), &["buyers"]),
        );
        assert_eq!(
            actions(&out),
            vec![pair("news", "add"), pair("ads", "add"), pair("meta", "add")]
        );
        let google: Value = serde_json::from_str(&out[1].payload).unwrap();
        assert_eq!(
            google["hashed_email"],
            "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
        );
        assert_eq!(
            google["hashed_phone_number"],
            hashing::sha256_hex("+16505551212")
        );
        let meta: Value = serde_json::from_str(&out[2].payload).unwrap();
        assert_eq!(
            meta["PHONE"],
            "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
        );
        assert!(out[1].consent.contains("advertising"), "{}", out[1].consent);
        // Buying puts the person in recent-buyers (another segment's record): both ads
        // audiences remove them at once, the email audience stays.
        let mut rec = membership(
            "r2",
            "enter",
            traits.clone(),
            yes.clone(),
            &["buyers", "recent-buyers"],
        );
        let mut m = MembershipChange::from_avro(rec.payload.as_ref().unwrap()).unwrap();
        m.segment_id = "recent-buyers".into();
        rec.payload = Some(m.to_avro().unwrap());
        let out = step(&mut p, &s, &rec);
        assert_eq!(
            actions(&out),
            vec![pair("ads", "remove"), pair("meta", "remove")]
        );
        assert!(out[0].reason.contains("suppressed"), "{}", out[0].reason);
        let removed: Value = serde_json::from_str(&out[0].payload).unwrap();
        assert_eq!(
            removed["hashed_email"], google["hashed_email"],
            "a remove carries what was added"
        );
        // Leaving recent-buyers adds them back; withdrawing consent removes them.
        let out = step(
            &mut p,
            &s,
            &membership("r3", "update", traits.clone(), yes, &["buyers"]),
        );
        assert_eq!(actions(&out), vec![pair("ads", "add"), pair("meta", "add")]);
        let no = json!({"advertising": {"granted": false, "event_time": 9, "source": "web", "via": "context.consent"}});
        let out = step(
            &mut p,
            &s,
            &membership("r4", "update", traits, no, &["buyers"]),
        );
        assert_eq!(
            actions(&out),
            vec![pair("ads", "remove"), pair("meta", "remove")]
        );
        assert!(out[0].reason.contains("no_consent"), "{}", out[0].reason);
        assert_eq!(
            p.activations
                .with_label_values(&["ads", "update", "no_consent"])
                .get(),
            1
        );
        assert_eq!(
            p.activations
                .with_label_values(&["ads", "update", "suppressed"])
                .get(),
            1
        );
    }

    fn fired(rid: &str, at: i64, consent: Value) -> Message {
        let t = TriggerFired {
            record_id: rid.into(),
            profile_id: "p1".into(),
            trigger_id: "abandoned-cart".into(),
            trigger_version: 1,
            reason: "event Cart Viewed, then no Order Completed within 1h: deadline reached".into(),
            event_time: at,
            received_at: at,
            event: "Cart Viewed".into(),
            properties: r#"{"cart_id":"c1","medical_condition":"asthma"}"#.into(),
            traits: r#"{"email":"a@b.co","phone":"+1"}"#.into(),
            consent: consent.to_string(),
            segments: vec![],
        };
        Message {
            topic: "tessera.profiles.triggers".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(t.to_avro().unwrap()),
            timestamp_ms: None,
            replayed: false,
        }
    }

    #[test]
    fn trigger_sends_respect_consent_and_frequency_caps_and_are_sent_once() {
        let mut p = processor();
        // A sensitive property never reaches a destination that does not allow the label.
        p.labels = Config::demo().privacy;
        let s = MemStore::default();
        let out = step(&mut p, &s, &fired("f1", 1_000, json!({})));
        assert_eq!(actions(&out), vec![pair("cart", "send")]);
        let payload: Value = serde_json::from_str(&out[0].payload).unwrap();
        assert_eq!(
            payload,
            json!({"email": "a@b.co", "event": {"name": "Cart Viewed", "properties": {"cart_id": "c1"}}})
        );
        // The same firing again is not sent twice.
        assert!(step(&mut p, &s, &fired("f1", 1_000, json!({}))).is_empty());
        // Another within the hour is capped; after it, sent.
        assert!(step(&mut p, &s, &fired("f2", 2_000, json!({}))).is_empty());
        assert_eq!(
            p.activations
                .with_label_values(&["cart", "send", "capped"])
                .get(),
            1
        );
        assert_eq!(
            step(&mut p, &s, &fired("f3", 3_700_000, json!({}))).len(),
            1
        );
        // Marketing refused by email: nothing.
        let no = json!({"marketing.email": {"granted": false, "event_time": 5}});
        assert!(step(&mut p, &s, &fired("f4", 9_000_000, no)).is_empty());
        assert_eq!(
            p.activations
                .with_label_values(&["cart", "send", "no_consent"])
                .get(),
            1
        );
    }

    #[test]
    fn records_are_json_by_default_and_avro_when_configured() {
        let mut p = processor();
        let s = MemStore::default();
        let yes = json!({"advertising": {"granted": true, "event_time": 1}});
        let enter = membership("r1", "enter", json!({"email": "a@b.co"}), yes, &["buyers"]);
        let mut out = Vec::new();
        p.process(&enter, &mut Txn::new(&s), &mut out).unwrap();
        let by_topic = |t: &str| out.iter().find(|o| o.topic == t).unwrap().payload.clone();
        let json = by_topic("tessera.activation.ads");
        assert_eq!(json[0], b'{');
        let v: Value = serde_json::from_slice(&json).unwrap();
        assert!(v["payload"]["hashed_email"].is_string(), "{v}");
        let avro = by_topic("tessera.activation.meta");
        assert_eq!(&avro[..2], &[0xC3, 0x01], "Avro single-object encoding");
        assert_eq!(Activation::from_avro(&avro).unwrap().destination, "meta");
    }

    /// Records written before membership carried the profile's segments and consent (a
    /// rolling upgrade) act on their own segment only.
    #[test]
    fn a_record_of_the_first_schema_acts_on_its_own_segment_only() {
        let mut p = processor();
        let s = MemStore::default();
        let legacy = |rid: &str, segment: &str, change: &str| {
            let m = MembershipChange {
                record_id: rid.into(),
                profile_id: "p1".into(),
                segment_id: segment.into(),
                segment_version: 1,
                change: change.into(),
                reason: "old".into(),
                event_time: 1,
                received_at: 2,
                traits: r#"{"email":"a@b.co"}"#.into(),
                consent: String::new(),
                segments: vec![],
            };
            Message {
                topic: "tessera.segments.membership".into(),
                partition: 0,
                offset: 0,
                key: None,
                payload: Some(m.to_avro().unwrap()),
                timestamp_ms: None,
                replayed: false,
            }
        };
        let out = step(&mut p, &s, &legacy("r1", "buyers", "enter"));
        assert_eq!(actions(&out), vec![pair("news", "add")]);
        assert!(step(&mut p, &s, &legacy("r2", "other", "exit")).is_empty());
        let out = step(&mut p, &s, &legacy("r3", "buyers", "exit"));
        assert_eq!(actions(&out), vec![pair("news", "remove")]);
    }

    #[test]
    fn unreadable_records_are_dead_lettered_with_the_reason() {
        let mut p = processor();
        let s = MemStore::default();
        let bad = membership("r1", "teleport", json!({}), json!({}), &[]);
        let mut out = Vec::new();
        p.process(&bad, &mut Txn::new(&s), &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "tessera.events.deadletter");
        let d = tessera_common::records::DeadLetter::from_avro(&out[0].payload).unwrap();
        assert!(d.reason.contains("teleport"), "{}", d.reason);
    }
}
