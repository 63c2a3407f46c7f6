//! Every topic name, in one place. Names are `<prefix><name>`; the prefix comes from
//! configuration (default `tessera.`). `schemas/<default name>.avsc` describes each, but
//! `identity.matches`: identity's own log of its fuzzy decisions (JSON,
//! `services/identity/src/fuzzy/log.rs`).

use crate::config::TopicsConfig;

pub const EVENTS_RAW: &str = "events.raw";
pub const EVENTS_INGESTED: &str = "events.ingested";
pub const EVENTS_DEADLETTER: &str = "events.deadletter";
pub const EVENTS_RESOLVED: &str = "events.resolved";
pub const IDENTITY_MERGES: &str = "identity.merges";
pub const IDENTITY_SPLITS: &str = "identity.splits";
pub const IDENTITY_COMMANDS: &str = "identity.commands";
pub const IDENTITY_MATCHES: &str = "identity.matches";
pub const PROFILES_TRANSFERS: &str = "profiles.transfers";
pub const SEGMENTS_MEMBERSHIP: &str = "segments.membership";
pub const PROFILES_DEFINITIONS: &str = "profiles.definitions";
pub const PROFILES_TRIGGERS: &str = "profiles.triggers";
pub const AUDIT: &str = "audit";
pub const PRIVACY_KEYS: &str = "privacy.keys";
pub const PRIVACY_ACTIONS: &str = "privacy.actions";
pub const PRIVACY_REPORTS: &str = "privacy.reports";
pub const PRIVACY_SUPPRESSIONS: &str = "privacy.suppressions";
/// Destination topics are `activation.<destination id>`.
pub const ACTIVATION_PREFIX: &str = "activation.";

/// Resolved topic names for one deployment.
#[derive(Debug, Clone)]
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn new(cfg: &TopicsConfig) -> Self {
        Topics {
            prefix: cfg.prefix.clone(),
        }
    }
    pub fn name(&self, base: &str) -> String {
        format!("{}{}", self.prefix, base)
    }
    pub fn raw(&self) -> String {
        self.name(EVENTS_RAW)
    }
    pub fn ingested(&self) -> String {
        self.name(EVENTS_INGESTED)
    }
    pub fn deadletter(&self) -> String {
        self.name(EVENTS_DEADLETTER)
    }
    pub fn resolved(&self) -> String {
        self.name(EVENTS_RESOLVED)
    }
    pub fn merges(&self) -> String {
        self.name(IDENTITY_MERGES)
    }
    pub fn splits(&self) -> String {
        self.name(IDENTITY_SPLITS)
    }
    pub fn matches(&self) -> String {
        self.name(IDENTITY_MATCHES)
    }
    pub fn commands(&self) -> String {
        self.name(IDENTITY_COMMANDS)
    }
    pub fn transfers(&self) -> String {
        self.name(PROFILES_TRANSFERS)
    }
    pub fn definitions(&self) -> String {
        self.name(PROFILES_DEFINITIONS)
    }
    pub fn audit(&self) -> String {
        self.name(AUDIT)
    }
    pub fn keys(&self) -> String {
        self.name(PRIVACY_KEYS)
    }
    pub fn privacy_actions(&self) -> String {
        self.name(PRIVACY_ACTIONS)
    }
    pub fn privacy_reports(&self) -> String {
        self.name(PRIVACY_REPORTS)
    }
    pub fn suppressions(&self) -> String {
        self.name(PRIVACY_SUPPRESSIONS)
    }
    pub fn triggers(&self) -> String {
        self.name(PROFILES_TRIGGERS)
    }
    pub fn membership(&self) -> String {
        self.name(SEGMENTS_MEMBERSHIP)
    }
    /// Consumer group of a service, under the same prefix, so one prefix isolates a
    /// whole deployment (several can share a cluster).
    pub fn group(&self, service: &str) -> String {
        format!("{}{}", self.prefix, service)
    }
    pub fn activation(&self, destination: &str) -> String {
        format!("{}{}{}", self.prefix, ACTIVATION_PREFIX, destination)
    }
}

/// A processor's input topics, resolved once at start: which of its inputs a record came
/// from, as the processor's own kind, without building topic names per record.
#[derive(Debug, Clone)]
pub struct Routes<K: Copy>(Vec<(String, K)>);

impl<K: Copy> Routes<K> {
    pub fn new(routes: impl IntoIterator<Item = (String, K)>) -> Self {
        Routes(routes.into_iter().collect())
    }

    /// The kind of input `topic` is, if it is one.
    pub fn of(&self, topic: &str) -> Option<K> {
        self.0.iter().find(|(t, _)| t == topic).map(|(_, k)| *k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_routed_by_its_topic() {
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Input {
            Events,
            Commands,
        }
        let t = Topics {
            prefix: "t.".into(),
        };
        let routes = Routes::new([
            (t.ingested(), Input::Events),
            (t.commands(), Input::Commands),
        ]);
        assert_eq!(routes.of("t.identity.commands"), Some(Input::Commands));
        assert_eq!(routes.of("t.events.ingested"), Some(Input::Events));
        assert_eq!(routes.of("t.events.raw"), None);
    }
}
