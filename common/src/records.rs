//! The record types on Tessera's topics. Each is tied to its schema file under
//! `schemas/` through [`AvroRecord`]; `tests` below prove struct and `.avsc` agree.

use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::avro::Codec;

/// A record with an Avro schema from `schemas/`.
pub trait AvroRecord: Serialize + DeserializeOwned {
    fn codec() -> &'static Codec;

    fn to_avro(&self) -> Result<Vec<u8>> {
        Self::codec().encode(self)
    }
    fn from_avro(bytes: &[u8]) -> Result<Self> {
        Self::codec().decode(bytes)
    }
}

/// `avro_record!(Type, "schema file")`, optionally with older versions of the schema
/// (files under `schemas/previous/`) whose records still read.
macro_rules! avro_record {
    ($ty:ty, $file:literal $(, previous: [$($old:literal),*])?) => {
        impl AvroRecord for $ty {
            fn codec() -> &'static Codec {
                static CODEC: OnceLock<Codec> = OnceLock::new();
                CODEC.get_or_init(|| {
                    Codec::new($file, include_str!(concat!("../../schemas/", $file)))
                    $($(.with_previous(include_str!(concat!("../../schemas/previous/", $old))))*)?
                })
            }
        }
    };
}

/// `tessera.events.ingested`: an accepted Segment-spec event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestedEvent {
    pub message_id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub event: Option<String>,
    pub received_at: i64,
    pub event_time: i64,
    /// The whole normalised Segment message as JSON.
    pub payload: String,
}
avro_record!(IngestedEvent, "tessera.events.ingested.avsc");

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identifier {
    pub kind: String,
    pub value: String,
}

/// `tessera.events.resolved`: an event with its profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedEvent {
    pub profile_id: String,
    pub identifiers: Vec<Identifier>,
    pub event: IngestedEvent,
}
avro_record!(ResolvedEvent, "tessera.events.resolved.avsc");

impl IngestedEvent {
    /// The Segment message as JSON (null if the stored text is not JSON, which ingest
    /// never writes).
    pub fn payload_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

impl ResolvedEvent {
    /// The event's Segment message as JSON.
    pub fn payload(&self) -> serde_json::Value {
        self.event.payload_json()
    }
}

/// `tessera.events.deadletter`: refused input with its reason and original bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub origin: String,
    pub source: Option<String>,
    pub reason: String,
    pub received_at: i64,
    pub batch_index: Option<i32>,
    pub input_topic: Option<String>,
    pub input_partition: Option<i32>,
    pub input_offset: Option<i64>,
    #[serde(with = "serde_bytes_vec")]
    pub original: Vec<u8>,
}
avro_record!(DeadLetter, "tessera.events.deadletter.avsc");

/// `tessera.identity.merges`: `merged` now belongs to `survivor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileMerge {
    pub merge_id: String,
    pub survivor: String,
    pub merged: String,
    pub cause_message_id: String,
    pub event_time: i64,
    pub received_at: i64,
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub score: Option<f64>,
    /// Larger for a later decision about the same profiles (identity's merge clock): a
    /// profile merged away and later merged back into is live again, whichever of the
    /// two merges profiles reads first. 0 in records of the first schema.
    #[serde(default)]
    pub version: i64,
}
avro_record!(
    ProfileMerge,
    "tessera.identity.merges.avsc",
    previous: ["tessera.identity.merges.1.avsc"]
);

/// One identifier's new profile in a [`ProfileSplit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub kind: String,
    pub value: String,
    pub profile_id: String,
}

/// `tessera.identity.splits`: a profile's identifiers now belong to several profiles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileSplit {
    pub split_id: String,
    pub profile_id: String,
    pub assignments: Vec<Assignment>,
    pub cause: String,
    pub event_time: i64,
    pub received_at: i64,
}
avro_record!(ProfileSplit, "tessera.identity.splits.avsc");

/// `tessera.identity.commands`: an un-merge or a detach, applied by identity in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityCommand {
    pub command_id: String,
    pub action: String,
    pub merge_id: Option<String>,
    #[serde(default)]
    pub survivor_identifiers: Vec<Identifier>,
    #[serde(default)]
    pub merged_identifiers: Vec<Identifier>,
    pub kind: Option<String>,
    pub value: Option<String>,
    pub reason: Option<String>,
    /// A delete also suppresses the identifiers.
    #[serde(default)]
    pub suppress: bool,
    pub requested_at: i64,
}
avro_record!(
    IdentityCommand,
    "tessera.identity.commands.avsc",
    previous: ["tessera.identity.commands.1.avsc"]
);

/// `tessera.profiles.transfers`: state moved into a survivor (internal to profiles).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileTransfer {
    pub transfer_id: String,
    pub survivor: String,
    pub from_profile: String,
    pub state: String,
    pub received_at: i64,
}
avro_record!(ProfileTransfer, "tessera.profiles.transfers.avsc");

/// `tessera.segments.membership`: a profile entered or left a segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembershipChange {
    pub record_id: String,
    pub profile_id: String,
    pub segment_id: String,
    pub segment_version: i32,
    pub change: String,
    pub reason: String,
    pub event_time: i64,
    pub received_at: i64,
    pub traits: String,
    /// The profile's consent decisions as JSON; empty in a record of the first schema
    /// (which carries neither consent nor segments).
    pub consent: String,
    /// Every segment the profile is in after this change.
    pub segments: Vec<String>,
}

impl MembershipChange {
    /// Written by the first schema: no consent and no segments to go by.
    pub fn is_legacy(&self) -> bool {
        self.consent.is_empty()
    }
}

avro_record!(
    MembershipChange,
    "tessera.segments.membership.avsc",
    previous: ["tessera.segments.membership.1.avsc"]
);

/// `tessera.profiles.triggers`: a trigger fired for a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerFired {
    pub record_id: String,
    pub profile_id: String,
    pub trigger_id: String,
    pub trigger_version: i32,
    pub reason: String,
    pub event_time: i64,
    pub received_at: i64,
    pub event: String,
    pub properties: String,
    pub traits: String,
    pub consent: String,
    pub segments: Vec<String>,
}
avro_record!(TriggerFired, "tessera.profiles.triggers.avsc");

/// `tessera.profiles.definitions`: a segment or computed trait definition, versioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionChange {
    /// `segment` or `computed_trait`.
    pub kind: String,
    pub id: String,
    pub version: i32,
    /// The definition as JSON.
    pub definition: String,
    pub deleted: bool,
    /// `api`, or `file:<name>`.
    pub origin: String,
    pub changed_at: i64,
}
avro_record!(DefinitionChange, "tessera.profiles.definitions.avsc");

/// `tessera.activation.<destination>`: what a downstream system consumes, as JSON
/// ([`Activation::to_json`]) or Avro.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    pub activation_id: String,
    pub destination: String,
    pub kind: String,
    pub profile_id: String,
    pub action: String,
    pub source: String,
    pub source_id: String,
    pub source_version: i32,
    pub reason: String,
    pub consent: String,
    pub event_time: i64,
    pub received_at: i64,
    pub payload: String,
}

impl Activation {
    /// The JSON form: the same fields, with `consent` and `payload` as JSON objects
    /// (written through as they are, after a check that they are JSON).
    pub fn to_json(&self) -> Result<Vec<u8>> {
        use serde_json::value::RawValue;
        #[derive(Serialize)]
        struct Json<'a> {
            activation_id: &'a str,
            destination: &'a str,
            kind: &'a str,
            profile_id: &'a str,
            action: &'a str,
            source: &'a str,
            source_id: &'a str,
            source_version: i32,
            reason: &'a str,
            consent: &'a RawValue,
            event_time: i64,
            received_at: i64,
            payload: &'a RawValue,
        }
        Ok(serde_json::to_vec(&Json {
            activation_id: &self.activation_id,
            destination: &self.destination,
            kind: &self.kind,
            profile_id: &self.profile_id,
            action: &self.action,
            source: &self.source,
            source_id: &self.source_id,
            source_version: self.source_version,
            reason: &self.reason,
            consent: serde_json::from_str(&self.consent)?,
            event_time: self.event_time,
            received_at: self.received_at,
            payload: serde_json::from_str(&self.payload)?,
        })?)
    }

    /// Reads either form (a JSON record starts with `{`, an Avro one with `C3 01`).
    pub fn decode(bytes: &[u8]) -> Result<Activation> {
        if bytes.first() != Some(&b'{') {
            return Activation::from_avro(bytes);
        }
        let mut v: serde_json::Value = serde_json::from_slice(bytes)?;
        for f in ["consent", "payload"] {
            v[f] = serde_json::Value::String(v[f].to_string());
        }
        Ok(serde_json::from_value(v)?)
    }
}
avro_record!(Activation, "tessera.activation.avsc");

/// `tessera.audit`: an accepted change made through an API, and who made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub audit_id: String,
    pub at: i64,
    pub who: String,
    pub service: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}
avro_record!(AuditEntry, "tessera.audit.avsc");

/// `tessera.privacy.keys`: one encryption key of a data subject (see [`crate::vault`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubjectKey {
    pub subject: String,
    pub key_id: String,
    #[serde(with = "serde_bytes_vec")]
    pub key: Vec<u8>,
    pub created_at: i64,
}
avro_record!(SubjectKey, "tessera.privacy.keys.avsc");

/// `tessera.privacy.actions`: a privacy request resolved to a profile, for the next stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyAction {
    pub request_id: String,
    pub action: String,
    pub stage: String,
    pub profile_id: String,
    pub merged_profiles: Vec<String>,
    pub requested_at: i64,
}
avro_record!(PrivacyAction, "tessera.privacy.actions.avsc");

/// `tessera.privacy.reports`: what one service did for a privacy request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyReport {
    pub request_id: String,
    pub service: String,
    pub action: String,
    pub status: String,
    #[serde(default)]
    pub profile_id: Option<String>,
    pub at: i64,
    pub detail: String,
}
avro_record!(PrivacyReport, "tessera.privacy.reports.avsc");

impl PrivacyReport {
    /// The compacted topic's key: one report per request and service.
    pub fn key(&self) -> String {
        format!("{}/{}", self.request_id, self.service)
    }

    /// The record for `topic`: an export's report holds the person's data, so it is
    /// sealed with their profile's key; the others hold counts and ids.
    pub fn output(&self, topic: String) -> Result<crate::message::Output> {
        use crate::message::Output;
        let (key, payload) = (self.key().into_bytes(), self.to_avro()?);
        Ok(match &self.profile_id {
            // The report stays on its compacted topic: its key must not expire.
            Some(p) if self.action == "export" => Output::sealed_lasting(topic, key, payload, p),
            _ => Output::plain(topic, key, payload),
        })
    }
}

/// `tessera.privacy.suppressions`: an identifier whose events ingest drops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suppression {
    pub identifier: String,
    pub kind: String,
    pub request_id: String,
    pub at: i64,
}
avro_record!(Suppression, "tessera.privacy.suppressions.avsc");

/// Avro `bytes` through serde: serialise as bytes, not as an array of ints.
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_str<E>(self, v: &str) -> Result<Vec<u8>, E> {
                Ok(v.as_bytes().to_vec())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingested() -> IngestedEvent {
        IngestedEvent {
            message_id: "m-1".into(),
            source: "web".into(),
            kind: "track".into(),
            user_id: None,
            anonymous_id: Some("anon-1".into()),
            event: Some("Order Completed".into()),
            received_at: 1_700_000_000_123,
            event_time: 1_700_000_000_100,
            payload: r#"{"type":"track"}"#.into(),
        }
    }

    fn roundtrip<T: AvroRecord + PartialEq + std::fmt::Debug>(v: T) {
        let bytes = v.to_avro().unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01], "single-object marker");
        assert_eq!(&bytes[2..10], T::codec().fingerprint());
        assert_eq!(T::from_avro(&bytes).unwrap(), v);
    }

    /// Every struct encodes against its `.avsc` and decodes back equal: the code and the
    /// schema files agree field for field.
    #[test]
    fn every_record_roundtrips_through_its_schema_file() {
        roundtrip(ingested());
        roundtrip(ResolvedEvent {
            profile_id: "p".into(),
            identifiers: vec![Identifier {
                kind: "email".into(),
                value: "a@b.c".into(),
            }],
            event: ingested(),
        });
        roundtrip(DeadLetter {
            origin: "http".into(),
            source: Some("web".into()),
            reason: "missing userId".into(),
            received_at: 1,
            batch_index: Some(3),
            input_topic: None,
            input_partition: None,
            input_offset: None,
            original: vec![0, 159, 146, 150, b'{'],
        });
        roundtrip(ProfileMerge {
            merge_id: "x".into(),
            survivor: "a".into(),
            merged: "b".into(),
            cause_message_id: "m".into(),
            event_time: 5,
            received_at: 6,
            rule: Some("name+birthday".into()),
            score: Some(31.5),
            version: 7,
        });
        roundtrip(ProfileSplit {
            split_id: "s".into(),
            profile_id: "p".into(),
            assignments: vec![Assignment {
                kind: "email".into(),
                value: "a@b.io".into(),
                profile_id: "q".into(),
            }],
            cause: "m".into(),
            event_time: 1,
            received_at: 2,
        });
        roundtrip(IdentityCommand {
            command_id: "c".into(),
            action: "unmerge".into(),
            merge_id: Some("m".into()),
            survivor_identifiers: vec![Identifier {
                kind: "crm_id".into(),
                value: "c".into(),
            }],
            // Both non-empty: a named type used twice must encode (the serializer does not
            // resolve a reference to a record defined earlier in the schema).
            merged_identifiers: vec![Identifier {
                kind: "loyalty_id".into(),
                value: "l".into(),
            }],
            kind: None,
            value: None,
            reason: Some("wrong merge".into()),
            suppress: false,
            requested_at: 3,
        });
        roundtrip(ProfileTransfer {
            transfer_id: "t".into(),
            survivor: "a".into(),
            from_profile: "b".into(),
            state: "{}".into(),
            received_at: 7,
        });
        roundtrip(MembershipChange {
            record_id: "r".into(),
            profile_id: "p".into(),
            segment_id: "buyers".into(),
            segment_version: 2,
            change: "enter".into(),
            reason: "event_count".into(),
            event_time: 8,
            received_at: 9,
            traits: "{}".into(),
            consent: "{}".into(),
            segments: vec!["buyers".into()],
        });
        roundtrip(TriggerFired {
            record_id: "r".into(),
            profile_id: "p".into(),
            trigger_id: "abandoned-cart".into(),
            trigger_version: 1,
            reason: "deadline".into(),
            event_time: 8,
            received_at: 9,
            event: "Cart Viewed".into(),
            properties: "{}".into(),
            traits: "{}".into(),
            consent: "{}".into(),
            segments: vec![],
        });
        roundtrip(DefinitionChange {
            kind: "segment".into(),
            id: "buyers".into(),
            version: 2,
            definition: "{}".into(),
            deleted: false,
            origin: "api".into(),
            changed_at: 3,
        });
        let a = Activation {
            activation_id: "a".into(),
            destination: "email".into(),
            kind: "email".into(),
            profile_id: "p".into(),
            action: "add".into(),
            source: "segment".into(),
            source_id: "buyers".into(),
            source_version: 1,
            reason: "segment enter".into(),
            consent: r#"{"marketing":{"granted":true}}"#.into(),
            event_time: 1,
            received_at: 2,
            payload: r#"{"email":"a@b.c"}"#.into(),
        };
        roundtrip(a.clone());
        let json = a.to_json().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["payload"]["email"], "a@b.c", "the payload is an object");
        assert_eq!(Activation::decode(&json).unwrap(), a);
        assert_eq!(Activation::decode(&a.to_avro().unwrap()).unwrap(), a);
    }

    /// Every schema file under schemas/ belongs to a record type here.
    #[test]
    fn every_schema_file_has_a_record_type() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".avsc"))
            .collect();
        files.sort();
        let known = [
            IngestedEvent::codec().fingerprint(),
            ResolvedEvent::codec().fingerprint(),
            DeadLetter::codec().fingerprint(),
            ProfileMerge::codec().fingerprint(),
            ProfileSplit::codec().fingerprint(),
            IdentityCommand::codec().fingerprint(),
            ProfileTransfer::codec().fingerprint(),
            MembershipChange::codec().fingerprint(),
            TriggerFired::codec().fingerprint(),
            AuditEntry::codec().fingerprint(),
            DefinitionChange::codec().fingerprint(),
            Activation::codec().fingerprint(),
            SubjectKey::codec().fingerprint(),
            PrivacyAction::codec().fingerprint(),
            PrivacyReport::codec().fingerprint(),
            Suppression::codec().fingerprint(),
        ];
        assert_eq!(files.len(), known.len(), "schema files: {files:?}");
        for f in files {
            let text = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
            let fp = Codec::new("file", &text).fingerprint().to_vec();
            assert!(
                known.contains(&fp.as_slice()),
                "{f} is not used by any record type"
            );
        }
    }

    /// Merges written before they carried a version still read (a rolling upgrade), as
    /// the oldest.
    #[test]
    fn merges_of_the_first_schema_still_read() {
        let old = include_str!("../../schemas/previous/tessera.identity.merges.1.avsc");
        #[derive(Serialize)]
        struct Old<'a> {
            merge_id: &'a str,
            survivor: &'a str,
            merged: &'a str,
            cause_message_id: &'a str,
            event_time: i64,
            received_at: i64,
            rule: Option<&'a str>,
            score: Option<f64>,
        }
        let bytes = Codec::new("old", old)
            .encode(&Old {
                merge_id: "g",
                survivor: "a",
                merged: "b",
                cause_message_id: "m",
                event_time: 1,
                received_at: 2,
                rule: None,
                score: None,
            })
            .unwrap();
        let m = ProfileMerge::from_avro(&bytes).unwrap();
        assert_eq!((m.survivor.as_str(), m.version), ("a", 0));
    }

    /// Membership records written before they carried consent and segments still read
    /// (a rolling upgrade), with none of either.
    #[test]
    fn membership_records_of_the_first_schema_still_read() {
        let old = include_str!("../../schemas/previous/tessera.segments.membership.1.avsc");
        #[derive(Serialize)]
        struct Old<'a> {
            record_id: &'a str,
            profile_id: &'a str,
            segment_id: &'a str,
            segment_version: i32,
            change: &'a str,
            reason: &'a str,
            event_time: i64,
            received_at: i64,
            traits: &'a str,
        }
        let bytes = Codec::new("old", old)
            .encode(&Old {
                record_id: "r",
                profile_id: "p",
                segment_id: "buyers",
                segment_version: 1,
                change: "enter",
                reason: "x",
                event_time: 1,
                received_at: 2,
                traits: "{}",
            })
            .unwrap();
        let m = MembershipChange::from_avro(&bytes).unwrap();
        assert_eq!((m.consent.as_str(), m.segments.len()), ("", 0));
        assert_eq!(m.segment_id, "buyers");
    }

    /// A record written with an older schema (no `event` field) still reads with the
    /// current one, the new field taking its default.
    #[test]
    fn evolution_reads_records_of_an_older_schema() {
        let old = r#"{"type":"record","name":"IngestedEvent","namespace":"io.tessera","fields":[
            {"name":"message_id","type":"string"},{"name":"source","type":"string"},
            {"name":"type","type":"string"},
            {"name":"user_id","type":["null","string"],"default":null},
            {"name":"anonymous_id","type":["null","string"],"default":null},
            {"name":"received_at","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"payload","type":"string"}]}"#;
        #[derive(Serialize)]
        struct Old {
            message_id: String,
            source: String,
            #[serde(rename = "type")]
            kind: String,
            user_id: Option<String>,
            anonymous_id: Option<String>,
            received_at: i64,
            event_time: i64,
            payload: String,
        }
        let old_codec = Codec::new("old", old);
        let bytes = old_codec
            .encode(&Old {
                message_id: "m".into(),
                source: "s".into(),
                kind: "identify".into(),
                user_id: Some("u".into()),
                anonymous_id: None,
                received_at: 1,
                event_time: 2,
                payload: "{}".into(),
            })
            .unwrap();
        let current = Codec::new(
            "current",
            include_str!("../../schemas/tessera.events.ingested.avsc"),
        )
        .with_previous(old);
        let got: IngestedEvent = current.decode(&bytes).unwrap();
        assert_eq!(got.user_id.as_deref(), Some("u"));
        assert_eq!(got.event, None);
        let err = IngestedEvent::codec()
            .decode::<IngestedEvent>(&bytes)
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown schema fingerprint"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let err = IngestedEvent::from_avro(b"{\"json\":true}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("marker"), "{err}");
        let mut truncated = ingested().to_avro().unwrap();
        truncated.truncate(truncated.len() - 3);
        assert!(IngestedEvent::from_avro(&truncated).is_err());
    }

    proptest::proptest! {
        /// Bytes from a topic never panic a decoder: a record or an error.
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = IngestedEvent::from_avro(&bytes);
            let _ = ResolvedEvent::from_avro(&bytes);
            let _ = MembershipChange::from_avro(&bytes);
            // The same with a valid header, so the datum decoder itself is exercised.
            let mut framed = IngestedEvent::codec().encode(&ingested()).unwrap()[..10].to_vec();
            framed.extend_from_slice(&bytes);
            let _ = IngestedEvent::from_avro(&framed);
        }
    }
}
