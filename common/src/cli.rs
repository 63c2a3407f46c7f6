//! What every service binary does before its own `run`: parse `--config`, load the
//! layered configuration, start tracing, install the signal handler.

use std::future::Future;
use std::path::PathBuf;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Debug, Parser)]
struct Args {
    /// TOML file layered over the embedded defaults; TESSERA__SECTION__KEY variables
    /// override both.
    #[arg(long, env = "TESSERA_CONFIG")]
    config: Option<PathBuf>,
    /// Load and validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
}

/// Runs a service's `run(config, shutdown)` on a multi-threaded runtime.
pub fn service_main<F, Fut>(name: &str, run: F) -> anyhow::Result<()>
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = crate::Result<()>>,
{
    service_main_checked(name, |_| Ok(()), run)
}

/// [`service_main`] with a service's own validation of what the configuration points at
/// (e.g. identity's rules file), run by `--check-config` and before starting.
pub fn service_main_checked<C, F, Fut>(name: &str, check: C, run: F) -> anyhow::Result<()>
where
    C: FnOnce(&Config) -> crate::Result<()>,
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = crate::Result<()>>,
{
    let args = Args::parse();
    crate::telemetry::init();
    let config = Config::load(args.config.as_deref())?;
    check(&config)?;
    if args.check_config {
        println!("{name}: configuration is valid\n{}", toml_summary(&config));
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = crate::shutdown::on_signals();
        tracing::info!(
            service = name,
            version = env!("CARGO_PKG_VERSION"),
            "starting"
        );
        run(config, shutdown).await?;
        tracing::info!(service = name, "stopped");
        Ok(())
    })
}

/// What the service will use, without secrets: write keys, API tokens and Kafka
/// properties whose name mentions a password or secret are masked.
fn toml_summary(config: &Config) -> String {
    let mut c = config.clone();
    for s in &mut c.ingest.sources {
        s.write_key = "***".into();
        for k in &mut s.previous_write_keys {
            *k = "***".into();
        }
    }
    for t in c.admin.tokens.iter_mut().chain(&mut c.admin.privacy_tokens) {
        t.token = "***".into();
    }
    c.console.api_token = "***".into();
    for u in &mut c.console.users {
        u.password = "***".into();
    }
    for (k, v) in c.kafka.properties.iter_mut() {
        if k.contains("password") || k.contains("secret") {
            *v = "***".into();
        }
    }
    serde_json::to_string_pretty(&c).unwrap_or_default()
}
