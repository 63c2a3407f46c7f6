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
    let result = runtime.block_on(async {
        let shutdown = crate::shutdown::on_signals();
        tracing::info!(
            service = name,
            version = env!("CARGO_PKG_VERSION"),
            "starting"
        );
        run(config, shutdown).await
    });
    drop(runtime);
    match result {
        Ok(()) => {
            tracing::info!(service = name, "stopped");
            Ok(())
        }
        Err(e) => {
            let retryable = e.is_retryable();
            tracing::error!(service = name, error = %e, retryable, "stopped by an error");
            eprintln!("{name}: {e}");
            std::process::exit(exit_code(&e))
        }
    }
}

/// How a service that stopped by an error exits: 75 (`EX_TEMPFAIL`) when starting it
/// again later can succeed by itself (the broker was unreachable, a store was busy), 78
/// (`EX_CONFIG`) for a configuration to fix, 1 for anything else (corrupt state, a bug).
pub fn exit_code(e: &crate::Error) -> i32 {
    match e {
        e if e.is_retryable() => 75,
        crate::Error::Config(_) => 78,
        _ => 1,
    }
}

/// librdkafka properties that hold a secret without saying so in their name (librdkafka
/// marks them sensitive): private keys and OAUTHBEARER configuration.
const SECRET_PROPERTIES: [&str; 4] = [
    "ssl.key.pem",
    "ssl_key",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.assertion.private.key.pem",
];

/// Whether a librdkafka property's value is a secret.
fn secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PROPERTIES.contains(&name.as_str())
        || ["password", "secret", "passphrase"]
            .iter()
            .any(|w| name.contains(w))
}

/// What the service will use, without secrets: write keys, API tokens, passwords, the
/// pseudonym secret and secret Kafka properties ([`secret_property`]) are masked.
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
    c.privacy.pseudonym_secret = "***".into();
    for u in &mut c.console.users {
        u.password = "***".into();
    }
    for (k, v) in c.kafka.properties.iter_mut() {
        if secret_property(k) {
            *v = "***".into();
        }
    }
    serde_json::to_string_pretty(&c).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEMO_SECRETS;

    #[test]
    fn the_exit_code_says_whether_a_restart_can_help() {
        assert_eq!(exit_code(&crate::Error::Broker("unreachable".into())), 75);
        assert_eq!(exit_code(&crate::Error::Config("bad".into())), 78);
        assert_eq!(exit_code(&crate::Error::Internal("corrupt".into())), 1);
    }

    /// The audit's finding: `--check-config` printed `ssl.key.pem` and
    /// `sasl.oauthbearer.config`, whose names mention no password.
    #[test]
    fn the_summary_masks_every_secret_property() {
        let mut c = Config::parse("demo = true").unwrap();
        for (k, v) in [
            ("ssl.key.pem", "-----BEGIN PRIVATE KEY-----abc"),
            ("sasl.oauthbearer.config", "principal=x clientSecret=abc"),
            ("sasl.password", "abc-password"),
            ("ssl.keystore.password", "abc-store"),
            ("sasl.oauthbearer.client.secret", "abc-client"),
            ("SSL.KEY.PASSWORD", "abc-upper"),
            ("security.protocol", "SASL_SSL"),
            ("ssl.ca.pem", "-----BEGIN CERTIFICATE-----public"),
        ] {
            c.kafka.properties.insert(k.into(), v.into());
        }
        let out = toml_summary(&c);
        assert!(!out.contains("abc"), "{out}");
        for secret in DEMO_SECRETS {
            assert!(!out.contains(secret), "{secret}: {out}");
        }
        assert!(out.contains("SASL_SSL") && out.contains("public"), "{out}");
    }
}
