//! The console against the real platform on a real Kafka: its HTTP security (sessions,
//! CSRF, headers) by hand, and the whole user journey in Debian's Chromium
//! (tests/console/browser.mjs, driven by playwright-core).

use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tessera_common::config::{Config, ConsoleUser};
use tessera_common::records::{AuditEntry, AvroRecord};
use tessera_tests::*;

const USER: &str = "console-tester";
const PASSWORD: &str = "a console test password";

/// The console, in-process, pointed at the platform's services.
async fn start_console(p: &Platform) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let mut c: Config = p.config.clone();
    c.console.ingest_url = p.ingest.clone();
    c.console.identity_url = p.identity.clone();
    c.console.profiles_url = p.profiles.clone();
    c.console.activation_url = p.activation.clone();
    c.console.api_token = ADMIN_TOKEN.into();
    c.console.users = vec![ConsoleUser {
        name: USER.into(),
        password: PASSWORD.into(),
    }];
    c.console.sample_every_ms = 500;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            tessera_console::run_with_listener(c, listener, stop)
                .await
                .expect("the console runs")
        }
    });
    wait_ready(&url, Duration::from_secs(10)).await;
    (url, stop, task)
}

fn browser_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The value of `name="csrf"` (or the csrf-token meta) in a page.
fn csrf_in(html: &str) -> String {
    let re =
        regex::Regex::new(r#"(?:name="csrf" value|name="csrf-token" content)="([^"]+)""#).unwrap();
    re.captures(html).expect("a CSRF token in the page")[1].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_csrf_and_headers_guard_the_console() {
    let p = Platform::start().await;
    let (url, stop, task) = start_console(&p).await;
    let c = browser_client();

    // No session: pages lead to the login form, other requests get a JSON 401.
    let r = c.get(format!("{url}/profiles")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/login");
    let r = c
        .get(format!("{url}/api/series?prefixes=up."))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");

    // The login form's CSRF token is required, then the password.
    let form = c.get(format!("{url}/login")).send().await.unwrap();
    let headers = form.headers().clone();
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["cache-control"], "no-store");
    let login_csrf = csrf_in(&form.text().await.unwrap());
    let r = c
        .post(format!("{url}/login"))
        .form(&[("csrf", "forged"), ("user", USER), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a forged login form");
    let login_csrf_2 = csrf_in(&r.text().await.unwrap());
    let r = c
        .post(format!("{url}/login"))
        .form(&[
            ("csrf", login_csrf_2.as_str()),
            ("user", USER),
            ("password", "wrong"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let fresh = csrf_in(&r.text().await.unwrap());
    assert_ne!(fresh, login_csrf);
    let r = c
        .post(format!("{url}/login"))
        .form(&[
            ("csrf", fresh.as_str()),
            ("user", USER),
            ("password", PASSWORD),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|v| v.starts_with("tessera_session="))
        .expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }

    // Logged in: a page holds the session's CSRF token; changes need it.
    let page = c.get(format!("{url}/profiles")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let token = csrf_in(&page.text().await.unwrap());
    let dry = json!({"id": "console-dry", "condition": {"has_identifier": "email"}});
    let r = c
        .post(format!("{url}/segments/dry-run"))
        .json(&dry)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "no CSRF token");
    let r = c
        .post(format!("{url}/segments/dry-run"))
        .header("x-csrf-token", "forged")
        .json(&dry)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a wrong CSRF token");
    let r = c
        .post(format!("{url}/segments/dry-run"))
        .header("x-csrf-token", &token)
        .json(&dry)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.json::<Value>().await.unwrap()["size"].is_u64());

    // A definition the API refuses comes back with the API's own reason.
    let bad = json!({"definition": {"id": "console-bad", "condition": {"all": []}}});
    let r = c
        .post(format!("{url}/segments/save"))
        .header("x-csrf-token", &token)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let reason = r.json::<Value>().await.unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    let direct = http()
        .post(format!("{}/v1/segments", p.profiles))
        .json(&bad["definition"])
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(
        reason,
        direct["reason"].as_str().unwrap(),
        "the same message as the API"
    );

    // A definition saved in the console is audited under the token, for the user.
    let good =
        json!({"definition": {"id": "console-saved", "condition": {"has_identifier": "email"}}});
    let r = c
        .post(format!("{url}/segments/save"))
        .header("x-csrf-token", &token)
        .json(&good)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 1);
    let audit = read_topic(&p.topics().audit(), Duration::from_secs(30), |rs| {
        !rs.is_empty()
    })
    .await;
    let entry = AuditEntry::from_avro(&audit[0]).unwrap();
    assert_eq!(
        (
            entry.who.as_str(),
            entry.action.as_str(),
            entry.target.as_str()
        ),
        (
            "tests for console-tester",
            "definition.create",
            "segment/console-saved"
        )
    );

    // A search keeps the identifier out of the address.
    let email = format!("{}@mail.test", uid("console"));
    let (status, _) = post(
        &p.ingest,
        "/v1/identify",
        &json!({"userId": uid("c"), "traits": {"email": email}}),
    )
    .await;
    assert_eq!(status, 200);
    let found = eventually("the person to be findable", Duration::from_secs(30), || {
        let (c, url, token, email) = (c.clone(), url.clone(), token.clone(), email.clone());
        async move {
            let r = c
                .post(format!("{url}/profiles/search"))
                .form(&[
                    ("csrf", token.as_str()),
                    ("type", "email"),
                    ("value", email.as_str()),
                ])
                .send()
                .await
                .ok()?;
            (r.status() == 303).then(|| r.headers()["location"].to_str().unwrap().to_string())
        }
    })
    .await;
    assert!(
        found.starts_with("/profiles/") && !found.contains('@'),
        "{found}"
    );
    let r = c.get(format!("{url}{found}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains(&email));

    // The profile page's live stream, through the console; it ends with the session.
    let live = c.get(format!("{url}{found}/stream")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let mut stream = Box::pin(live.bytes_stream());
    let mut buf = String::new();
    next_sse_event(&mut stream, &mut buf, "ready").await;

    // Logging out ends the session for good.
    let r = c
        .post(format!("{url}/logout"))
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = c.get(format!("{url}/profiles")).send().await.unwrap();
    assert_eq!(r.status(), 303, "the session is gone");
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        use futures::StreamExt;
        while stream.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the live stream ends with the session");

    // The console's own metrics.
    let m = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        r#"tessera_console_logins_total{outcome="ok"} 1"#,
        r#"tessera_console_logins_total{outcome="refused"} 1"#,
        r#"tessera_console_logins_total{outcome="csrf"} 1"#,
        r#"tessera_console_upstream_requests_total{outcome="ok",service="profiles"}"#,
    ] {
        assert!(m.contains(needle), "{needle} in\n{m}");
    }
    let findings = promtool_findings(&m);
    assert!(findings.is_empty(), "promtool on the console: {findings}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the console stops")
        .unwrap();
    p.stop().await;
}

/// The newcomer's journey in a real browser: log in, build a segment with the form, send
/// events through the HTTP API, see the person enter the segment and the profile's
/// timeline update without a reload; hostile trait values are shown as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_works_in_chromium() {
    let p = Platform::start().await;
    let (url, stop, task) = start_console(&p).await;
    let node_modules = node_with_playwright().join("node_modules");
    let shots = std::env::var("TESSERA_SCREENSHOTS").ok();
    let mut node = tokio::process::Command::new("node");
    node.arg(repo_root().join("tests/console/browser.mjs"))
        .env("NODE_PATH", node_modules)
        .env("CONSOLE_URL", &url)
        .env("INGEST_URL", &p.ingest)
        .env("WRITE_KEY", WRITE_KEY)
        .env("CONSOLE_USER", USER)
        .env("CONSOLE_PASSWORD", PASSWORD)
        .env("TAG", uid("b").replace(['_', '.'], "-"))
        .kill_on_drop(true);
    if let Some(dir) = &shots {
        node.env("SCREENSHOTS", dir);
    }
    let out = tokio::time::timeout(Duration::from_secs(240), node.output())
        .await
        .expect("the browser test finishes within 4 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all steps passed"),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the console stops")
        .unwrap();
    p.stop().await;
}
