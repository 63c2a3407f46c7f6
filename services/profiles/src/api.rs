//! The profile API (reads go to RocksDB on the blocking pool):
//! - `GET /v1/profiles/{id}[?explain=true][&events=N]`,
//!   `GET /v1/profiles/lookup?type=&value=`: the 360 view (`events`: the timeline's
//!   length, default `profiles.recent_events`); `GET /v1/profiles/{id}/segments`: its segments with entry times;
//! - `GET|POST /v1/segments`, `GET|PUT|DELETE /v1/segments/{id}`,
//!   `GET /v1/segments/{id}/members?after=&limit=`, `POST /v1/segments/dry-run`;
//! - `GET|POST /v1/computed-traits`, `GET|PUT|DELETE /v1/computed-traits/{id}`;
//! - `GET|POST /v1/triggers`, `GET|PUT|DELETE /v1/triggers/{id}`;
//! - `GET /v1/definitions/backfill`: the back-fill after the last definition change;
//! - `GET /v1/households/{id}`, `GET /v1/accounts/{id}`: member profile ids;
//! - `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/models/fit`: the predictive
//!   traits' fitted models (`model_api`).
//!
//! Definitions are JSON, or YAML with a `Content-Type` of `application/yaml`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use tessera_common::admin::Caller;
use tessera_common::audit::Audit;
use tessera_common::config::TraitStrategy;
use tessera_common::kafka::Producer;
use tessera_common::records::{DefinitionChange, ResolvedEvent};
use tessera_common::store::SharedStore;
use tessera_common::topics::Topics;

use crate::catalog::{self, COMPUTED_TRAIT, Catalog, Definition, SEGMENT, TRIGGER};
use crate::profile::Profile;
use crate::state::Placement;
use crate::state::queries::{self, Loaded};

#[derive(Clone)]
pub struct ApiState {
    pub store: SharedStore,
    /// Where definition changes are recorded with who made them.
    pub audit: Audit,
    pub catalog: Catalog,
    pub producer: Arc<Producer>,
    pub topics: Topics,
    /// Trait strategies, shown by `explain`.
    pub strategies: Arc<BTreeMap<String, TraitStrategy>>,
    /// Events kept per profile (a dry run derives computed traits from them).
    pub history_limit: usize,
    /// The timeline's length (the newest kept events).
    pub recent_events: usize,
    /// Which profiles this instance answers for (see [`crate::peers`]).
    pub placement: Placement,
    /// A fit of the predictive models asked for, and how fitting goes.
    pub fit_requests: Arc<std::sync::atomic::AtomicBool>,
    pub fit_status: Arc<std::sync::Mutex<crate::state::FitStatus>>,
}

pub fn router(state: ApiState) -> Router {
    let router = definition_routes(Router::new(), "/v1/segments", SEGMENT);
    let router = definition_routes(router, "/v1/triggers", TRIGGER);
    definition_routes(router, "/v1/computed-traits", COMPUTED_TRAIT)
        .route("/v1/profiles/lookup", get(lookup))
        .route("/v1/profiles/{id}", get(by_id))
        .route("/v1/profiles/{id}/segments", get(profile_segments))
        .route("/v1/segments/dry-run", post(dry_run))
        .route("/v1/segments/{id}/members", get(members_of_segment))
        .route("/v1/definitions/backfill", get(backfill))
        .route("/v1/households/{id}", get(household))
        .route("/v1/accounts/{id}", get(account))
        .merge(crate::model_api::routes())
        .with_state(state)
}

/// List and create at `base`; read, replace and delete at `base/{id}`.
fn definition_routes(router: Router<ApiState>, base: &str, kind: &'static str) -> Router<ApiState> {
    router
        .route(
            base,
            get(move |st: State<ApiState>| list(st, kind)).post(
                move |st: State<ApiState>, c: Extension<Caller>, h: HeaderMap, body: Bytes| {
                    create(st, c.0, kind, h, body)
                },
            ),
        )
        .route(
            &format!("{base}/{{id}}"),
            get(move |st: State<ApiState>, id: Path<String>| get_one(st, kind, id))
                .put(
                    move |st: State<ApiState>,
                          c: Extension<Caller>,
                          id: Path<String>,
                          h: HeaderMap,
                          body: Bytes| { replace(st, c.0, kind, id, h, body) },
                )
                .delete(
                    move |st: State<ApiState>, c: Extension<Caller>, id: Path<String>| {
                        remove(st, c.0, kind, id)
                    },
                ),
        )
}

use tessera_common::admin::{blocking, error};

fn iso(ms: i64) -> Value {
    tessera_common::time::iso_millis(ms).map_or(Value::Null, Value::String)
}

/// The 360 view of a profile. With `explain`, each trait carries its provenance and
/// the strategy that chose it (`strategies`; unlisted: most recent).
pub fn view(
    p: &Profile,
    recent: &[ResolvedEvent],
    explain: bool,
    strategies: &BTreeMap<String, TraitStrategy>,
    defs: &crate::catalog::DefinitionSet,
) -> Value {
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
    let computed: serde_json::Map<String, Value> = p
        .computed
        .iter()
        // Segment counters are internal.
        .filter(|(id, _)| !id.starts_with("_seg_"))
        .map(|(id, c)| {
            let shown = match (&c.purchases, c.day) {
                // A prediction explains itself: the customer's summary on the day it was
                // evaluated for, and the model version (its parameters: /v1/models/{id}).
                (Some(purchases), Some(day)) if explain => {
                    let s = purchases.summary(day, false);
                    let fitted = defs.model(id).and_then(|h| h.version(c.model));
                    json!({
                        "value": c.value, "model_version": c.model,
                        "as_of": iso(day * crate::predict::DAY_MS),
                        "frequency": s.map(|s| s.x), "recency_days": s.map(|s| s.t_x),
                        "age_days": s.map(|s| s.t), "approximate": purchases.approximate(),
                        "parameters": fitted.map(|f| json!({
                            "bgnbd": f.bgnbd, "gamma_gamma": f.gamma_gamma,
                            "fitted_at": iso(f.fitted_at), "customers": f.customers,
                        })),
                    })
                }
                // A propensity: the features it was evaluated on, and the weights.
                (None, Some(_)) if explain && c.activity.is_some() => {
                    let activity = c.activity.as_ref().expect("checked above");
                    let x = activity.features(p.evaluated_at);
                    let fitted = defs.model(id).and_then(|h| h.version(c.model));
                    let names = crate::predict::propensity::FEATURES;
                    json!({
                        "value": c.value, "model_version": c.model, "as_of": iso(p.evaluated_at),
                        "features": names.iter().zip(&x).map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                        "weights": fitted.and_then(|f| f.propensity.as_ref()).map(|l| l.weights.clone()),
                        "waiting_snapshots": activity.pending.len(), "examples": activity.examples.len(),
                    })
                }
                _ => c.value.clone(),
            };
            (id.clone(), shown)
        })
        .collect();
    let consent: serde_json::Map<String, Value> = p
        .consent
        .iter()
        .map(|(k, c)| {
            (
                k.clone(),
                json!({"granted": c.granted, "event_time": iso(c.event_time), "source": c.source, "via": c.via}),
            )
        })
        .collect();
    json!({
        "profile_id": p.id,
        "computed_traits": computed,
        "consent": consent,
        "identifiers": p.identifiers.iter().map(|i| json!({"type": i.kind, "value": i.value})).collect::<Vec<_>>(),
        "traits": traits,
        "event_counts": p.event_counts,
        "events_total": p.events_total,
        "first_seen": iso(p.first_seen),
        "last_seen": iso(p.last_seen),
        "segments": p.segments.iter().map(|(id, m)| json!({"id": id, "version": m.version, "entered_at": iso(m.entered_at)})).collect::<Vec<_>>(),
        "waiting_triggers": p.pending.iter().map(|(id, w)| json!({"id": id, "started_at": iso(w.started_at), "due": iso(w.due)})).collect::<Vec<_>>(),
        "recent_events": recent.iter().map(|r| {
            let e = &r.event;
            json!({
                "message_id": e.message_id, "type": e.kind, "event": e.event,
                "timestamp": iso(e.event_time), "received_at": iso(e.received_at),
                "source": e.source, "properties": properties(&e.payload),
            })
        }).collect::<Vec<_>>(),
        "merged_from": p.merged_from,
        "accounts": p.accounts,
        "household": p.household,
    })
}

/// An event's `properties`, read without building the rest of its payload.
fn properties(payload: &str) -> Value {
    #[derive(serde::Deserialize)]
    struct Only<'a> {
        #[serde(borrow, default)]
        properties: Option<&'a serde_json::value::RawValue>,
    }
    serde_json::from_str::<Only<'_>>(payload)
        .ok()
        .and_then(|o| o.properties)
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or_else(|| json!({}))
}

/// The answer that sends a peer's gatherer on to the profile a merge moved to.
pub(crate) fn elsewhere(live: &str) -> Response {
    let mut r = error(
        StatusCode::NOT_FOUND,
        "not_found",
        "merged into a profile another instance serves",
    );
    if let Ok(v) = axum::http::HeaderValue::from_str(live) {
        r.headers_mut().insert(crate::peers::LIVE_HEADER, v);
    }
    r
}

/// [`queries::load_live`] on the blocking pool.
pub(crate) async fn load_live(
    store: &SharedStore,
    placement: &Placement,
    id: String,
    recent: usize,
) -> Result<Loaded, String> {
    let (store, placement) = (store.clone(), placement.clone());
    tokio::task::spawn_blocking(move || {
        queries::load_live(store.as_ref(), &placement, &id, recent).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// `?events=N`: the timeline's length, up to the kept history (default
/// `profiles.recent_events`).
fn timeline_length(q: &HashMap<String, String>, st: &ApiState) -> Result<usize, String> {
    match q.get("events").map(|n| n.parse::<usize>()) {
        None => Ok(st.recent_events),
        Some(Ok(n)) if n <= st.history_limit => Ok(n),
        Some(_) => Err(format!(
            "events must be 0 to {} (the kept history)",
            st.history_limit
        )),
    }
}

/// `explain=true` (or 1) shows where each trait value came from.
fn explain(q: &HashMap<String, String>) -> Result<bool, String> {
    match q.get("explain").map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(_) => Err("explain must be true or false".into()),
    }
}

async fn by_id(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    profile_response(&st, id, &q, "no such profile").await
}

/// The 360 view of a profile (following merges), or a 404 saying `missing`.
async fn profile_response(
    st: &ApiState,
    id: String,
    q: &HashMap<String, String>,
    missing: &str,
) -> Response {
    let (events, explain) = match (timeline_length(q, st), explain(q)) {
        (Ok(n), Ok(x)) => (n, x),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, "invalid_query", e),
    };
    match load_live(&st.store, &st.placement, id, events).await {
        Ok(Loaded::Found(p, recent)) => {
            let defs = st.catalog.current();
            axum::Json(view(&p, &recent, explain, &st.strategies, &defs)).into_response()
        }
        Ok(Loaded::Missing) => error(StatusCode::NOT_FOUND, "not_found", missing),
        Ok(Loaded::Elsewhere(live)) => elsewhere(&live),
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
    let (store, placement) = (st.store.clone(), st.placement.clone());
    let kind = kind.clone();
    let found =
        blocking(move || queries::profile_of(store.as_ref(), &placement, &kind, &value)).await;
    let id = match found {
        Ok(Some(id)) => id,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no profile has this identifier",
            );
        }
        Err(r) => return r,
    };
    profile_response(&st, id, &q, "no profile has this identifier").await
}

async fn profile_segments(State(st): State<ApiState>, Path(id): Path<String>) -> Response {
    match load_live(&st.store, &st.placement, id, 0).await {
        Ok(Loaded::Elsewhere(live)) => elsewhere(&live),
        Ok(Loaded::Found(p, _)) => axum::Json(json!({
            "profile_id": p.id,
            "segments": p.segments.iter().map(|(id, m)| json!({"id": id, "version": m.version, "entered_at": iso(m.entered_at)})).collect::<Vec<_>>(),
        "waiting_triggers": p.pending.iter().map(|(id, w)| json!({"id": id, "started_at": iso(w.started_at), "due": iso(w.due)})).collect::<Vec<_>>(),
        }))
        .into_response(),
        Ok(Loaded::Missing) => error(StatusCode::NOT_FOUND, "not_found", "no such profile"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}

/// A segment's members in the partitions this instance serves.
fn segment_size(store: &SharedStore, placement: &Placement, id: &str) -> i64 {
    queries::segment_size(store.as_ref(), placement, id).unwrap_or(0)
}

/// A definition as the API shows it: the document, its version, where it came from
/// and, for a segment, its current size.
fn shown(store: &SharedStore, placement: &Placement, r: &DefinitionChange) -> Value {
    let mut v = json!({
        "id": r.id, "kind": r.kind, "version": r.version, "origin": r.origin,
        "changed_at": iso(r.changed_at),
        "definition": serde_json::from_str::<Value>(&r.definition).unwrap_or(Value::Null),
    });
    if r.kind == SEGMENT {
        v["size"] = json!(segment_size(store, placement, &r.id));
    }
    v
}

async fn list(State(st): State<ApiState>, kind: &'static str) -> Response {
    let (store, placement) = (st.store.clone(), st.placement.clone());
    let records = st.catalog.records();
    let found = blocking(move || {
        Ok(records
            .iter()
            .filter(|r| r.kind == kind && !r.deleted)
            .map(|r| shown(&store, &placement, r))
            .collect::<Vec<_>>())
    })
    .await;
    let key = match kind {
        SEGMENT => "segments",
        TRIGGER => "triggers",
        _ => "computed_traits",
    };
    match found {
        Ok(list) => axum::Json(json!({ key: list })).into_response(),
        Err(r) => r,
    }
}

async fn get_one(
    State(st): State<ApiState>,
    kind: &'static str,
    Path(id): Path<String>,
) -> Response {
    match st.catalog.record(kind, &id).filter(|r| !r.deleted) {
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {kind} {id}"),
        ),
        Some(r) => {
            let (store, placement) = (st.store.clone(), st.placement.clone());
            match blocking(move || Ok(shown(&store, &placement, &r))).await {
                Ok(v) => axum::Json(v).into_response(),
                Err(r) => r,
            }
        }
    }
}

/// The request's definition of `kind`, JSON or YAML by its content type, with `id`
/// set from the path when it has none. Every error is the client's (400).
fn definition(
    headers: &HeaderMap,
    body: &[u8],
    id: Option<&str>,
    kind: &str,
) -> Result<Definition, String> {
    let body = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8 text")?;
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("yaml"));
    let mut doc = catalog::parse_document(body, yaml)?;
    let obj = doc.as_object_mut().ok_or("a definition is an object")?;
    match (id, obj.get("id").and_then(Value::as_str)) {
        (Some(path), Some(given)) if path != given => {
            return Err(format!(
                "the id in the body ({given}) differs from the path's ({path})"
            ));
        }
        (Some(path), None) => {
            obj.insert("id".into(), json!(path));
        }
        (None, None) => return Err("the definition has no id".into()),
        _ => {}
    }
    Definition::from_value(doc, Some(kind))
}

/// Publishes a change and answers with the definition (202 if this instance has not
/// seen it back within 5 s).
async fn publish(st: &ApiState, change: DefinitionChange, created: bool) -> Response {
    match crate::publish(&st.producer, &st.topics, &st.catalog, &change).await {
        Ok(seen) => {
            let status = match (seen, created) {
                (false, _) => StatusCode::ACCEPTED,
                (true, true) => StatusCode::CREATED,
                (true, false) => StatusCode::OK,
            };
            let mut body = shown(&st.store, &st.placement, &change);
            body["backfill"] = json!("started: GET /v1/definitions/backfill");
            (status, axum::Json(body)).into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

/// Puts `def` in force (or deletes `kind/id`) if the other definitions allow it, and
/// records who asked in the audit trail first.
async fn change(
    st: &ApiState,
    caller: &Caller,
    kind: &'static str,
    id: &str,
    def: Option<&Definition>,
    created: bool,
) -> Response {
    let change = match st
        .catalog
        .propose(kind, id, def, &format!("api:{}", caller.0))
    {
        Ok(c) => c,
        Err(e) => return error(StatusCode::CONFLICT, "conflict", e),
    };
    let action = match (def, created) {
        (None, _) => "definition.delete",
        (Some(_), true) => "definition.create",
        (Some(_), false) => "definition.update",
    };
    let detail = json!({"kind": kind, "id": id, "version": change.version});
    if let Err(e) = st
        .audit
        .record(&caller.0, action, &format!("{kind}/{id}"), detail)
        .await
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        );
    }
    publish(st, change, created).await
}

async fn create(
    State(st): State<ApiState>,
    caller: Caller,
    kind: &'static str,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let def = match definition(&headers, &body, None, kind) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_definition", e),
    };
    if st
        .catalog
        .record(kind, def.id())
        .is_some_and(|r| !r.deleted)
    {
        return error(
            StatusCode::CONFLICT,
            "exists",
            format!("{kind} {} exists: change it with PUT", def.id()),
        );
    }
    change(&st, &caller, kind, def.id(), Some(&def), true).await
}

async fn replace(
    State(st): State<ApiState>,
    caller: Caller,
    kind: &'static str,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let def = match definition(&headers, &body, Some(&id), kind) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_definition", e),
    };
    let created = st.catalog.record(kind, &id).is_none_or(|r| r.deleted);
    change(&st, &caller, kind, &id, Some(&def), created).await
}

async fn remove(
    State(st): State<ApiState>,
    caller: Caller,
    kind: &'static str,
    Path(id): Path<String>,
) -> Response {
    if st.catalog.record(kind, &id).is_none_or(|r| r.deleted) {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {kind} {id}"),
        );
    }
    change(&st, &caller, kind, &id, None, false).await
}

/// `POST /v1/segments/dry-run[?sample=N]`: the size a segment would have now. With
/// `sample`, at most N profiles are evaluated and the size is estimated from them.
async fn dry_run(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let limit = match q.get("sample").map(|n| n.parse::<u64>()) {
        None => None,
        Some(Ok(n)) if (1..=10_000_000).contains(&n) => Some(n),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "sample must be 1 to 10000000 profiles",
            );
        }
    };
    let def = match definition(&headers, &body, None, SEGMENT) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_definition", e),
    };
    let set = match st.catalog.with_candidate(&def) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::CONFLICT, "conflict", e),
    };
    let (store, id, placement) = (st.store.clone(), def.id().to_string(), st.placement.clone());
    let now = tessera_common::now_ms();
    let history = st.history_limit;
    match blocking(move || {
        queries::dry_run(store.as_ref(), &set, &id, history, now, limit, &placement)
    })
    .await
    {
        Ok(r) => {
            // Scanning stopped short of every profile: the share found, scaled up.
            let estimated = r.scanned < r.total;
            let size = if estimated && r.scanned > 0 {
                (r.size as f64 * r.total as f64 / r.scanned as f64).round() as u64
            } else {
                r.size
            };
            axum::Json(json!({
                "segment": def.id(), "size": size, "estimated": estimated,
                "members_found": r.size, "profiles_scanned": r.scanned, "profiles_total": r.total,
                "sample": r.sample,
            }))
            .into_response()
        }
        Err(r) => r,
    }
}

async fn members_of_segment(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if st.catalog.current().segment(&id).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no segment {id}"),
        );
    }
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(l)) if (1..=1000).contains(&l) => l,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "limit must be 1 to 1000",
            );
        }
    };
    let (store, placement) = (st.store.clone(), st.placement.clone());
    let (segment, after) = (id.clone(), q.get("after").cloned());
    let rows = match blocking(move || {
        queries::segment_members(
            store.as_ref(),
            &placement,
            &segment,
            after.as_deref(),
            limit,
        )
    })
    .await
    {
        Ok(r) => r,
        Err(r) => return r,
    };
    let members: Vec<Value> = rows
        .iter()
        .take(limit)
        .map(|(id, entered)| json!({"profile_id": id, "entered_at": iso(*entered)}))
        .collect();
    let next = (rows.len() > limit)
        .then(|| members.last().map(|m| m["profile_id"].clone()))
        .flatten();
    axum::Json(json!({
        "segment": id, "size": segment_size(&st.store, &st.placement, &id), "members": members, "next_after": next,
    }))
    .into_response()
}

async fn backfill(State(st): State<ApiState>) -> Response {
    let store = st.store.clone();
    let job = blocking(move || queries::backfill_job(store.as_ref())).await;
    match job {
        Ok(None) => axum::Json(json!({"state": "none"})).into_response(),
        Ok(Some(j)) => {
            let progress = if j.total == 0 {
                1.0
            } else {
                (j.scanned as f64 / j.total as f64).min(1.0)
            };
            axum::Json(json!({
                "state": if j.finished_at.is_some() { "done" } else { "running" },
                "definitions": j.definitions, "profiles_scanned": j.scanned,
                "profiles_total": j.total, "progress": progress,
                "started_at": iso(j.started_at), "finished_at": j.finished_at.map(iso),
            }))
            .into_response()
        }
        Err(r) => r,
    }
}

/// Profile ids of a household or an account (at most 1000).
async fn members(st: ApiState, kind: &'static str, id: String) -> Response {
    let (store, placement, group) = (st.store.clone(), st.placement.clone(), id.clone());
    let found =
        blocking(move || queries::group_members(store.as_ref(), &placement, kind, &group)).await;
    match found {
        Ok(ids) if ids.is_empty() => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no profile belongs to it",
        ),
        Ok(ids) => axum::Json(json!({"id": id, "members": ids})).into_response(),
        Err(r) => r,
    }
}

async fn household(State(st): State<ApiState>, Path(id): Path<String>) -> Response {
    members(st, "hh", id).await
}

async fn account(State(st): State<ApiState>, Path(id): Path<String>) -> Response {
    members(st, "acct", id).await
}
