//! State behind a narrow batch interface: point reads, prefix scans and atomic write
//! batches. [`RocksStore`] is the real one; [`MemStore`] is its in-memory twin for unit
//! tests. A [`Txn`] buffers a batch's writes over a store, so a processor sees its own
//! writes before they are committed together with the consumed offsets; a [`Layered`]
//! store shows the writes of a batch not committed yet (its outputs are being
//! acknowledged) over the store, so the next batch is processed meanwhile.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::Result;

/// One atomic write: every put and delete lands together, or none does. The last write
/// of a key is the one that counts; they are kept in key order (RocksDB inserts keys that
/// follow each other into its memtable faster: each insert starts where the last ended).
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub(crate) ops: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Its deletions erase a person: once written they must leave the disk too.
    pub(crate) purge: bool,
}

impl WriteBatch {
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.insert(key.into(), Some(value.into()));
    }
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.insert(key.into(), None);
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    /// The keys to purge from disk once this batch is written ([`Txn::purge_on_commit`]).
    pub fn purged_keys(&self) -> Option<Vec<Vec<u8>>> {
        self.purge.then(|| {
            self.ops
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| k.clone())
                .collect()
        })
    }
}

pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Up to `limit` entries whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_from(prefix, prefix, limit)
    }
    /// The same from `start` on (a key at or after it): pages through a prefix.
    fn scan_from(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Up to `limit` entries under `prefix`, last key first.
    fn scan_last(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    fn write(&self, batch: WriteBatch) -> Result<()>;
    /// Makes deleted keys leave the disk: a deletion is first a tombstone beside the old
    /// value (and the key itself holds values, like `id/email/<address>`); this rewrites
    /// the files that hold them so neither is left. For erasure, so it may take a while.
    fn purge(&self, _deleted: &[Vec<u8>]) -> Result<()> {
        Ok(())
    }
    /// [`Store::purge`] for every deleted key, wherever it is (when which keys is not
    /// known any more).
    fn purge_all(&self) -> Result<()> {
        Ok(())
    }
    /// Bytes on disk (live SST files), for a gauge; 0 where unknown.
    fn size_bytes(&self) -> u64 {
        0
    }
}

pub type SharedStore = Arc<dyn Store>;

/// RocksDB. Writes go through the WAL without fsync: a killed process loses nothing
/// that was written; a lost machine is recovered by replaying Kafka (issue 7).
pub struct RocksStore {
    db: rocksdb::DB,
}

impl RocksStore {
    pub fn open(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.increase_parallelism(2);
        // Most reads are point lookups, many of keys that do not exist (a new
        // identifier, a first-seen message id): bloom filters answer those without
        // reading blocks; a larger block cache keeps the hot graph in memory.
        // Index and filter blocks stay with the table readers, outside the block cache:
        // in the cache, data blocks evicted them and a read then reloaded a whole
        // filter block (~1 ms per read at a million profiles, BENCHMARKS.md). They take
        // about 1.3 bytes per key.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_block_cache(&rocksdb::Cache::new_lru_cache(256 << 20));
        opts.set_block_based_table_factory(&table);
        // The same for the memtable: a lookup of an absent key skips the skiplist.
        opts.set_memtable_whole_key_filtering(true);
        opts.set_memtable_prefix_bloom_ratio(0.05);
        let db = rocksdb::DB::open(&opts, path)?;
        Ok(RocksStore { db })
    }

    /// Writes the memtables to SST files and compacts (benchmarks measure state size).
    pub fn flush_and_compact(&self) -> Result<()> {
        self.db.flush()?;
        self.db.compact_range::<&[u8], &[u8]>(None, None);
        Ok(())
    }
}

impl Store for RocksStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key)?)
    }

    fn scan_from(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let from = start.max(prefix);
        let iter = self.db.iterator(rocksdb::IteratorMode::From(
            from,
            rocksdb::Direction::Forward,
        ));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn scan_last(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut iter = self.db.raw_iterator();
        // The last key under the prefix: before the prefix's successor.
        match prefix_successor(prefix) {
            Some(end) => {
                iter.seek_for_prev(&end);
                if iter.valid() && iter.key() == Some(end.as_slice()) {
                    iter.prev();
                }
            }
            None => iter.seek_to_last(),
        }
        while iter.valid() && out.len() < limit {
            match (iter.key(), iter.value()) {
                (Some(k), Some(v)) if k.starts_with(prefix) => out.push((k.to_vec(), v.to_vec())),
                _ => break,
            }
            iter.prev();
        }
        iter.status()?;
        Ok(out)
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut wb = rocksdb::WriteBatch::default();
        for (k, v) in &batch.ops {
            match v {
                Some(v) => wb.put(k, v),
                None => wb.delete(k),
            }
        }
        self.db.write(wb)?;
        Ok(())
    }

    fn purge(&self, deleted: &[Vec<u8>]) -> Result<()> {
        // The memtable (and with it the write-ahead log holding the old values) goes to
        // a table file first; then the ranges of the deleted keys are compacted down to
        // the last level, where tombstones and what they hide are dropped. Many keys:
        // one compaction of everything.
        if deleted.len() > 1000 {
            return self.purge_all();
        }
        self.db.flush()?;
        let opts = force_bottommost();
        for k in deleted {
            self.db.compact_range_opt(Some(k), Some(k), &opts);
        }
        Ok(())
    }

    fn purge_all(&self) -> Result<()> {
        self.db.flush()?;
        self.db
            .compact_range_opt::<&[u8], &[u8]>(None, None, &force_bottommost());
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.db
            .property_int_value("rocksdb.total-sst-files-size")
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

/// Compaction down to the last level, where tombstones and what they hide are dropped.
fn force_bottommost() -> rocksdb::CompactOptions {
    let mut opts = rocksdb::CompactOptions::default();
    opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
    opts
}

/// The smallest key greater than every key starting with `prefix` (none if the
/// prefix is all 0xff).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// In-memory twin of [`RocksStore`] for unit tests.
#[derive(Default)]
pub struct MemStore {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl Store for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.map.lock().unwrap().get(key).cloned())
    }
    fn scan_from(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let map = self.map.lock().unwrap();
        Ok(map
            .range(start.max(prefix).to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn scan_last(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let map = self.map.lock().unwrap();
        let under: Vec<_> = map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .collect();
        Ok(under
            .into_iter()
            .rev()
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut map = self.map.lock().unwrap();
        for (k, v) in batch.ops {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }
}

/// A buffered write: a value, or `None` for a delete.
type Pending = Option<Vec<u8>>;

/// Buffered writes over a store. Reads see the buffer first. Nothing reaches the store
/// until the runner commits the batch together with the consumed offsets.
pub struct Txn<'a> {
    store: &'a dyn Store,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Each write's key and what `pending` held for it before, for [`Txn::rollback_to`].
    undo: Vec<(Vec<u8>, Option<Pending>)>,
    purge: bool,
    /// Put before every key read or written ([`Txn::in_keyspace`]); empty outside one.
    space: Vec<u8>,
}

impl<'a> Txn<'a> {
    pub fn new(store: &'a dyn Store) -> Self {
        Txn {
            store,
            pending: BTreeMap::new(),
            undo: Vec::new(),
            purge: false,
            space: Vec::new(),
        }
    }

    /// Runs `f` with every key it reads, writes or scans under `space`: a part of the
    /// state kept apart from the rest of the store (one shard of identity's graph
    /// among the shards an instance holds). `f` sees its keys without `space`.
    pub fn in_keyspace<R>(&mut self, space: &[u8], f: impl FnOnce(&mut Self) -> R) -> R {
        assert!(self.space.is_empty(), "keyspaces do not nest");
        self.space = space.to_vec();
        let r = f(self);
        self.space.clear();
        r
    }

    fn full<'k>(&self, key: &'k [u8]) -> std::borrow::Cow<'k, [u8]> {
        if self.space.is_empty() {
            std::borrow::Cow::Borrowed(key)
        } else {
            std::borrow::Cow::Owned([self.space.as_slice(), key].concat())
        }
    }

    /// Scanned rows with the keyspace taken off their keys.
    fn unspaced(&self, mut rows: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
        if !self.space.is_empty() {
            for (k, _) in &mut rows {
                k.drain(..self.space.len());
            }
        }
        rows
    }

    /// This transaction erases a person: once committed, its deleted keys are purged
    /// from disk ([`Store::purge`]).
    pub fn purge_on_commit(&mut self) {
        self.purge = true;
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let key = self.full(key);
        match self.pending.get(key.as_ref()) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(&key),
        }
    }

    pub fn get_json<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        match self.get(key)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.set(key.into(), Some(value.into()));
    }

    pub fn put_json<T: serde::Serialize>(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: &T,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(value)?;
        self.set(key.into(), Some(bytes));
        Ok(())
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.set(key.into(), None);
    }

    /// Keys under `prefix` in key order, this transaction's own writes included, at most
    /// `limit` of them.
    pub fn scan(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_from(prefix, prefix, limit)
    }

    /// The same from `start` on (a key at or after it).
    pub fn scan_from(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let (prefix, start) = (self.full(prefix), self.full(start));
        let rows = merged_scan_from(self.store, &self.pending, &prefix, &start, limit)?;
        Ok(self.unspaced(rows))
    }

    /// Scans committed state only (not this transaction's own writes).
    pub fn scan_committed(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let rows = self.store.scan_prefix(&self.full(prefix), limit)?;
        Ok(self.unspaced(rows))
    }

    /// The same from `start` on (a key at or after it).
    pub fn scan_committed_from(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let (prefix, start) = (self.full(prefix), self.full(start));
        let rows = self
            .store
            .scan_from(&prefix, start.as_ref().max(prefix.as_ref()), limit)?;
        Ok(self.unspaced(rows))
    }

    fn set(&mut self, mut key: Vec<u8>, value: Option<Vec<u8>>) {
        if !self.space.is_empty() {
            key.splice(0..0, self.space.iter().copied());
        }
        let before = self.pending.insert(key.clone(), value);
        self.undo.push((key, before));
    }

    /// A point to roll back to: the writes made so far.
    pub fn savepoint(&self) -> usize {
        self.undo.len()
    }

    /// Forgets every write made since `savepoint`.
    pub fn rollback_to(&mut self, savepoint: usize) {
        while self.undo.len() > savepoint {
            let (key, before) = self.undo.pop().expect("undo is longer than the savepoint");
            match before {
                Some(v) => {
                    self.pending.insert(key, v);
                }
                None => {
                    self.pending.remove(&key);
                }
            }
        }
    }

    /// The buffered writes as one batch.
    pub fn into_batch(self) -> WriteBatch {
        WriteBatch {
            ops: self.pending,
            purge: self.purge,
        }
    }
}

/// `base` as it will be once `top` (a batch not committed yet) is written: what the
/// runner processes the next batch against while `top`'s outputs are acknowledged. Read
/// only: writes go to the base store, `top` first.
pub struct Layered {
    base: SharedStore,
    top: Arc<WriteBatch>,
}

impl Layered {
    pub fn new(base: SharedStore, top: Arc<WriteBatch>) -> Self {
        Layered { base, top }
    }
}

impl Store for Layered {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.top.ops.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn scan_from(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        merged_scan_from(self.base.as_ref(), &self.top.ops, prefix, start, limit)
    }

    fn scan_last(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        // As in `merged_scan_from`, from the end: at least `limit` of the stored rows are
        // live, and every row before them sorts before the page.
        let (own, deletes) = writes_under(&self.top.ops, prefix, prefix);
        let stored = self.base.scan_last(prefix, limit.saturating_add(deletes))?;
        Ok(overlaid(stored, own).rev().take(limit).collect())
    }

    fn write(&self, _batch: WriteBatch) -> Result<()> {
        Err(crate::Error::Internal(
            "a layered store is read only: write to its base".into(),
        ))
    }

    fn size_bytes(&self) -> u64 {
        self.base.size_bytes()
    }
}

/// Up to `limit` live rows under `prefix` from `start` on, of `store` with `over`'s
/// writes (a value, or `None` for a delete) on top.
fn merged_scan_from(
    store: &dyn Store,
    over: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    prefix: &[u8],
    start: &[u8],
    limit: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let from = start.max(prefix);
    // Each delete on top in the range can hide one stored row, so the store gives
    // `limit` rows more than deletes: at least `limit` of them are live, and every row
    // after them sorts after the page.
    let (own, deletes) = writes_under(over, prefix, from);
    let stored = store.scan_from(prefix, from, limit.saturating_add(deletes))?;
    Ok(overlaid(stored, own).take(limit).collect())
}

type Writes<'a> = Vec<(&'a Vec<u8>, &'a Option<Vec<u8>>)>;

/// The writes of `over` under `prefix` from `from` on, and how many are deletes.
fn writes_under<'a>(
    over: &'a BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    prefix: &[u8],
    from: &[u8],
) -> (Writes<'a>, usize) {
    let own: Writes<'a> = over
        .range(from.to_vec()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .collect();
    let deletes = own.iter().filter(|(_, v)| v.is_none()).count();
    (own, deletes)
}

/// `stored` rows with `own` writes on top, the live ones in key order.
fn overlaid(
    stored: Vec<(Vec<u8>, Vec<u8>)>,
    own: Writes<'_>,
) -> impl DoubleEndedIterator<Item = (Vec<u8>, Vec<u8>)> {
    let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> =
        stored.into_iter().map(|(k, v)| (k, Some(v))).collect();
    for (k, v) in own {
        merged.insert(k.clone(), v.clone());
    }
    merged.into_iter().filter_map(|(k, v)| v.map(|v| (k, v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn Store) {
        let mut b = WriteBatch::default();
        b.put(b"a/1".to_vec(), b"x".to_vec());
        b.put(b"a/2".to_vec(), b"y".to_vec());
        b.put(b"b/1".to_vec(), b"z".to_vec());
        store.write(b).unwrap();
        let got = store.scan_prefix(b"a/", 10).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], (b"a/2".to_vec(), b"y".to_vec()));
        assert_eq!(store.scan_prefix(b"a/", 1).unwrap().len(), 1);
        let last: Vec<Vec<u8>> = store
            .scan_last(b"a/", 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(last, vec![b"a/2".to_vec(), b"a/1".to_vec()], "last first");
        assert_eq!(store.scan_last(b"a/", 1).unwrap().len(), 1);
        assert_eq!(store.scan_last(b"b/", 5).unwrap().len(), 1);
        assert!(store.scan_last(b"c/", 5).unwrap().is_empty());
        let from: Vec<Vec<u8>> = store
            .scan_from(b"a/", b"a/2", 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(from, vec![b"a/2".to_vec()], "from a key on");

        let mut txn = Txn::new(store);
        txn.put(b"a/3".to_vec(), b"w".to_vec());
        txn.delete(b"a/1".to_vec());
        assert_eq!(txn.get(b"a/3").unwrap(), Some(b"w".to_vec()));
        assert_eq!(txn.get(b"a/1").unwrap(), None, "a txn sees its own delete");
        let keys: Vec<Vec<u8>> = txn
            .scan(b"a/", 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            vec![b"a/2".to_vec(), b"a/3".to_vec()],
            "a scan sees own writes"
        );
        assert_eq!(txn.scan(b"a/", 1).unwrap().len(), 1);
        assert_eq!(
            store.get(b"a/1").unwrap(),
            Some(b"x".to_vec()),
            "nothing written before commit"
        );
        store.write(txn.into_batch()).unwrap();
        assert_eq!(store.get(b"a/1").unwrap(), None);
        assert_eq!(store.get(b"a/3").unwrap(), Some(b"w".to_vec()));
    }

    #[test]
    fn rollback_forgets_writes_since_the_savepoint() {
        let store = MemStore::default();
        let mut txn = Txn::new(&store);
        txn.put(b"a".to_vec(), b"1".to_vec());
        let sp = txn.savepoint();
        txn.put(b"a".to_vec(), b"2".to_vec());
        txn.put(b"b".to_vec(), b"x".to_vec());
        txn.delete(b"a".to_vec());
        txn.rollback_to(sp);
        assert_eq!(txn.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(txn.get(b"b").unwrap(), None);
        txn.put(b"c".to_vec(), b"3".to_vec());
        store.write(txn.into_batch()).unwrap();
        assert_eq!(store.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.get(b"b").unwrap(), None);
        assert_eq!(store.get(b"c").unwrap(), Some(b"3".to_vec()));
    }

    /// One step of the property test: a write into the transaction or a scan of it.
    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u8),
        Delete(u8),
        Scan { prefix: u8, start: u8, limit: usize },
    }

    /// Keys in two prefixes, so a scan has neighbours on both sides.
    fn key(n: u8) -> Vec<u8> {
        format!(
            "{}/{:02}",
            if n.is_multiple_of(2) { "a" } else { "b" },
            n / 2
        )
        .into_bytes()
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..40, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            (0u8..40).prop_map(Op::Delete),
            (0u8..2, 0u8..40, 0usize..8).prop_map(|(prefix, start, limit)| Op::Scan {
                prefix,
                start,
                limit
            }),
        ]
    }

    type Model = BTreeMap<Vec<u8>, Vec<u8>>;

    /// A store holding `committed`, and the same rows in a plain map.
    fn seeded(committed: Vec<(u8, u8)>) -> (SharedStore, Model) {
        let store: SharedStore = Arc::new(MemStore::default());
        let mut model = BTreeMap::new();
        let mut batch = WriteBatch::default();
        for (k, v) in committed {
            batch.put(key(k), vec![v]);
            model.insert(key(k), vec![v]);
        }
        store.write(batch).unwrap();
        (store, model)
    }

    /// Runs `ops` on `txn` and on `model`: every read and scan of the transaction must
    /// answer as the map does.
    fn run(
        txn: &mut Txn<'_>,
        model: &mut Model,
        ops: Vec<Op>,
    ) -> std::result::Result<(), proptest::test_runner::TestCaseError> {
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    txn.put(key(k), vec![v]);
                    model.insert(key(k), vec![v]);
                }
                Op::Delete(k) => {
                    proptest::prop_assert_eq!(
                        txn.get(&key(k)).unwrap(),
                        model.get(&key(k)).cloned()
                    );
                    txn.delete(key(k));
                    model.remove(&key(k));
                }
                Op::Scan {
                    prefix,
                    start,
                    limit,
                } => {
                    let prefix = if prefix == 0 {
                        b"a/".to_vec()
                    } else {
                        b"b/".to_vec()
                    };
                    let start = key(start);
                    let want: Vec<_> = model
                        .range(start.clone().max(prefix.clone())..)
                        .filter(|(k, _)| k.starts_with(&prefix))
                        .take(limit)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    proptest::prop_assert_eq!(txn.scan_from(&prefix, &start, limit).unwrap(), want);
                }
            }
        }
        Ok(())
    }

    /// Every row of the store, in key order.
    fn everything(store: &SharedStore) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut stored = store.scan_prefix(b"a/", usize::MAX).unwrap();
        stored.extend(store.scan_prefix(b"b/", usize::MAX).unwrap());
        stored
    }

    proptest::proptest! {
        /// A transaction's scans answer exactly as a plain map holding the committed
        /// rows and the transaction's own writes would, whatever the mix of puts and
        /// deletes before them (deletes used to push live rows out of a scan's page).
        #[test]
        fn txn_scans_match_a_plain_map(
            committed in proptest::collection::vec((0u8..40, proptest::prelude::any::<u8>()), 0..40),
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let (store, mut model) = seeded(committed);
            let mut txn = Txn::new(store.as_ref());
            run(&mut txn, &mut model, ops)?;
            store.write(txn.into_batch()).unwrap();
            proptest::prop_assert_eq!(everything(&store), model.into_iter().collect::<Vec<_>>());
        }

        /// The next batch, processed while the previous one is in flight, sees exactly
        /// what it would see once the previous one is written: reads, scans from a key,
        /// scans from the end, and its own writes on top; writing both in order gives
        /// the same store.
        #[test]
        fn a_layered_store_reads_as_the_store_after_its_top_batch(
            committed in proptest::collection::vec((0u8..40, proptest::prelude::any::<u8>()), 0..40),
            in_flight in proptest::collection::vec(op(), 0..40),
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let (store, mut model) = seeded(committed);
            let mut top = WriteBatch::default();
            for op in in_flight {
                match op {
                    Op::Put(k, v) => {
                        top.put(key(k), vec![v]);
                        model.insert(key(k), vec![v]);
                    }
                    Op::Delete(k) => {
                        top.delete(key(k));
                        model.remove(&key(k));
                    }
                    Op::Scan { .. } => {}
                }
            }
            let top = Arc::new(top);
            let after_top = model.clone();
            let layered = Layered::new(store.clone(), top.clone());
            // From the end, on the layered store itself.
            for p in [b"a/".to_vec(), b"b/".to_vec()] {
                for limit in 0..6 {
                    let want: Vec<_> = after_top
                        .iter()
                        .rev()
                        .filter(|(k, _)| k.starts_with(&p))
                        .take(limit)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    proptest::prop_assert_eq!(layered.scan_last(&p, limit).unwrap(), want);
                }
            }
            let mut txn = Txn::new(&layered);
            run(&mut txn, &mut model, ops)?;
            let write = txn.into_batch();
            drop(layered);
            store.write(Arc::try_unwrap(top).unwrap()).unwrap();
            store.write(write).unwrap();
            proptest::prop_assert_eq!(everything(&store), model.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_page_after_many_deletes_keeps_the_new_rows() {
        // The kept-history trim of profiles: 5 old rows, 3 new ones, trimmed one at a
        // time from the oldest. The third scan used to see the new rows as oldest.
        let store = MemStore::default();
        let mut batch = WriteBatch::default();
        for n in 0..5u8 {
            batch.put(key(n * 2), vec![n]);
        }
        store.write(batch).unwrap();
        let mut txn = Txn::new(&store);
        for n in 5..8u8 {
            txn.put(key(n * 2), vec![n]);
            let oldest = txn.scan(b"a/", 1).unwrap();
            txn.delete(oldest[0].0.clone());
        }
        let kept: Vec<u8> = txn
            .scan(b"a/", 10)
            .unwrap()
            .into_iter()
            .map(|(_, v)| v[0])
            .collect();
        assert_eq!(
            kept,
            vec![3, 4, 5, 6, 7],
            "the three oldest go, the new rows stay"
        );
    }

    #[test]
    fn keyspaces_keep_the_same_keys_apart() {
        let store = MemStore::default();
        let mut b = WriteBatch::default();
        b.put(b"a/1".to_vec(), b"outside".to_vec());
        b.put(b"s/1/a/1".to_vec(), b"one".to_vec());
        store.write(b).unwrap();
        let mut txn = Txn::new(&store);
        txn.in_keyspace(b"s/2/", |t| {
            assert_eq!(t.get(b"a/1").unwrap(), None, "another keyspace's key");
            t.put(b"a/1".to_vec(), b"two".to_vec());
            t.put(b"a/2".to_vec(), b"two".to_vec());
        });
        let (got, scanned, from) = txn.in_keyspace(b"s/1/", |t| {
            t.put(b"a/3".to_vec(), b"one".to_vec());
            t.delete(b"a/3".to_vec());
            t.put(b"a/4".to_vec(), b"one".to_vec());
            let keys = |rows: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<Vec<u8>> {
                rows.into_iter().map(|(k, _)| k).collect()
            };
            (
                t.get(b"a/1").unwrap(),
                keys(t.scan(b"a/", 10).unwrap()),
                keys(t.scan_committed_from(b"a/", b"a/0", 10).unwrap()),
            )
        });
        assert_eq!(got, Some(b"one".to_vec()));
        assert_eq!(
            scanned,
            vec![b"a/1".to_vec(), b"a/4".to_vec()],
            "keys without the space"
        );
        assert_eq!(
            from,
            vec![b"a/1".to_vec()],
            "committed rows of its space only"
        );
        assert_eq!(txn.get(b"a/1").unwrap(), Some(b"outside".to_vec()));
        store.write(txn.into_batch()).unwrap();
        assert_eq!(store.get(b"s/2/a/1").unwrap(), Some(b"two".to_vec()));
        assert_eq!(store.get(b"s/1/a/4").unwrap(), Some(b"one".to_vec()));
        assert_eq!(store.get(b"a/4").unwrap(), None);
    }

    #[test]
    fn mem_store_behaves() {
        exercise(&MemStore::default());
    }

    #[test]
    fn rocks_store_behaves_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path()).unwrap();
            exercise(&s);
        }
        let s = RocksStore::open(dir.path()).unwrap();
        assert_eq!(
            s.get(b"a/3").unwrap(),
            Some(b"w".to_vec()),
            "state survives a reopen"
        );
    }
}
