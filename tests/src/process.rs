//! The services as child processes, started from their real binaries with a
//! configuration file, as the README starts them (kill -9, restart, logs).

use crate::*;

/// The path of a workspace binary built beside the test binary or program
/// (target/<profile>/, the test binaries being in its deps/).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("target/<profile>/");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target/<profile>/deps/..")
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// The four services as real processes on free ports, with static group membership as
/// in a StatefulSet (a restarted process keeps its name and gets its partitions back at
/// once). Returns them by name, and their base URLs in the order ingest, identity,
/// profiles, activation, once all are ready. `config` gets the chosen ports.
/// A loopback address with a free port, for a service to listen on.
pub fn free_listen() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("bound").to_string()
}

pub async fn start_processes(
    config: &mut Config,
    dir: &Path,
) -> (
    std::collections::HashMap<&'static str, ServiceProcess>,
    Vec<String>,
) {
    config.kafka.group_instance_id = Some("pod-0".into());
    let mut urls = Vec::new();
    for listen in [
        &mut config.ingest.http_listen,
        &mut config.identity.http_listen,
        &mut config.profiles.http_listen,
        &mut config.activation.http_listen,
    ] {
        // A port the test chose (a peer list names it) stays.
        if listen.ends_with(":0") {
            *listen = free_listen();
        }
        urls.push(format!("http://{listen}"));
    }
    let mut services = std::collections::HashMap::new();
    for name in ["ingest", "identity", "profiles", "activation"] {
        services.insert(name, ServiceProcess::start(name, config, dir));
    }
    for url in &urls {
        wait_ready(url, Duration::from_secs(60)).await;
    }
    (services, urls)
}

/// A service run as its real binary, with a configuration file.
pub struct ServiceProcess {
    name: String,
    config_file: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl ServiceProcess {
    pub fn start(name: &str, config: &Config, dir: &Path) -> ServiceProcess {
        let config_file = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config_file,
            toml::to_string(config).expect("config serialises"),
        )
        .expect("write config");
        let mut p = ServiceProcess {
            name: name.to_string(),
            config_file,
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(binary(&format!("tessera-{}", self.name)))
            .arg("--config")
            .arg(&self.config_file)
            .env_remove("KAFKA_BOOTSTRAP")
            .env("RUST_LOG", "info")
            .env("TESSERA_LOG_FORMAT", "json")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn service");
        self.child = Some(child);
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no shutdown handler runs, nothing is flushed.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill");
            c.wait().expect("reap");
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Time from the last start of the process to its consumer's first partition
    /// assignment after it, read from the JSON log; `None` if it has not happened.
    pub fn recovery(&self) -> Option<Duration> {
        let mut started = None;
        let mut assigned = None;
        for line in self.log().lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let at = v["timestamp"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            match v["message"].as_str() {
                Some("starting") => (started, assigned) = (at, None),
                Some("partitions assigned") if assigned.is_none() => assigned = at,
                _ => {}
            }
        }
        (assigned? - started?).to_std().ok()
    }

    /// When this process was last given partitions (its log's last "partitions
    /// assigned").
    pub fn last_assigned(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|v| v["message"] == "partitions assigned")
            .filter_map(|v| chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str()?).ok())
            .next_back()
            .map(|t| t.with_timezone(&chrono::Utc))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
