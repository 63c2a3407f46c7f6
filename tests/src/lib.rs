//! The end-to-end test harness, shared by every end-to-end test and the load program.
//!
//! - [`bootstrap`]: the real Apache Kafka for this test run: `KAFKA_BOOTSTRAP` when set
//!   (`deploy/test.sh` starts one broker for the whole run), otherwise one started once
//!   per test binary with `deploy/kafka.sh`, stopped when the binary exits.
//! - [`Platform`]: the four services started in-process through their
//!   `run_with_listener` functions on port 0, isolated by a unique topic prefix (topics
//!   and consumer groups), so tests run in parallel on one broker.
//! - [`ServiceProcess`] and [`start_processes`]: the services as real child processes
//!   (for SIGKILL, rebuild and recovery tests).
//! - [`read_topic`], [`eventually`], HTTP helpers.
//! - [`synth`]: a synthetic customer base with ground truth (identity quality figures).

pub mod faults;
mod process;
pub mod synth;
mod tools;

pub use process::*;
pub use tools::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use tessera_common::config::Config;
use tessera_common::vault::{Opened, Vault};

pub use tessera_common;

pub const WRITE_KEY: &str = "test-write-key";
/// The API token of the test platforms (name `tests`); [`http`] sends it.
pub const ADMIN_TOKEN: &str = "tests-admin-token-0123456789";
/// The test platform's privacy API token (that API takes no other).
pub const PRIVACY_TOKEN: &str = "tests-privacy-token-0123456789";
/// The tests' deployment's pseudonym secret.
pub const PSEUDONYM_SECRET: &str = "tests-pseudonym-secret-0123456789abcdef";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where caches live outside the clone (the Kafka jars, the Python SDK's venv).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("TESSERA_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".cache/tessera"),
    }
}

/// The bootstrap servers of this run's broker.
pub fn bootstrap() -> &'static str {
    static BOOTSTRAP: OnceLock<String> = OnceLock::new();
    BOOTSTRAP.get_or_init(|| {
        if let Ok(b) = std::env::var("KAFKA_BOOTSTRAP")
            && !b.is_empty()
        {
            return b;
        }
        // No broker given: start one for this test binary; it stops when we exit.
        let data = std::env::temp_dir().join(format!("tessera-test-kafka-{}", std::process::id()));
        let out = Command::new("bash")
            .arg(repo_root().join("deploy/kafka.sh"))
            .args(["start", "--data"])
            .arg(&data)
            .args(["--watch-pid", &std::process::id().to_string()])
            .stderr(Stdio::inherit())
            .output()
            .expect("running deploy/kafka.sh");
        assert!(
            out.status.success(),
            "deploy/kafka.sh could not start a broker"
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("kafka.sh prints the bootstrap")
            .trim()
            .to_string()
    })
}

/// A configuration for one isolated platform: unique topic prefix, state in `dir`,
/// the example segment definitions, ports chosen by the OS, one demo source.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::parse(&format!(
        "[privacy]\npseudonym_secret = \"{PSEUDONYM_SECRET}\""
    ))
    .expect("the defaults and a secret load");
    let prefix = format!("t{}.", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    c.kafka.bootstrap = bootstrap().to_string();
    c.kafka.fetch_wait_max_ms = 50;
    c.topics.prefix = prefix;
    c.topics.partitions = 3;
    for listen in [
        &mut c.ingest.http_listen,
        &mut c.identity.http_listen,
        &mut c.profiles.http_listen,
        &mut c.activation.http_listen,
    ] {
        *listen = "127.0.0.1:0".into();
    }
    c.ingest.state_dir = dir.join("ingest");
    c.identity.state_dir = dir.join("identity");
    c.profiles.state_dir = dir.join("profiles");
    c.activation.state_dir = dir.join("activation");
    c.profiles.definitions_dir = repo_root().join("deploy/definitions");
    // Ids the tests compute are the services' (one secret per process).
    tessera_common::ids::install_secret(PSEUDONYM_SECRET).expect("one secret in the tests");
    c.ingest.sources = vec![tessera_common::config::SourceConfig::new("test", WRITE_KEY)];
    // The console's token in the console tests, so it may act for its users.
    c.admin.tokens = vec![tessera_common::config::ApiToken {
        name: "tests".into(),
        token: ADMIN_TOKEN.into(),
        delegate: true,
    }];
    c.admin.privacy_tokens = vec![tessera_common::config::ApiToken {
        name: "tests-dpo".into(),
        token: PRIVACY_TOKEN.into(),
        delegate: false,
    }];
    c
}

/// A plain client (producer, consumer, admin) of the test broker.
pub fn kafka_client<T: rdkafka::config::FromClientConfig>() -> T {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("kafka client")
}

/// Every topic of the platform whose topics start with `prefix`.
pub fn platform_topics(prefix: &str) -> Vec<String> {
    use rdkafka::consumer::BaseConsumer;
    let c: BaseConsumer = kafka_client();
    let md = c
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    let mut names: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Where any of `needles` shows in a service's RocksDB (every key and value, read
/// through RocksDB), as `key: needle` lines.
pub fn store_mentions(dir: &Path, needles: &[&str]) -> Vec<String> {
    use tessera_common::store::{RocksStore, Store};
    let store = RocksStore::open(dir).expect("the state opens");
    let mut found = Vec::new();
    for (k, v) in store.scan_prefix(b"", usize::MAX).expect("scan") {
        for n in needles {
            if contains(&k, n.as_bytes()) || contains(&v, n.as_bytes()) {
                found.push(format!("{}: {n}", String::from_utf8_lossy(&k)));
            }
        }
    }
    found
}

/// Which files under `dir` hold any of `needles` in their bytes (RocksDB's table, log
/// and manifest files as they are on disk), as `file: needle` lines.
pub fn files_mentioning(dir: &Path, needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("state dir") {
        let path = entry.expect("entry").path();
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        for n in needles {
            if contains(&bytes, n.as_bytes()) {
                found.push(format!("{}: {n}", path.display()));
            }
        }
    }
    found
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The four services, in-process, on a real broker.
pub struct Platform {
    pub config: Config,
    pub ingest: String,
    pub identity: String,
    pub profiles: String,
    pub activation: String,
    shutdown: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<tessera_common::Result<()>>)>,
    _dir: tempfile::TempDir,
}

impl Platform {
    pub async fn start() -> Platform {
        Platform::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Platform {
        tessera_common::telemetry::init();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut urls = Vec::new();
        macro_rules! start {
            ($name:literal, $krate:ident) => {{
                let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                urls.push(format!("http://{}", l.local_addr().unwrap()));
                let (c, t) = (config.clone(), shutdown.clone());
                tasks.push((
                    $name,
                    tokio::spawn(async move { $krate::run_with_listener(c, l, t).await }),
                ));
            }};
        }
        start!("ingest", tessera_ingest);
        start!("identity", tessera_identity);
        start!("profiles", tessera_profiles);
        start!("activation", tessera_activation);
        let mut p = Platform {
            config,
            ingest: urls[0].clone(),
            identity: urls[1].clone(),
            profiles: urls[2].clone(),
            activation: urls[3].clone(),
            shutdown,
            tasks,
            _dir: dir,
        };
        p.wait_ready(Duration::from_secs(60)).await;
        p
    }

    /// Waits until every service is ready; a service that stopped instead fails the
    /// test at once with its own error, and one that stays unready is named.
    async fn wait_ready(&mut self, timeout: Duration) {
        let client = http();
        let urls = [
            &self.ingest,
            &self.identity,
            &self.profiles,
            &self.activation,
        ];
        let deadline = Instant::now() + timeout;
        let mut waiting: Vec<usize> = (0..urls.len()).collect();
        while !waiting.is_empty() {
            if let Some(i) = self.tasks.iter().position(|(_, t)| t.is_finished()) {
                let (name, task) = self.tasks.remove(i);
                match task.await {
                    Ok(Err(e)) => panic!("{name} stopped while starting: {e}"),
                    Ok(Ok(())) => panic!("{name} stopped while starting, with no error"),
                    Err(e) => panic!("{name} panicked while starting: {e}"),
                }
            }
            if Instant::now() > deadline {
                let names: Vec<&str> = waiting.iter().map(|i| self.tasks[*i].0).collect();
                panic!("not ready within {timeout:?}: {names:?}");
            }
            let mut still = Vec::new();
            for i in waiting {
                let ready = match client.get(format!("{}/readyz", urls[i])).send().await {
                    Ok(r) => r.status().is_success(),
                    Err(_) => false,
                };
                if !ready {
                    still.push(i);
                }
            }
            waiting = still;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn topics(&self) -> tessera_common::topics::Topics {
        tessera_common::topics::Topics::new(&self.config.topics)
    }

    /// Stops every service and checks that each stopped cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for (name, task) in self.tasks {
            let r = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .unwrap_or_else(|_| panic!("{name} did not stop within 30 s"));
            r.expect("service task panicked")
                .unwrap_or_else(|e| panic!("{name} failed: {e}"));
        }
    }

    /// The profile an identifier resolves to, once the predicate holds.
    pub async fn wait_profile(
        &self,
        kind: &str,
        value: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_profile(&self.profiles, kind, value, what, pred).await
    }
}

pub async fn wait_profile(
    profiles: &str,
    kind: &str,
    value: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let url = format!("{profiles}/v1/profiles/lookup");
    let client = http();
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = client
            .get(&url)
            .query(&[("type", kind), ("value", value)])
            .send()
            .await
            && r.status().is_success()
        {
            last = r.json().await.unwrap_or(Value::Null);
            if pred(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("profile {kind}={value} never showed {what}; last seen: {last}");
}

pub async fn wait_ready(base: &str, timeout: Duration) {
    let client = http();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{base} was not ready within {timeout:?}");
}

/// An HTTP client that presents the test platform's API token (a request's own
/// `basic_auth`, as for ingest, replaces it).
pub fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {ADMIN_TOKEN}")).unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// GETs a URL and parses the JSON answer (whatever the status).
pub async fn get_json(url: &str) -> Value {
    http()
        .get(url)
        .send()
        .await
        .expect("the service answers")
        .json()
        .await
        .expect("a JSON answer")
}

/// A service's `/metrics` page.
pub async fn metrics_text(base: &str) -> String {
    http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text")
}

/// POSTs a JSON body to ingest with the test write key (HTTP Basic).
pub async fn post(ingest: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = http()
        .post(format!("{ingest}{path}"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(body)
        .send()
        .await
        .expect("ingest answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// POSTs an event to ingest and asserts it was accepted.
pub async fn send_ok(ingest: &str, path: &str, body: Value) {
    let (status, answer) = post(ingest, path, &body).await;
    assert_eq!(status, 200, "ingest refused {body}: {answer}");
}

/// A request to identity's privacy API with its own token.
pub async fn privacy_request(identity: &str, body: &Value) -> (u16, Value) {
    let r = http()
        .post(format!("{identity}/v1/privacy/requests"))
        .bearer_auth(PRIVACY_TOKEN)
        .json(body)
        .send()
        .await
        .expect("identity answers");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Polls a privacy request until it is `done` or `not_found`; returns its report.
pub async fn privacy_finished(identity: &str, request: &str) -> Value {
    let url = format!("{identity}/v1/privacy/requests/{request}");
    eventually(
        "the privacy request to finish",
        Duration::from_secs(60),
        || {
            let url = url.clone();
            async move {
                let r = http()
                    .get(&url)
                    .bearer_auth(PRIVACY_TOKEN)
                    .send()
                    .await
                    .ok()?;
                let v: Value = r.json().await.ok()?;
                matches!(v["status"].as_str(), Some("done" | "not_found")).then_some(v)
            }
        },
    )
    .await
}

/// Reads records of `topic` from the beginning (a fresh group) until `done` holds for
/// what was read, or `timeout` passes. Returns the payloads.
pub async fn read_topic(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Vec<u8>]) -> bool,
) -> Vec<Vec<u8>> {
    read_timed(topic, timeout, done)
        .await
        .into_iter()
        .map(|(payload, _)| payload)
        .collect()
}

/// [`read_topic`], with each record's Kafka timestamp (ms; its producer's create time).
pub async fn read_timed(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Vec<u8>]) -> bool,
) -> Vec<(Vec<u8>, i64)> {
    read_timed_from(bootstrap(), topic, timeout, done).await
}

/// [`read_timed`] from the brokers at `bootstrap`. Sealed records (see
/// `tessera_common::vault`) come opened with the platform's keys; one whose key is gone
/// comes as it is, sealed.
pub async fn read_timed_from(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Vec<u8>]) -> bool,
) -> Vec<(Vec<u8>, i64)> {
    read_records(bootstrap, topic, timeout, done, true).await
}

/// Every record of `topic` as it is stored (sealed records stay sealed): what was read
/// within `timeout`.
pub async fn read_stored(topic: &str, timeout: Duration) -> Vec<Vec<u8>> {
    read_records(bootstrap(), topic, timeout, |_| false, false)
        .await
        .into_iter()
        .map(|(p, _)| p)
        .collect()
}

/// The keys of the platform a topic belongs to (its prefix is up to the first dot),
/// read by a vault that only opens.
async fn vault_for(bootstrap: &str, topic: &str) -> std::sync::Arc<Vault> {
    static VAULTS: OnceLock<
        tokio::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Vault>>>,
    > = OnceLock::new();
    let prefix = topic.split_once('.').map(|(p, _)| p).unwrap_or(topic);
    let mut vaults = VAULTS.get_or_init(Default::default).lock().await;
    if let Some(v) = vaults.get(prefix) {
        return v.clone();
    }
    let mut kafka = Config::demo().kafka;
    kafka.bootstrap = bootstrap.to_string();
    let v = Vault::follow(
        &kafka,
        format!("{prefix}.{}", tessera_common::topics::PRIVACY_KEYS),
        &format!("test-reader-{prefix}"),
        None,
        tessera_common::vault::Keeping::in_memory(),
        CancellationToken::new(),
    )
    .await
    .expect("the platform's keys topic reads");
    vaults.insert(prefix.to_string(), v.clone());
    v
}

/// Brings the keys that [`open_record`] uses for `topic`'s platform up to the end of its
/// keys topic (destroyed keys included).
pub async fn keys_caught_up(topic: &str) {
    vault_for(bootstrap(), topic)
        .await
        .catch_up()
        .await
        .expect("the keys topic reads to its end");
}

/// A record of `topic` opened with its platform's keys if it is sealed (as stored if its
/// key is gone).
pub async fn open_record(topic: &str, payload: &[u8]) -> Vec<u8> {
    if !tessera_common::vault::is_sealed(payload) {
        return payload.to_vec();
    }
    match vault_for(bootstrap(), topic).await.open(payload).await {
        Ok(Opened::Plain(p)) => p,
        _ => payload.to_vec(),
    }
}

async fn read_records(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Vec<u8>]) -> bool,
    open: bool,
) -> Vec<(Vec<u8>, i64)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("reader consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut times: Vec<i64> = Vec::new();
    let deadline = Instant::now() + timeout;
    while !done(&out) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left.min(Duration::from_millis(500)), consumer.recv()).await {
            Ok(Ok(m)) => {
                let mut payload = m.payload().unwrap_or_default().to_vec();
                if open && tessera_common::vault::is_sealed(&payload) {
                    let vault = vault_for(bootstrap, topic).await;
                    if let Ok(Opened::Plain(p)) = vault.open(&payload).await {
                        payload = p;
                    }
                }
                out.push(payload);
                times.push(m.timestamp().to_millis().unwrap_or(0));
            }
            // Transport errors (a broker going away) are passed on by librdkafka and are
            // not fatal: it reconnects, or the timeout ends the read.
            Ok(Err(e)) => eprintln!("reading {topic}: {e}"),
            Err(_) => {}
        }
    }
    out.into_iter().zip(times).collect()
}

/// Reads a server-sent event stream until an event named `name` arrives; its data.
pub async fn next_sse_event<B: AsRef<[u8]>>(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
    buf: &mut String,
    name: &str,
) -> Value {
    use futures::StreamExt;
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let event = block.lines().find_map(|l| l.strip_prefix("event: "));
            let data = block.lines().find_map(|l| l.strip_prefix("data: "));
            if let (Some(e), Some(d)) = (event, data)
                && e == name
            {
                return serde_json::from_str(d).unwrap();
            }
        }
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no {name} event within 30 s"))
            .expect("the stream stays open")
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(chunk.as_ref()));
    }
}

/// What `promtool check metrics` finds wrong with a `/metrics` page (empty: nothing).
/// test.sh installs promtool from Debian.
pub fn promtool_findings(text: &str) -> String {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (deploy/setup.sh --for-tests)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match (out.status.success(), findings.trim()) {
        (true, "") => String::new(),
        (_, "") => "promtool failed without a word".into(),
        (_, f) => f.to_string(),
    }
}

/// A unique name for a test's people and definitions: `tag-<12 hex digits>`.
pub fn uid(tag: &str) -> String {
    format!("{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `bytes` gzip-compressed (a `Content-Encoding: gzip` body).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}
