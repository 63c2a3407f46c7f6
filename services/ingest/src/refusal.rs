//! How ingest refuses a request: an HTTP status with `{"error", "reason"}` (and
//! `Retry-After` when trying again later may work).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::validate::Reject;

/// A refusal as HTTP: status + `{error, reason}`.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub reason: String,
    pub(crate) extra: Option<Value>,
    /// Seconds for `Retry-After` (with 429 and 503).
    pub(crate) retry_after: u64,
}

impl Refusal {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        reason: impl Into<String>,
    ) -> Refusal {
        Refusal {
            status,
            code,
            reason: reason.into(),
            extra: None,
            retry_after: 1,
        }
    }
    pub(crate) fn from_reject(status: StatusCode, r: Reject) -> Refusal {
        Refusal::new(status, r.code, r.reason)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code, "reason": self.reason});
        if let Some(extra) = self.extra {
            body["rejected"] = extra;
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after));
        }
        resp
    }
}
