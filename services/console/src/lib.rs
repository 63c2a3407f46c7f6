//! # tessera-console
//!
//! The web console: the 360 view of a person with a timeline that updates live, a
//! no-code segment builder with a dry-run size, segment and activation lists with
//! charts, and the pipeline dashboard. Pages are rendered on the server ([`pages`]) from
//! the services' own HTTP APIs ([`upstream`]), with one small script for the charts,
//! the live profile and the builder (`assets/console.js`, no build step). The charts'
//! figures come from the services' `/metrics` ([`sampler`]). Users, sessions and CSRF
//! protection: [`auth`]. The console keeps no state beyond sessions and chart readings.

pub mod auth;
pub mod pages;
pub mod sampler;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum_extra::extract::cookie::CookieJar;
use futures::StreamExt;
use maud::Markup;
use prometheus::{IntCounterVec, IntGauge, Opts};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use tessera_common::admin::{self, Admin};
use tessera_common::config::Config;
use tessera_common::{Error, Result};

use auth::{Auth, LOGIN_COOKIE, Login, SESSION_COOKIE, Session};
use sampler::Samples;
use upstream::{Failure, Service, Upstream};

/// The demo password of the embedded configuration, refused in production mode.
pub const DEMO_PASSWORD: &str = "tessera-demo";
const DEMO_TOKEN: &str = "demo-admin-token";
/// The builder's dry run evaluates at most this many profiles (an answer within a few
/// seconds at any size); beyond, the size is estimated from them.
const DRY_RUN_SAMPLE: &str = "20000";
/// Identifier types offered in the search and the builder (custom ones can be typed).
const IDENTIFIER_TYPES: [&str; 4] = ["email", "phone", "user_id", "anonymous_id"];

/// What the console refuses to start with: no user, a nameless one, and in production
/// mode the demo password, a password under 12 characters or the demo API token.
pub fn check(config: &Config) -> Result<()> {
    let c = &config.console;
    let bad = |m: &str| Err(Error::Config(format!("console: {m}")));
    if c.users.is_empty() {
        return bad("console.users is empty: nobody could log in");
    }
    if c.api_token.is_empty() {
        return bad("console.api_token is empty: set it to one of [admin] tokens");
    }
    if let Some(t) = config.admin.tokens.iter().find(|t| t.token == c.api_token)
        && !t.delegate
    {
        return bad(&format!(
            "console.api_token is the admin token {:?}, which may not act on behalf of the console's users: set delegate = true on it",
            t.name
        ));
    }
    if c.users
        .iter()
        .any(|u| u.name.trim().is_empty() || u.password.is_empty())
    {
        return bad("every console user needs a name and a password");
    }
    if c.session_idle_minutes == 0 || c.session_max_minutes == 0 || c.sample_every_ms < 100 {
        return bad(
            "session_idle_minutes and session_max_minutes must be above 0, sample_every_ms at least 100",
        );
    }
    if c.production {
        if c.users.iter().any(|u| u.password == DEMO_PASSWORD) {
            return bad("production mode refuses the demo password; set console.users");
        }
        if c.users.iter().any(|u| u.password.chars().count() < 12) {
            return bad("production mode needs passwords of at least 12 characters");
        }
        if c.api_token == DEMO_TOKEN {
            return bad("production mode refuses the demo API token; set console.api_token");
        }
    }
    Ok(())
}

#[derive(Clone)]
struct Console {
    auth: Auth,
    upstream: Upstream,
    samples: Samples,
    config: Arc<Config>,
    logins: IntCounterVec,
    streams: IntGauge,
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let listener = admin::bind(&config.console.http_listen).await?;
    run_with_listener(config, listener, shutdown).await
}

pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    check(&config)?;
    let admin = Admin::new();
    let requests = admin.register(
        &IntCounterVec::new(
            Opts::new(
                "tessera_console_upstream_requests_total",
                "Requests to the services' APIs, by service and outcome (ok, refused, failed, unreachable)",
            ),
            &["service", "outcome"],
        )
        .expect("metric"),
    );
    let logins = admin.register(
        &IntCounterVec::new(
            Opts::new(
                "tessera_console_logins_total",
                "Login attempts by outcome (ok, refused, locked, csrf)",
            ),
            &["outcome"],
        )
        .expect("metric"),
    );
    let streams = admin.register(
        &IntGauge::new(
            "tessera_console_live_streams",
            "Profile pages following their profile live",
        )
        .expect("metric"),
    );
    let upstream = Upstream::new(&config.console, requests);
    let samples = Samples::new(config.console.keep_samples);
    let sampler = tokio::spawn(sampler::run(
        upstream.clone(),
        samples.clone(),
        Duration::from_millis(config.console.sample_every_ms),
        shutdown.clone(),
    ));
    let state = Console {
        auth: Auth::new(&config.console),
        upstream,
        samples,
        config: Arc::new(config.clone()),
        logins,
        streams,
    };
    let router = router(state).merge(admin.router());
    admin.health.set_ready(true);
    info!(listen = %listener.local_addr()?, "console ready");
    admin::serve(listener, router, &config.http, shutdown).await?;
    let _ = sampler.await;
    Ok(())
}

fn router(state: Console) -> Router {
    Router::new()
        .route("/", get(pipeline))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/profiles", get(search_page))
        .route("/profiles/search", post(search))
        .route("/profiles/{id}", get(profile))
        .route("/profiles/{id}/panel", get(profile_panel))
        .route("/profiles/{id}/stream", get(profile_stream))
        .route("/segments", get(segments))
        .route("/segments/new", get(new_segment))
        .route("/segments/dry-run", post(dry_run))
        .route("/segments/save", post(save_segment))
        .route("/segments/{id}", get(segment))
        .route("/segments/{id}/edit", get(edit_segment))
        .route("/activations", get(activations))
        .route("/api/series", get(series))
        .route("/assets/console.js", get(script))
        .route("/assets/console.css", get(stylesheet))
        .layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require_session,
        ))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Every answer: no caching (pages hold personal data), no framing, no inline script.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "no-referrer");
    set(h, "x-frame-options", "DENY");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    resp
}

fn page(title: &str, s: &Session, active: &str, body: Markup) -> Response {
    Html(pages::layout(title, Some((&s.user, &s.csrf)), active, body).into_string()).into_response()
}

fn problem(s: &Session, f: &Failure) -> Response {
    let status = f.status_code();
    let title = if f.status == 404 {
        "Not found"
    } else {
        "The request failed"
    };
    (status, page(title, s, "", pages::problem(title, &f.reason))).into_response()
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../assets/console.js"),
    )
}

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../assets/console.css"),
    )
}

async fn login_page(State(st): State<Console>, jar: CookieJar) -> Response {
    login_form(&st, jar, None, StatusCode::OK)
}

/// The login form with a fresh CSRF token (in a cookie and the form: double submit).
fn login_form(st: &Console, jar: CookieJar, error: Option<&str>, status: StatusCode) -> Response {
    let csrf = auth::random_token();
    let jar = jar.add(
        st.auth
            .cookie(LOGIN_COOKIE, csrf.clone(), Duration::from_secs(3600)),
    );
    let demo = st.config.demo
        && st
            .config
            .console
            .users
            .iter()
            .any(|u| u.password == DEMO_PASSWORD);
    (
        status,
        jar,
        Html(pages::login(&csrf, error, demo).into_string()),
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
}

async fn login(State(st): State<Console>, jar: CookieJar, Form(f): Form<LoginForm>) -> Response {
    let expected = jar.get(LOGIN_COOKIE).map(|c| c.value().to_string());
    if !expected.is_some_and(|e| !e.is_empty() && auth::same(&e, &f.csrf)) {
        st.logins.with_label_values(&["csrf"]).inc();
        return login_form(
            &st,
            jar,
            Some("The form expired; log in again."),
            StatusCode::FORBIDDEN,
        );
    }
    match st.auth.login(&f.user, &f.password) {
        Login::Ok { token } => {
            st.logins.with_label_values(&["ok"]).inc();
            info!("console login");
            let jar = jar
                .remove(axum_extra::extract::cookie::Cookie::build(LOGIN_COOKIE).path("/"))
                .add(st.auth.cookie(SESSION_COOKIE, token, st.auth.max_age));
            (jar, Redirect::to("/")).into_response()
        }
        Login::Refused => {
            st.logins.with_label_values(&["refused"]).inc();
            login_form(
                &st,
                jar,
                Some("Unknown user or wrong password."),
                StatusCode::UNAUTHORIZED,
            )
        }
        Login::Locked => {
            st.logins.with_label_values(&["locked"]).inc();
            login_form(
                &st,
                jar,
                Some("Too many failed attempts for this user: wait 15 minutes."),
                StatusCode::TOO_MANY_REQUESTS,
            )
        }
    }
}

async fn logout(State(st): State<Console>, jar: CookieJar) -> Response {
    if let Some(c) = jar.get(SESSION_COOKIE) {
        st.auth.logout(c.value());
    }
    let jar = jar.remove(axum_extra::extract::cookie::Cookie::build(SESSION_COOKIE).path("/"));
    (jar, Redirect::to("/login")).into_response()
}

async fn pipeline(Extension(s): Extension<Session>) -> Response {
    page("Pipeline", &s, "Pipeline", pages::pipeline())
}

fn identifier_types() -> Vec<String> {
    IDENTIFIER_TYPES.iter().map(|t| t.to_string()).collect()
}

async fn search_page(Extension(s): Extension<Session>) -> Response {
    page(
        "Profiles",
        &s,
        "Profiles",
        pages::search(&identifier_types(), None, &s.csrf),
    )
}

#[derive(Deserialize)]
struct SearchForm {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    value: String,
}

/// Finds the profile of an identifier through the identity API (which normalises it as
/// its rules say) and sends the browser to the profile's page: the identifier stays in
/// the form body, the address holds only the profile id.
async fn search(
    State(st): State<Console>,
    Extension(s): Extension<Session>,
    Form(f): Form<SearchForm>,
) -> Response {
    let again = |status: StatusCode, reason: &str| {
        (
            status,
            page(
                "Profiles",
                &s,
                "Profiles",
                pages::search(&identifier_types(), Some(reason), &s.csrf),
            ),
        )
            .into_response()
    };
    if f.kind.trim().is_empty() || f.value.trim().is_empty() {
        return again(
            StatusCode::BAD_REQUEST,
            "Give an identifier type and a value.",
        );
    }
    let found = st
        .upstream
        .get(
            Service::Identity,
            "/v1/identity/lookup",
            &[("type", f.kind.trim()), ("value", f.value.trim())],
        )
        .await;
    match found {
        Ok(v) => match v["profile_id"].as_str() {
            Some(id) => match api_path("/profiles", id, "") {
                Ok(to) => Redirect::to(&to).into_response(),
                Err(f) => again(StatusCode::BAD_GATEWAY, &f.reason),
            },
            None => again(
                StatusCode::BAD_GATEWAY,
                "The identity service gave no profile id.",
            ),
        },
        Err(f) if f.status == 404 => {
            again(StatusCode::NOT_FOUND, "No profile has this identifier.")
        }
        Err(f) => again(f.status_code(), &f.reason),
    }
}

/// `{prefix}/{id}{suffix}` with the id percent-encoded as one path segment; an id that a
/// URL would read as a step up or nothing (`.`, `..`, empty) names nothing.
fn api_path(prefix: &str, id: &str, suffix: &str) -> std::result::Result<String, Failure> {
    if id.is_empty() || id.chars().all(|c| c == '.') {
        return Err(Failure {
            status: 404,
            reason: "no such id".into(),
        });
    }
    let mut encoded = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(format!("{prefix}/{encoded}{suffix}"))
}

/// The profiles API's 360 view (with provenance and 50 recent events) and the identity
/// API's identifiers and merges of a profile.
async fn load_profile(st: &Console, id: &str) -> std::result::Result<Markup, Failure> {
    let path = api_path("/v1/profiles", id, "")?;
    let ipath = api_path("/v1/identity/profiles", id, "")?;
    let (view, identity) = tokio::join!(
        st.upstream.get(
            Service::Profiles,
            &path,
            &[("explain", "true"), ("events", "50")]
        ),
        st.upstream.get(Service::Identity, &ipath, &[]),
    );
    let view = match (view, &identity) {
        (Ok(v), _) => v,
        // Known to identity, not applied by profiles yet: show what identity knows.
        (Err(f), Ok(i)) if f.status == 404 => json!({"profile_id": i["profile_id"]}),
        (Err(f), _) => return Err(f),
    };
    Ok(pages::profile_panel(&view, identity.ok().as_ref()))
}

async fn profile(
    State(st): State<Console>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    match load_profile(&st, &id).await {
        Ok(panel) => page("Profile", &s, "Profiles", pages::profile(&id, panel)),
        Err(f) => problem(&s, &f),
    }
}

async fn profile_panel(State(st): State<Console>, Path(id): Path<String>) -> Response {
    match load_profile(&st, &id).await {
        Ok(panel) => Html(panel.into_string()).into_response(),
        Err(f) => f.response(),
    }
}

/// The profile's change stream (profiles' `/v1/profiles/{id}/changes`), passed through
/// to the page until the browser leaves or the session ends.
async fn profile_stream(
    State(st): State<Console>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let resp = match api_path("/v1/profiles", &id, "/changes") {
        Ok(path) => st.upstream.stream(Service::Profiles, &path).await,
        Err(f) => Err(f),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(f) => {
            return f.response();
        }
    };
    let gauge = st.streams.clone();
    gauge.inc();
    let open = OpenStream(gauge);
    // The stream ends with the session: logged out, idle or past its maximum age.
    let auth = st.auth.clone();
    let ends = async move {
        while auth.still_live(&s) {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    };
    let body = resp.bytes_stream().take_until(ends).map(move |chunk| {
        let _ = &open;
        chunk
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(body))
        .expect("a stream response")
}

/// Counts an open live stream until it is dropped.
struct OpenStream(IntGauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn segments(State(st): State<Console>, Extension(s): Extension<Session>) -> Response {
    match st
        .upstream
        .get(Service::Profiles, "/v1/segments", &[])
        .await
    {
        Ok(v) => {
            let list = v["segments"].as_array().cloned().unwrap_or_default();
            page("Segments", &s, "Segments", pages::segments(&list))
        }
        Err(f) => problem(&s, &f),
    }
}

async fn segment(
    State(st): State<Console>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let (path, members_path) = match (
        api_path("/v1/segments", &id, ""),
        api_path("/v1/segments", &id, "/members"),
    ) {
        (Ok(p), Ok(m)) => (p, m),
        (Err(f), _) | (_, Err(f)) => return problem(&s, &f),
    };
    let (def, members) = tokio::join!(
        st.upstream.get(Service::Profiles, &path, &[]),
        st.upstream
            .get(Service::Profiles, &members_path, &[("limit", "20")]),
    );
    match def {
        Ok(def) => {
            let members = members
                .ok()
                .and_then(|m| m["members"].as_array().cloned())
                .unwrap_or_default();
            page("Segment", &s, "Segments", pages::segment(&def, &members))
        }
        Err(f) => problem(&s, &f),
    }
}

/// What a condition may name: the segments and computed traits in force.
async fn builder_page(st: &Console, s: &Session, initial: Option<Value>) -> Response {
    let (segs, computed) = tokio::join!(
        st.upstream.get(Service::Profiles, "/v1/segments", &[]),
        st.upstream
            .get(Service::Profiles, "/v1/computed-traits", &[]),
    );
    let ids = |v: std::result::Result<Value, Failure>, key: &str| -> Vec<String> {
        v.ok()
            .and_then(|v| v[key].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|d| d["id"].as_str().map(str::to_string))
            .collect()
    };
    let mut purposes: Vec<String> = ["marketing", "advertising", "analytics", "personalization"]
        .iter()
        .map(|p| p.to_string())
        .chain(st.config.activation.opt_in_purposes.iter().cloned())
        .collect();
    purposes.sort();
    purposes.dedup();
    page(
        "Segment builder",
        s,
        "Segments",
        pages::builder(
            initial.as_ref(),
            &ids(segs, "segments"),
            &ids(computed, "computed_traits"),
            &identifier_types(),
            &purposes,
        ),
    )
}

async fn new_segment(State(st): State<Console>, Extension(s): Extension<Session>) -> Response {
    builder_page(&st, &s, None).await
}

async fn edit_segment(
    State(st): State<Console>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let found = match api_path("/v1/segments", &id, "") {
        Ok(path) => st.upstream.get(Service::Profiles, &path, &[]).await,
        Err(f) => Err(f),
    };
    match found {
        Ok(v) => builder_page(&st, &s, Some(v["definition"].clone())).await,
        Err(f) => problem(&s, &f),
    }
}

/// A JSON answer carrying the service's status and body (or its refusal).
fn passed_on(r: std::result::Result<(u16, Value), Failure>) -> Response {
    match r {
        Ok((status, v)) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            axum::Json(v),
        )
            .into_response(),
        Err(f) => f.response(),
    }
}

/// The builder's dry run: the profiles API's `POST /v1/segments/dry-run`.
async fn dry_run(
    State(st): State<Console>,
    Extension(s): Extension<Session>,
    axum::Json(def): axum::Json<Value>,
) -> Response {
    passed_on(
        st.upstream
            .call(
                Service::Profiles,
                Method::POST,
                "/v1/segments/dry-run",
                &[("sample", DRY_RUN_SAMPLE)],
                Some(&def),
                Some(&s.user),
            )
            .await,
    )
}

#[derive(Deserialize)]
struct Save {
    definition: Value,
    /// Replace the segment of this id (a new version) instead of creating one.
    #[serde(default)]
    replaces: Option<String>,
}

/// The builder's save: `POST /v1/segments` (new) or `PUT /v1/segments/{id}` (a new
/// version), with the API's answer or refusal.
async fn save_segment(
    State(st): State<Console>,
    Extension(s): Extension<Session>,
    axum::Json(save): axum::Json<Save>,
) -> Response {
    let r = match &save.replaces {
        Some(id) => match api_path("/v1/segments", id, "") {
            Ok(path) => {
                st.upstream
                    .call(
                        Service::Profiles,
                        Method::PUT,
                        &path,
                        &[],
                        Some(&save.definition),
                        Some(&s.user),
                    )
                    .await
            }
            Err(f) => Err(f),
        },
        None => {
            st.upstream
                .call(
                    Service::Profiles,
                    Method::POST,
                    "/v1/segments",
                    &[],
                    Some(&save.definition),
                    Some(&s.user),
                )
                .await
        }
    };
    passed_on(r)
}

async fn activations(State(st): State<Console>, Extension(s): Extension<Session>) -> Response {
    page(
        "Activations",
        &s,
        "Activations",
        pages::activations(&st.config, &st.samples.totals()),
    )
}

/// The charts' readings: `?prefixes=a,b` (series whose names start with one of them).
async fn series(State(st): State<Console>, Query(q): Query<HashMap<String, String>>) -> Response {
    let prefixes: Vec<&str> = q
        .get("prefixes")
        .map(|p| p.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    if prefixes.is_empty() || prefixes.len() > 64 {
        return auth::refusal(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "prefixes: 1 to 64 series name prefixes, comma-separated",
        );
    }
    axum::Json(json!({
        "every_ms": st.config.console.sample_every_ms,
        "series": st.samples.series(&prefixes),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_mode_refuses_the_demo_credentials() {
        let mut c = Config::parse("demo = true").unwrap();
        check(&c).expect("the demo configuration starts in demo mode");
        c.console.production = true;
        assert!(check(&c).unwrap_err().to_string().contains("demo password"));
        c.console.users[0].password = "short".into();
        assert!(check(&c).unwrap_err().to_string().contains("12 characters"));
        c.console.users[0].password = "a long enough secret".into();
        assert!(
            check(&c)
                .unwrap_err()
                .to_string()
                .contains("demo API token")
        );
        c.console.api_token = "a-real-token-from-a-secret".into();
        check(&c).expect("real credentials");
        c.admin.tokens = vec![tessera_common::config::ApiToken {
            name: "console".into(),
            token: c.console.api_token.clone(),
            delegate: false,
        }];
        assert!(
            check(&c)
                .unwrap_err()
                .to_string()
                .contains("delegate = true")
        );
        c.admin.tokens[0].delegate = true;
        check(&c).expect("a delegating token");
        c.console.api_token.clear();
        assert!(check(&c).unwrap_err().to_string().contains("api_token"));
        c.console.users.clear();
        assert!(check(&c).is_err());
    }

    #[test]
    fn ids_become_single_path_segments() {
        let p = |id| api_path("/v1/profiles", id, "/changes").map_err(|f| f.status);
        assert_eq!(p("p-1_a.b"), Ok("/v1/profiles/p-1_a.b/changes".into()));
        assert_eq!(
            p("../x/y?z#"),
            Ok("/v1/profiles/..%2Fx%2Fy%3Fz%23/changes".into())
        );
        assert_eq!(p("é"), Ok("/v1/profiles/%C3%A9/changes".into()));
        assert_eq!(p(".."), Err(404));
        assert_eq!(p(""), Err(404));
    }
}
