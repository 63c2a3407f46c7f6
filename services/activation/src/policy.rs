//! What may reach a destination, decided at the moment of each activation from the
//! profile as the causing record carries it: consent per purpose and channel,
//! suppressions (segments that block destinations), a contact address, and frequency
//! caps on sends. Each refusal is an [`Outcome`] with a reason; each allowance names the
//! consent decisions it rests on.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use tessera_common::config::{DestinationConfig, DestinationKind, FrequencyCap, SuppressionConfig};
use tessera_common::{Error, Result};

/// Why an activation did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    NoConsent,
    Suppressed,
    NoAddress,
    Capped,
    /// The person asked to be suppressed (a privacy request).
    PersonSuppressed,
    /// The person was erased after the record was sent.
    Erased,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::NoConsent => "no_consent",
            Outcome::Suppressed => "suppressed",
            Outcome::NoAddress => "no_address",
            Outcome::Capped => "capped",
            Outcome::PersonSuppressed => "person_suppressed",
            Outcome::Erased => "erased",
        }
    }
}

pub type Refusal = (Outcome, String);

/// A consent decision as profiles records it.
#[derive(Debug, Clone, Deserialize)]
pub struct Decision {
    pub granted: bool,
    pub event_time: i64,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub via: String,
}

/// The profile at the causing record: fields, consent (keys lower-cased) and segments.
#[derive(Debug, Default)]
pub struct View {
    pub fields: Map<String, Value>,
    pub consent: BTreeMap<String, Decision>,
    pub segments: BTreeSet<String>,
}

impl View {
    pub fn parse(traits: &str, consent: &str, segments: &[String]) -> Result<View> {
        let fields: Map<String, Value> = serde_json::from_str(traits)
            .map_err(|e| Error::Data(format!("traits are not a JSON object: {e}")))?;
        // Empty: a record that carries no consent (none is known).
        let consent = if consent.is_empty() { "{}" } else { consent };
        let raw: BTreeMap<String, Decision> = serde_json::from_str(consent)
            .map_err(|e| Error::Data(format!("consent is not readable: {e}")))?;
        let mut consent: BTreeMap<String, Decision> = BTreeMap::new();
        for (k, d) in raw {
            let k = k.to_lowercase();
            if consent.get(&k).is_none_or(|o| o.event_time <= d.event_time) {
                consent.insert(k, d);
            }
        }
        Ok(View {
            fields,
            consent,
            segments: segments.iter().cloned().collect(),
        })
    }
}

/// A destination with what its configuration implies.
#[derive(Debug, Clone)]
pub struct Destination {
    pub config: DestinationConfig,
    pub purposes: Vec<String>,
    pub channel: Option<String>,
    pub cap: Option<(u32, i64)>,
    pub topic: String,
}

impl Destination {
    pub fn new(config: DestinationConfig, topic: String) -> Result<Destination> {
        Ok(Destination {
            purposes: config.purposes().iter().map(|p| p.to_lowercase()).collect(),
            channel: config.channel().map(|c| c.to_lowercase()),
            cap: cap(&config.frequency_cap)?,
            topic,
            config,
        })
    }
    pub fn id(&self) -> &str {
        &self.config.id
    }
}

pub fn cap(c: &Option<FrequencyCap>) -> Result<Option<(u32, i64)>> {
    c.as_ref().map(|c| Ok((c.max, c.window_ms()?))).transpose()
}

pub struct Policy {
    pub suppressions: Vec<SuppressionConfig>,
    pub opt_in: BTreeSet<String>,
    pub global_cap: Option<(u32, i64)>,
}

impl Policy {
    /// Whether being in `segment` blocks `destination`.
    pub fn suppresses(&self, segment: &str, destination: &str) -> bool {
        self.suppressions.iter().any(|s| {
            s.segment == segment
                && (s.destinations.is_empty() || s.destinations.iter().any(|d| d == destination))
        })
    }

    /// Consent, then suppressions, then a contact address. Ok: the consent decisions
    /// the activation rests on, as JSON.
    pub fn check(&self, d: &Destination, v: &View) -> std::result::Result<Value, Refusal> {
        let mut used = Map::new();
        for purpose in &d.purposes {
            let channel_key = d.channel.as_ref().map(|c| format!("{purpose}.{c}"));
            let found = channel_key
                .iter()
                .chain(std::iter::once(purpose))
                .find_map(|k| v.consent.get(k).map(|dec| (k.clone(), dec)));
            match found {
                Some((key, dec)) if dec.granted => {
                    used.insert(
                        purpose.clone(),
                        json!({"decision": key, "granted": true, "event_time": dec.event_time,
                               "source": dec.source, "via": dec.via}),
                    );
                }
                Some((key, dec)) => {
                    return Err((
                        Outcome::NoConsent,
                        format!("consent {key} refused (decision at {})", dec.event_time),
                    ));
                }
                None if self.opt_in.contains(purpose) => {
                    return Err((
                        Outcome::NoConsent,
                        format!("consent {purpose} never granted (opt-in purpose)"),
                    ));
                }
                None => {
                    used.insert(
                        purpose.clone(),
                        json!({"decision": "default", "granted": true,
                               "note": "opt-out purpose, never refused"}),
                    );
                }
            }
        }
        if let Some(s) = self
            .suppressions
            .iter()
            .find(|s| v.segments.contains(&s.segment) && self.suppresses(&s.segment, d.id()))
        {
            return Err((
                Outcome::Suppressed,
                format!("suppression {}: in segment {}", s.id, s.segment),
            ));
        }
        let needs = match d.config.kind {
            DestinationKind::Email => Some("email"),
            DestinationKind::Sms => Some("phone"),
            _ => None,
        };
        if let Some(f) = needs
            && v.fields
                .get(f)
                .is_none_or(|x| x.as_str().is_none_or(|s| s.trim().is_empty()))
        {
            return Err((Outcome::NoAddress, format!("no {f}")));
        }
        Ok(Value::Object(used))
    }
}

/// Sends to one person, kept for the frequency caps (and to recognise a repeated
/// record): time, destination and activation id.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sends(pub Vec<(i64, String, String)>);

impl Sends {
    pub fn contains(&self, activation_id: &str) -> bool {
        self.0.iter().any(|s| s.2 == activation_id)
    }

    /// Whether one more send to `d` at `at` stays within the destination's and the
    /// global caps.
    pub fn allows(
        &self,
        d: &Destination,
        global: Option<(u32, i64)>,
        at: i64,
    ) -> std::result::Result<(), Refusal> {
        let count = |dest: Option<&str>, window: i64| {
            self.0
                .iter()
                .filter(|(t, x, _)| at - *t < window && *t <= at && dest.is_none_or(|d| d == x))
                .count() as u32
        };
        if let Some((max, w)) = d.cap
            && count(Some(d.id()), w) >= max
        {
            return Err((
                Outcome::Capped,
                format!(
                    "{max} per {} on {}",
                    d.config
                        .frequency_cap
                        .as_ref()
                        .map_or("", |c| c.per.as_str()),
                    d.id()
                ),
            ));
        }
        if let Some((max, w)) = global
            && count(None, w) >= max
        {
            return Err((
                Outcome::Capped,
                format!("{max} per window across destinations"),
            ));
        }
        Ok(())
    }

    /// Records a send and forgets those older than the longest window.
    pub fn record(&mut self, at: i64, d: &str, activation_id: &str, longest: i64) {
        self.0.push((at, d.to_string(), activation_id.to_string()));
        self.0.retain(|(t, _, _)| at - *t < longest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(doc: &str) -> Destination {
        let c: DestinationConfig = serde_json::from_str(doc).unwrap();
        Destination::new(c, "t".into()).unwrap()
    }

    fn policy() -> Policy {
        Policy {
            suppressions: vec![SuppressionConfig {
                id: "open-case".into(),
                segment: "open-cases".into(),
                destinations: vec!["survey".into()],
            }],
            opt_in: ["advertising".to_string()].into(),
            global_cap: Some((3, 86_400_000)),
        }
    }

    fn view(consent: &str, segments: &[&str]) -> View {
        let segs: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
        View::parse(r#"{"email":"a@b.co"}"#, consent, &segs).unwrap()
    }

    #[test]
    fn consent_by_channel_then_purpose_and_opt_in_needs_a_grant() {
        let email = dest(r#"{"id":"news","kind":"email","segments":["s"]}"#);
        let ads = dest(r#"{"id":"ads","kind":"google_ads","segments":["s"]}"#);
        let p = policy();
        // Marketing is opt-out: allowed until refused.
        let ok = p.check(&email, &view("{}", &[])).unwrap();
        assert_eq!(ok["marketing"]["decision"], "default");
        // A refusal for the purpose blocks; a grant on the channel wins over it.
        let refused = r#"{"Marketing":{"granted":false,"event_time":5}}"#;
        assert_eq!(
            p.check(&email, &view(refused, &[])).unwrap_err().0,
            Outcome::NoConsent
        );
        let channel = r#"{"marketing":{"granted":false,"event_time":5},"marketing.email":{"granted":true,"event_time":6,"source":"web","via":"traits.consent"}}"#;
        let ok = p.check(&email, &view(channel, &[])).unwrap();
        assert_eq!(ok["marketing"]["decision"], "marketing.email");
        // Advertising is opt-in: never answered is refused.
        let (o, why) = p.check(&ads, &view("{}", &[])).unwrap_err();
        assert_eq!(o, Outcome::NoConsent);
        assert!(why.contains("never granted"), "{why}");
        let granted = r#"{"advertising":{"granted":true,"event_time":1}}"#;
        assert!(p.check(&ads, &view(granted, &[])).is_ok());
    }

    #[test]
    fn a_suppression_blocks_only_its_destinations() {
        let survey = dest(r#"{"id":"survey","kind":"email","triggers":["t"]}"#);
        let news = dest(r#"{"id":"news","kind":"email","segments":["s"]}"#);
        let p = policy();
        let (o, why) = p.check(&survey, &view("{}", &["open-cases"])).unwrap_err();
        assert_eq!(o, Outcome::Suppressed);
        assert!(why.contains("open-case"));
        assert!(p.check(&news, &view("{}", &["open-cases"])).is_ok());
    }

    #[test]
    fn an_email_destination_needs_an_email() {
        let email = dest(r#"{"id":"news","kind":"email","segments":["s"]}"#);
        let v = View::parse(r#"{"phone":"+1"}"#, "{}", &[]).unwrap();
        assert_eq!(
            policy().check(&email, &v).unwrap_err().0,
            Outcome::NoAddress
        );
    }

    #[test]
    fn caps_count_per_destination_and_across_destinations_within_the_window() {
        let a = dest(
            r#"{"id":"a","kind":"email","triggers":["t"],"frequency_cap":{"max":2,"per":"1h"}}"#,
        );
        let b = dest(r#"{"id":"b","kind":"email","triggers":["t"]}"#);
        let global = Some((3, 86_400_000));
        let hour = 3_600_000;
        let mut s = Sends::default();
        for i in 0..2 {
            assert!(s.allows(&a, global, i).is_ok());
            s.record(i, "a", &format!("x{i}"), 86_400_000);
        }
        assert_eq!(s.allows(&a, global, 10).unwrap_err().0, Outcome::Capped);
        // An hour later the destination's window has room again.
        assert!(s.allows(&a, global, hour + 2).is_ok());
        // Across destinations: 3 a day.
        s.record(20, "b", "y", 86_400_000);
        assert_eq!(s.allows(&b, global, 30).unwrap_err().0, Outcome::Capped);
        assert!(s.contains("y") && !s.contains("z"));
    }
}
