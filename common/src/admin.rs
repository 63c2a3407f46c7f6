//! The admin HTTP endpoints every service serves: `/healthz` (the process is alive),
//! `/readyz` (it can do its work: Kafka reachable, state open) and `/metrics`
//! (Prometheus text). Each service merges these routes into its own HTTP server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;

/// Readiness, flipped by the service.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct Admin {
    pub registry: Registry,
    pub health: Arc<Health>,
}

impl Admin {
    pub fn new() -> Admin {
        Admin {
            registry: Registry::new(),
            health: Arc::new(Health::default()),
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/openapi.yaml", get(openapi))
            .fallback(not_found)
            .with_state(self.clone())
    }

    /// Registers a collector; names are static per service, so a clash is a bug.
    pub fn register<C: prometheus::core::Collector + Clone + 'static>(&self, c: &C) -> C {
        self.registry
            .register(Box::new(c.clone()))
            .expect("metric registered twice");
        c.clone()
    }
}

impl Default for Admin {
    fn default() -> Self {
        Self::new()
    }
}

/// The description of every service's HTTP API (`docs/openapi.yaml`, checked against
/// the routes and the live answers by `tests/tests/contract.rs`).
pub const OPENAPI: &str = include_str!("../../docs/openapi.yaml");

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI)
}

/// The one shape of every refusal: `{"error": <code>, "reason": <what is wrong>}`.
pub fn error(status: StatusCode, code: &str, reason: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": code, "reason": reason.into()})),
    )
        .into_response()
}

/// A 503 `unavailable`: the state could not be read (or the read panicked).
pub fn unavailable(e: impl std::fmt::Display) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        e.to_string(),
    )
}

/// Runs a blocking read (RocksDB) on the blocking pool, for a handler; a failed read is
/// a 503 [`unavailable`].
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(e) => Err(unavailable(e)),
    }
}

/// Every unknown path, on every service: a JSON refusal like all the others.
async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

async fn readyz(State(admin): State<Admin>) -> impl IntoResponse {
    if admin.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&admin.registry.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            buf,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            e.to_string().into_bytes(),
        ),
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets in-flight
/// requests finish (for up to the shutdown grace). Slow or oversized clients are cut off
/// (`http`): a connection whose headers are not complete in time is closed, headers
/// beyond the limit are refused, and a body that stalls between its parts ends the
/// request.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    http: &HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let router = router
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            Duration::from_millis(http.body_timeout_ms),
        ))
        // A defect that panics a handler answers 500 with a JSON reason (and is logged
        // by the panic hook) instead of dropping the connection.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                let body = r#"{"error":"internal","reason":"the request failed on a defect in the service; it is logged"}"#;
                axum::response::Response::builder()
                    .status(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
                    .header(axum::http::header::CONTENT_TYPE, "application/json")
                    .body(axum::body::Body::from(body))
                    .expect("a static response")
            },
        ));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(http.header_read_timeout_ms))
        .max_buf_size(http.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(http.max_header_bytes as u32);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(crate::shutdown::GRACE, graceful.shutdown()).await;
    Ok(())
}

/// Binds the configured address (`host:port`; port 0 picks a free one).
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The header naming on whose behalf a token holder acts (see [`require_token`]).
pub const ON_BEHALF_OF: &str = "x-on-behalf-of";

/// Who made an API request: the name of its token (a request extension set by
/// [`require_token`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Caller(pub String);

/// The configured API tokens, kept as SHA-256 digests.
#[derive(Clone)]
pub struct Tokens(std::sync::Arc<Vec<TokenEntry>>);

#[derive(Clone)]
struct TokenEntry {
    name: String,
    digest: Vec<u8>,
    delegate: bool,
}

impl Tokens {
    pub fn new(tokens: &[crate::config::ApiToken]) -> Tokens {
        Tokens(std::sync::Arc::new(
            tokens
                .iter()
                .map(|t| TokenEntry {
                    name: t.name.clone(),
                    digest: digest(&t.token),
                    delegate: t.delegate,
                })
                .collect(),
        ))
    }

    /// The token presented, if it is one of them. Digests are compared, so the time
    /// taken says nothing about the tokens themselves.
    fn find(&self, presented: &str) -> Option<&TokenEntry> {
        let d = digest(presented);
        self.0.iter().find(|t| t.digest == d)
    }

    /// The name of the token presented, if it is one of them.
    pub fn name_of(&self, presented: &str) -> Option<String> {
        self.find(presented).map(|t| t.name.clone())
    }
}

fn digest(s: &str) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes()).to_vec()
}

/// Middleware for a service's own API routes: `Authorization: Bearer <token>` with a
/// configured token, else 401 with a JSON reason. A client acting for someone (the
/// console, for its logged-in user) names them in `X-On-Behalf-Of`; the audit trail then
/// records `<token name> for <them>`. Only tokens configured with `delegate = true` may
/// do so: any other that names someone is refused with 403, so a token holder cannot
/// write another name into the audit trail.
pub async fn require_token(
    State(tokens): State<Tokens>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match presented.and_then(|t| tokens.find(t)) {
        Some(token) => {
            let actor = req
                .headers()
                .get(ON_BEHALF_OF)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|a| !a.is_empty() && a.len() <= 64 && a.chars().all(|c| !c.is_control()));
            let caller = match actor {
                Some(_) if !token.delegate => {
                    return error(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "this API token may not act on behalf of others (X-On-Behalf-Of): \
                         only tokens configured with delegate = true may",
                    );
                }
                Some(a) => format!("{} for {a}", token.name),
                None => token.name.clone(),
            };
            req.extensions_mut().insert(Caller(caller));
            next.run(req).await
        }
        None => {
            let reason = match presented {
                None => "an API token is required: Authorization: Bearer <token>",
                Some(_) => "unknown API token",
            };
            let mut resp = error(StatusCode::UNAUTHORIZED, "unauthorized", reason);
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `router` on a free loopback port until the token is cancelled.
    async fn serve_for_test(
        router: Router,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let http = HttpConfig {
            header_read_timeout_ms: 5_000,
            max_header_bytes: 16 * 1024,
            body_timeout_ms: 5_000,
        };
        let stop = CancellationToken::new();
        let server = tokio::spawn({
            let stop = stop.clone();
            async move { serve(listener, router, &http, stop).await }
        });
        (addr, stop, server)
    }

    /// Sends one raw request (its head, `Connection: close` added) and reads the answer.
    async fn raw_get(addr: std::net::SocketAddr, path: &str, headers: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The audit's finding: any token holder could set `X-On-Behalf-Of` to any name and
    /// so write it into the audit trail. Only a delegating token may.
    #[tokio::test]
    async fn only_a_delegating_token_acts_on_behalf_of_someone() {
        let tokens = Tokens::new(&[
            crate::config::ApiToken {
                name: "crm-sync".into(),
                token: "plain-token-0123456789".into(),
                delegate: false,
            },
            crate::config::ApiToken {
                name: "console".into(),
                token: "console-token-0123456789".into(),
                delegate: true,
            },
        ]);
        let router = Router::new()
            .route(
                "/who",
                axum::routing::get(|axum::Extension(c): axum::Extension<Caller>| async move {
                    format!("caller={}", c.0)
                }),
            )
            .layer(axum::middleware::from_fn_with_state(tokens, require_token));
        let (addr, stop, server) = serve_for_test(router).await;
        let ask = |token: &'static str, actor: &'static str| async move {
            let actor = if actor.is_empty() {
                String::new()
            } else {
                format!("X-On-Behalf-Of: {actor}\r\n")
            };
            raw_get(
                addr,
                "/who",
                &format!("Authorization: Bearer {token}\r\n{actor}"),
            )
            .await
        };
        let plain = ask("plain-token-0123456789", "").await;
        assert!(
            plain.starts_with("HTTP/1.1 200") && plain.contains("caller=crm-sync"),
            "{plain}"
        );
        let posing = ask("plain-token-0123456789", "the-ceo").await;
        assert!(posing.starts_with("HTTP/1.1 403"), "{posing}");
        assert!(
            posing.contains("delegate") && !posing.contains("caller="),
            "{posing}"
        );
        let console = ask("console-token-0123456789", "ops").await;
        assert!(console.contains("caller=console for ops"), "{console}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    /// A handler that panics answers 500 with a JSON reason; the server goes on serving.
    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_the_server_lives_on() {
        let router = Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    let cut: &str = "\u{130f6}";
                    // The defect class schemathesis found: slicing inside a character.
                    cut.split_at(1).0.to_string()
                }),
            )
            .route("/ok", axum::routing::get(|| async { "ok" }));
        let (addr, stop, server) = serve_for_test(router).await;
        let get = |path: &'static str| raw_get(addr, path, "");
        let boom = get("/boom").await;
        assert!(boom.starts_with("HTTP/1.1 500"), "{boom}");
        assert!(boom.contains(r#""error":"internal""#), "{boom}");
        assert!(get("/ok").await.starts_with("HTTP/1.1 200"));
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
