//! Configuration in layers: the embedded defaults (`default.toml`), then an optional TOML
//! file, then `TESSERA__SECTION__KEY` environment variables (and `KAFKA_BOOTSTRAP`).
//! Unknown keys are refused. The result is passed explicitly; there is no global.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub ingest: IngestConfig,
    pub identity: IdentityConfig,
    pub profiles: ProfilesConfig,
    pub activation: ActivationConfig,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    pub write_key: String,
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
    pub sources: Vec<SourceConfig>,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Also the topic suffix: records go to `<prefix>activation.<id>`.
    pub id: String,
    /// Segments synced to this destination: enter → add, exit → remove.
    pub segments: Vec<String>,
    /// Profile fields (identifiers or traits) the destination may receive.
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationConfig {
    pub http_listen: String,
    pub state_dir: PathBuf,
    pub destinations: Vec<DestinationConfig>,
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

    fn load_from(file: Option<&Path>, env: Env, bootstrap_shorthand: bool) -> Result<Config> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "config file {} not found",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig.merge(env);
        if bootstrap_shorthand {
            fig = fig.merge(
                Env::raw()
                    .only(&["KAFKA_BOOTSTRAP"])
                    .map(|_| "kafka.bootstrap".into()),
            );
        }
        let cfg: Config = fig.extract().map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
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
            if !keys.insert(&s.write_key) {
                return bad(format!("ingest source {:?} repeats a write key", s.name));
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
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_load_and_validate() {
        let cfg = Config::load_without_env(None).unwrap();
        assert_eq!(cfg.topics.prefix, "tessera.");
        assert_eq!(cfg.ingest.sources[0].write_key, "demo-write-key");
        assert_eq!(cfg.ingest.max_batch_events, 2500);
    }

    #[test]
    fn file_overrides_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "[kafka]\nbootstrap = \"k:1\"\n").unwrap();
        let cfg = Config::load_without_env(Some(&good)).unwrap();
        assert_eq!(cfg.kafka.bootstrap, "k:1");
        assert_eq!(cfg.kafka.linger_ms, 1, "untouched keys keep their defaults");

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[kafka]\nbootstrapp = \"k:1\"\n").unwrap();
        let err = Config::load_without_env(Some(&bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bootstrapp"), "{err}");
    }

    #[test]
    fn duplicate_write_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[ingest]\nsources = [{name=\"a\", write_key=\"k\"}, {name=\"b\", write_key=\"k\"}]\n",
        )
        .unwrap();
        let err = Config::load_without_env(Some(&f)).unwrap_err().to_string();
        assert!(err.contains("repeats a write key"), "{err}");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = Config::load_without_env(Some(Path::new("/nonexistent/t.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");
    }
}
