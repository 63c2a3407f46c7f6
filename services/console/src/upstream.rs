//! The services' HTTP APIs, as the console uses them: the same endpoints and token any
//! program would use (no private back door). A refusal keeps the service's JSON reason,
//! so the console shows the API's own message.

use std::time::Duration;

use prometheus::IntCounterVec;
use reqwest::Method;
use serde_json::Value;

use tessera_common::config::ConsoleConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Ingest,
    Identity,
    Profiles,
    Activation,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Ingest,
        Service::Identity,
        Service::Profiles,
        Service::Activation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Ingest => "ingest",
            Service::Identity => "identity",
            Service::Profiles => "profiles",
            Service::Activation => "activation",
        }
    }
}

/// An answer that is not a success: the status and the service's reason, or why the
/// service could not be asked.
#[derive(Debug, Clone)]
pub struct Failure {
    /// 502 when the service did not answer.
    pub status: u16,
    pub reason: String,
}

impl Failure {
    pub fn status_code(&self) -> axum::http::StatusCode {
        axum::http::StatusCode::from_u16(self.status).unwrap_or(axum::http::StatusCode::BAD_GATEWAY)
    }

    /// The failure as a JSON answer to the console's own client: the service's status
    /// (502 when it did not answer) and reason.
    pub fn response(&self) -> axum::response::Response {
        let code = if self.status == 502 {
            "upstream"
        } else {
            "refused"
        };
        crate::auth::refusal(self.status_code(), code, &self.reason)
    }
}

#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    /// A client without a total timeout, for live streams.
    streaming: reqwest::Client,
    token: String,
    urls: [String; 4],
    requests: IntCounterVec,
}

impl Upstream {
    pub fn new(c: &ConsoleConfig, requests: IntCounterVec) -> Upstream {
        let trim = |u: &str| u.trim_end_matches('/').to_string();
        Upstream {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .connect_timeout(Duration::from_secs(3))
                .build()
                .expect("an HTTP client"),
            streaming: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .build()
                .expect("an HTTP client"),
            token: c.api_token.clone(),
            urls: [
                trim(&c.ingest_url),
                trim(&c.identity_url),
                trim(&c.profiles_url),
                trim(&c.activation_url),
            ],
            requests,
        }
    }

    pub fn url(&self, s: Service, path: &str) -> String {
        format!("{}{path}", self.urls[s as usize])
    }

    /// A JSON request; `Ok` for a 2xx with its status and body. `user`, the console user
    /// it is made for, is named to the service (its audit trail records them).
    pub async fn call(
        &self,
        s: Service,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
        user: Option<&str>,
    ) -> Result<(u16, Value), Failure> {
        let mut req = self
            .client
            .request(method, self.url(s, path))
            .bearer_auth(&self.token)
            .query(query);
        if let Some(u) = user {
            req = req.header(tessera_common::admin::ON_BEHALF_OF, u);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let outcome =
            match req.send().await {
                Err(e) => Err(Failure {
                    status: 502,
                    reason: format!(
                        "the {} service did not answer: {}",
                        s.name(),
                        without_url(&e)
                    ),
                }),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    if (200..300).contains(&status) {
                        Ok((status, body))
                    } else {
                        Err(Failure {
                            status,
                            reason: body["reason"].as_str().map(str::to_string).unwrap_or_else(
                                || format!("the {} service answered {status}", s.name()),
                            ),
                        })
                    }
                }
            };
        let label = match &outcome {
            Ok(_) => "ok",
            Err(f) if f.status == 502 => "unreachable",
            Err(f) if f.status < 500 => "refused",
            Err(_) => "failed",
        };
        self.requests.with_label_values(&[s.name(), label]).inc();
        outcome
    }

    pub async fn get(
        &self,
        s: Service,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Value, Failure> {
        self.call(s, Method::GET, path, query, None, None)
            .await
            .map(|(_, v)| v)
    }

    /// A service's `/metrics` text.
    pub async fn metrics(&self, s: Service) -> Result<String, Failure> {
        let failed = |e: reqwest::Error| Failure {
            status: 502,
            reason: without_url(&e),
        };
        let resp = self
            .client
            .get(self.url(s, "/metrics"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(failed)?;
        resp.text().await.map_err(failed)
    }

    /// An open event stream (`text/event-stream`) of a service.
    pub async fn stream(&self, s: Service, path: &str) -> Result<reqwest::Response, Failure> {
        let resp = self
            .streaming
            .get(self.url(s, path))
            .bearer_auth(&self.token)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|e| Failure {
                status: 502,
                reason: without_url(&e),
            })?;
        if !resp.status().is_success() {
            return Err(Failure {
                status: resp.status().as_u16(),
                reason: format!("the {} service answered {}", s.name(), resp.status()),
            });
        }
        Ok(resp)
    }
}

/// An error without the URL it carries: a URL may hold an identifier (a lookup's query).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection refused"
    } else if e.is_decode() {
        "unreadable answer"
    } else {
        "request failed"
    };
    kind.to_string()
}
