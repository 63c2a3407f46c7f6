//! Where a vault keeps the keys it read from `privacy.keys`: in the service's RocksDB,
//! with a bounded cache of the subjects used lately in memory. A visitor's key costs
//! memory only while the visitor is active; a million idle ones cost disk.
//!
//! Keys expire. Every record sealed for a topic of events lives at most that topic's
//! retention (plus a day: segments roll daily), so a key stops sealing after a while
//! (a new one is made) and is dropped once no record sealed with it can be left: the
//! keys of visitors who never come back go away by themselves. A key's expiry is in its
//! id, so a record names its key's expiry in its header, and every reader tells an
//! expired key from a missing one. Keys for records that stay (export reports) never
//! expire.
//!
//! In the store (binary keys, no personal value):
//! - `vault/k/<subject><key id>`: the key's 32 bytes;
//! - `vault/e/<subject><key id>`: an erased key (its erasure marker was read);
//! - `vault/x/<expiry day><subject><key id>`: expiring keys by day, for the sweep;
//! - `vault/s/<subject>`: when the subject was erased (its subject marker was read);
//! - `vault/offset`: the next offset of the keys topic to read;
//! - `vault/secret`: the fingerprint of the deployment's pseudonym secret.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::Result;
use crate::message::Message;
use crate::records::{AvroRecord, SubjectKey};
use crate::store::{SharedStore, WriteBatch};

use super::{SubjectHash, parse_record_key};

/// A key's id: its expiry day (2 bytes, big-endian days since 1970-01-01, `NEVER` for
/// a key that does not expire), then 6 random bytes, so that instances creating keys
/// for one subject at once never collide.
pub type KeyId = [u8; 8];

/// The expiry day of a key that does not expire.
pub const NEVER: u16 = u16::MAX;

pub fn expiry_day(id: &KeyId) -> u16 {
    u16::from_be_bytes([id[0], id[1]])
}

/// A new key id expiring at the end of `day`.
pub fn new_key_id(day: u16) -> KeyId {
    let mut id: KeyId = rand::random();
    id[..2].copy_from_slice(&day.to_be_bytes());
    id
}

/// Today, in days since 1970-01-01 (UTC).
pub fn today() -> u16 {
    u16::try_from(crate::now_ms().max(0) / 86_400_000).unwrap_or(NEVER - 1)
}

/// How long keys for events live, from the events topics' retention.
#[derive(Debug, Clone, Copy)]
pub struct Lifetime {
    /// How many days a record sealed today may still be read (retention, the last
    /// segment's day, and a day of margin); `None`: events are kept for ever.
    keep_days: Option<u16>,
    /// How many days a key seals before a new one is made.
    rotate_days: u16,
}

impl Lifetime {
    /// For topics that keep events `retention_ms` (negative: for ever).
    pub fn for_retention(retention_ms: i64) -> Lifetime {
        if retention_ms < 0 {
            return Lifetime {
                keep_days: None,
                rotate_days: 0,
            };
        }
        let days = u16::try_from((retention_ms + 86_399_999) / 86_400_000).unwrap_or(NEVER / 4);
        Lifetime {
            keep_days: Some(days + 2),
            rotate_days: days.max(1),
        }
    }

    /// Whether a key may seal a record today: for events, only if it outlives the
    /// record; for records that stay, only if it never expires.
    pub fn seals(&self, id: &KeyId, lasting: bool, today: u16) -> bool {
        match (lasting, self.keep_days) {
            (true, _) | (false, None) => expiry_day(id) == NEVER,
            (false, Some(keep)) => {
                expiry_day(id) != NEVER
                    && u32::from(expiry_day(id)) >= u32::from(today) + u32::from(keep)
            }
        }
    }

    /// The expiry day of a new key.
    pub fn new_expiry(&self, lasting: bool, today: u16) -> u16 {
        match (lasting, self.keep_days) {
            (true, _) | (false, None) => NEVER,
            (false, Some(keep)) => today
                .saturating_add(keep)
                .saturating_add(self.rotate_days)
                .min(NEVER - 1),
        }
    }
}

fn key_of(prefix: &[u8], s: &SubjectHash, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 24);
    k.extend_from_slice(prefix);
    k.extend_from_slice(s);
    k.extend_from_slice(id);
    k
}

fn expiry_key(s: &SubjectHash, id: &KeyId) -> Vec<u8> {
    let mut k = b"vault/x/".to_vec();
    k.extend_from_slice(&expiry_day(id).to_be_bytes());
    k.extend_from_slice(s);
    k.extend_from_slice(id);
    k
}

const KEYS: &[u8] = b"vault/k/";
const ERASED: &[u8] = b"vault/e/";
const EXPIRING: &[u8] = b"vault/x/";
const SUBJECTS: &[u8] = b"vault/s/";
const OFFSET: &[u8] = b"vault/offset";

/// How long after a subject's erasure no key of it is made or kept: a key another
/// instance made around the erasure (before it read the marker) is erased too. After
/// it, the subject may come back (an unsuppressed visitor) with new keys.
pub const ERASURE_HOLD_MS: i64 = 24 * 3_600_000;

/// The keys topic's record key of a subject's erasure marker.
pub fn subject_marker_key(s: &SubjectHash) -> String {
    format!("~erased/{}", super::hex(s))
}
const SECRET: &[u8] = b"vault/secret";

/// The keys of the subjects used lately: two generations, the older dropped whole
/// when the newer is full, so at most `capacity` subjects are held.
struct Cache {
    hot: HashMap<SubjectHash, Vec<(KeyId, [u8; 32])>>,
    cold: HashMap<SubjectHash, Vec<(KeyId, [u8; 32])>>,
    capacity: usize,
    /// How many times a subject was forgotten (its keys changed on disk): a list read
    /// from disk is cached only if none was meanwhile, else it may be older than the
    /// change and would hide a new key for good.
    forgotten: u64,
}

impl Cache {
    fn get(&mut self, s: &SubjectHash) -> Option<Vec<(KeyId, [u8; 32])>> {
        if let Some(v) = self.hot.get(s) {
            return Some(v.clone());
        }
        let v = self.cold.remove(s)?;
        self.put(*s, v.clone());
        Some(v)
    }

    fn put(&mut self, s: SubjectHash, keys: Vec<(KeyId, [u8; 32])>) {
        self.hot.insert(s, keys);
        if self.hot.len() >= self.capacity.div_ceil(2) {
            self.cold = std::mem::take(&mut self.hot);
        }
    }

    fn forget(&mut self, s: &SubjectHash) {
        self.forgotten += 1;
        self.hot.remove(s);
        self.cold.remove(s);
    }

    fn len(&self) -> usize {
        self.hot.len() + self.cold.len()
    }
}

/// A vault's keys: on disk, the lately used ones in memory.
pub struct Keyring {
    store: SharedStore,
    cache: Mutex<Cache>,
}

impl Keyring {
    pub fn new(store: SharedStore, capacity: usize) -> Keyring {
        Keyring {
            store,
            cache: Mutex::new(Cache {
                hot: HashMap::new(),
                cold: HashMap::new(),
                capacity: capacity.max(2),
                forgotten: 0,
            }),
        }
    }

    /// Every key of a subject (expired ones too, until they are swept).
    pub fn keys(&self, s: &SubjectHash) -> Result<Vec<(KeyId, [u8; 32])>> {
        let read_from = {
            let mut cache = self.cache.lock().expect("key cache");
            if let Some(v) = cache.get(s) {
                return Ok(v);
            }
            cache.forgotten
        };
        let prefix = key_of(KEYS, s, &[]);
        let keys: Vec<(KeyId, [u8; 32])> = self
            .store
            .scan_prefix(&prefix, 1024)?
            .into_iter()
            .filter_map(|(k, v)| Some((k[prefix.len()..].try_into().ok()?, v.try_into().ok()?)))
            .collect();
        let mut cache = self.cache.lock().expect("key cache");
        if !keys.is_empty() && cache.forgotten == read_from {
            cache.put(*s, keys.clone());
        }
        Ok(keys)
    }

    pub fn get(&self, s: &SubjectHash, id: &KeyId) -> Result<Option<[u8; 32]>> {
        Ok(self
            .keys(s)?
            .into_iter()
            .find(|(k, _)| k == id)
            .map(|(_, key)| key))
    }

    pub fn is_erased(&self, s: &SubjectHash, id: &KeyId) -> Result<bool> {
        Ok(self.store.get(&key_of(ERASED, s, id))?.is_some())
    }

    /// When the subject was erased, if it was.
    pub fn erased_since(&self, s: &SubjectHash) -> Result<Option<i64>> {
        Ok(self
            .store
            .get(&key_of(SUBJECTS, s, &[]))?
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(i64::from_be_bytes))
    }

    /// Whether no key of the subject may be made or kept now (its erasure is recent).
    pub fn held(&self, s: &SubjectHash) -> Result<bool> {
        Ok(self
            .erased_since(s)?
            .is_some_and(|at| crate::now_ms() < at + ERASURE_HOLD_MS))
    }

    /// Holds a key this instance just created and stored on the topic.
    pub fn add(&self, s: &SubjectHash, id: &KeyId, key: &[u8; 32]) -> Result<()> {
        let mut b = WriteBatch::default();
        self.put(&mut b, s, id, key)?;
        self.store.write(b)?;
        self.cache.lock().expect("key cache").forget(s);
        Ok(())
    }

    fn put(&self, b: &mut WriteBatch, s: &SubjectHash, id: &KeyId, key: &[u8; 32]) -> Result<()> {
        if self.is_erased(s, id)? {
            return Ok(());
        }
        b.put(key_of(KEYS, s, id), key.to_vec());
        if expiry_day(id) != NEVER {
            b.put(expiry_key(s, id), Vec::new());
        }
        Ok(())
    }

    /// The next offset of the keys topic to read (0: from its beginning).
    pub fn offset(&self) -> Result<i64> {
        Ok(self
            .store
            .get(OFFSET)?
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map_or(0, i64::from_be_bytes))
    }

    /// Starts reading the keys topic over (it was replaced): the keys held stay.
    pub fn restart(&self) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete(OFFSET.to_vec());
        self.store.write(b)
    }

    pub fn secret_fingerprint(&self) -> Result<Option<String>> {
        Ok(self
            .store
            .get(SECRET)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Takes in one record of the keys topic: a key, an erasure marker or a tombstone
    /// (an expired key swept, or an erasure before erasure markers), or the secret's
    /// fingerprint. An erased key's bytes are purged from the disk; an expired one's
    /// are left to compaction (nothing it sealed is left to read).
    pub fn apply(&self, m: &Message, secret_key: &[u8]) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(OFFSET.to_vec(), (m.offset + 1).to_be_bytes().to_vec());
        let key = m.key.as_deref().unwrap_or_default();
        if key == secret_key {
            match m.payload.as_deref() {
                Some(p) => b.put(SECRET.to_vec(), p.to_vec()),
                None => b.delete(SECRET.to_vec()),
            }
            return self.store.write(b);
        }
        if let Some(hex) = key.strip_prefix(b"~erased/".as_slice()) {
            return self.apply_subject_marker(b, hex, m);
        }
        let Some((s, id)) = parse_record_key(key) else {
            tracing::warn!(
                offset = m.offset,
                "a keys record with a malformed key, skipped"
            );
            return self.store.write(b);
        };
        let record = match m.payload.as_deref() {
            None | Some([]) => None,
            Some(bytes) => match SubjectKey::from_avro(bytes) {
                // A key made around its subject's erasure, before its maker read the
                // marker: erased like the others.
                Ok(r)
                    if self
                        .erased_since(&s)?
                        .is_some_and(|at| r.created_at < at + ERASURE_HOLD_MS) =>
                {
                    Some(Vec::new())
                }
                Ok(r) => Some(r.key),
                Err(_) => {
                    tracing::warn!(offset = m.offset, "an unreadable keys record, skipped");
                    return self.store.write(b);
                }
            },
        };
        let mut purged = Vec::new();
        match record.as_deref().map(<[u8; 32]>::try_from) {
            Some(Ok(key)) => self.put(&mut b, &s, &id, &key)?,
            Some(Err(_)) if record.as_deref().is_some_and(|k| !k.is_empty()) => {
                tracing::warn!(
                    offset = m.offset,
                    "a keys record with a malformed key, skipped"
                );
            }
            // A tombstone of an expired key: it was swept, nothing to remember.
            None if expiry_day(&id) < today() => {
                self.remove(&mut b, &s, &id);
            }
            // An erasure marker, or a tombstone of a key that had not expired.
            _ => {
                purged = self.remove(&mut b, &s, &id);
                b.put(key_of(ERASED, &s, &id), Vec::new());
            }
        }
        self.commit(b, &s, &purged)
    }

    /// Writes a record's changes to a subject's keys; erased keys' bytes must leave the
    /// disk too, not only the topic.
    fn commit(&self, b: WriteBatch, s: &SubjectHash, purged: &[Vec<u8>]) -> Result<()> {
        self.store.write(b)?;
        self.cache.lock().expect("key cache").forget(s);
        if !purged.is_empty() {
            self.store.purge(purged)?;
        }
        Ok(())
    }

    /// A subject's erasure marker (`~erased/<subject>`, the time in ms as text): every
    /// key of it held now is erased, and keys made around then will be.
    fn apply_subject_marker(&self, mut b: WriteBatch, hex: &[u8], m: &Message) -> Result<()> {
        let subject = std::str::from_utf8(hex)
            .ok()
            .and_then(super::unhex)
            .and_then(|v| SubjectHash::try_from(v).ok());
        let at = m
            .payload
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok()?.parse::<i64>().ok());
        let (Some(s), Some(at)) = (subject, at) else {
            tracing::warn!(
                offset = m.offset,
                "a malformed subject erasure marker, skipped"
            );
            return self.store.write(b);
        };
        b.put(key_of(SUBJECTS, &s, &[]), at.to_be_bytes().to_vec());
        let mut purged = Vec::new();
        for (id, _) in self.keys(&s)? {
            purged.extend(self.remove(&mut b, &s, &id));
            b.put(key_of(ERASED, &s, &id), Vec::new());
        }
        self.commit(b, &s, &purged)
    }

    fn remove(&self, b: &mut WriteBatch, s: &SubjectHash, id: &KeyId) -> Vec<Vec<u8>> {
        let gone = vec![key_of(KEYS, s, id), expiry_key(s, id)];
        for k in &gone {
            b.delete(k.clone());
        }
        gone
    }

    /// Up to `limit` keys that expired before `today`: what a sweep tombstones.
    pub fn expired(&self, today: u16, limit: usize) -> Result<Vec<(SubjectHash, KeyId)>> {
        let mut found = Vec::new();
        for (k, _) in self.store.scan_prefix(EXPIRING, limit)? {
            let rest = &k[EXPIRING.len()..];
            if rest.len() != 2 + 16 + 8 {
                continue;
            }
            if u16::from_be_bytes([rest[0], rest[1]]) >= today {
                break;
            }
            found.push((
                rest[2..18].try_into().expect("16 bytes"),
                rest[18..].try_into().expect("8 bytes"),
            ));
        }
        Ok(found)
    }

    /// How many subjects the cache holds.
    pub fn cached(&self) -> usize {
        self.cache.lock().expect("key cache").len()
    }

    /// Every key held (tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.store
            .scan_prefix(KEYS, usize::MAX)
            .map_or(0, |v| v.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};

    use super::*;
    use crate::store::{MemStore, Store};

    /// A store that runs a hook once, between reading a prefix and handing it back: a
    /// key record applied by the follower while an opener reads the same subject.
    #[derive(Default)]
    struct Racing {
        inner: MemStore,
        armed: AtomicBool,
        during_scan: OnceLock<Box<dyn Fn() + Send + Sync>>,
    }

    impl Store for Racing {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
            self.inner.get(key)
        }
        fn scan_from(
            &self,
            prefix: &[u8],
            start: &[u8],
            limit: usize,
        ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            let read = self.inner.scan_from(prefix, start, limit);
            if self.armed.swap(false, Ordering::SeqCst)
                && let Some(hook) = self.during_scan.get()
            {
                hook();
            }
            read
        }
        fn scan_last(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            self.inner.scan_last(prefix, limit)
        }
        fn write(&self, batch: WriteBatch) -> Result<()> {
            self.inner.write(batch)
        }
    }

    /// The second key of a subject, stored while a reader was reading the subject's
    /// keys from disk, must not be hidden by the older list that reader then caches:
    /// a record sealed with it would read as "missing" and hold the service for good.
    #[test]
    fn a_key_applied_while_its_subject_is_read_is_not_hidden_by_the_cache() {
        let store = Arc::new(Racing::default());
        let ring = Arc::new(Keyring::new(store.clone(), 16));
        let s: SubjectHash = [7; 16];
        let (first, second) = (new_key_id(today() + 30), new_key_id(today() + 31));
        ring.add(&s, &first, &[1; 32]).unwrap();
        let r = ring.clone();
        let _ = store.during_scan.set(Box::new(move || {
            r.add(&s, &second, &[2; 32]).unwrap();
        }));
        store.armed.store(true, Ordering::SeqCst);
        // This read sees the first key only; the second lands meanwhile.
        assert_eq!(ring.get(&s, &second).unwrap(), None);
        assert_eq!(
            ring.get(&s, &second).unwrap(),
            Some([2; 32]),
            "the key stored during the read is hidden by a stale cached list"
        );
        assert_eq!(ring.get(&s, &first).unwrap(), Some([1; 32]));
    }
}
