//! Configuration in layers: the embedded defaults (`default.toml`), in demo mode the demo
//! credentials (`demo.toml`), then an optional TOML file, then `TESSERA__SECTION__KEY`
//! environment variables (and `KAFKA_BOOTSTRAP`). Unknown keys are refused. The result is
//! passed explicitly; there is no global.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const DEFAULT_TOML: &str = include_str!("default.toml");
/// The shortest pseudonym secret accepted.
const MIN_PSEUDONYM_SECRET: usize = 32;

/// The demo credentials, a layer only in demo mode (`demo = true`).
pub const DEMO_TOML: &str = include_str!("demo.toml");
/// The secrets of `demo.toml`. They are public (the README prints them), so outside demo
/// mode a configuration holding any of them is refused.
pub const DEMO_SECRETS: [&str; 5] = [
    "demo-write-key",
    "demo-admin-token",
    "demo-privacy-token",
    "tessera-demo",
    crate::ids::DEMO_PSEUDONYM_SECRET,
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Demo mode, for a local run on one's own machine: the demo credentials of
    /// `demo.toml` are added and accepted. Off, a service refuses to start with them.
    #[serde(default)]
    pub demo: bool,
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub ingest: IngestConfig,
    pub identity: IdentityConfig,
    pub profiles: ProfilesConfig,
    pub activation: ActivationConfig,
    pub admin: AdminConfig,
    pub http: HttpConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
    pub console: ConsoleConfig,
}

/// The web console (services/console): where it listens, the services' APIs it uses
/// like any other client, who may log in, and how long a session lasts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub http_listen: String,
    pub ingest_url: String,
    pub identity_url: String,
    pub profiles_url: String,
    pub activation_url: String,
    /// The token the console presents to the services' APIs (one of `admin.tokens`).
    pub api_token: String,
    /// Production mode: the demo password, passwords under 12 characters and the demo
    /// API token are refused at start, and the session cookie is `Secure`.
    pub production: bool,
    pub users: Vec<ConsoleUser>,
    /// A session ends after this long without a request, and at the latest after
    /// `session_max_minutes`.
    pub session_idle_minutes: u64,
    pub session_max_minutes: u64,
    /// How often the charts' figures are read from the services, and how many readings
    /// each chart keeps.
    pub sample_every_ms: u64,
    pub keep_samples: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleUser {
    pub name: String,
    pub password: String,
}

/// Data classification: labels (`pii`, `sensitive`, ...) of profile fields and event
/// properties, by name. A destination receives a labelled field only if it allows the
/// label (`allow_labels`); an export names the labels of what it holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    #[serde(default)]
    pub labels: BTreeMap<String, Vec<String>>,
    /// The deployment's pseudonym secret: profile ids, the state's keys and the keys
    /// topic's names of people are keyed hashes under it ([`crate::ids`]), so that nobody
    /// without it can tell whose they are from an email. Random, at least 32 characters,
    /// the same in every service, and never changed (the keys topic records its
    /// fingerprint and a service with another one refuses to start).
    #[serde(default)]
    pub pseudonym_secret: String,
    /// A record sealed with a subject key that the keys topic does not hold and that was
    /// never erased means the keys topic lost records: the services hold there, unready
    /// (`tessera_<service>_missing_key_hold`), until the key is back. Set this only once
    /// the keys are known to be lost for good: such records are then skipped and counted
    /// (their data is lost). See the runbook, "Subject keys are missing".
    #[serde(default)]
    pub skip_missing_keys: bool,
    /// How many subjects' keys each service holds in memory; the others are read from
    /// its RocksDB when needed.
    pub key_cache_subjects: usize,
}

impl PrivacyConfig {
    /// The labels of a field (a trait, identifier or property name).
    pub fn labels_of(&self, field: &str) -> Vec<&str> {
        self.labels
            .iter()
            .filter(|(_, fields)| fields.iter().any(|f| f == field))
            .map(|(label, _)| label.as_str())
            .collect()
    }
}

/// Limits of every service's HTTP server, against slow or oversized clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// A connection whose request headers are not complete within this is closed.
    pub header_read_timeout_ms: u64,
    /// Request headers larger than this (bytes) are refused (431) or the connection closed.
    pub max_header_bytes: usize,
    /// A request body must arrive whole within this (ingest answers 408), and no gap
    /// between its parts may be longer.
    pub body_timeout_ms: u64,
}

/// Credentials of the services' own APIs (profiles, definitions, identity), apart from
/// the ingest write keys. Requests carry `Authorization: Bearer <token>`; the token's
/// name is who the audit trail records. No token configured: every API request is
/// refused (the health, readiness and metrics endpoints stay open).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub tokens: Vec<ApiToken>,
    /// Credentials of the privacy API alone (a data-protection officer's tooling), so
    /// holders of an admin token cannot erase or export people, and the reverse.
    #[serde(default)]
    pub privacy_tokens: Vec<ApiToken>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub name: String,
    /// At least 16 characters.
    pub token: String,
    /// Whether its holder may act for someone else (`X-On-Behalf-Of`, which the audit
    /// trail records): the console's token does, for its logged-in users. Others are
    /// refused (403) when they name someone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delegate: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap: String,
    pub fetch_wait_max_ms: u32,
    pub linger_ms: u32,
    pub message_timeout_ms: u32,
    /// Static group membership: a stable name for this instance (a StatefulSet pod name).
    /// A restarted instance with the same name gets its partitions back at once instead
    /// of after the session timeout. Each service appends its own name. Unset: dynamic.
    #[serde(default)]
    pub group_instance_id: Option<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    pub prefix: String,
    pub create: bool,
    pub partitions: i32,
    pub replication_factor: i32,
    pub events_retention_ms: i64,
    /// How long the audit trail (`<prefix>audit`) is kept.
    pub audit_retention_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    pub write_key: String,
    /// Keys still accepted while clients move to `write_key` (a rotation); requests with
    /// them are counted, so an operator sees when the last client moved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_write_keys: Vec<String>,
    /// A disabled source is refused with 403.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Events per second the source may send, with bursts of one second's worth;
    /// beyond it requests are refused with 429 and `Retry-After`. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_events_per_second: Option<u32>,
}

fn enabled() -> bool {
    true
}

impl SourceConfig {
    /// A source with one key, enabled, without a rate limit.
    pub fn new(name: &str, write_key: &str) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            write_key: write_key.into(),
            previous_write_keys: Vec::new(),
            enabled: true,
            max_events_per_second: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub http_listen: String,
    pub consume_raw_topic: bool,
    pub raw_topic_source: String,
    pub max_event_bytes: usize,
    pub max_request_bytes: usize,
    pub max_batch_events: usize,
    pub max_depth: usize,
    pub max_string_bytes: usize,
    pub future_tolerance_ms: i64,
    /// Requests processed at once, once their bodies are read; more are refused with 429
    /// and `Retry-After`. Bodies being read hold at most this many times
    /// `max_request_bytes` in all (429 beyond), so memory stays bounded however many
    /// clients push, and slow clients hold only the bytes they sent.
    pub max_concurrent_requests: usize,
    pub sources: Vec<SourceConfig>,
    /// Ingest's RocksDB: the subject keys it read (a cache of `privacy.keys`, rebuilt
    /// from the topic when empty, so a pod's scratch volume will do).
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub http_listen: String,
    pub state_dir: PathBuf,
    /// The identity rules (TOML, see services/identity/README.md); empty: the embedded
    /// default.
    #[serde(default)]
    pub rules_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilesConfig {
    pub http_listen: String,
    pub state_dir: PathBuf,
    pub definitions_dir: PathBuf,
    pub dedup_window_ms: i64,
    pub recent_events: usize,
    /// Events kept per profile (whole) to re-derive it after an un-merge.
    pub history_events: usize,
    /// How a trait's value is chosen among the values events gave it, per trait name;
    /// traits not listed take the most recent value by event time.
    #[serde(default)]
    pub trait_strategies: BTreeMap<String, TraitStrategy>,
    /// The base URLs of every profiles instance (this one included) when several run:
    /// each answers the API for the partitions it serves and asks the others for the
    /// rest. Empty: one instance, which answers for everyone.
    #[serde(default)]
    pub peers: Vec<String>,
    /// How often the predictive traits' models are fitted (ms).
    pub predict_refit_ms: i64,
    /// Customers with a purchase a model needs before it is fitted.
    pub predict_min_customers: u64,
}

/// How a trait's value is chosen. Each is independent of arrival order: ties go to the
/// more recent value (event time, then message id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum TraitStrategy {
    /// The value with the latest event time (the default).
    MostRecent,
    /// The earliest non-empty value (not null, "", [] or {}).
    FirstNonEmpty,
    /// The largest value (numbers by value, strings in order).
    Max,
    /// The smallest value.
    Min,
    /// The value seen most often.
    MostFrequent,
    /// The value from the highest-ranked source (first in `sources`; unlisted sources
    /// rank last), the most recent among equals.
    SourcePriority { sources: Vec<String> },
}

/// What a destination is; it decides the payload and the default consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    /// Contact fields, email channel, marketing purpose.
    Email,
    /// Contact fields, sms channel, marketing purpose.
    Sms,
    /// Contact fields, push channel, marketing purpose.
    Push,
    /// The listed fields as they are; no consent purpose unless configured.
    Webhook,
    /// Hashed identifiers by Google's rules (Customer Match), ads channel, advertising purpose.
    GoogleAds,
    /// Hashed identifiers by Meta's rules, ads channel, advertising purpose.
    MetaAds,
    /// The listed fields as they are; no consent purpose unless configured.
    Custom,
}

impl DestinationKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            DestinationKind::Email => "email",
            DestinationKind::Sms => "sms",
            DestinationKind::Push => "push",
            DestinationKind::Webhook => "webhook",
            DestinationKind::GoogleAds => "google_ads",
            DestinationKind::MetaAds => "meta_ads",
            DestinationKind::Custom => "custom",
        }
    }
    pub fn is_ads(&self) -> bool {
        matches!(self, DestinationKind::GoogleAds | DestinationKind::MetaAds)
    }
    /// The consent channel a destination of this kind reaches people through.
    pub fn default_channel(&self) -> Option<&'static str> {
        match self {
            DestinationKind::Email => Some("email"),
            DestinationKind::Sms => Some("sms"),
            DestinationKind::Push => Some("push"),
            DestinationKind::GoogleAds | DestinationKind::MetaAds => Some("ads"),
            DestinationKind::Webhook | DestinationKind::Custom => None,
        }
    }
    /// The consent purposes a destination of this kind needs.
    pub fn default_purposes(&self) -> Vec<String> {
        match self {
            DestinationKind::Email | DestinationKind::Sms | DestinationKind::Push => {
                vec!["marketing".into()]
            }
            DestinationKind::GoogleAds | DestinationKind::MetaAds => vec!["advertising".into()],
            DestinationKind::Webhook | DestinationKind::Custom => Vec::new(),
        }
    }
}

/// How records are written on a destination's topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// One JSON document per record (the default).
    #[default]
    Json,
    /// Avro single-object encoding, schema `tessera.activation.avsc`.
    Avro,
}

/// At most `max` messages per person within `per` (`30m`, `24h`, `7d`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    pub max: u32,
    pub per: String,
}

impl FrequencyCap {
    pub fn window_ms(&self) -> Result<i64> {
        let d = humantime::parse_duration(&self.per)
            .map_err(|e| Error::Config(format!("frequency cap window {:?}: {e}", self.per)))?;
        Ok(d.as_millis() as i64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Also the topic suffix: records go to `<prefix>activation.<id>`.
    pub id: String,
    #[serde(default = "default_kind")]
    pub kind: DestinationKind,
    #[serde(default)]
    pub format: PayloadFormat,
    /// Segments synced to this destination: enter → add, exit → remove.
    #[serde(default)]
    pub segments: Vec<String>,
    /// Triggers this destination serves: each firing → a `send`.
    #[serde(default)]
    pub triggers: Vec<String>,
    /// Profile fields (identifiers or traits) the destination may receive. Ads
    /// destinations receive only the hashed `email` and `phone` among them.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Consent purposes every activation needs; by default from the kind.
    #[serde(default)]
    pub purposes: Option<Vec<String>>,
    /// Consent channel; by default from the kind.
    #[serde(default)]
    pub channel: Option<String>,
    /// Messages (trigger sends) per person and window on this destination.
    #[serde(default)]
    pub frequency_cap: Option<FrequencyCap>,
    /// Labels ([`PrivacyConfig`]) of the data this destination may receive: a field or
    /// event property with another label never reaches it.
    #[serde(default = "default_allowed_labels")]
    pub allow_labels: Vec<String>,
}

fn default_allowed_labels() -> Vec<String> {
    vec!["pii".into()]
}

fn default_kind() -> DestinationKind {
    DestinationKind::Custom
}

impl DestinationConfig {
    /// Whether a field with these labels may reach this destination.
    pub fn allows(&self, labels: &[&str]) -> bool {
        labels
            .iter()
            .all(|l| self.allow_labels.iter().any(|a| a == l))
    }
    pub fn purposes(&self) -> Vec<String> {
        self.purposes
            .clone()
            .unwrap_or_else(|| self.kind.default_purposes())
    }
    pub fn channel(&self) -> Option<String> {
        self.channel
            .clone()
            .or_else(|| self.kind.default_channel().map(str::to_string))
    }
}

/// While a profile is in `segment`, the listed destinations (all when empty) receive
/// nothing from it: audiences remove it, triggers do not send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuppressionConfig {
    pub id: String,
    pub segment: String,
    #[serde(default)]
    pub destinations: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationConfig {
    pub http_listen: String,
    pub state_dir: PathBuf,
    pub destinations: Vec<DestinationConfig>,
    #[serde(default)]
    pub suppressions: Vec<SuppressionConfig>,
    /// Purposes that need a recorded grant: never answered counts as refused. Other
    /// purposes are allowed until refused.
    pub opt_in_purposes: Vec<String>,
    /// Messages per person and window across all destinations.
    #[serde(default)]
    pub frequency_cap: Option<FrequencyCap>,
    /// Region of phone numbers written without a country code (ads hashing).
    pub phone_default_region: String,
}

impl Config {
    /// Defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        Self::load_from(file, Env::prefixed("TESSERA__").split("__"), true)
    }

    /// Defaults and an optional file only, ignoring the environment (for tests).
    pub fn load_without_env(file: Option<&Path>) -> Result<Config> {
        Self::load_from(file, Env::prefixed("TESSERA_IGNORED_IN_TESTS__"), false)
    }

    /// The embedded defaults in demo mode (its public credentials and pseudonym secret):
    /// a configuration for unit tests and tools that run no deployment of their own.
    pub fn demo() -> Config {
        Self::parse("demo = true").expect("the demo configuration is valid")
    }

    /// Defaults and the TOML `text` only (no file, no environment).
    pub fn parse(text: &str) -> Result<Config> {
        Self::layered(|fig| fig.merge(Toml::string(text)))
    }

    fn load_from(file: Option<&Path>, env: Env, bootstrap_shorthand: bool) -> Result<Config> {
        if let Some(path) = file
            && !path.exists()
        {
            return Err(Error::Config(format!(
                "config file {} not found",
                path.display()
            )));
        }
        Self::layered(|mut fig| {
            if let Some(path) = file {
                fig = fig.merge(Toml::file(path));
            }
            fig = fig.merge(env.clone());
            if bootstrap_shorthand {
                fig = fig.merge(
                    Env::raw()
                        .only(&["KAFKA_BOOTSTRAP"])
                        .map(|_| "kafka.bootstrap".into()),
                );
            }
            fig
        })
    }

    /// The defaults, the demo credentials if the layers above them ask for demo mode, and
    /// those layers (`over`) on top.
    fn layered(over: impl Fn(Figment) -> Figment) -> Result<Config> {
        let defaults = || Figment::from(Toml::string(DEFAULT_TOML));
        let demo = over(defaults())
            .extract_inner::<bool>("demo")
            .map_err(|e| Error::Config(e.to_string()))?;
        let base = if demo {
            defaults().merge(Toml::string(DEMO_TOML))
        } else {
            defaults()
        };
        Self::extract(over(base))
    }

    fn extract(fig: Figment) -> Result<Config> {
        let cfg: Config = fig.extract().map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if let Some(place) = self.demo_secret_in_use() {
            return bad(format!(
                "{place} is a built-in demo credential, which works only in demo mode \
                 (demo = true, set by deploy/run.sh for a local run); configure your own"
            ));
        }
        if self.privacy.pseudonym_secret.chars().count() < MIN_PSEUDONYM_SECRET {
            return bad(format!(
                "privacy.pseudonym_secret must be a random secret of at least \
                 {MIN_PSEUDONYM_SECRET} characters, the same in every service and never \
                 changed: every id derived from personal data is keyed with it (e.g. \
                 `openssl rand -hex 32`; demo mode has one of its own)"
            ));
        }
        if self.kafka.bootstrap.trim().is_empty() {
            return bad("kafka.bootstrap is empty".into());
        }
        if self.topics.partitions < 1 || self.topics.replication_factor < 1 {
            return bad("topics.partitions and topics.replication_factor must be >= 1".into());
        }
        let mut keys = std::collections::HashSet::new();
        for s in &self.ingest.sources {
            if s.write_key.is_empty() || s.name.is_empty() {
                return bad("every ingest source needs a name and a write_key".into());
            }
            for k in std::iter::once(&s.write_key).chain(&s.previous_write_keys) {
                if k.is_empty() || !keys.insert(k) {
                    return bad(format!(
                        "ingest source {:?} repeats a write key (or has an empty one)",
                        s.name
                    ));
                }
            }
            if s.max_events_per_second == Some(0) {
                return bad(format!(
                    "ingest source {:?}: max_events_per_second must be at least 1",
                    s.name
                ));
            }
        }
        for d in &self.activation.destinations {
            if d.id.is_empty()
                || !d
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return bad(format!(
                    "destination id {:?} must be non-empty letters, digits, '-' or '_'",
                    d.id
                ));
            }
            if self
                .activation
                .destinations
                .iter()
                .filter(|x| x.id == d.id)
                .count()
                > 1
            {
                return bad(format!("destination {:?} is defined twice", d.id));
            }
            if d.segments.is_empty() && d.triggers.is_empty() {
                return bad(format!(
                    "destination {:?} syncs no segment and serves no trigger",
                    d.id
                ));
            }
            if let Some(c) = &d.frequency_cap {
                c.window_ms()?;
            }
            for f in &d.fields {
                let labels = self.privacy.labels_of(f);
                if !d.allows(&labels) {
                    return bad(format!(
                        "destination {:?} lists field {f:?}, labelled {labels:?}; it allows only {:?} (allow_labels)",
                        d.id, d.allow_labels
                    ));
                }
            }
        }
        for peer in &self.profiles.peers {
            if !(peer.starts_with("http://") || peer.starts_with("https://")) {
                return bad(format!(
                    "profiles.peers: {peer:?} is not an http:// or https:// base URL"
                ));
            }
        }
        if self.profiles.predict_refit_ms < 60_000 || self.profiles.predict_min_customers < 10 {
            return bad("profiles.predict_refit_ms must be at least 60000 (a minute) and profiles.predict_min_customers at least 10".into());
        }
        if self.http.max_header_bytes < 8192 || self.http.header_read_timeout_ms == 0 {
            return bad("http.max_header_bytes must be at least 8192 and http.header_read_timeout_ms above 0".into());
        }
        let mut names = std::collections::HashSet::new();
        let mut secrets = std::collections::HashSet::new();
        for t in self.admin.tokens.iter().chain(&self.admin.privacy_tokens) {
            if t.name.is_empty() || !names.insert(&t.name) {
                return bad(format!(
                    "admin token names must be set and unique ({:?})",
                    t.name
                ));
            }
            if t.token.len() < 16 || !secrets.insert(&t.token) {
                return bad(format!(
                    "admin token {:?} must be at least 16 characters and unique",
                    t.name
                ));
            }
        }
        if let Some(c) = &self.activation.frequency_cap {
            c.window_ms()?;
        }
        for s in &self.activation.suppressions {
            for d in &s.destinations {
                if !self.activation.destinations.iter().any(|x| &x.id == d) {
                    return bad(format!(
                        "suppression {:?} names destination {d:?}, which is not defined",
                        s.id
                    ));
                }
            }
        }
        Ok(())
    }

    /// Where this configuration uses a demo secret ([`DEMO_SECRETS`]) outside demo mode.
    fn demo_secret_in_use(&self) -> Option<String> {
        if self.demo {
            return None;
        }
        let demo = |secret: &str| DEMO_SECRETS.contains(&secret);
        for s in &self.ingest.sources {
            if std::iter::once(&s.write_key)
                .chain(&s.previous_write_keys)
                .any(|k| demo(k))
            {
                return Some(format!("the write key of ingest source {:?}", s.name));
            }
        }
        for (list, t) in (self.admin.tokens.iter().map(|t| ("admin.tokens", t))).chain(
            self.admin
                .privacy_tokens
                .iter()
                .map(|t| ("admin.privacy_tokens", t)),
        ) {
            if demo(&t.token) {
                return Some(format!("the token {:?} of {list}", t.name));
            }
        }
        if demo(&self.console.api_token) {
            return Some("console.api_token".into());
        }
        if demo(&self.privacy.pseudonym_secret) {
            return Some("privacy.pseudonym_secret".into());
        }
        if let Some(u) = self.console.users.iter().find(|u| demo(&u.password)) {
            return Some(format!("the password of console user {:?}", u.name));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a config file: `text` and a pseudonym secret (every deployment has one).
    fn write(f: &Path, text: &str) {
        let secret = "[privacy]\npseudonym_secret = \"0123456789abcdef0123456789abcdef\"\n";
        std::fs::write(f, format!("{text}\n{secret}")).unwrap();
    }

    #[test]
    fn embedded_defaults_need_only_a_pseudonym_secret() {
        let err = Config::load_without_env(None).unwrap_err().to_string();
        assert!(err.contains("privacy.pseudonym_secret"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        write(&f, "");
        let cfg = Config::load_without_env(Some(&f)).unwrap();
        assert_eq!(cfg.topics.prefix, "tessera.");
        assert_eq!(cfg.ingest.max_batch_events, 2500);
        assert!(!cfg.demo);
        assert!(cfg.ingest.sources.is_empty() && cfg.admin.tokens.is_empty());
        assert!(cfg.admin.privacy_tokens.is_empty() && cfg.console.users.is_empty());
    }

    #[test]
    fn demo_mode_adds_the_demo_credentials_and_every_one_is_listed() {
        let cfg = Config::parse("demo = true").unwrap();
        assert_eq!(cfg.ingest.sources[0].write_key, "demo-write-key");
        let secrets = [
            cfg.ingest.sources[0].write_key.as_str(),
            &cfg.admin.tokens[0].token,
            &cfg.admin.privacy_tokens[0].token,
            &cfg.console.api_token,
            &cfg.console.users[0].password,
            &cfg.privacy.pseudonym_secret,
        ];
        for s in secrets {
            assert!(
                DEMO_SECRETS.contains(&s),
                "{s} is refused outside demo mode"
            );
        }
    }

    /// The audit's finding: layers merge key by key, so a file that set only its own
    /// admin token kept the demo privacy token, and anyone who read the README could
    /// export or erase any person.
    #[test]
    fn outside_demo_mode_no_demo_credential_is_left_or_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        write(
            &f,
            "[admin]\ntokens = [{name=\"ops\", token=\"ops-token-0123456789\"}]\n",
        );
        let cfg = Config::load_without_env(Some(&f)).unwrap();
        assert!(cfg.admin.privacy_tokens.is_empty(), "no demo privacy token");
        assert!(cfg.ingest.sources.is_empty() && cfg.console.users.is_empty());
        assert!(cfg.console.api_token.is_empty());

        for (text, place) in [
            (
                "[admin]\nprivacy_tokens = [{name=\"dpo\", token=\"demo-privacy-token\"}]\n",
                "admin.privacy_tokens",
            ),
            (
                "[admin]\ntokens = [{name=\"x\", token=\"demo-admin-token\"}]\n",
                "admin.tokens",
            ),
            (
                "[ingest]\nsources = [{name=\"web\", write_key=\"k-new\", previous_write_keys=[\"demo-write-key\"]}]\n",
                "ingest source \"web\"",
            ),
            (
                "[console]\napi_token = \"demo-admin-token\"\n",
                "console.api_token",
            ),
            (
                "[console]\nusers = [{name=\"admin\", password=\"tessera-demo\"}]\n",
                "console user \"admin\"",
            ),
        ] {
            write(&f, text);
            let err = Config::load_without_env(Some(&f)).unwrap_err().to_string();
            assert!(err.contains(place) && err.contains("demo mode"), "{err}");
            write(&f, &format!("demo = true\n{text}"));
            Config::load_without_env(Some(&f)).expect("demo mode accepts them");
        }
        let demo_secret = format!(
            "[privacy]\npseudonym_secret = \"{}\"\n",
            crate::ids::DEMO_PSEUDONYM_SECRET
        );
        std::fs::write(&f, &demo_secret).unwrap();
        let err = Config::load_without_env(Some(&f)).unwrap_err().to_string();
        assert!(
            err.contains("privacy.pseudonym_secret") && err.contains("demo mode"),
            "{err}"
        );
        std::fs::write(&f, "[privacy]\npseudonym_secret = \"too short\"\n").unwrap();
        let err = Config::load_without_env(Some(&f)).unwrap_err().to_string();
        assert!(err.contains("at least 32"), "{err}");
    }

    #[test]
    fn file_overrides_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        write(&good, "[kafka]\nbootstrap = \"k:1\"\n");
        let cfg = Config::load_without_env(Some(&good)).unwrap();
        assert_eq!(cfg.kafka.bootstrap, "k:1");
        assert_eq!(cfg.kafka.linger_ms, 1, "untouched keys keep their defaults");

        let bad = dir.path().join("bad.toml");
        write(&bad, "[kafka]\nbootstrapp = \"k:1\"\n");
        let err = Config::load_without_env(Some(&bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bootstrapp"), "{err}");
    }

    #[test]
    fn duplicate_write_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        write(
            &f,
            "[ingest]\nsources = [{name=\"a\", write_key=\"k\"}, {name=\"b\", write_key=\"k\"}]\n",
        );
        let err = Config::load_without_env(Some(&f)).unwrap_err().to_string();
        assert!(err.contains("repeats a write key"), "{err}");
    }

    #[test]
    fn a_destination_gets_a_sensitive_field_only_if_it_allows_the_label() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let dest = |allow: &str| {
            format!(
                "[activation]\nsuppressions = []\ndestinations = [{{id=\"crm\", segments=[\"buyers\"], fields=[\"email\", \"health\"]{allow}}}]\n"
            )
        };
        write(&f, &dest(""));
        let err = Config::load_without_env(Some(&f)).unwrap_err().to_string();
        assert!(
            err.contains("\"health\"") && err.contains("sensitive"),
            "{err}"
        );
        write(&f, &dest(", allow_labels=[\"pii\", \"sensitive\"]"));
        let cfg = Config::load_without_env(Some(&f)).unwrap();
        assert_eq!(cfg.privacy.labels_of("email"), vec!["pii"]);
        assert!(cfg.privacy.labels_of("cart_id").is_empty());
    }

    #[test]
    fn privacy_tokens_are_apart_from_admin_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        write(
            &f,
            "[admin]\ntokens = [{name=\"a\", token=\"same-token-0123456789\"}]\nprivacy_tokens = [{name=\"b\", token=\"same-token-0123456789\"}]\n",
        );
        let err = Config::load_without_env(Some(&f)).unwrap_err().to_string();
        assert!(err.contains("unique"), "{err}");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = Config::load_without_env(Some(Path::new("/nonexistent/t.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");
    }
}
