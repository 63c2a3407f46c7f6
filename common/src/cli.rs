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
}

/// Runs a service's `run(config, shutdown)` on a multi-threaded runtime.
pub fn service_main<F, Fut>(name: &str, run: F) -> anyhow::Result<()>
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = crate::Result<()>>,
{
    let args = Args::parse();
    crate::telemetry::init();
    let config = Config::load(args.config.as_deref())?;
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
