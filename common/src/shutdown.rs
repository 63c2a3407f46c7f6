//! Shutdown: SIGINT or SIGTERM cancels a token that every task of a service watches;
//! the service then finishes its current batch and requests within a bounded grace.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

/// How long a service may take to stop after the signal.
pub const GRACE: Duration = Duration::from_secs(20);

/// A token cancelled on SIGINT or SIGTERM.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => info!("SIGINT received, shutting down"),
                _ = term.recv() => info!("SIGTERM received, shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        t.cancel();
    });
    token
}
