//! The predictive traits' models over HTTP:
//! - `GET /v1/models`: every predictive trait with its latest fitted version, and how
//!   the fitting goes;
//! - `GET /v1/models/{id}`: one trait's kept versions with their fit diagnostics;
//! - `POST /v1/models/fit`: fit every predictive trait now (202). Fits run on the
//!   instance that serves partition 0; another answers 409 and says so.
//!
//! BG/NBD's α and Gamma–Gamma's parameters are per day (the unit the profiles count
//! in); `alpha_weeks` gives α per week, the unit of the papers.

use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use tessera_common::admin::error;

use crate::api::ApiState;
use crate::computed::ComputedTrait;
use crate::predict::{Fitted, ModelHistory};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/models", get(list))
        .route("/v1/models/fit", post(fit_now))
        .route("/v1/models/{id}", get(one))
}

fn version(f: &Fitted) -> Value {
    let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
    if let Some(b) = f.bgnbd {
        v["alpha_weeks"] = json!(b.alpha / 7.0);
    }
    v["fitted_at"] =
        tessera_common::time::iso_millis(f.fitted_at).map_or(Value::Null, Value::String);
    v
}

fn shown(def: &ComputedTrait, history: Option<&ModelHistory>, all: bool) -> Value {
    let latest = history.and_then(|h| h.latest());
    let mut v = json!({
        "id": def.id, "aggregate": def.aggregate, "event": def.event,
        "property": def.property, "horizon": def.horizon,
        "latest": latest.map(version),
    });
    if all {
        v["versions"] = history.map_or(json!([]), |h| h.versions.iter().map(version).collect());
    }
    v
}

fn status(st: &ApiState) -> Value {
    st.fit_status.lock().map_or(Value::Null, |s| {
        serde_json::to_value(&*s).unwrap_or(Value::Null)
    })
}

async fn list(State(st): State<ApiState>) -> Response {
    let defs = st.catalog.current();
    let models: Vec<Value> = defs
        .computed
        .iter()
        .filter(|d| d.aggregate.predictive())
        .map(|d| shown(d, defs.model(&d.id), false))
        .collect();
    axum::Json(json!({"models": models, "fitting": status(&st)})).into_response()
}

async fn one(State(st): State<ApiState>, Path(id): Path<String>) -> Response {
    let defs = st.catalog.current();
    match defs
        .computed_trait(&id)
        .filter(|d| d.aggregate.predictive())
    {
        Some(d) => axum::Json(shown(d, defs.model(&id), true)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no predictive computed trait {id}"),
        ),
    }
}

async fn fit_now(State(st): State<ApiState>) -> Response {
    let leader = st.fit_status.lock().is_ok_and(|s| s.leader);
    if !leader {
        return error(
            StatusCode::CONFLICT,
            "not_the_fitting_instance",
            "models are fitted by the profiles instance that serves partition 0; ask that one",
        );
    }
    st.fit_requests.store(true, Ordering::SeqCst);
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({"requested": true, "fitting": status(&st)})),
    )
        .into_response()
}
