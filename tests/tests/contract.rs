//! The OpenAPI description (`docs/openapi.yaml`) against the code and the running
//! platform: every route in the source is described and every described path is a route;
//! every operation, called on a real platform with and without credentials and with an
//! empty body, answers with a status the description lists, and every refusal is JSON
//! with an error code and a reason.

use std::collections::BTreeSet;

use serde_json::Value;

use tessera_tests::*;

fn description() -> Value {
    let text = std::fs::read_to_string(repo_root().join("docs/openapi.yaml")).unwrap();
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    doc.apply_merge().unwrap();
    serde_json::to_value(doc).unwrap()
}

/// The Rust files under `dir`, in its subfolders too (a module may be a folder).
fn rust_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Every route the services define, read from their source.
fn routes_in_source() -> BTreeSet<String> {
    let route = regex::Regex::new(r#"\.route\(\s*"([^"]+)""#).unwrap();
    let defs = regex::Regex::new(r#"definition_routes\([^,]+,\s*"([^"]+)""#).unwrap();
    let mut found = BTreeSet::new();
    for dir in [
        "services/ingest/src",
        "services/identity/src",
        "services/profiles/src",
        "common/src",
    ] {
        for path in rust_files(&repo_root().join(dir)) {
            let text = std::fs::read_to_string(path).unwrap();
            // Unit tests define routes of their own.
            let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            for c in route.captures_iter(text) {
                found.insert(c[1].to_string());
            }
            for c in defs.captures_iter(text) {
                found.insert(c[1].to_string());
                found.insert(format!("{}/{{id}}", &c[1]));
            }
        }
    }
    // Ingest serves its endpoints through one route, /v1/{kind}.
    found.remove("/v1/{kind}");
    for k in [
        "identify", "track", "page", "screen", "group", "alias", "batch", "import",
    ] {
        found.insert(format!("/v1/{k}"));
    }
    // A route whose path is built at run time (the definition routes' {id} form).
    found.retain(|r| !r.contains("{{"));
    found
}

#[test]
fn every_route_is_described_and_every_described_path_is_a_route() {
    let doc = description();
    let described: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let routes = routes_in_source();
    let undescribed: Vec<_> = routes.difference(&described).collect();
    let unserved: Vec<_> = described.difference(&routes).collect();
    assert!(
        undescribed.is_empty(),
        "routes missing from docs/openapi.yaml: {undescribed:?}"
    );
    assert!(
        unserved.is_empty(),
        "described but not routed: {unserved:?}"
    );
}

/// A client that presents the privacy API token.
fn privacy_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {PRIVACY_TOKEN}")).unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_answers_are_the_described_ones() {
    let doc = description();
    let p = Platform::start().await;
    let bare = reqwest::Client::new();
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let base = if path.starts_with("/v1/identity") || path.starts_with("/v1/privacy") {
            &p.identity
        } else if path.starts_with("/v1/") && ops["post"]["security"][0].get("writeKey").is_some() {
            &p.ingest
        } else {
            &p.profiles
        };
        let url = format!("{base}{}", path.replace("{id}", "no-such-id"));
        for (method, op) in ops.as_object().unwrap() {
            let documented: BTreeSet<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            let needs_key = op["security"][0].get("writeKey").is_some();
            let needs_privacy = op["security"][0].get("privacyToken").is_some();
            let needs_token = op["security"][0].get("apiToken").is_some() || needs_privacy;
            // With credentials (an empty JSON body where one is taken), and without.
            let mut attempts = vec![true];
            if needs_key || needs_token {
                attempts.push(false);
            }
            for with_credentials in attempts {
                let client = if needs_token && with_credentials {
                    http()
                } else {
                    bare.clone()
                };
                let client = if needs_privacy && with_credentials {
                    privacy_client()
                } else {
                    client
                };
                let mut req = match method.as_str() {
                    "get" => client.get(&url),
                    "post" => client.post(&url),
                    "put" => client.put(&url),
                    "delete" => client.delete(&url),
                    m => panic!("unexpected method {m}"),
                };
                if needs_key && with_credentials {
                    req = req.basic_auth(WRITE_KEY, Some(""));
                }
                if op.get("requestBody").is_some() {
                    req = req.header("Content-Type", "application/json").body("{}");
                }
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                let what = format!(
                    "{} {url} (credentials: {with_credentials})",
                    method.to_uppercase()
                );
                assert!(
                    documented.contains(&status),
                    "{what}: {status} is not described ({documented:?})"
                );
                if status >= 400 && !path.starts_with("/readyz") {
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    assert!(
                        body["error"].is_string() && body["reason"].is_string(),
                        "{what}: a refusal without error and reason: {body}"
                    );
                }
                if !with_credentials {
                    assert_eq!(status, 401, "{what}");
                }
                checked += 1;
            }
        }
    }
    // The description is served by every service.
    for base in [&p.ingest, &p.identity, &p.profiles, &p.activation] {
        let r = bare
            .get(format!("{base}/openapi.yaml"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().starts_with("openapi: 3"));
    }
    eprintln!("contract: {checked} calls answered as described");
    p.stop().await;
}

/// A bounded property-based pass: schemathesis generates requests from the description
/// (valid and hostile) for every operation of the three APIs, and follows the links
/// between them (create a definition, read it, replace it, delete it; a privacy request
/// and its status; an identity lookup and the profile). No answer may be a server error
/// or differ from the description (status, content type, body schema); hostile input
/// must be refused and valid input accepted, except where `tests/schemathesis.toml` says
/// validity depends on more than the description can say.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generated_requests_find_no_server_error() {
    let st = schemathesis();
    let p = Platform::start().await;
    let spec = repo_root().join("docs/openapi.yaml");
    let work = tempfile::tempdir().unwrap();
    let token = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let privacy = format!("Authorization: Bearer {PRIVACY_TOKEN}");
    let key = {
        use base64::Engine;
        format!(
            "Authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"))
        )
    };
    let runs = [
        (
            &p.profiles,
            token.as_str(),
            "^/v1/(profiles|segments|computed-traits|triggers|definitions|households|accounts)",
        ),
        (
            &p.ingest,
            key.as_str(),
            "^/v1/(identify|track|page|screen|group|alias|batch|import)$",
        ),
        (&p.identity, token.as_str(), "^/v1/identity"),
        (&p.identity, privacy.as_str(), "^/v1/privacy"),
    ];
    for (url, header, paths) in runs {
        let st = st.clone();
        let (spec, url_, header, paths_) = (
            spec.clone(),
            url.clone(),
            header.to_string(),
            paths.to_string(),
        );
        let dir = work.path().to_path_buf();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(&st)
                .current_dir(&dir)
                .arg("--config-file")
                .arg(repo_root().join("tests/schemathesis.toml"))
                .arg("run")
                .arg(&spec)
                .args(["-u", &url_, "-H", &header, "--include-path-regex", &paths_])
                .args(["-n", "5", "--seed", "20261124", "--request-timeout", "10"])
                .arg("--no-color")
                .output()
                .expect("running schemathesis")
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let summary: String = text.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        eprintln!("contract: schemathesis on {paths}: {summary}");
        assert!(
            out.status.success(),
            "schemathesis found failures on {url}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    p.stop().await;
}
