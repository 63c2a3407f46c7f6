//! Validation and normalisation of Segment-spec messages, shared by the HTTP API and
//! the raw Kafka topic. Pure functions: no I/O.
//!
//! Rules (the README's "Ingest rules" section repeats them for users):
//! - `type` is one of identify, track, page, screen, group, alias;
//! - `userId` or `anonymousId` (a non-empty string; numbers are turned into strings);
//!   `event` for track, `previousId` for alias, `groupId` for group;
//! - `traits`, `properties`, `context` are objects when present; timestamps are ISO-8601;
//! - one event serialises to at most `max_event_bytes`, nests at most `max_depth`
//!   levels, and no string is longer than `max_string_bytes`;
//! - `messageId` is assigned when absent;
//! - event time = receivedAt − (sentAt − timestamp), falling back to `originalTimestamp`
//!   for the client time; without sentAt the client time is used as is; without any, the
//!   receive time. An event time further than `future_tolerance_ms` in the future is
//!   replaced by the receive time (the client value stays in `originalTimestamp`).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tessera_common::suppressions::{Suppressions, identifier_hash};

use tessera_common::config::IngestConfig;
use tessera_common::records::IngestedEvent;

pub const TYPES: [&str; 6] = ["identify", "track", "page", "screen", "group", "alias"];

/// A refused input: a stable code (for metrics and clients) and a readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: &'static str,
    pub reason: String,
}

impl Reject {
    pub fn new(code: &'static str, reason: impl Into<String>) -> Reject {
        Reject {
            code,
            reason: reason.into(),
        }
    }
}

/// The limits from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_event_bytes: usize,
    pub max_depth: usize,
    pub max_string_bytes: usize,
    pub future_tolerance_ms: i64,
}

impl From<&IngestConfig> for Limits {
    fn from(c: &IngestConfig) -> Self {
        Limits {
            max_event_bytes: c.max_event_bytes,
            max_depth: c.max_depth,
            max_string_bytes: c.max_string_bytes,
            future_tolerance_ms: c.future_tolerance_ms,
        }
    }
}

/// What the envelope of a request adds to each message.
#[derive(Debug, Clone, Default)]
pub struct Envelope<'a> {
    /// `sentAt` of a batch, used when a message has none.
    pub sent_at: Option<&'a Value>,
    /// `context` of a batch, merged under each message's own context.
    pub context: Option<&'a Map<String, Value>>,
}

/// Checks nesting depth and string lengths over a whole JSON value.
pub fn check_shape(v: &Value, limits: &Limits) -> Result<(), Reject> {
    fn walk(v: &Value, depth: usize, limits: &Limits) -> Result<(), Reject> {
        if depth > limits.max_depth {
            return Err(Reject::new(
                "too_deep",
                format!("nesting deeper than {} levels", limits.max_depth),
            ));
        }
        let long = |s: &str| s.len() > limits.max_string_bytes;
        match v {
            Value::String(s) if long(s) => Err(Reject::new(
                "string_too_long",
                format!("a string is longer than {} bytes", limits.max_string_bytes),
            )),
            Value::Array(a) => a.iter().try_for_each(|x| walk(x, depth + 1, limits)),
            Value::Object(o) => o.iter().try_for_each(|(k, x)| {
                if long(k) {
                    return Err(Reject::new(
                        "string_too_long",
                        format!("a key is longer than {} bytes", limits.max_string_bytes),
                    ));
                }
                walk(x, depth + 1, limits)
            }),
            _ => Ok(()),
        }
    }
    walk(v, 0, limits)
}

/// An identifier field: a non-empty string, or a number turned into one.
fn id_field(msg: &Map<String, Value>, name: &str) -> Result<Option<String>, Reject> {
    match msg.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(Reject::new(
            "invalid_field",
            format!("{name} must be a string"),
        )),
    }
}

fn time_field(msg: &Map<String, Value>, name: &str) -> Result<Option<DateTime<Utc>>, Reject> {
    time_value(msg.get(name), name)
}

fn time_value(v: Option<&Value>, name: &str) -> Result<Option<DateTime<Utc>>, Reject> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| {
                Reject::new(
                    "invalid_field",
                    format!("{name} is not an ISO-8601 timestamp"),
                )
            }),
        Some(_) => Err(Reject::new(
            "invalid_field",
            format!("{name} must be an ISO-8601 string"),
        )),
    }
}

/// An out-of-calendar time (refused before it gets here) would show as the epoch.
fn iso(ms: i64) -> String {
    tessera_common::time::iso_millis(ms).unwrap_or_else(|| "1970-01-01T00:00:00.000Z".into())
}

/// Validates one message and turns it into the record for `events.ingested`.
/// `forced_type` is the type from the endpoint (`/v1/track`), `None` in a batch.
/// `message_id` supplies an id when the message has none.
#[allow(clippy::too_many_arguments)]
pub fn normalise(
    value: Value,
    forced_type: Option<&str>,
    envelope: &Envelope<'_>,
    source: &str,
    received_at: i64,
    limits: &Limits,
    message_id: impl FnOnce() -> String,
) -> Result<IngestedEvent, Reject> {
    let Value::Object(mut msg) = value else {
        return Err(Reject::new(
            "not_an_object",
            "an event must be a JSON object",
        ));
    };
    let kind = match (forced_type, msg.get("type")) {
        (Some(t), _) => t.to_string(),
        (None, Some(Value::String(t))) => t.clone(),
        (None, None) => return Err(Reject::new("unknown_type", "type is missing")),
        (None, Some(_)) => return Err(Reject::new("unknown_type", "type must be a string")),
    };
    if !TYPES.contains(&kind.as_str()) {
        return Err(Reject::new(
            "unknown_type",
            format!("type must be one of {}", TYPES.join(", ")),
        ));
    }
    msg.remove("writeKey");
    check_shape(&Value::Object(msg.clone()), limits)?;

    let user_id = id_field(&msg, "userId")?;
    let anonymous_id = id_field(&msg, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(Reject::new(
            "missing_identity",
            "userId or anonymousId is required",
        ));
    }
    for obj in ["traits", "properties", "context", "integrations"] {
        if let Some(v) = msg.get(obj)
            && !v.is_object()
            && !v.is_null()
        {
            return Err(Reject::new(
                "invalid_field",
                format!("{obj} must be an object"),
            ));
        }
    }
    let event = match kind.as_str() {
        "track" => match msg.get("event") {
            Some(Value::String(e)) if !e.trim().is_empty() => Some(e.clone()),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(Reject::new(
                    "missing_event",
                    "track needs a non-empty event name",
                ));
            }
            Some(_) => return Err(Reject::new("invalid_field", "event must be a string")),
        },
        "alias" => {
            if id_field(&msg, "previousId")?.is_none() {
                return Err(Reject::new("missing_previous_id", "alias needs previousId"));
            }
            None
        }
        "group" => {
            if id_field(&msg, "groupId")?.is_none() {
                return Err(Reject::new("missing_group_id", "group needs groupId"));
            }
            None
        }
        "page" | "screen" => msg.get("name").and_then(Value::as_str).map(str::to_string),
        _ => None,
    };

    // Event time, corrected for the client's clock skew.
    let timestamp = time_field(&msg, "timestamp")?;
    let original = time_field(&msg, "originalTimestamp")?;
    let sent_at = match time_field(&msg, "sentAt")? {
        Some(t) => Some(t),
        None => time_value(envelope.sent_at, "sentAt")?,
    };
    let client_time = timestamp.or(original);
    let mut event_time = match (client_time, sent_at) {
        (Some(t), Some(s)) => received_at - (s.timestamp_millis() - t.timestamp_millis()),
        (Some(t), None) => t.timestamp_millis(),
        (None, _) => received_at,
    };
    if let Some(t) = client_time {
        msg.entry("originalTimestamp")
            .or_insert_with(|| Value::String(iso(t.timestamp_millis())));
    }
    if event_time > received_at + limits.future_tolerance_ms {
        event_time = received_at;
    }

    let message_id = match id_field(&msg, "messageId")? {
        Some(id) => id,
        None => message_id(),
    };
    if message_id.chars().count() > 256 {
        return Err(Reject::new(
            "invalid_field",
            "messageId is longer than 256 characters",
        ));
    }

    // Batch context goes under the message's own.
    if let Some(batch_ctx) = envelope.context {
        let ctx = msg
            .entry("context")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(ctx) = ctx {
            for (k, v) in batch_ctx {
                ctx.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    msg.insert("type".into(), Value::String(kind.clone()));
    msg.insert("messageId".into(), Value::String(message_id.clone()));
    msg.insert("receivedAt".into(), Value::String(iso(received_at)));
    msg.insert("timestamp".into(), Value::String(iso(event_time)));
    if let Some(s) = sent_at {
        msg.insert("sentAt".into(), Value::String(iso(s.timestamp_millis())));
    }

    let payload = serde_json::to_string(&msg).expect("a JSON map serialises");
    if payload.len() > limits.max_event_bytes {
        return Err(Reject::new(
            "event_too_large",
            format!("event is larger than {} bytes", limits.max_event_bytes),
        ));
    }
    Ok(IngestedEvent {
        message_id,
        source: source.to_string(),
        kind,
        user_id,
        anonymous_id,
        event,
        received_at,
        event_time,
        payload,
    })
}

/// The Kafka key of an event, its *subject*: a hash of its userId, else its
/// anonymousId, so the key names nobody, a person's identified events stay in order
/// across their devices, and one visitor's anonymous events stay in order. The record
/// is sealed with the subject's key, and erasing the person destroys it.
///
/// The userId comes first because a device can be shared: a kiosk's anonymousId is
/// every user's who logs in on it. Erasing one of them destroys the keys of the subjects
/// noted under their profile; keyed by the anonymousId, the other users' events from the
/// kiosk would be destroyed with theirs. Keyed by the userId, only the device's
/// anonymous events share a key, and those are attributed to one profile anyway.
pub fn partition_key(e: &IngestedEvent) -> String {
    subject_of(
        e.user_id
            .as_deref()
            .or(e.anonymous_id.as_deref())
            .unwrap_or(&e.message_id),
    )
}

fn subject_of(id: &str) -> String {
    tessera_common::ids::deterministic_id("subject", &[id])
}

/// The subject of an input that was refused, when it names a visitor: its dead letter
/// is sealed with that subject's key like the visitor's events (the userId's, else
/// the anonymousId's: `partition_key`).
pub fn subject_of_input(v: &Value) -> Option<String> {
    let m = v.as_object()?;
    let id = id_field(m, "userId")
        .ok()
        .flatten()
        .or_else(|| id_field(m, "anonymousId").ok().flatten())?;
    Some(subject_of(&id))
}

/// Whether the event carries a suppressed userId or anonymousId (hashed as identity
/// hashes them, trimmed).
pub fn is_suppressed(e: &IngestedEvent, s: &Suppressions) -> bool {
    !s.is_empty()
        && [("user_id", &e.user_id), ("anonymous_id", &e.anonymous_id)]
            .iter()
            .any(|(kind, v)| {
                v.as_deref()
                    .is_some_and(|v| s.contains(&identifier_hash(kind, v.trim())))
            })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits {
            max_event_bytes: 32 * 1024,
            max_depth: 32,
            max_string_bytes: 16 * 1024,
            future_tolerance_ms: 60_000,
        }
    }

    const NOW: i64 = 1_700_000_100_000; // 2023-11-14T22:15:00Z

    fn norm(v: Value) -> Result<IngestedEvent, Reject> {
        normalise(v, None, &Envelope::default(), "web", NOW, &limits(), || {
            "gen-id".into()
        })
    }

    #[test]
    fn track_is_normalised() {
        let e = norm(
            json!({"type":"track","userId":"u1","event":"Order Completed",
            "properties":{"total":10},"messageId":"m1","writeKey":"secret"}),
        )
        .unwrap();
        assert_eq!(e.kind, "track");
        assert_eq!(e.event.as_deref(), Some("Order Completed"));
        assert_eq!(e.message_id, "m1");
        assert_eq!(e.event_time, NOW, "no client time: the receive time");
        let p: Value = serde_json::from_str(&e.payload).unwrap();
        assert!(
            p.get("writeKey").is_none(),
            "the write key never reaches a topic"
        );
        assert_eq!(p["receivedAt"], "2023-11-14T22:15:00.000Z");
    }

    #[test]
    fn missing_fields_are_refused_with_codes() {
        let cases = [
            (json!({"type":"track","event":"x"}), "missing_identity"),
            (json!({"type":"track","userId":"u"}), "missing_event"),
            (
                json!({"type":"track","userId":"u","event":"  "}),
                "missing_event",
            ),
            (json!({"type":"alias","userId":"u"}), "missing_previous_id"),
            (json!({"type":"group","userId":"u"}), "missing_group_id"),
            (json!({"type":"boom","userId":"u"}), "unknown_type"),
            (json!({"userId":"u"}), "unknown_type"),
            (json!({"type":"identify","userId":{"a":1}}), "invalid_field"),
            (
                json!({"type":"identify","userId":"u","traits":[1]}),
                "invalid_field",
            ),
            (
                json!({"type":"identify","userId":"u","timestamp":"yesterday"}),
                "invalid_field",
            ),
            (json!([1, 2]), "not_an_object"),
        ];
        for (v, code) in cases {
            let got = norm(v.clone()).unwrap_err();
            assert_eq!(got.code, code, "{v}: {got:?}");
            assert!(!got.reason.is_empty());
        }
    }

    #[test]
    fn numeric_user_id_becomes_a_string_and_message_id_is_assigned() {
        let e = norm(json!({"type":"identify","userId":42})).unwrap();
        assert_eq!(e.user_id.as_deref(), Some("42"));
        assert_eq!(e.message_id, "gen-id");
    }

    #[test]
    fn clock_skew_is_corrected() {
        // The client clock is 1 hour fast: it stamped the event 10 s before sending.
        let e = norm(json!({"type":"track","anonymousId":"a","event":"x",
            "timestamp":"2023-11-14T23:14:50Z","sentAt":"2023-11-14T23:15:00Z"}))
        .unwrap();
        assert_eq!(e.event_time, NOW - 10_000);
        let p: Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(p["originalTimestamp"], "2023-11-14T23:14:50.000Z");
    }

    #[test]
    fn batch_sent_at_applies_and_future_times_are_clamped() {
        let sent = json!("2023-11-14T22:15:00Z");
        let env = Envelope {
            sent_at: Some(&sent),
            context: None,
        };
        let e = normalise(
            json!({"type":"page","anonymousId":"a","originalTimestamp":"2023-11-14T22:14:59Z"}),
            None,
            &env,
            "web",
            NOW,
            &limits(),
            || "g".into(),
        )
        .unwrap();
        assert_eq!(e.event_time, NOW - 1_000);
        // Without sentAt a time far in the future is replaced by the receive time.
        let e = norm(json!({"type":"track","anonymousId":"a","event":"x","timestamp":"2030-01-01T00:00:00Z"})).unwrap();
        assert_eq!(e.event_time, NOW);
    }

    #[test]
    fn shape_limits() {
        let mut deep = json!("x");
        for _ in 0..40 {
            deep = json!({ "a": deep });
        }
        let got = norm(json!({"type":"identify","userId":"u","traits":deep})).unwrap_err();
        assert_eq!(got.code, "too_deep");
        let long = "x".repeat(17 * 1024);
        let got = norm(json!({"type":"identify","userId":"u","traits":{"bio":long}})).unwrap_err();
        assert_eq!(got.code, "string_too_long");
        let many: Map<String, Value> = (0..3000)
            .map(|i| (format!("k{i}"), json!("0123456789")))
            .collect();
        let got = norm(json!({"type":"identify","userId":"u","traits":many})).unwrap_err();
        assert_eq!(got.code, "event_too_large");
    }

    #[test]
    fn batch_context_is_merged_under_the_message_context() {
        let ctx = json!({"library":{"name":"batch"},"ip":"1.2.3.4"});
        let env = Envelope {
            sent_at: None,
            context: ctx.as_object(),
        };
        let e = normalise(
            json!({"type":"track","userId":"u","event":"e","context":{"library":{"name":"own"}}}),
            None,
            &env,
            "s",
            NOW,
            &limits(),
            || "g".into(),
        )
        .unwrap();
        let p: Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(p["context"]["library"]["name"], "own");
        assert_eq!(p["context"]["ip"], "1.2.3.4");
    }

    /// A kiosk's anonymousId is shared by everyone who logs in on it: an event with a
    /// userId is keyed and sealed by the userId, so erasing one of them leaves the
    /// others' events readable. A refused input is sealed under the same subject.
    #[test]
    fn the_subject_is_the_user_id_else_the_anonymous_id() {
        let ann = json!({"type":"track","event":"e","userId":"ann","anonymousId":"kiosk"});
        let bob = json!({"type":"track","event":"e","userId":"bob","anonymousId":"kiosk"});
        let visitor = json!({"type":"page","anonymousId":"kiosk"});
        let keys: Vec<String> = [&ann, &bob, &visitor]
            .iter()
            .map(|v| partition_key(&norm((*v).clone()).unwrap()))
            .collect();
        assert_ne!(keys[0], keys[1], "two users of one device: two subjects");
        assert_ne!(keys[0], keys[2]);
        assert_eq!(
            keys[0],
            partition_key(&norm(json!({"type":"track","event":"e","userId":"ann"})).unwrap()),
            "a user's events share one subject on every device"
        );
        for (v, key) in [&ann, &bob, &visitor].iter().zip(&keys) {
            assert_eq!(subject_of_input(v).as_ref(), Some(key));
        }
    }

    /// Any JSON value: nested objects and arrays of strings, numbers, bools and nulls,
    /// with the field names validation looks at among the keys.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("type".to_string()),
            Just("userId".to_string()),
            Just("anonymousId".to_string()),
            Just("event".to_string()),
            Just("timestamp".to_string()),
            Just("sentAt".to_string()),
            Just("traits".to_string()),
            Just("context".to_string()),
            Just("messageId".to_string()),
            ".{0,8}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            prop_oneof![
                Just("track".to_string()),
                Just("2024-01-01T00:00:00Z".to_string()),
                ".{0,12}"
            ]
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(6, 64, 8, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(key.clone(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever JSON arrives, validation answers: an event, or a coded reason.
        #[test]
        fn any_json_gets_an_event_or_a_reason(v in any_json(), forced in proptest::option::of(0usize..6)) {
            let forced = forced.map(|i| TYPES[i]);
            match normalise(v, forced, &Envelope::default(), "s", NOW, &limits(), || "g".into()) {
                Ok(e) => {
                    proptest::prop_assert!(TYPES.contains(&e.kind.as_str()));
                    proptest::prop_assert!(e.user_id.is_some() || e.anonymous_id.is_some());
                    proptest::prop_assert!(e.event_time <= NOW + limits().future_tolerance_ms);
                }
                Err(r) => proptest::prop_assert!(!r.code.is_empty() && !r.reason.is_empty()),
            }
        }
    }
}
