//! Several profiles instances behind one address. Each instance holds the profiles of
//! the partitions it serves ([`crate::state::Placement`]); a read that reaches it is
//! asked of every instance (`profiles.peers`, this one included) with
//! [`LOCAL_HEADER`], each answers from what it serves and says which partitions those
//! are ([`SERVING_HEADER`]), and the answers are combined here:
//!
//! - a profile (by id, by identifier, its segments, its change stream): the one that
//!   has it; one merged into a profile another instance serves is asked for again
//!   under the survivor's id ([`LIVE_HEADER`]);
//! - segment sizes, members, dry runs, households and accounts, the back-fill: added
//!   up or merged.
//!
//! Unless the answers together cover every partition, the request gets a 503 with
//! `Retry-After` (an instance is starting, rebuilding its partitions, or gone and not
//! yet replaced by the group), never a partial answer. A single instance (no peers)
//! answers reads likewise only once it serves every partition. Writes (definitions) are
//! not fanned out: they go through Kafka and every instance reads them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::IntCounterVec;
use serde_json::{Value, json};

use tessera_common::admin::error;

use crate::state::Placement;

/// On a request: answer from this instance's partitions only.
pub const LOCAL_HEADER: &str = "x-tessera-local";
/// On a local answer: the partitions this instance serves, comma-separated.
pub const SERVING_HEADER: &str = "x-tessera-serving";
/// On a local 404: the profile was merged into this one, served elsewhere.
pub const LIVE_HEADER: &str = "x-tessera-live";

/// Request headers passed on to the peers.
const PASSED: [&str; 4] = ["authorization", "content-type", "x-on-behalf-of", "accept"];

#[derive(Clone)]
pub struct Peers {
    urls: Arc<Vec<String>>,
    client: reqwest::Client,
    placement: Placement,
    requests: IntCounterVec,
}

impl Peers {
    pub fn new(
        urls: &[String],
        placement: Placement,
        admin: &tessera_common::admin::Admin,
    ) -> Peers {
        let requests = admin.register(
            &IntCounterVec::new(
                prometheus::Opts::new(
                    "tessera_profiles_peer_requests_total",
                    "API reads asked of the profiles instances (this one included), by outcome",
                ),
                &["outcome"],
            )
            .expect("metric"),
        );
        for outcome in ["ok", "incomplete", "peer_failed"] {
            requests.with_label_values(&[outcome]);
        }
        Peers {
            urls: Arc::new(
                urls.iter()
                    .map(|u| u.trim_end_matches('/').to_string())
                    .collect(),
            ),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("http client"),
            placement,
            requests,
        }
    }
}

/// How the answers to a read are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// One instance has it.
    Profile,
    /// A profile's change stream, from the instance that has it.
    Stream,
    /// Definitions with segment sizes: added up.
    Sizes,
    Members,
    DryRun,
    Group,
    Backfill,
}

fn kind_of(method: &Method, path: &str) -> Option<Kind> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["v1", "profiles", _] | ["v1", "profiles", _, "segments"]) => Some(Kind::Profile),
        ("GET", ["v1", "profiles", _, "changes"]) => Some(Kind::Stream),
        ("GET", ["v1", "segments"] | ["v1", "segments", _]) => Some(Kind::Sizes),
        ("GET", ["v1", "segments", _, "members"]) => Some(Kind::Members),
        ("POST", ["v1", "segments", "dry-run"]) => Some(Kind::DryRun),
        ("GET", ["v1", "households" | "accounts", _]) => Some(Kind::Group),
        ("GET", ["v1", "definitions", "backfill"]) => Some(Kind::Backfill),
        _ => None,
    }
}

/// The middleware: a local request is answered here and says what this instance
/// serves; a read from outside is asked of every instance and the answers combined.
pub async fn gather(State(peers): State<Peers>, req: Request, next: Next) -> Response {
    let kind = kind_of(req.method(), req.uri().path());
    if peers.urls.is_empty() {
        // One instance: it answers once it serves every partition (not while it starts
        // or rebuilds one), like several would.
        let serving = peers.placement.serving().len() as i32;
        if kind.is_some() && serving < peers.placement.partitions {
            return incomplete();
        }
        return next.run(req).await;
    }
    if req.headers().contains_key(LOCAL_HEADER) || kind.is_none() {
        let mut r = next.run(req).await;
        let serving = peers
            .placement
            .serving()
            .iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if let Ok(v) = HeaderValue::from_str(&serving) {
            r.headers_mut().insert(SERVING_HEADER, v);
        }
        return r;
    }
    let kind = kind.expect("checked above");
    let method = req.method().clone();
    let mut path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()),
    };
    // A merged profile is asked for again under its survivor's id (chains are short).
    for _ in 0..4 {
        let answers = peers.ask(&method, &path, &headers, &body, kind).await;
        if covered(&answers, peers.placement.partitions).is_err() {
            peers.requests.with_label_values(&["incomplete"]).inc();
            return incomplete();
        }
        peers.requests.with_label_values(&["ok"]).inc();
        let answers: Vec<Answer> = answers.into_iter().flatten().collect();
        // The request itself is wrong: every instance says so alike.
        if let Some(a) = answers
            .iter()
            .find(|a| a.status.is_client_error() && a.status != StatusCode::NOT_FOUND)
        {
            return a.clone().into_response();
        }
        match kind {
            Kind::Profile | Kind::Stream => {
                if let Some(i) = answers.iter().position(|a| a.status == StatusCode::OK) {
                    return answers.into_iter().nth(i).expect("found").into_response();
                }
                match answers.iter().find_map(|a| a.live.clone()) {
                    Some(live) => path = rename(&path, &live),
                    None => return first_or_404(answers),
                }
            }
            _ => return combine(kind, &path, answers),
        }
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the profile's merges could not be followed",
    )
}

/// One instance's answer.
#[derive(Clone)]
struct Answer {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    serving: BTreeSet<i32>,
    live: Option<String>,
    /// Read whole, except for a stream's 200 (passed on as it comes).
    body: AnswerBody,
}

#[derive(Clone)]
enum AnswerBody {
    Whole(Bytes),
    Stream(Arc<std::sync::Mutex<Option<reqwest::Response>>>),
}

impl Answer {
    fn json(&self) -> Value {
        match &self.body {
            AnswerBody::Whole(b) => serde_json::from_slice(b).unwrap_or(Value::Null),
            AnswerBody::Stream(_) => Value::Null,
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let body = match self.body {
            AnswerBody::Whole(b) => Body::from(b),
            AnswerBody::Stream(r) => match r.lock().expect("stream").take() {
                Some(r) => Body::from_stream(r.bytes_stream()),
                None => Body::empty(),
            },
        };
        let mut r = Response::new(body);
        *r.status_mut() = self.status;
        if let Some(ct) = self.content_type {
            r.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        if self.status == StatusCode::OK {
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        r
    }
}

impl Peers {
    /// Asks every instance; `None` for one that did not answer.
    async fn ask(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: &Bytes,
        kind: Kind,
    ) -> Vec<Option<Answer>> {
        let asks = self.urls.iter().map(|base| async move {
            let mut req = self
                .client
                .request(method.clone(), format!("{base}{path}"))
                .header(LOCAL_HEADER, "1")
                .body(body.clone());
            if kind != Kind::Stream {
                req = req.timeout(Duration::from_secs(30));
            }
            for name in PASSED {
                if let Some(v) = headers.get(name) {
                    req = req.header(name, v);
                }
            }
            let r = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(peer = %base, error = %e.without_url(), "a profiles instance did not answer");
                    self.requests.with_label_values(&["peer_failed"]).inc();
                    return None;
                }
            };
            let status = r.status();
            let serving = r
                .headers()
                .get(SERVING_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(',').filter_map(|p| p.parse().ok()).collect())
                .unwrap_or_default();
            let live = r
                .headers()
                .get(LIVE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let content_type = r.headers().get(header::CONTENT_TYPE).cloned();
            let body = if kind == Kind::Stream && status == StatusCode::OK {
                AnswerBody::Stream(Arc::new(std::sync::Mutex::new(Some(r))))
            } else {
                AnswerBody::Whole(r.bytes().await.ok()?)
            };
            Some(Answer {
                status,
                content_type,
                serving,
                live,
                body,
            })
        });
        futures::future::join_all(asks).await
    }
}

/// `Err` with the partitions no answer covers.
fn covered(answers: &[Option<Answer>], partitions: i32) -> Result<(), Vec<i32>> {
    let served: BTreeSet<i32> = answers
        .iter()
        .flatten()
        .filter(|a| !a.status.is_server_error())
        .flat_map(|a| a.serving.iter().copied())
        .collect();
    let missing: Vec<i32> = (0..partitions).filter(|p| !served.contains(p)).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

/// The path with its profile id (the segment after `/v1/profiles/`) replaced; a
/// lookup by identifier becomes a read by id, with the same query.
fn rename(path: &str, live: &str) -> String {
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    let mut parts: Vec<String> = p.split('/').map(str::to_string).collect();
    if parts.get(3).is_some_and(|s| s == "lookup") {
        parts.truncate(3);
        parts.push(live.to_string());
    } else if parts.len() > 3 {
        parts[3] = live.to_string();
    }
    let query: Vec<&str> = q
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("type=") && !kv.starts_with("value="))
        .collect();
    match query.is_empty() {
        true => parts.join("/"),
        false => format!("{}?{}", parts.join("/"), query.join("&")),
    }
}

/// Some partition is not served right now: no partial answer.
fn incomplete() -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "some partitions are not served right now (an instance is starting, rebuilding its \
         state or gone): retry shortly",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    r
}

fn first_or_404(answers: Vec<Answer>) -> Response {
    match answers.into_iter().next() {
        Some(a) => a.into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "no such profile"),
    }
}

fn query_limit(path: &str) -> usize {
    path.split_once('?')
        .and_then(|(_, q)| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("limit="))
                .and_then(|l| l.parse().ok())
        })
        .unwrap_or(100)
}

/// Adds up or merges the instances' answers (all 200 or 404 here).
fn combine(kind: Kind, path: &str, answers: Vec<Answer>) -> Response {
    let ok: Vec<Value> = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .map(Answer::json)
        .collect();
    let Some(first) = ok.first().cloned() else {
        return first_or_404(answers);
    };
    let sum = |field: &str| -> u64 { ok.iter().filter_map(|v| v[field].as_u64()).sum() };
    let body = match kind {
        Kind::Sizes if first.get("segments").is_some() => {
            let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
            for v in &ok {
                for s in v["segments"].as_array().into_iter().flatten() {
                    *sizes
                        .entry(s["id"].as_str().unwrap_or_default().into())
                        .or_default() += s["size"].as_u64().unwrap_or(0);
                }
            }
            let mut out = first;
            for s in out["segments"].as_array_mut().into_iter().flatten() {
                s["size"] = json!(sizes[s["id"].as_str().unwrap_or_default()]);
            }
            out
        }
        Kind::Sizes if first.get("size").is_some() => {
            let mut out = first;
            out["size"] = json!(sum("size"));
            out
        }
        Kind::Members => {
            let limit = query_limit(path);
            let mut members: Vec<Value> = ok
                .iter()
                .flat_map(|v| v["members"].as_array().cloned().unwrap_or_default())
                .collect();
            members.sort_by(|a, b| a["profile_id"].as_str().cmp(&b["profile_id"].as_str()));
            let more = members.len() > limit || ok.iter().any(|v| !v["next_after"].is_null());
            members.truncate(limit);
            let next = more
                .then(|| members.last().map(|m| m["profile_id"].clone()))
                .flatten();
            json!({"segment": first["segment"], "size": sum("size"), "members": members, "next_after": next})
        }
        Kind::DryRun => {
            let (found, scanned, total) = (
                sum("members_found"),
                sum("profiles_scanned"),
                sum("profiles_total"),
            );
            let sample: Vec<Value> = ok
                .iter()
                .flat_map(|v| v["sample"].as_array().cloned().unwrap_or_default())
                .take(10)
                .collect();
            let mut out = first;
            out["size"] = json!(sum("size"));
            out["estimated"] = json!(scanned < total);
            out["members_found"] = json!(found);
            out["profiles_scanned"] = json!(scanned);
            out["profiles_total"] = json!(total);
            out["sample"] = json!(sample);
            out
        }
        Kind::Group => {
            let members: BTreeSet<String> = ok
                .iter()
                .flat_map(|v| v["members"].as_array().cloned().unwrap_or_default())
                .filter_map(|m| m.as_str().map(str::to_string))
                .collect();
            json!({"id": first["id"], "members": members})
        }
        Kind::Backfill => {
            let jobs: Vec<&Value> = ok.iter().filter(|v| v["state"] != "none").collect();
            if jobs.is_empty() {
                json!({"state": "none"})
            } else {
                let running = jobs.iter().any(|v| v["state"] == "running");
                let (scanned, total) = (sum("profiles_scanned"), sum("profiles_total"));
                let started = jobs.iter().filter_map(|v| v["started_at"].as_str()).min();
                let finished = jobs.iter().filter_map(|v| v["finished_at"].as_str()).max();
                json!({
                    "state": if running { "running" } else { "done" },
                    "definitions": jobs[0]["definitions"], "profiles_scanned": scanned,
                    "profiles_total": total,
                    "progress": if total == 0 { 1.0 } else { (scanned as f64 / total as f64).min(1.0) },
                    "started_at": started, "finished_at": if running { None } else { finished },
                    "instances": jobs.len(),
                })
            }
        }
        _ => first,
    };
    let mut r = axum::Json(body).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_recognised_and_writes_are_not() {
        let get = Method::GET;
        assert_eq!(kind_of(&get, "/v1/profiles/lookup"), Some(Kind::Profile));
        assert_eq!(
            kind_of(&get, "/v1/profiles/abc/segments"),
            Some(Kind::Profile)
        );
        assert_eq!(
            kind_of(&get, "/v1/profiles/abc/changes"),
            Some(Kind::Stream)
        );
        assert_eq!(kind_of(&get, "/v1/segments/s/members"), Some(Kind::Members));
        assert_eq!(
            kind_of(&Method::POST, "/v1/segments/dry-run"),
            Some(Kind::DryRun)
        );
        assert_eq!(kind_of(&Method::POST, "/v1/segments"), None);
        assert_eq!(kind_of(&Method::PUT, "/v1/segments/s"), None);
        assert_eq!(kind_of(&get, "/v1/triggers"), None);
    }

    #[test]
    fn a_merged_profile_is_asked_for_under_its_survivor() {
        assert_eq!(
            rename("/v1/profiles/old/segments", "new"),
            "/v1/profiles/new/segments"
        );
        assert_eq!(
            rename(
                "/v1/profiles/lookup?type=email&value=a%40b.c&explain=true",
                "new"
            ),
            "/v1/profiles/new?explain=true"
        );
        assert_eq!(
            rename("/v1/profiles/old?events=5", "new"),
            "/v1/profiles/new?events=5"
        );
    }

    fn answer(status: u16, serving: &[i32], body: Value) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            content_type: None,
            serving: serving.iter().copied().collect(),
            live: None,
            body: AnswerBody::Whole(Bytes::from(body.to_string())),
        }
    }

    #[test]
    fn an_answer_is_given_only_when_every_partition_is_served() {
        let a = Some(answer(200, &[0, 2], json!({})));
        let b = Some(answer(404, &[1], json!({})));
        assert_eq!(covered(&[a.clone(), b.clone()], 3), Ok(()));
        assert_eq!(covered(&[a.clone(), None], 3), Err(vec![1]));
        assert_eq!(
            covered(&[a, Some(answer(503, &[1], json!({})))], 3),
            Err(vec![1])
        );
    }

    #[tokio::test]
    async fn members_merge_in_order_and_page_on() {
        let a = answer(
            200,
            &[0],
            json!({"segment": "s", "size": 3, "members": [
            {"profile_id": "a"}, {"profile_id": "c"}], "next_after": "c"}),
        );
        let b = answer(
            200,
            &[1],
            json!({"segment": "s", "size": 1, "members": [
            {"profile_id": "b"}], "next_after": null}),
        );
        let r = combine(Kind::Members, "/v1/segments/s/members?limit=2", vec![a, b]);
        let v: Value =
            serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap())
                .unwrap();
        assert_eq!(v["size"], 4);
        assert_eq!(
            v["members"],
            json!([{"profile_id": "a"}, {"profile_id": "b"}])
        );
        assert_eq!(v["next_after"], "b");
    }
}
