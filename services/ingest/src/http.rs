//! The Segment HTTP Tracking API: `POST /v1/{identify,track,page,screen,group,alias,batch}`
//! (and `/v1/import`, an alias of batch). A 200 means every accepted event is
//! acknowledged by Kafka; refusals are JSON `{error, reason}` with a 4xx status.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use futures::StreamExt;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};
use tower_http::cors::{Any, CorsLayer};
use tracing::{debug, warn};

use tessera_common::config::SourceConfig;
use tessera_common::ids::subject_hash;
use tessera_common::kafka::{ProduceError, Producer};
use tessera_common::records::{AvroRecord, DeadLetter, IngestedEvent};
use tessera_common::suppressions::Suppressions;
use tessera_common::topics::Topics;
use tessera_common::vault::Vault;

use crate::body::{Decoding, decode_body, events_of, parse_object};
use crate::metrics::IngestMetrics;
use crate::refusal::Refusal;
use crate::validate::{self, Limits};

pub struct AppState {
    pub producer: Arc<Producer>,
    pub topics: Topics,
    pub metrics: IngestMetrics,
    pub limits: Limits,
    pub max_request_bytes: usize,
    pub max_batch_events: usize,
    /// A request body must arrive whole within this.
    pub body_timeout: Duration,
    /// Permits for requests being processed (`ingest.max_concurrent_requests`), taken
    /// once the body is read.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// Bytes of request bodies being read, one permit a byte
    /// (`max_concurrent_requests` × `max_request_bytes`): a slow client holds only what
    /// it has sent.
    pub reading: Arc<tokio::sync::Semaphore>,
    /// write key → the source it belongs to
    pub sources: HashMap<String, SourceKey>,
    /// The subject keys and suppressions, once read (until then: 503).
    pub privacy: Arc<OnceLock<Privacy>>,
}

/// What ingest needs of the privacy topics: keys to seal each event with its subject's,
/// and the identifiers whose events are dropped.
#[derive(Clone)]
pub struct Privacy {
    pub vault: Arc<Vault>,
    pub suppressions: Suppressions,
}

/// A source as ingest enforces it: enabled or not, its rate limit.
pub struct Source {
    pub name: String,
    pub enabled: bool,
    /// Events per second, and the limiter that keeps to it.
    pub limit: Option<(u32, DefaultDirectRateLimiter)>,
}

/// A write key: its source, and whether it is a key being rotated out.
#[derive(Clone)]
pub struct SourceKey {
    pub source: Arc<Source>,
    pub previous: bool,
}

/// Every key of every source.
pub fn source_keys(sources: &[SourceConfig]) -> HashMap<String, SourceKey> {
    let mut keys = HashMap::new();
    for c in sources {
        let source = Arc::new(Source {
            name: c.name.clone(),
            enabled: c.enabled,
            limit: c
                .max_events_per_second
                .and_then(NonZeroU32::new)
                .map(|n| (n.get(), RateLimiter::direct(Quota::per_second(n)))),
        });
        keys.insert(
            c.write_key.clone(),
            SourceKey {
                source: source.clone(),
                previous: false,
            },
        );
        for k in &c.previous_write_keys {
            keys.insert(
                k.clone(),
                SourceKey {
                    source: source.clone(),
                    previous: true,
                },
            );
        }
    }
    keys
}

impl Source {
    /// Takes `n` events from the source's allowance, or says how long to wait.
    fn admit(&self, n: usize) -> Result<(), Refusal> {
        let Some((rate, limiter)) = &self.limit else {
            return Ok(());
        };
        let n = NonZeroU32::new(n.clamp(1, u32::MAX as usize) as u32).expect("at least 1");
        let wait = match limiter.check_n(n) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(not_until)) => not_until.wait_time_from(DefaultClock::default().now()),
            // More events than a second's allowance: never in one request.
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "source {} may send {rate} events per second; send smaller batches",
                        self.name
                    ),
                ));
            }
        };
        let mut r = Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "source {} is over its rate of {rate} events per second",
                self.name
            ),
        );
        r.retry_after = wait.as_secs_f64().ceil().max(1.0) as u64;
        Err(r)
    }
}

/// How much of an oversized body is read (and thrown away) before answering 413.
const DRAIN_CAP: usize = 8 * 1024 * 1024;

/// The tracking routes. Browser SDKs post from other origins, so preflights are
/// answered for any origin (write keys are public in browsers by design; they only
/// name a source).
pub fn router(state: Arc<AppState>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
        ])
        .max_age(Duration::from_secs(86_400));
    Router::new()
        .route(
            "/v1/{kind}",
            post(handle).fallback(|| async {
                Refusal::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "use POST",
                )
            }),
        )
        .layer(cors)
        .with_state(state)
}

async fn handle(
    State(st): State<Arc<AppState>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let endpoint: &'static str = match kind.as_str() {
        "batch" | "import" => "batch",
        k => match validate::TYPES.iter().find(|t| **t == k) {
            Some(t) => t,
            None => {
                return Refusal::new(
                    StatusCode::NOT_FOUND,
                    "unknown_endpoint",
                    format!("no endpoint /v1/{kind}"),
                )
                .into_response();
            }
        },
    };
    let accepted = receive(&st, endpoint, &headers, body).await;
    let resp = match accepted {
        Ok(r) => r,
        Err(refusal) => {
            st.metrics
                .rejected
                .with_label_values(&["http", refusal.code])
                .inc();
            refusal.into_response()
        }
    };
    st.metrics
        .requests
        .with_label_values(&[endpoint, resp.status().as_str()])
        .inc();
    st.metrics
        .request_seconds
        .with_label_values(&[endpoint])
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// Reads a request, then processes it. The body is read first, against the budget of
/// bytes being read, and only then is a processing slot taken: clients that trickle
/// their bodies hold the few bytes they sent, never a slot. Beyond either limit ingest
/// sheds load (429) instead of queueing.
async fn receive(
    st: &AppState,
    endpoint: &'static str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    // A key in the header is checked before any body work.
    let header_key = basic_user(headers).filter(|k| !k.is_empty());
    if let Some(k) = &header_key {
        source_of(st, k)?;
    }
    let (bytes, _read) = read_body(st, headers, body).await?;
    let _slot = st
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| overloaded())?;
    accept(st, endpoint, header_key, &bytes).await
}

fn overloaded() -> Refusal {
    Refusal::new(
        StatusCode::TOO_MANY_REQUESTS,
        "overloaded",
        "ingest is at capacity (requests in flight), retry later",
    )
}

/// The source of a write key: 401 for an unknown key, 403 for a disabled source.
fn source_of(st: &AppState, key: &str) -> Result<SourceKey, Refusal> {
    match st.sources.get(key) {
        None => Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown write key",
        )),
        Some(k) if !k.source.enabled => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "source_disabled",
            format!("source {} is disabled", k.source.name),
        )),
        Some(k) => Ok(k.clone()),
    }
}

/// The write key: HTTP Basic user name (password empty), else `writeKey` in the body.
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(
        text.split_once(':')
            .map_or(text.clone(), |(user, _)| user.to_string()),
    )
}

/// Reads the body within the limit, undoing gzip whatever the Content-Type says; the
/// permits of `st.reading` for the bytes received come with it.
async fn read_body(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>), Refusal> {
    let limit = st.max_request_bytes;
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("request body is larger than {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && len > DRAIN_CAP
    {
        // Far too large to bother reading: answer now and let the connection close.
        return Err(too_large());
    }
    // Read up to the limit; past it, read and discard up to DRAIN_CAP so the client,
    // still sending, gets to read the 413 instead of a reset connection.
    let mut stream = body.into_data_stream();
    let mut raw: Vec<u8> = Vec::new();
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut seen = 0usize;
    // The whole body within the deadline: a client trickling bytes is cut off.
    let deadline = tokio::time::Instant::now() + st.body_timeout;
    let timed_out = || {
        Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms",
                st.body_timeout.as_millis()
            ),
        )
    };
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| timed_out())?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            let e = e.into_inner();
            // A gap between parts longer than the limit (the server's body timeout).
            if e.is::<tower_http::timeout::TimeoutError>() {
                return timed_out();
            }
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                format!("request body could not be read: {e}"),
            )
        })?;
        seen += chunk.len();
        if seen <= limit {
            let permit = u32::try_from(chunk.len())
                .ok()
                .and_then(|n| st.reading.clone().try_acquire_many_owned(n).ok())
                .ok_or_else(overloaded)?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
            raw.extend_from_slice(&chunk);
        } else if seen > DRAIN_CAP {
            break;
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    Ok((decode_body(encoding, raw, limit)?, held))
}

async fn accept(
    st: &AppState,
    endpoint: &'static str,
    header_key: Option<String>,
    bytes: &[u8],
) -> Result<Response, Refusal> {
    let root = parse_object(bytes)?;
    let key = match header_key {
        Some(k) => k,
        None => match root.get("writeKey") {
            Some(Value::String(k)) if !k.is_empty() => k.clone(),
            _ => {
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a write key is required (HTTP Basic user name or writeKey)",
                ));
            }
        },
    };
    let key = source_of(st, &key)?;
    if key.previous {
        st.metrics
            .previous_key_requests
            .with_label_values(&[&key.source.name])
            .inc();
    }
    let source = key.source.name.clone();
    let decoding = Decoding {
        limits: &st.limits,
        max_batch_events: st.max_batch_events,
        source: &source,
        received_at: tessera_common::now_ms(),
    };
    let decoded = events_of(endpoint, root, bytes.len(), &decoding, |n| {
        key.source.admit(n)
    })?;
    for r in &decoded.rejected {
        let code = r["error"].as_str().unwrap_or("invalid");
        st.metrics.rejected.with_label_values(&["http", code]).inc();
    }
    let valid = decoded.accepted.len();
    let n = produce(st, decoded.accepted, decoded.dead).await?;
    st.metrics
        .accepted
        .with_label_values(&["http", &source])
        .inc_by(n as u64);
    if valid == 0 {
        return Err(Refusal {
            extra: Some(Value::Array(decoded.rejected)),
            ..Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_batch",
                "no event in the batch is valid",
            )
        });
    }
    if endpoint == "batch" {
        debug!(
            accepted = n,
            rejected = decoded.rejected.len(),
            "batch accepted"
        );
    }
    Ok((
        StatusCode::OK,
        // Events dropped for a suppressed person count as accepted: the sender is not told.
        axum::Json(json!({"success": true, "accepted": valid, "rejected": decoded.rejected})),
    )
        .into_response())
}

/// A dead letter as it goes on the topic. One whose event names a visitor is sealed like
/// their events, so an erasure shreds it too; if it cannot be sealed the request is
/// refused (503, the client retries), never written in clear.
async fn dead_letter_payload(vault: &Vault, d: &DeadLetter) -> Result<Option<Vec<u8>>, Refusal> {
    let payload = d.to_avro().map_err(internal)?;
    let Some(subject) = serde_json::from_slice::<Value>(&d.original)
        .ok()
        .and_then(|v| validate::subject_of_input(&v))
    else {
        return Ok(Some(payload));
    };
    match vault.seal(&subject_hash(&subject), &payload).await {
        Ok(sealed) => Ok(Some(sealed)),
        // The visitor was erased a moment ago: nothing of theirs is written.
        Err(tessera_common::Error::Erased) => Ok(None),
        Err(e) => {
            warn!(error = %e, "a dead letter could not be sealed, answering with a retry");
            Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "events could not be stored in Kafka, retry later",
            ))
        }
    }
}

/// Produces the accepted events (sealed, less those of suppressed people, which are
/// counted) and the dead letters, and waits for every acknowledgement; returns how many
/// events were stored. Any failure answers 429 (queue full) or 503: the client retries
/// and the messageIds let the pipeline drop what did get through.
async fn produce(
    st: &AppState,
    mut events: Vec<IngestedEvent>,
    dead: Vec<DeadLetter>,
) -> Result<usize, Refusal> {
    let ingested = st.topics.ingested();
    let deadletter = st.topics.deadletter();
    let Some(privacy) = st.privacy.get() else {
        st.metrics.unavailable.inc();
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "events could not be stored in Kafka, retry later",
        ));
    };
    let before = events.len();
    events.retain(|e| !validate::is_suppressed(e, &privacy.suppressions));
    if events.len() < before {
        st.metrics
            .dropped
            .with_label_values(&["http", "suppressed"])
            .inc_by((before - events.len()) as u64);
    }
    let mut records: Vec<(&str, Vec<u8>, Vec<u8>)> = Vec::with_capacity(events.len() + dead.len());
    // Sealed together: a new subject's key is stored (one round trip) before its event.
    let sealed = futures::future::join_all(events.iter().map(|e| async move {
        let subject = validate::partition_key(e);
        let payload = e.to_avro()?;
        let sealed = privacy.vault.seal(&subject_hash(&subject), &payload).await;
        Ok::<_, tessera_common::Error>((subject, sealed))
    }))
    .await;
    for r in sealed {
        let (subject, payload) = match r {
            Ok((subject, Ok(payload))) => (subject, payload),
            // The visitor was erased a moment ago: their event is dropped, like a
            // suppressed one.
            Ok((_, Err(tessera_common::Error::Erased))) => {
                st.metrics
                    .dropped
                    .with_label_values(&["http", "erased"])
                    .inc();
                continue;
            }
            Ok((_, Err(e))) | Err(e) => {
                warn!(error = %e, "an event could not be sealed, answering with a retry");
                return Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "events could not be stored in Kafka, retry later",
                ));
            }
        };
        records.push((&ingested, subject.into_bytes(), payload));
    }
    for d in &dead {
        if let Some(payload) = dead_letter_payload(&privacy.vault, d).await? {
            records.push((
                &deadletter,
                d.source.clone().unwrap_or_default().into_bytes(),
                payload,
            ));
        }
    }
    let started = Instant::now();
    let results =
        futures::future::join_all(records.iter().map(|(t, k, p)| st.producer.send(t, k, p))).await;
    st.metrics
        .produce_seconds
        .observe(started.elapsed().as_secs_f64());
    let mut queue_full = false;
    let mut failed = 0usize;
    for r in results {
        match r {
            Ok(_) => {}
            Err(ProduceError::QueueFull) => {
                queue_full = true;
                failed += 1;
            }
            Err(ProduceError::Unavailable(e)) => {
                failed += 1;
                debug!(error = %e, "produce failed");
            }
        }
    }
    if failed == 0 {
        return Ok(events.len());
    }
    st.metrics.unavailable.inc();
    warn!(
        failed,
        total = records.len(),
        "events not acknowledged by kafka, answering with a retry"
    );
    if queue_full {
        Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            "ingest is at capacity, retry later",
        ))
    } else {
        Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "events could not be stored in Kafka, retry later",
        ))
    }
}

fn internal(e: tessera_common::Error) -> Refusal {
    Refusal::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("encoding failed: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::Decoded;

    fn decode(endpoint: &'static str, body: Value) -> Result<Decoded, Refusal> {
        let limits = Limits {
            max_event_bytes: 32 * 1024,
            max_depth: 32,
            max_string_bytes: 16 * 1024,
            future_tolerance_ms: 60_000,
        };
        let d = Decoding {
            limits: &limits,
            max_batch_events: 3,
            source: "web",
            received_at: 1_700_000_000_000,
        };
        let bytes = serde_json::to_vec(&body).unwrap();
        events_of(endpoint, parse_object(&bytes)?, bytes.len(), &d, |_| Ok(()))
    }

    /// The audit's finding: when sealing failed, the refused event went to the
    /// dead-letter topic in clear, with its PII, beyond any erasure.
    #[tokio::test]
    async fn a_dead_letter_that_cannot_be_sealed_is_refused_not_written_in_clear() {
        let dead = decode(
            "batch",
            json!({"batch": [{"type": "identify", "userId": "u-1", "traits": {"email": "x@mail.test"}, "timestamp": 7},
                             {"type": "track", "userId": "u-1", "event": "E"}]}),
        )
        .unwrap()
        .dead
        .remove(0);
        // A vault without a producer cannot create the visitor's key.
        let vault = Vault::detached();
        let refused = dead_letter_payload(&vault, &dead).await.unwrap_err();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        // One that names no visitor has no subject to be erased with: it goes as it is.
        let anonymous = DeadLetter {
            original: b"7".to_vec(),
            ..dead
        };
        let plain = dead_letter_payload(&vault, &anonymous).await.unwrap();
        assert_eq!(plain, Some(anonymous.to_avro().unwrap()));
    }

    #[test]
    fn a_batch_is_taken_item_by_item_within_its_limits() {
        let ok = decode(
            "batch",
            json!({"batch": [{"type": "track", "userId": "u", "event": "E"}, {"type": "track", "userId": "u"}, 7],
                   "context": {"library": {"name": "x"}}}),
        )
        .unwrap();
        assert_eq!(ok.accepted.len(), 1);
        assert_eq!(ok.dead.len(), 2);
        assert_eq!(ok.rejected[0]["index"], 1);
        assert_eq!(ok.rejected[0]["error"], "missing_event");
        assert_eq!(ok.rejected[1]["error"], "not_an_object");
        // The envelope's own faults refuse the whole request.
        for (body, status, code) in [
            (
                json!({"batch": [{"type": "page", "userId": "u"}], "context": [1]}),
                400,
                "invalid_batch",
            ),
            (json!({"batch": []}), 400, "invalid_batch"),
            (json!({"batch": {}}), 400, "invalid_batch"),
            (json!({"batch": [1, 2, 3, 4]}), 413, "batch_too_large"),
        ] {
            let r = decode("batch", body).unwrap_err();
            assert_eq!((r.status.as_u16(), r.code), (status, code));
        }
    }

    #[test]
    fn a_single_event_is_refused_whole_and_bodies_decode_or_say_why() {
        let r = decode("track", json!({"userId": "u"})).unwrap_err();
        assert_eq!((r.status.as_u16(), r.code), (400, "missing_event"));
        assert_eq!(
            decode("page", json!({"anonymousId": "a"}))
                .unwrap()
                .accepted
                .len(),
            1
        );
        assert_eq!(parse_object(b"[1]").unwrap_err().code, "not_an_object");
        assert_eq!(parse_object(b"{").unwrap_err().code, "invalid_json");
        assert_eq!(
            decode_body(Some("br"), vec![], 10).unwrap_err().code,
            "unsupported_encoding"
        );
        assert_eq!(
            decode_body(Some(" GZIP "), b"nope".to_vec(), 10)
                .unwrap_err()
                .code,
            "invalid_gzip"
        );
        // A gzip body that inflates past the limit is refused, having read one byte past it.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &[b' '; 10_000]).unwrap();
        let r = decode_body(Some("gzip"), gz.finish().unwrap(), 100).unwrap_err();
        assert_eq!((r.status.as_u16(), r.code), (413, "request_too_large"));
    }
}
