//! The identity API.
//!
//! - `GET /v1/identity/lookup?type=&value=`: the profile an identifier (of any type,
//!   custom ones included, normalised as the rules say) belongs to.
//! - `GET /v1/identity/profiles/{id}`: a profile's identifiers with where and when each
//!   was first seen, and its merge history (with the rule, score and explanation of
//!   fuzzy links: each field's level and weight).
//!   A merged-away id answers with its survivor.
//! - `GET /v1/identity/matching[?version=N]`: the fuzzy matcher: its mode, thresholds
//!   and, per field, each comparison level's m, u and weight in the current (or a
//!   given) version of the learned parameters, with what they were learned from.
//! - `POST /v1/identity/unmerge` `{"merge_id", "reason"?}` and `POST /v1/identity/detach`
//!   `{"type", "value", "reason"?}`: corrections, written to `identity.commands` and
//!   applied in order with the events (202 with the command id).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use tessera_common::admin::Caller;
use tessera_common::audit::Audit;
use tessera_common::kafka::Producer;
use tessera_common::records::{AvroRecord, Identifier, IdentityCommand};
use tessera_common::store::{SharedStore, Txn};

use crate::graph::{self, MergeInfo, Node};
use crate::reports::Reports;
use crate::rules::Rules;
use tessera_common::ids::subject_hash;
use tessera_common::vault::Vault;

#[derive(Clone)]
pub struct ApiState {
    pub store: SharedStore,
    pub producer: Arc<Producer>,
    pub rules: Arc<Rules>,
    pub commands_topic: String,
    /// Where commands are recorded with who asked.
    pub audit: Audit,
    /// Seals commands (they carry identifiers) and opens privacy reports.
    pub vault: Arc<Vault>,
    pub reports: Reports,
    pub reports_topic: String,
    /// Data classification, named in exports.
    pub labels: tessera_common::config::PrivacyConfig,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/identity/lookup", get(lookup))
        .route("/v1/identity/profiles/{id}", get(by_id))
        .route("/v1/identity/unmerge", post(unmerge))
        .route("/v1/identity/detach", post(detach))
        .route("/v1/identity/matching", get(matching))
        .with_state(state)
}

pub(crate) use tessera_common::admin::{error, unavailable};

fn iso(ms: i64) -> Value {
    tessera_common::time::iso_millis(ms).map_or(Value::Null, Value::String)
}

/// The profile's view, or `None` when there is no such profile.
pub fn view(store: &SharedStore, id: &str) -> tessera_common::Result<Option<Value>> {
    view_in(&Txn::new(store.as_ref()), id)
}

/// [`view`] as `txn` sees the graph.
pub fn view_in(txn: &Txn<'_>, id: &str) -> tessera_common::Result<Option<Value>> {
    let live = graph::live_profile(txn, id)?;
    let Some(node) = txn.get_json::<Node>(&graph::node_key(&live))? else {
        return Ok(None);
    };
    let mut identifiers = Vec::new();
    for i in &node.identifiers {
        let seen = graph::seen(txn, i)?;
        identifiers.push(json!({
            "type": i.kind,
            "value": i.value,
            "first_seen": seen.as_ref().map(|s| iso(s.event_time)),
            "first_message_id": seen.as_ref().map(|s| s.message_id.clone()),
            "source": seen.as_ref().map(|s| s.source.clone()),
        }));
    }
    // Merge history: this profile's merges and, recursively, those of the profiles it
    // absorbed (bounded).
    let mut merges: Vec<MergeInfo> = Vec::new();
    let mut queue = vec![live.clone()];
    while let Some(p) = queue.pop() {
        let prefix = graph::history_prefix(&p);
        for (k, _) in txn.scan(prefix.as_bytes(), 1000)? {
            let merge_id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let Some(m) = txn.get_json::<MergeInfo>(&graph::merge_info_key(&merge_id))? {
                queue.push(m.merged.clone());
                merges.push(m);
            }
        }
        if merges.len() > 1000 {
            break;
        }
    }
    merges.sort_by(|a, b| (a.event_time, &a.merge_id).cmp(&(b.event_time, &b.merge_id)));
    Ok(Some(json!({
        "profile_id": live,
        "requested_id": id,
        "anchor": {"type": node.anchor.kind, "value": node.anchor.value},
        "detached": node.detached,
        "identifiers": identifiers,
        "merges": merges.iter().map(|m| json!({
            "merge_id": m.merge_id,
            "survivor": m.survivor,
            "merged": m.merged,
            "merged_identifiers": m.merged_identifiers.iter().map(|i| json!({"type": i.kind, "value": i.value})).collect::<Vec<_>>(),
            "cause_message_id": m.cause_message_id,
            "rule": m.rule.as_deref().unwrap_or("shared identifier"),
            "score": m.score,
            "explain": m.explain,
            "event_time": iso(m.event_time),
            "undone": m.undone,
        })).collect::<Vec<_>>(),
    })))
}

/// Reads state on the blocking pool; a failed read is a 503.
pub(crate) async fn read<T: Send + 'static>(
    st: &ApiState,
    f: impl FnOnce(&SharedStore) -> tessera_common::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let store = st.store.clone();
    tessera_common::admin::blocking(move || f(&store)).await
}

/// The JSON found, or a 404 with the reason.
fn found_or_404(v: Option<Value>, reason: &str) -> Response {
    match v {
        Some(v) => axum::Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", reason),
    }
}

async fn by_id(State(st): State<ApiState>, Path(id): Path<String>) -> Response {
    match read(&st, move |store| view(store, &id)).await {
        Ok(v) => found_or_404(v, "no such profile"),
        Err(r) => r,
    }
}

/// An identifier from `type` and `value`, normalised by the rules.
#[allow(clippy::result_large_err)] // the error is the response itself
pub(crate) fn identifier(
    rules: &Rules,
    kind: Option<&str>,
    value: Option<&str>,
) -> Result<Identifier, Response> {
    let (Some(kind), Some(value)) = (kind, value) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "type and value are required",
        ));
    };
    if rules.kind(kind).is_none() {
        let known: Vec<&str> = rules.identifiers.iter().map(|i| i.kind.as_str()).collect();
        return Err(error(
            StatusCode::BAD_REQUEST,
            "unknown_type",
            format!(
                "identifier type {kind:?} is not declared; declared: {}",
                known.join(", ")
            ),
        ));
    }
    let Some(value) = rules.normalise(kind, value) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            format!("not a valid {kind}"),
        ));
    };
    Ok(Identifier {
        kind: kind.to_string(),
        value,
    })
}

async fn lookup(State(st): State<ApiState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let i = match identifier(
        &st.rules,
        q.get("type").map(String::as_str),
        q.get("value").map(String::as_str),
    ) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let found = read(&st, move |store| {
        match graph::lookup(&Txn::new(store.as_ref()), &i)? {
            Some(p) => view(store, &p),
            None => Ok(None),
        }
    })
    .await;
    match found {
        Ok(v) => found_or_404(v, "no profile has this identifier"),
        Err(r) => r,
    }
}

/// Records the command in the audit trail (who, which command; never the identifier's
/// value), then writes it, keyed by and sealed for the profile it concerns (it carries
/// identifiers: erasing that person makes it unreadable).
async fn send(st: &ApiState, caller: &Caller, cmd: IdentityCommand, profile: &str) -> Response {
    let detail = json!({"command_id": cmd.command_id, "merge_id": cmd.merge_id, "type": cmd.kind});
    let target = match &cmd.merge_id {
        Some(m) => format!("merge/{m}"),
        None => format!("command/{}", cmd.command_id),
    };
    if let Err(e) = st
        .audit
        .record(
            &caller.0,
            &format!("identity.{}", cmd.action),
            &target,
            detail,
        )
        .await
    {
        return unavailable(e.to_string());
    }
    let payload = match cmd.to_avro() {
        Ok(p) => p,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let payload = match st.vault.seal(&subject_hash(profile), &payload).await {
        Ok(p) => p,
        Err(tessera_common::Error::Erased) => {
            return error(
                StatusCode::CONFLICT,
                "erased",
                "this profile was erased a moment ago",
            );
        }
        Err(e) => return unavailable(e),
    };
    match st
        .producer
        .send(&st.commands_topic, profile.as_bytes(), &payload)
        .await
    {
        Ok(_) => (
            StatusCode::ACCEPTED,
            axum::Json(
                json!({"command_id": cmd.command_id, "action": cmd.action, "status": "accepted"}),
            ),
        )
            .into_response(),
        Err(e) => unavailable(format!("the command could not be written: {e}")),
    }
}

#[allow(clippy::result_large_err)] // the error is the response itself
pub(crate) fn body(b: Result<axum::Json<Value>, JsonRejection>) -> Result<Value, Response> {
    match b {
        Ok(axum::Json(v)) if v.is_object() => Ok(v),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be a JSON object",
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            e.body_text(),
        )),
    }
}

fn command(action: &str, reason: Option<&str>) -> IdentityCommand {
    IdentityCommand {
        command_id: uuid::Uuid::new_v4().to_string(),
        action: action.into(),
        merge_id: None,
        survivor_identifiers: Vec::new(),
        merged_identifiers: Vec::new(),
        kind: None,
        value: None,
        reason: reason.map(Into::into),
        suppress: false,
        requested_at: tessera_common::now_ms(),
    }
}

async fn unmerge(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    b: Result<axum::Json<Value>, JsonRejection>,
) -> Response {
    let v = match body(b) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(merge_id) = v["merge_id"].as_str().map(str::to_string) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "merge_id (string) is required",
        );
    };
    let key = graph::merge_info_key(&merge_id);
    let info = read(&st, move |store| {
        Txn::new(store.as_ref()).get_json::<MergeInfo>(&key)
    })
    .await;
    match info {
        Ok(Some(m)) if m.undone => error(
            StatusCode::CONFLICT,
            "already_undone",
            "this merge was already undone",
        ),
        Ok(Some(m)) => {
            let mut cmd = command("unmerge", v["reason"].as_str());
            cmd.merge_id = Some(merge_id);
            cmd.survivor_identifiers = m.survivor_identifiers;
            cmd.merged_identifiers = m.merged_identifiers;
            send(&st, &caller, cmd, &m.survivor).await
        }
        Ok(None) => found_or_404(None, "no such merge"),
        Err(r) => r,
    }
}

async fn detach(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    b: Result<axum::Json<Value>, JsonRejection>,
) -> Response {
    let v = match body(b) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let i = match identifier(&st.rules, v["type"].as_str(), v["value"].as_str()) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let probe = i.clone();
    let found = read(&st, move |store| {
        graph::lookup(&Txn::new(store.as_ref()), &probe)
    })
    .await;
    match found {
        Ok(Some(profile)) => {
            let mut cmd = command("detach", v["reason"].as_str());
            cmd.kind = Some(i.kind);
            cmd.value = Some(i.value);
            send(&st, &caller, cmd, &profile).await
        }
        Ok(None) => found_or_404(None, "no profile has this identifier"),
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
struct MatchingQuery {
    version: Option<u64>,
}

/// The fuzzy matcher and its learned parameters.
async fn matching(
    State(st): State<ApiState>,
    query: Result<Query<MatchingQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "version must be a whole number",
        );
    };
    let rules = st.rules.clone();
    let answer = read(&st, move |store| {
        let Some(f) = &rules.fuzzy else {
            return Ok(Some(json!({"mode": "off"})));
        };
        if !f.rules.is_empty() {
            return Ok(Some(json!({
                "mode": "rules",
                "rules": f.rules.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
            })));
        }
        let txn = Txn::new(store.as_ref());
        let current = crate::fuzzy::model::current(&txn, f)?;
        let params = match q.version {
            None => current.clone(),
            Some(v) if v <= current.version => match crate::fuzzy::model::version(&txn, f, v)? {
                Some(p) => p,
                None => return Ok(None),
            },
            Some(_) => return Ok(None),
        };
        let acc = crate::fuzzy::model::accumulators(&txn)?;
        let fields: Vec<Value> = f
            .fields
            .iter()
            .map(|field| {
                let weights = params.weights(&field.name);
                let levels: Vec<Value> = field
                    .compare
                    .levels()
                    .iter()
                    .enumerate()
                    .map(|(l, name)| {
                        let (m, u) = (params.m[&field.name][l], params.u[&field.name][l]);
                        json!({"level": name, "m": m, "u": u, "weight": weights[l]})
                    })
                    .collect();
                json!({
                    "field": field.name,
                    "compare": format!("{:?}", field.compare).to_lowercase(),
                    "discriminating": field.discriminating,
                    "term_frequencies": f.learn,
                    "levels": levels,
                })
            })
            .collect();
        Ok(Some(json!({
            "mode": "probabilistic",
            "threshold": f.threshold,
            "thresholds": f.thresholds.iter().map(|p| json!({"sources": p.sources, "threshold": p.threshold})).collect::<Vec<_>>(),
            "prior_population": f.prior_population,
            "learn": f.learn,
            "refresh_every": f.refresh_every,
            "version": params.version,
            "current_version": current.version,
            "learned_from": {
                "candidate_pairs": params.candidate_pairs,
                "random_pairs": params.random_pairs,
            },
            "records": acc.records,
            "fields": fields,
        })))
    })
    .await;
    match answer {
        Ok(Some(v)) => axum::Json(v).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such version of the parameters",
        ),
        Err(r) => r,
    }
}
