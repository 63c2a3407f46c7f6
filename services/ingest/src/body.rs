//! A request body, from bytes to events: its `Content-Encoding` undone, the JSON object
//! parsed, and the events of a single-event endpoint or a batch validated (each batch
//! item refused alone). No I/O: the HTTP handler (`http.rs`) and the fuzz target call it.

use std::io::Read;

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use tessera_common::records::{DeadLetter, IngestedEvent};

use crate::refusal::Refusal;
use crate::validate::{self, Envelope, Limits};

/// Undoes a body's `Content-Encoding` (gzip or none); at most `limit` bytes come out.
pub fn decode_body(encoding: Option<&str>, raw: Vec<u8>, limit: usize) -> Result<Vec<u8>, Refusal> {
    match encoding.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("identity") => Ok(raw),
        Some("gzip") | Some("x-gzip") => {
            // Stop reading one byte past the limit: a decompression bomb costs at most that.
            let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit + 1));
            flate2::read::MultiGzDecoder::new(&raw[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_gzip",
                        format!("body is not valid gzip: {e}"),
                    )
                })?;
            if out.len() > limit {
                return Err(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    format!("decompressed body is larger than {limit} bytes"),
                ));
            }
            Ok(out)
        }
        Some(other) => Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!("Content-Encoding {other:?} is not supported (use gzip or none)"),
        )),
    }
}

/// A body as the JSON object every endpoint takes.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, Refusal> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("body is not valid JSON: {e}"),
        )
    })?;
    match value {
        Value::Object(root) => Ok(root),
        _ => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "not_an_object",
            "body must be a JSON object",
        )),
    }
}

/// What a request's events are checked against.
pub struct Decoding<'a> {
    pub limits: &'a Limits,
    pub max_batch_events: usize,
    pub source: &'a str,
    pub received_at: i64,
}

/// A request's events, checked and normalised, before anything is produced.
#[derive(Debug, Default)]
pub struct Decoded {
    pub accepted: Vec<IngestedEvent>,
    /// The refused items of a batch, as dead letters with their reasons...
    pub dead: Vec<DeadLetter>,
    /// ...and as the answer's `rejected` entries (`index`, `error`, `reason`).
    pub rejected: Vec<Value>,
}

/// The events of a request body: the one event of `/v1/<type>` (refused whole when
/// invalid) or the items of a batch (each refused alone). `admit` is asked for the number
/// of events before any is checked (the source's rate limit).
pub fn events_of(
    endpoint: &'static str,
    mut root: Map<String, Value>,
    body_len: usize,
    d: &Decoding<'_>,
    admit: impl FnOnce(usize) -> Result<(), Refusal>,
) -> Result<Decoded, Refusal> {
    let new_id = || uuid::Uuid::new_v4().to_string();
    if endpoint != "batch" {
        if body_len > d.limits.max_event_bytes {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "event_too_large",
                format!("event is larger than {} bytes", d.limits.max_event_bytes),
            ));
        }
        admit(1)?;
        let event = validate::normalise(
            Value::Object(root),
            Some(endpoint),
            &Envelope::default(),
            d.source,
            d.received_at,
            d.limits,
            new_id,
        )
        .map_err(|r| {
            let status = if r.code == "event_too_large" {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            Refusal::from_reject(status, r)
        })?;
        return Ok(Decoded {
            accepted: vec![event],
            ..Decoded::default()
        });
    }

    let items = match root.remove("batch") {
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_batch",
                "batch must be an array",
            ));
        }
        None => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_batch",
                "batch is missing",
            ));
        }
    };
    if items.len() > d.max_batch_events {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "a batch holds at most {} events, got {}",
                d.max_batch_events,
                items.len()
            ),
        ));
    }
    if items.is_empty() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_batch",
            "batch is empty",
        ));
    }
    if root
        .get("context")
        .is_some_and(|c| !c.is_object() && !c.is_null())
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_batch",
            "the batch's context must be an object",
        ));
    }
    admit(items.len())?;
    let envelope = Envelope {
        sent_at: root.get("sentAt"),
        context: root.get("context").and_then(Value::as_object),
    };
    let mut out = Decoded {
        accepted: Vec::with_capacity(items.len()),
        ..Decoded::default()
    };
    for (index, item) in items.into_iter().enumerate() {
        let original = serde_json::to_vec(&item).unwrap_or_default();
        match validate::normalise(
            item,
            None,
            &envelope,
            d.source,
            d.received_at,
            d.limits,
            new_id,
        ) {
            Ok(e) => out.accepted.push(e),
            Err(r) => {
                out.rejected
                    .push(json!({"index": index, "error": r.code, "reason": r.reason}));
                out.dead.push(DeadLetter {
                    origin: "http".into(),
                    source: Some(d.source.to_string()),
                    reason: format!("{}: {}", r.code, r.reason),
                    received_at: d.received_at,
                    batch_index: Some(index as i32),
                    input_topic: None,
                    input_partition: None,
                    input_offset: None,
                    original,
                });
            }
        }
    }
    Ok(out)
}
