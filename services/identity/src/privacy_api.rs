//! The privacy API, on identity (it resolves any identifier), with credentials of its
//! own (`[admin] privacy_tokens`):
//!
//! - `POST /v1/privacy/requests` `{"action": "delete"|"suppress"|"unsuppress"|"export",
//!   "identifier": {"type", "value"}, "request_id"?, "suppress"?}`: records the request
//!   in the audit trail (who, which action, never the value) and on
//!   `privacy.reports`, then writes it, sealed, to `identity.commands`: it is durable and
//!   applied in order with the events, whatever restarts. 202 with the request id; the
//!   same `request_id` again answers with that request's status (idempotent).
//!   A delete suppresses the identifiers too unless `"suppress": false`.
//! - `GET /v1/privacy/requests/{id}`: the request's status and what each service did
//!   (counts and ids); an export's answer holds the person's data.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use tessera_common::admin::Caller;
use tessera_common::config::PrivacyConfig;
use tessera_common::ids::subject_hash;
use tessera_common::records::{AvroRecord, IdentityCommand, PrivacyReport};
use tessera_common::store::Txn;
use tessera_common::vault::Opened;

use crate::api::{ApiState, error, identifier, read, unavailable};
use crate::graph;

const ACTIONS: [&str; 4] = ["delete", "suppress", "unsuppress", "export"];
/// The services that report on a request found in the graph, in order.
const STAGES: [&str; 3] = ["identity", "profiles", "activation"];

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/privacy/requests", post(create))
        .route("/v1/privacy/requests/{id}", get(status))
        .with_state(state)
}

fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

async fn create(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    b: Result<axum::Json<Value>, JsonRejection>,
) -> Response {
    let v = match crate::api::body(b) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let action = v["action"].as_str().unwrap_or_default().to_string();
    if !ACTIONS.contains(&action.as_str()) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_action",
            "action must be one of delete, suppress, unsuppress, export",
        );
    }
    let id = &v["identifier"];
    let i = match identifier(&st.rules, id["type"].as_str(), id["value"].as_str()) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let suppress = match &v["suppress"] {
        Value::Null => action == "delete",
        Value::Bool(b) if action == "delete" => *b,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "suppress is a boolean, and only for a delete",
            );
        }
    };
    let request_id = match &v["request_id"] {
        Value::Null => uuid::Uuid::new_v4().to_string(),
        Value::String(s) if valid_request_id(s) => s.clone(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_id",
                "request_id: 1 to 128 letters, digits, '-', '_' or '.'",
            );
        }
    };
    if let Some(known) = st.reports.get(&request_id) {
        // Any report that is not sealed names the request's action.
        let same = known
            .values()
            .find_map(|b| PrivacyReport::from_avro(b).ok())
            .is_none_or(|r| r.action == action);
        if !same {
            return error(
                StatusCode::CONFLICT,
                "request_id_taken",
                "this request_id names another request",
            );
        }
        return answer(&st, &request_id).await;
    }
    let probe = i.clone();
    let profile = match read(&st, move |store| {
        graph::lookup(&Txn::new(store.as_ref()), &probe)
    })
    .await
    {
        Ok(p) => p,
        Err(r) => return r,
    };
    // The request is sealed with the profile's key (erased with the person), or its own.
    let key = profile.clone().unwrap_or_else(|| request_id.clone());
    if let Err(e) = st
        .audit
        .record(
            &caller.0,
            &format!("privacy.{action}"),
            &format!("privacy/{request_id}"),
            json!({"request_id": request_id, "type": i.kind, "suppress": suppress}),
        )
        .await
    {
        return unavailable(e.to_string());
    }
    let now = tessera_common::now_ms();
    let accepted = PrivacyReport {
        request_id: request_id.clone(),
        service: "api".into(),
        action: action.clone(),
        status: "accepted".into(),
        profile_id: None,
        at: now,
        detail: json!({"type": i.kind, "suppress": suppress, "by": caller.0}).to_string(),
    };
    let cmd = IdentityCommand {
        command_id: request_id.clone(),
        action,
        merge_id: None,
        survivor_identifiers: Vec::new(),
        merged_identifiers: Vec::new(),
        kind: Some(i.kind),
        value: Some(i.value),
        reason: None,
        suppress,
        requested_at: now,
    };
    // The command first: once it is written the request will be applied. A client that
    // retries after a failure here sends it again under the same id, and identity
    // applies a request once.
    let sent = async {
        let sealed = st.vault.seal(&subject_hash(&key), &cmd.to_avro()?).await?;
        st.producer
            .send(&st.commands_topic, key.as_bytes(), &sealed)
            .await?;
        let report = accepted.to_avro()?;
        st.producer
            .send(&st.reports_topic, accepted.key().as_bytes(), &report)
            .await?;
        st.reports.insert(&accepted, report);
        Ok::<_, tessera_common::Error>(())
    };
    if let Err(e) = sent.await {
        return unavailable(format!("the request could not be written: {e}"));
    }
    let mut r = answer(&st, &request_id).await;
    *r.status_mut() = StatusCode::ACCEPTED;
    r
}

/// The labels of the fields an export holds (traits, identifier types, event
/// properties), so whoever receives it knows what is personal or sensitive.
fn classify(labels: &PrivacyConfig, data: &Value) -> Value {
    let mut fields: std::collections::BTreeSet<String> = Default::default();
    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    fields.extend(keys(&data["profile"]["traits"]));
    for i in data["graph"]["identifiers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        fields.extend(i["type"].as_str().map(str::to_string));
    }
    for e in data["events"].as_array().into_iter().flatten() {
        fields.extend(keys(&e["properties"]));
        fields.extend(keys(&e["traits"]));
    }
    let mut by_label: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in &fields {
        for l in labels.labels_of(f) {
            by_label.entry(l.to_string()).or_default().push(f.clone());
        }
    }
    json!(by_label)
}

async fn status(State(st): State<ApiState>, Path(id): Path<String>) -> Response {
    if st.reports.get(&id).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such privacy request",
        );
    }
    answer(&st, &id).await
}

/// The request's status: `accepted` (not applied yet), `in_progress`, `done`, or
/// `not_found` (nobody has that identifier), with each service's report.
async fn answer(st: &ApiState, id: &str) -> Response {
    let reports = st.reports.get(id).unwrap_or_default();
    let mut steps = serde_json::Map::new();
    let mut data = serde_json::Map::new();
    let (mut action, mut profile, mut found) = (String::new(), Value::Null, None);
    for (service, bytes) in &reports {
        let opened = match st.vault.open(bytes).await {
            Ok(Opened::Plain(p)) => PrivacyReport::from_avro(&p).ok(),
            Ok(_) => None,
            Err(e) => return unavailable(e),
        };
        let Some(r) = opened else {
            // Sealed with a key that is gone: the person was erased since.
            steps.insert(service.clone(), json!({"status": "erased"}));
            continue;
        };
        let detail: Value = serde_json::from_str(&r.detail).unwrap_or(Value::Null);
        if r.action == "export"
            && service != "api"
            && let Value::Object(m) = &detail
        {
            data.extend(m.clone());
        }
        if service == "identity" {
            found = Some(r.status == "done");
            profile = json!(r.profile_id);
        }
        action = r.action.clone();
        steps.insert(
            service.clone(),
            json!({
                "status": r.status,
                "at": r.at,
                "detail": if r.action == "export" && service != "api" { Value::Null } else { detail },
            }),
        );
    }
    let status = match found {
        None => "accepted",
        Some(false) => "not_found",
        Some(true) if STAGES.iter().all(|s| steps.contains_key(*s)) => "done",
        Some(true) => "in_progress",
    };
    let mut body = json!({
        "request_id": id,
        "action": action,
        "status": status,
        "profile_id": profile,
        "steps": steps,
    });
    if action == "export" && status == "done" {
        let data = Value::Object(data);
        body["classification"] = classify(&st.labels, &data);
        body["data"] = data;
    }
    axum::Json(body).into_response()
}
