//! Committing a batch's state, and the purge from disk an erasure owes: recorded with the
//! batch, so one that fails is done again at the next start.

use std::time::Instant;

use tracing::{info, warn};

use crate::Result;
use crate::store::{SharedStore, WriteBatch};

/// Written with an erasure's deletions and removed once they are purged from disk: a
/// purge that failed, or a crash before it ended, is done again at the next start
/// ([`resume_purge`]).
const PURGE_OWED: &[u8] = b"~purge-owed";

/// Writes the batch; one that erased a person is then purged from disk before the
/// runner goes on (erasures are rare, and the report says it is done).
pub(super) async fn commit_state(store: &SharedStore, mut write: WriteBatch) -> Result<()> {
    let st = store.clone();
    // A small write without a purge takes microseconds: written here, not handed off.
    let small = write.len() <= INLINE_WRITES && !write.purge;
    super::blocking(small, move || {
        let purge = write.purged_keys();
        if purge.is_some() {
            write.put(PURGE_OWED, Vec::new());
        }
        st.write(write)?;
        if let Some(keys) = purge {
            let started = Instant::now();
            st.purge(&keys)?;
            purged(&st)?;
            info!(
                keys = keys.len(),
                seconds = started.elapsed().as_secs_f64(),
                "erased keys purged from disk"
            );
        }
        Ok(())
    })
    .await?
}

/// Up to this many writes are committed on the runner's own thread.
const INLINE_WRITES: usize = 128;

fn purged(store: &SharedStore) -> Result<()> {
    let mut done = WriteBatch::default();
    done.delete(PURGE_OWED);
    store.write(done)
}

/// Finishes a purge owed from before: the whole store is compacted, since which keys it
/// was for is not kept (they may name people).
pub fn resume_purge(store: &SharedStore) -> Result<()> {
    if store.get(PURGE_OWED)?.is_none() {
        return Ok(());
    }
    warn!("an erasure's purge from disk did not finish before; purging everything now");
    let started = Instant::now();
    store.purge_all()?;
    purged(store)?;
    info!(seconds = started.elapsed().as_secs_f64(), "owed purge done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::store::{MemStore, Store};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::runner::{offset_key, stored_offset};

    /// A store whose first purges fail, counting what it was asked to purge.
    #[derive(Default)]
    struct FailingPurge {
        inner: MemStore,
        failures_left: AtomicUsize,
        purges: AtomicUsize,
        purges_of_all: AtomicUsize,
    }

    impl Store for FailingPurge {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
            self.inner.get(key)
        }
        fn scan_from(&self, p: &[u8], s: &[u8], l: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            self.inner.scan_from(p, s, l)
        }
        fn scan_last(&self, p: &[u8], l: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            self.inner.scan_last(p, l)
        }
        fn write(&self, batch: WriteBatch) -> Result<()> {
            self.inner.write(batch)
        }
        fn purge(&self, _deleted: &[Vec<u8>]) -> Result<()> {
            self.purges.fetch_add(1, Ordering::SeqCst);
            self.failed()
        }
        fn purge_all(&self) -> Result<()> {
            self.purges_of_all.fetch_add(1, Ordering::SeqCst);
            self.failed()
        }
    }

    impl FailingPurge {
        fn failed(&self) -> Result<()> {
            match self
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            {
                Ok(_) => Err(Error::Io(std::io::Error::other("disk full"))),
                Err(_) => Ok(()),
            }
        }
    }

    /// The audit's finding: an erasure's purge that failed after its batch was written
    /// was never done again (the batch, offsets included, was committed).
    #[tokio::test]
    async fn a_purge_that_failed_is_done_at_the_next_start() {
        let failing = Arc::new(FailingPurge::default());
        failing.failures_left.store(1, Ordering::SeqCst);
        let store: SharedStore = failing.clone();
        let mut write = WriteBatch::default();
        write.put(b"p/1".to_vec(), b"x".to_vec());
        store.write(write).unwrap();
        let mut txn = crate::store::Txn::new(store.as_ref());
        txn.delete(b"p/1".to_vec());
        txn.put(offset_key("t", 0), 8i64.to_be_bytes().to_vec());
        txn.purge_on_commit();
        let write = txn.into_batch();
        assert!(
            commit_state(&store, write).await.is_err(),
            "the purge failed"
        );
        assert!(
            store.get(b"p/1").unwrap().is_none(),
            "the batch was written"
        );
        assert_eq!(stored_offset(&store, "t", 0).unwrap(), Some(8));

        // The next start purges everything, once.
        resume_purge(&store).unwrap();
        assert_eq!(failing.purges_of_all.load(Ordering::SeqCst), 1);
        resume_purge(&store).unwrap();
        assert_eq!(
            failing.purges_of_all.load(Ordering::SeqCst),
            1,
            "nothing owed any more"
        );

        // A purge that succeeds owes nothing.
        let mut txn = crate::store::Txn::new(store.as_ref());
        txn.delete(b"p/2".to_vec());
        txn.purge_on_commit();
        commit_state(&store, txn.into_batch()).await.unwrap();
        assert_eq!(failing.purges.load(Ordering::SeqCst), 2);
        resume_purge(&store).unwrap();
        assert_eq!(failing.purges_of_all.load(Ordering::SeqCst), 1);
    }
}
