//! The profile API: `GET /v1/profiles/{id}`, `GET /v1/profiles/lookup?type=&value=`,
//! `GET /v1/segments`, and the members of a household or an account:
//! `GET /v1/households/{id}`, `GET /v1/accounts/{id}`. Reads go to RocksDB on the blocking pool.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{SecondsFormat, TimeZone, Utc};
use serde_json::{Value, json};

use tessera_common::config::TraitStrategy;
use tessera_common::store::SharedStore;

use crate::profile::Profile;
use crate::segments::Segment;
use crate::state::{index_key, live_id, member_prefix, profile_key, segment_size_key};

#[derive(Clone)]
pub struct ApiState {
    pub store: SharedStore,
    pub segments: Arc<Vec<Segment>>,
    /// Trait strategies, shown by `explain`.
    pub strategies: Arc<BTreeMap<String, TraitStrategy>>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/profiles/lookup", get(lookup))
        .route("/v1/profiles/{id}", get(by_id))
        .route("/v1/segments", get(segments))
        .route("/v1/households/{id}", get(household))
        .route("/v1/accounts/{id}", get(account))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, reason: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": code, "reason": reason.into()})),
    )
        .into_response()
}

fn iso(ms: i64) -> Value {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) if ms != i64::MIN && ms != i64::MAX => {
            Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true))
        }
        _ => Value::Null,
    }
}

/// The 360 view of a profile. With `explain`, each trait carries its provenance and
/// the strategy that chose it (`strategies`; unlisted: most recent).
pub fn view(p: &Profile, explain: bool, strategies: &BTreeMap<String, TraitStrategy>) -> Value {
    let traits: serde_json::Map<String, Value> = p
        .traits
        .iter()
        .map(|(k, v)| {
            let shown = if explain {
                let strategy = strategies.get(k).unwrap_or(&TraitStrategy::MostRecent);
                let mut why = json!({
                    "value": v.value, "event_time": iso(v.event_time), "message_id": v.message_id,
                    "source": v.source, "strategy": strategy,
                });
                if let Some(f) = p
                    .trait_counts
                    .get(k)
                    .and_then(|c| c.get(&v.value.to_string()))
                {
                    why["count"] = json!(f.count);
                    why["values_counted"] = json!(p.trait_counts[k].len());
                }
                why
            } else {
                v.value.clone()
            };
            (k.clone(), shown)
        })
        .collect();
    json!({
        "profile_id": p.id,
        "identifiers": p.identifiers.iter().map(|i| json!({"type": i.kind, "value": i.value})).collect::<Vec<_>>(),
        "traits": traits,
        "event_counts": p.event_counts,
        "events_total": p.events_total,
        "first_seen": iso(p.first_seen),
        "last_seen": iso(p.last_seen),
        "segments": p.segments.iter().map(|(id, m)| json!({"id": id, "version": m.version, "entered_at": iso(m.entered_at)})).collect::<Vec<_>>(),
        "recent_events": p.recent_events.iter().map(|e| json!({
            "message_id": e.message_id, "type": e.kind, "event": e.event,
            "timestamp": iso(e.event_time), "received_at": iso(e.received_at),
            "source": e.source, "properties": e.properties,
        })).collect::<Vec<_>>(),
        "merged_from": p.merged_from,
        "accounts": p.accounts,
        "household": p.household,
    })
}

async fn load_live(store: SharedStore, id: String) -> Result<Option<Profile>, String> {
    tokio::task::spawn_blocking(move || {
        let live = live_id(|k| store.get(k), &id).map_err(|e| e.to_string())?;
        match store.get(&profile_key(&live)).map_err(|e| e.to_string())? {
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| e.to_string()),
            None => Ok(None),
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

fn explain(q: &HashMap<String, String>) -> bool {
    q.get("explain").is_some_and(|v| v == "true" || v == "1")
}

async fn by_id(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match load_live(st.store, id).await {
        Ok(Some(p)) => axum::Json(view(&p, explain(&q), &st.strategies)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", "no such profile"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}

async fn lookup(State(st): State<ApiState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let (Some(kind), Some(value)) = (q.get("type"), q.get("value")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "type and value are required",
        );
    };
    if kind.is_empty() || value.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "type and value must not be empty",
        );
    }
    let value = if kind == "email" {
        value.trim().to_lowercase()
    } else {
        value.clone()
    };
    let store = st.store.clone();
    let key = index_key(kind, &value);
    let found = tokio::task::spawn_blocking(move || store.get(&key)).await;
    let id = match found {
        Ok(Ok(Some(b))) => String::from_utf8_lossy(&b).into_owned(),
        Ok(Ok(None)) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no profile has this identifier",
            );
        }
        Ok(Err(e)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            );
        }
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            );
        }
    };
    match load_live(st.store, id).await {
        Ok(Some(p)) => axum::Json(view(&p, explain(&q), &st.strategies)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no profile has this identifier",
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}

async fn segments(State(st): State<ApiState>) -> Response {
    let store = st.store.clone();
    let segs = st.segments.clone();
    let sizes = tokio::task::spawn_blocking(move || {
        segs.iter()
            .map(|s| {
                let size: i64 = store
                    .get(&segment_size_key(&s.id))
                    .ok()
                    .flatten()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or(0);
                json!({"id": s.id, "version": s.version, "name": s.name, "description": s.description, "size": size})
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    axum::Json(json!({"segments": sizes})).into_response()
}

/// Profile ids of a household or an account (at most 1000).
async fn members(st: ApiState, kind: &'static str, id: String) -> Response {
    let store = st.store.clone();
    let prefix = member_prefix(kind, &id);
    let found = tokio::task::spawn_blocking(move || {
        store.scan_prefix(prefix.as_bytes(), 1000).map(|rows| {
            rows.into_iter()
                .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
                .collect::<Vec<_>>()
        })
    })
    .await;
    match found {
        Ok(Ok(ids)) if ids.is_empty() => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no profile belongs to it",
        ),
        Ok(Ok(ids)) => axum::Json(json!({"id": id, "members": ids})).into_response(),
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

async fn household(State(st): State<ApiState>, Path(id): Path<String>) -> Response {
    members(st, "hh", id).await
}

async fn account(State(st): State<ApiState>, Path(id): Path<String>) -> Response {
    members(st, "acct", id).await
}
