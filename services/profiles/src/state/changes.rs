//! The profiles a batch changed, announced once the batch is committed: what the live
//! change stream (`live.rs`) tells its readers. The next batch may be processed before
//! (the runner keeps one batch in flight), so each batch's changes are taken when it is
//! processed and announced when it is committed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

/// Changed profile ids, announced after commit.
#[derive(Clone)]
pub struct Changes {
    tx: broadcast::Sender<Arc<str>>,
    pending: Arc<Mutex<BTreeSet<String>>>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            // Room for a few batches of changes; a slower stream is told "changed".
            tx: broadcast::channel(8192).0,
            pending: Arc::default(),
        }
    }
}

impl Changes {
    /// The batch being processed changed profile `id`.
    pub fn touch(&self, id: &str) {
        if self.tx.receiver_count() > 0 {
            self.pending.lock().expect("changes").insert(id.to_string());
        }
    }

    /// The batch is processed: what it changed, to announce once it is committed.
    pub fn take(&self) -> impl FnOnce() + Send + 'static {
        let ids = std::mem::take(&mut *self.pending.lock().expect("changes"));
        let tx = self.tx.clone();
        move || {
            for id in ids {
                // No receiver left: nobody to tell.
                let _ = tx.send(id.into());
            }
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }
}
