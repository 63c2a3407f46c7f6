//! Who may use the console: users from the configuration, sessions kept in memory behind
//! an HttpOnly, SameSite=Strict cookie, and a CSRF token per session that every
//! state-changing request must carry (a form field `csrf` or an `X-CSRF-Token` header).
//!
//! Passwords and session tokens are kept as SHA-256 digests and compared as digests.
//! Five failed logins for a user name within 15 minutes lock that name for the rest of
//! the 15 minutes (429), so a password cannot be guessed at speed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use tessera_common::config::ConsoleConfig;

pub const SESSION_COOKIE: &str = "tessera_session";
/// The login form's CSRF token travels in this cookie and in the form (double submit):
/// there is no session yet to keep it in.
pub const LOGIN_COOKIE: &str = "tessera_login";
const MAX_FAILURES: usize = 5;
/// User names with recent failures kept at most (see [`Auth::login`]).
const MAX_TRACKED_NAMES: usize = 10_000;
const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// A form body larger than this is refused before it is read for its CSRF token.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// The logged-in user of a request (a request extension set by [`require_session`]).
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub csrf: String,
    /// The digest of its token: where the session is kept.
    key: Vec<u8>,
    created: Instant,
    last_seen: Instant,
}

#[derive(Clone)]
pub struct Auth {
    users: Arc<Vec<(String, Vec<u8>)>>,
    sessions: Arc<Mutex<HashMap<Vec<u8>, Session>>>,
    failures: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
    pub idle: Duration,
    pub max_age: Duration,
    secure: bool,
    max_tracked_names: usize,
}

pub enum Login {
    Ok { token: String },
    Refused,
    Locked,
}

fn digest(s: &str) -> Vec<u8> {
    Sha256::digest(s.as_bytes()).to_vec()
}

/// 32 random bytes, URL-safe base64.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Equal strings, compared as digests (the time taken says nothing about either).
pub fn same(a: &str, b: &str) -> bool {
    digest(a) == digest(b)
}

impl Auth {
    pub fn new(c: &ConsoleConfig) -> Auth {
        Auth {
            users: Arc::new(
                c.users
                    .iter()
                    .map(|u| (u.name.clone(), digest(&u.password)))
                    .collect(),
            ),
            sessions: Arc::default(),
            failures: Arc::default(),
            idle: Duration::from_secs(c.session_idle_minutes * 60),
            max_age: Duration::from_secs(c.session_max_minutes * 60),
            secure: c.production,
            max_tracked_names: MAX_TRACKED_NAMES,
        }
    }

    pub fn login(&self, user: &str, password: &str) -> Login {
        self.login_at(user, password, Instant::now())
    }

    fn login_at(&self, user: &str, password: &str, now: Instant) -> Login {
        {
            let mut failures = self.failures.lock().expect("failures");
            // Expired failures go first, so a lock always lifts with its window.
            failures.retain(|_, v| {
                v.retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
                !v.is_empty()
            });
            if let Some(recent) = failures.get(user)
                && recent.len() >= MAX_FAILURES
            {
                return Login::Locked;
            }
        }
        let presented = digest(password);
        // Every user's digest is compared, so the time taken does not tell names apart.
        let ok = self.users.iter().fold(false, |ok, (name, d)| {
            ok | (name == user && *d == presented)
        });
        if !ok {
            let mut failures = self.failures.lock().expect("failures");
            // Failures are counted by name, and a flood of made-up names must neither
            // grow memory without end nor lock anyone else out. Beyond the limit only
            // the configured users' failures are still counted (at most one entry
            // each): a made-up name can never log in, so leaving it uncounted loses
            // nothing.
            let tracked = failures.contains_key(user);
            let is_user = self.users.iter().any(|(name, _)| name == user);
            if tracked || is_user || failures.len() < self.max_tracked_names {
                failures.entry(user.to_string()).or_default().push(now);
            }
            return Login::Refused;
        }
        self.failures.lock().expect("failures").remove(user);
        let token = random_token();
        let mut sessions = self.sessions.lock().expect("sessions");
        sessions.retain(|_, s| self.live(s, now));
        sessions.insert(
            digest(&token),
            Session {
                user: user.to_string(),
                csrf: random_token(),
                key: digest(&token),
                created: now,
                last_seen: now,
            },
        );
        Login::Ok { token }
    }

    fn live(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.last_seen) < self.idle && now.duration_since(s.created) < self.max_age
    }

    /// The session a token names, if it is live; its idle clock restarts.
    pub fn session(&self, token: &str) -> Option<Session> {
        let now = Instant::now();
        let mut sessions = self.sessions.lock().expect("sessions");
        let key = digest(token);
        let s = sessions.get_mut(&key)?;
        if !self.live(s, now) {
            sessions.remove(&key);
            return None;
        }
        s.last_seen = now;
        Some(s.clone())
    }

    /// Whether a session is still live (not logged out, not expired), without counting
    /// this as activity: a live stream asks it to end with its session.
    pub fn still_live(&self, s: &Session) -> bool {
        let sessions = self.sessions.lock().expect("sessions");
        sessions
            .get(&s.key)
            .is_some_and(|held| self.live(held, Instant::now()))
    }

    pub fn logout(&self, token: &str) {
        self.sessions
            .lock()
            .expect("sessions")
            .remove(&digest(token));
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().expect("sessions").len()
    }

    /// A cookie for the console's own path, HttpOnly and SameSite=Strict (Secure in
    /// production mode).
    pub fn cookie(&self, name: &'static str, value: String, max_age: Duration) -> Cookie<'static> {
        let mut c = Cookie::new(name, value);
        c.set_path("/");
        c.set_http_only(true);
        c.set_same_site(SameSite::Strict);
        c.set_secure(self.secure);
        c.set_max_age(time_duration(max_age));
        c
    }
}

fn time_duration(d: Duration) -> cookie::time::Duration {
    cookie::time::Duration::seconds(d.as_secs() as i64)
}

/// Paths served without a session: the login page, the static assets, and the admin
/// endpoints (health, readiness, metrics).
fn open_path(path: &str) -> bool {
    matches!(path, "/login" | "/healthz" | "/readyz" | "/metrics") || path.starts_with("/assets/")
}

/// Middleware: a live session for every page but the open ones (else a page is sent to
/// the login form and any other request gets 401), and the session's CSRF token on every
/// request that changes something (else 403).
pub async fn require_session(
    State(auth): State<Auth>,
    jar: CookieJar,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    if open_path(&path) {
        return next.run(req).await;
    }
    let session = jar
        .get(SESSION_COOKIE)
        .and_then(|c| auth.session(c.value()));
    let Some(session) = session else {
        if req.method() == Method::GET && !wants_json(req.headers()) {
            return Redirect::to("/login").into_response();
        }
        return refusal(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "log in first: the session is missing or expired",
        );
    };
    let req = if changes_state(req.method()) {
        match checked_csrf(req, &session.csrf).await {
            Ok(req) => req,
            Err(r) => return r,
        }
    } else {
        req
    };
    let mut req = req;
    req.extensions_mut().insert(session);
    next.run(req).await
}

fn changes_state(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn wants_json(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") || a.contains("text/event-stream"))
}

pub fn refusal(status: StatusCode, code: &str, reason: &str) -> Response {
    tessera_common::admin::error(status, code, reason)
}

/// The request, if it carries `expected` as `X-CSRF-Token` or as the `csrf` field of its
/// form body (read, checked and put back).
async fn checked_csrf(req: Request, expected: &str) -> Result<Request, Response> {
    let forbidden = || {
        refusal(
            StatusCode::FORBIDDEN,
            "csrf",
            "the request lacks this session's CSRF token; reload the page",
        )
    };
    if let Some(t) = req.headers().get("x-csrf-token") {
        return match t.to_str() {
            Ok(t) if same(t, expected) => Ok(req),
            _ => Err(forbidden()),
        };
    }
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Err(forbidden());
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| {
            refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the form is larger than 64 KiB",
            )
        })?;
    let fields: Vec<(String, String)> =
        serde_urlencoded::from_bytes(&bytes).map_err(|_| forbidden())?;
    let ok = fields.iter().any(|(k, v)| k == "csrf" && same(v, expected));
    if !ok {
        return Err(forbidden());
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConsoleConfig {
        let mut c = tessera_common::config::Config::demo().console;
        c.users = vec![tessera_common::config::ConsoleUser {
            name: "ops".into(),
            password: "correct horse".into(),
        }];
        c
    }

    #[test]
    fn a_session_is_made_only_with_the_right_password_and_ends_on_logout() {
        let auth = Auth::new(&config());
        assert!(matches!(auth.login("ops", "wrong"), Login::Refused));
        assert!(matches!(
            auth.login("nobody", "correct horse"),
            Login::Refused
        ));
        let Login::Ok { token } = auth.login("ops", "correct horse") else {
            panic!("the right password is refused")
        };
        let s = auth.session(&token).expect("a live session");
        assert_eq!(s.user, "ops");
        assert_ne!(s.csrf, token, "the CSRF token is not the session token");
        assert!(auth.session("forged").is_none());
        assert!(auth.still_live(&s));
        auth.logout(&token);
        assert!(auth.session(&token).is_none());
        assert!(!auth.still_live(&s), "a stream of this session ends too");
    }

    #[test]
    fn five_failures_lock_the_name_even_for_the_right_password() {
        let auth = Auth::new(&config());
        for _ in 0..MAX_FAILURES {
            assert!(matches!(auth.login("ops", "guess"), Login::Refused));
        }
        assert!(matches!(auth.login("ops", "correct horse"), Login::Locked));
    }

    /// The audit's finding: once the table of failing names was full, every name not
    /// in it was `Locked`, real users included, and the check returned before expired
    /// failures were forgotten, so the lock never lifted until a restart.
    #[test]
    fn a_flood_of_made_up_names_neither_grows_memory_nor_locks_anyone_out() {
        let mut auth = Auth::new(&config());
        auth.max_tracked_names = 3;
        let start = Instant::now();
        for name in ["a", "b", "c", "d", "e"] {
            assert!(matches!(
                auth.login_at(name, "guess", start),
                Login::Refused
            ));
        }
        assert_eq!(
            auth.failures.lock().unwrap().len(),
            3,
            "nothing more is kept"
        );
        assert!(
            matches!(
                auth.login_at("ops", "correct horse", start),
                Login::Ok { .. }
            ),
            "a real user still logs in"
        );
        // A real user's failures are still counted while the table is full.
        for _ in 0..MAX_FAILURES {
            auth.login_at("a", "guess", start);
            auth.login_at("ops", "guess", start);
        }
        assert!(matches!(
            auth.login_at("ops", "correct horse", start),
            Login::Locked
        ));
        assert_eq!(
            auth.failures.lock().unwrap().len(),
            4,
            "the user's one entry more"
        );
        // And every lock lifts with its window.
        let later = start + FAILURE_WINDOW + Duration::from_secs(1);
        assert!(matches!(
            auth.login_at("ops", "correct horse", later),
            Login::Ok { .. }
        ));
        assert!(matches!(auth.login_at("a", "guess", later), Login::Refused));
        assert_eq!(
            auth.failures.lock().unwrap().len(),
            1,
            "expired names are forgotten"
        );
    }

    #[test]
    fn an_idle_session_expires() {
        let mut c = config();
        c.session_idle_minutes = 0;
        let auth = Auth::new(&c);
        let Login::Ok { token } = auth.login("ops", "correct horse") else {
            panic!()
        };
        assert!(auth.session(&token).is_none(), "idle longer than 0 minutes");
        assert_eq!(auth.session_count(), 0, "an expired session is forgotten");
    }

    #[tokio::test]
    async fn a_form_carries_its_csrf_token_through_the_check() {
        let req = |body: &'static str| {
            axum::http::Request::builder()
                .method("POST")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap()
        };
        let ok = checked_csrf(req("csrf=t0k&name=x"), "t0k").await.unwrap();
        let body = axum::body::to_bytes(ok.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"csrf=t0k&name=x", "the body is put back whole");
        let refused = checked_csrf(req("csrf=other"), "t0k").await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let missing = checked_csrf(req("name=x"), "t0k").await.unwrap_err();
        assert_eq!(missing.status(), StatusCode::FORBIDDEN);
        let json = axum::http::Request::builder()
            .method("POST")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap();
        assert_eq!(
            checked_csrf(json, "t0k").await.unwrap_err().status(),
            StatusCode::FORBIDDEN,
            "JSON needs the header"
        );
    }
}
