//! Crypto-shredding: how a person is erased from topics, which are logs.
//!
//! Every record that carries a person's data is **sealed** with a key of its *subject*:
//! the ingest subject of an event (a hash of its userId or anonymousId), the profile id
//! of everything downstream of identity, or a privacy request's id. Keys are random
//! AES-256-GCM keys kept on `privacy.keys` (compacted, one partition, read whole by
//! every service). Erasing a person overwrites each key of their subjects with an
//! erasure marker (the same record key, no key bytes; compaction then drops the key
//! itself): every sealed record of theirs, on every topic and in every replay, is then
//! noise. A record whose key was erased is *shredded*: the runner skips it and counts it.
//! A record whose key is simply not there (the keys topic lost, truncated or cleaned by
//! retention) is *missing*, which is never taken for an erasure: the runner stops and
//! says so (see the runbook, "Subject keys are missing").
//!
//! Subjects are only ever named by a hash ([`subject_hash`]): the keys topic holds no
//! personal value. Several instances may create keys for one subject at once; each key
//! has its own id, so none is lost. Within one instance, requests at once for a new
//! subject wait for one key (a new visitor's first page sends several).
//!
//! A sealed record: `C3 5F` | subject hash (16 bytes) | key id (8) | keys-topic offset
//! (8, big-endian) | nonce (12) | AES-256-GCM ciphertext and tag of the plain record,
//! with the bytes before the nonce as associated data.
//! The offset is how far the keys topic must be read to hold the key: a reader that
//! has not seen the key yet waits for its own reading to pass that offset, which asks
//! the broker nothing. Records sealed before it was added (`C3 5E`, no offset) still
//! open: the reader then reads the keys topic to its end. Anything else is plain.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::ids::SubjectHash;
use crate::kafka::{Producer, consumer_config};
use crate::message::Message;
use crate::records::{AvroRecord, SubjectKey};
use crate::store::{MemStore, SharedStore};
use crate::{Error, Result};

mod keyring;
pub use keyring::Lifetime;
use keyring::{KeyId, Keyring};

/// The first two bytes of a sealed record that names its key's offset.
pub const SEAL_MARKER: [u8; 2] = [0xC3, 0x5F];
/// ...and of one sealed before offsets were named.
const SEAL_MARKER_V1: [u8; 2] = [0xC3, 0x5E];
const HEADER_LEN: usize = 2 + 16 + 8 + 8 + 12;
const HEADER_LEN_V1: usize = 2 + 16 + 8 + 12;
/// How long a reader waits for its reading of the keys topic to pass a record's named
/// offset before it asks the broker where the topic ends (a topic replaced under it).
const NAMED_OFFSET_WAIT: Duration = Duration::from_secs(2);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The keys topic's record key of one key.
fn record_key(subject: &SubjectHash, key_id: &[u8; 8]) -> String {
    format!("{}/{}", hex(subject), hex(key_id))
}

fn parse_record_key(k: &[u8]) -> Option<(SubjectHash, [u8; 8])> {
    let s = std::str::from_utf8(k).ok()?;
    let (a, b) = s.split_once('/')?;
    Some((unhex(a)?.try_into().ok()?, unhex(b)?.try_into().ok()?))
}

/// The length of a sealed record's header (`None`: the record is not sealed).
fn header_len(bytes: &[u8]) -> Option<usize> {
    let len = match bytes.get(..2)? {
        m if m == SEAL_MARKER => HEADER_LEN,
        m if m == SEAL_MARKER_V1 => HEADER_LEN_V1,
        _ => return None,
    };
    (bytes.len() > len).then_some(len)
}

pub fn is_sealed(bytes: &[u8]) -> bool {
    header_len(bytes).is_some()
}

/// How far the keys topic must be read to hold the key of a sealed record (`None` for
/// a record sealed before records named it).
fn key_offset(bytes: &[u8]) -> Option<i64> {
    (header_len(bytes)? == HEADER_LEN)
        .then(|| i64::from_be_bytes(bytes[26..34].try_into().expect("8 bytes")))
}

/// The subject a sealed record was sealed for.
pub fn sealed_subject(bytes: &[u8]) -> Option<SubjectHash> {
    is_sealed(bytes).then(|| bytes[2..18].try_into().expect("16 bytes"))
}

/// What opening a record gave.
#[derive(Debug, PartialEq)]
pub enum Opened {
    /// The plain record (it was sealed with a known key, or never sealed).
    Plain(Vec<u8>),
    /// Sealed with a key that was erased (an erasure marker or a tombstone was seen).
    Shredded,
    /// Sealed with a key the keys topic does not hold, and that was never erased: the
    /// keys topic lost records. Not an erasure: the record must not be skipped.
    Missing,
    /// Sealed, but it does not open with its key: damaged or forged.
    Corrupt,
}

/// The keys topic's record of the deployment's pseudonym secret: its fingerprint
/// ([`crate::ids::secret_fingerprint`]), written by the first service that starts, checked
/// by every later one. A subject hash is hex, so it cannot be mistaken for one.
const SECRET_RECORD_KEY: &str = "~pseudonym-secret";

fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new_from_slice(key).expect("32-byte key")
}

/// Where and how long a vault keeps its keys.
pub struct Keeping {
    /// The service's RocksDB (keys under `vault/`).
    pub store: SharedStore,
    /// How many subjects' keys are held in memory (the others are read from the store).
    pub cache_subjects: usize,
    /// How long keys for events live.
    pub lifetime: Lifetime,
}

impl Keeping {
    /// In memory, for a vault that follows no topic (tools, tests and fuzzing).
    pub fn in_memory() -> Keeping {
        Keeping {
            store: Arc::new(MemStore::default()),
            cache_subjects: 1024,
            lifetime: Lifetime::for_retention(7 * 86_400_000),
        }
    }
}

/// The keyring of one service instance: follows `privacy.keys` into its store, creates
/// keys for new subjects, seals and opens records.
pub struct Vault {
    topic: String,
    producer: Option<Arc<Producer>>,
    keyring: Arc<Keyring>,
    lifetime: Lifetime,
    /// The next offset of the keys topic not applied yet...
    applied: Arc<AtomicI64>,
    /// ...announced to [`Vault::catch_up`] each time it moves.
    arrived: Arc<tokio::sync::Notify>,
    /// The offset after the last key this vault stored: with `applied`, how far a
    /// reader must read the keys topic to hold every key this vault seals with.
    stored: AtomicI64,
    /// Asks the broker where the keys topic ends (`None`: a vault of fixed keys).
    watermarks: Option<Arc<std::sync::Mutex<BaseConsumer>>>,
    /// How many times it asked.
    end_questions: AtomicU64,
    /// The keys being made now, by subject and kind: a second request for one waits for
    /// it instead of making another (a new visitor's first page sends several at once).
    making: std::sync::Mutex<HashMap<(SubjectHash, bool), Making>>,
}

/// A key being made: done once, whoever asks meanwhile.
type Making = Arc<tokio::sync::OnceCell<()>>;

impl Vault {
    /// Reads the keys topic from where this store left it (the whole topic the first
    /// time), then keeps following it until `shutdown`. With a producer the vault can
    /// create keys (seal); without, it only opens.
    pub async fn follow(
        kafka: &KafkaConfig,
        topic: String,
        client_id: &str,
        producer: Option<Arc<Producer>>,
        keeping: Keeping,
        shutdown: CancellationToken,
    ) -> Result<Arc<Vault>> {
        let keyring = Arc::new(Keyring::new(keeping.store, keeping.cache_subjects));
        let watermarks: BaseConsumer =
            consumer_config(kafka, client_id, &format!("{client_id}-keys-watermarks")).create()?;
        let mut from = keyring.offset()?;
        if from > 0 {
            let (_, high) = watermarks.fetch_watermarks(&topic, 0, Duration::from_secs(10))?;
            if from > high {
                // The topic is not the one this store read: it was replaced.
                tracing::warn!(%topic, from, high, "the keys topic is shorter than when last read: reading it again from its start");
                keyring.restart()?;
                from = 0;
            }
        }
        let applied = Arc::new(AtomicI64::new(from));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (k, a, n) = (keyring.clone(), applied.clone(), arrived.clone());
        crate::table::follow_from(
            kafka,
            &topic,
            &format!("{client_id}-keys"),
            from,
            move |m: &Message| {
                if let Err(e) = k.apply(m, SECRET_RECORD_KEY.as_bytes()) {
                    // Not applied: a record sealed with it is then missing, which holds the
                    // service instead of losing anything.
                    tracing::error!(offset = m.offset, error = %e, "a keys record could not be stored");
                    return;
                }
                a.store(m.offset + 1, Ordering::Release);
                n.notify_waiters();
            },
            shutdown,
        )
        .await?;
        Ok(Arc::new(Vault {
            topic,
            producer,
            keyring,
            lifetime: keeping.lifetime,
            applied,
            arrived,
            stored: AtomicI64::new(0),
            watermarks: Some(Arc::new(std::sync::Mutex::new(watermarks))),
            end_questions: AtomicU64::new(0),
            making: Default::default(),
        }))
    }

    /// Checks that this process's pseudonym secret is the deployment's (the one its ids
    /// were made with, recorded on the keys topic), recording it if the deployment has
    /// none yet. Another secret would name every person differently: their keys, their
    /// profiles, their erasure.
    pub async fn check_secret(&self) -> Result<()> {
        let mine = crate::ids::secret_fingerprint();
        if self.keyring.secret_fingerprint()?.is_none() {
            self.producer()?
                .send(&self.topic, SECRET_RECORD_KEY.as_bytes(), mine.as_bytes())
                .await
                .map_err(|e| {
                    Error::Broker(format!("the secret's fingerprint was not stored: {e}"))
                })?;
            // Read it back: of instances starting at once with different secrets, the
            // last record wins and the others refuse to start. A cluster still electing
            // leaders (a fresh one, or one restarting) can take longer than one
            // catch-up: the service waits, unready, for up to two minutes.
            let mut attempts = 1;
            while let Err(e) = self.catch_up().await {
                if attempts == 12 {
                    return Err(e);
                }
                attempts += 1;
                tracing::warn!(error = %e, "the keys topic is not read back yet: waiting");
            }
        }
        if self.keyring.secret_fingerprint()?.as_deref() == Some(mine.as_str()) {
            return Ok(());
        }
        Err(Error::Config(
            "privacy.pseudonym_secret is not the one this deployment's ids were made with \
             (the keys topic records its fingerprint): every service must use the same \
             secret, and it never changes"
                .into(),
        ))
    }

    fn producer(&self) -> Result<&Producer> {
        self.producer.as_deref().ok_or_else(|| {
            Error::Internal("this vault only opens records: it has no producer".into())
        })
    }

    /// Seals `plain`, a record for a topic of events, with a key of subject `s` that
    /// outlives it, creating (and storing on the keys topic, acknowledged) one if the
    /// subject has none.
    pub async fn seal(&self, s: &SubjectHash, plain: &[u8]) -> Result<Vec<u8>> {
        self.seal_for(s, plain, false).await
    }

    /// [`Vault::seal`] with a key that never expires, for a record that stays (an
    /// export report on a compacted topic).
    pub async fn seal_lasting(&self, s: &SubjectHash, plain: &[u8]) -> Result<Vec<u8>> {
        self.seal_for(s, plain, true).await
    }

    async fn seal_for(&self, s: &SubjectHash, plain: &[u8], lasting: bool) -> Result<Vec<u8>> {
        if let Some(sealed) = self.seal_known(s, plain, lasting)? {
            return Ok(sealed);
        }
        // Only a subject without a key can be held: its marker erased every key it had,
        // and none is made during the hold (so the common case reads no marker).
        if self.keyring.held(s)? {
            return Err(Error::Erased);
        }
        self.ensure_keys(&[*s], lasting).await?;
        Ok(self
            .seal_known(s, plain, lasting)?
            .expect("the key was just added"))
    }

    /// Gives every subject that has no key to seal with one, all stored at once (one
    /// round trip to the broker however many there are).
    pub async fn ensure_keys(&self, subjects: &[SubjectHash], lasting: bool) -> Result<()> {
        let mut missing = std::collections::BTreeSet::new();
        for s in subjects {
            // A subject erased a moment ago gets no key: what was for it is dropped.
            if self.sealing_key(s, lasting)?.is_none() && !self.keyring.held(s)? {
                missing.insert(*s);
            }
        }
        let created =
            futures::future::join_all(missing.iter().map(|s| self.create_once(s, lasting))).await;
        created.into_iter().collect()
    }

    /// Makes a key for `s` unless one is being made: then waits for that one (which
    /// may have failed: then this call makes it).
    async fn create_once(&self, s: &SubjectHash, lasting: bool) -> Result<()> {
        let cell = self
            .making
            .lock()
            .expect("keys being made")
            .entry((*s, lasting))
            .or_default()
            .clone();
        let made = cell
            .get_or_try_init(|| async {
                if self.sealing_key(s, lasting)?.is_some() {
                    return Ok(());
                }
                self.create_key(s, lasting).await
            })
            .await
            .map(|_| ());
        let mut m = self.making.lock().expect("keys being made");
        if m.get(&(*s, lasting)).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            m.remove(&(*s, lasting));
        }
        made
    }

    fn sealing_key(&self, s: &SubjectHash, lasting: bool) -> Result<Option<(KeyId, [u8; 32])>> {
        let today = keyring::today();
        Ok(self
            .keyring
            .keys(s)?
            .into_iter()
            .find(|(id, _)| self.lifetime.seals(id, lasting, today)))
    }

    async fn create_key(&self, s: &SubjectHash, lasting: bool) -> Result<()> {
        let producer = self.producer()?;
        let key: [u8; 32] = rand::random();
        let key_id = keyring::new_key_id(self.lifetime.new_expiry(lasting, keyring::today()));
        let record = SubjectKey {
            subject: hex(s),
            key_id: hex(&key_id),
            key: key.to_vec(),
            created_at: crate::now_ms(),
        };
        let (_, offset) = producer
            .send(
                &self.topic,
                record_key(s, &key_id).as_bytes(),
                &record.to_avro()?,
            )
            .await
            .map_err(|e| Error::Broker(format!("the subject key was not stored: {e}")))?;
        // Before the key is held: whoever seals with it names an offset past it.
        self.stored.fetch_max(offset + 1, Ordering::AcqRel);
        self.keyring.add(s, &key_id, &key)
    }

    fn seal_known(&self, s: &SubjectHash, plain: &[u8], lasting: bool) -> Result<Option<Vec<u8>>> {
        let Some((key_id, key)) = self.sealing_key(s, lasting)? else {
            return Ok(None);
        };
        // The key came from the keys topic (read up to `applied`) or was stored by this
        // vault (up to `stored`): a reader that has read past both holds it.
        let key_offset = self
            .applied
            .load(Ordering::Acquire)
            .max(self.stored.load(Ordering::Acquire));
        let nonce: [u8; 12] = rand::random();
        let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + 16);
        out.extend_from_slice(&SEAL_MARKER);
        out.extend_from_slice(s);
        out.extend_from_slice(&key_id);
        out.extend_from_slice(&key_offset.to_be_bytes());
        // What comes before the nonce is authenticated with the text: a changed offset
        // makes the record corrupt, never a readable one.
        let ct = cipher(&key)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &out,
                },
            )
            .map_err(|e| Error::Internal(format!("sealing failed: {e}")))?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(Some(out))
    }

    /// A vault that follows no topic: it holds the keys records [`apply`](Self::apply)
    /// hands it, in memory, and only opens (tools, tests and fuzzing).
    pub fn detached() -> Vault {
        let keeping = Keeping::in_memory();
        Vault {
            topic: String::new(),
            producer: None,
            keyring: Arc::new(Keyring::new(keeping.store, keeping.cache_subjects)),
            lifetime: keeping.lifetime,
            applied: Arc::default(),
            arrived: Arc::default(),
            stored: AtomicI64::new(0),
            watermarks: None,
            end_questions: AtomicU64::new(0),
            making: Default::default(),
        }
    }

    /// Takes in one record of the keys topic (a key, or a marker or tombstone that
    /// destroys one).
    pub fn apply(&self, m: &Message) {
        if let Err(e) = self.keyring.apply(m, SECRET_RECORD_KEY.as_bytes()) {
            tracing::error!(offset = m.offset, error = %e, "a keys record could not be stored");
        }
    }

    /// Opens a record without waiting: `None` when it is sealed with a key this vault
    /// has not seen (yet, or any more).
    fn try_open(&self, bytes: &[u8]) -> Result<Option<Opened>> {
        let Some(header) = header_len(bytes) else {
            return Ok(Some(Opened::Plain(bytes.to_vec())));
        };
        let s: SubjectHash = bytes[2..18].try_into().expect("16 bytes");
        let id: KeyId = bytes[18..26].try_into().expect("8 bytes");
        let Some(key) = self.keyring.get(&s, &id)? else {
            // Erased, or expired (swept once nothing sealed with it could be left): the
            // record is noise on purpose.
            let gone =
                self.keyring.is_erased(&s, &id)? || keyring::expiry_day(&id) < keyring::today();
            return Ok(gone.then_some(Opened::Shredded));
        };
        Ok(Some(
            match cipher(&key).decrypt(
                Nonce::from_slice(&bytes[header - 12..header]),
                Payload {
                    msg: &bytes[header..],
                    // The earlier format authenticated no header.
                    aad: if header == HEADER_LEN {
                        &bytes[..header - 12]
                    } else {
                        &[]
                    },
                },
            ) {
                Ok(p) => Opened::Plain(p),
                Err(_) => Opened::Corrupt,
            },
        ))
    }

    /// Opens a record. A key not seen yet may be on its way (it is stored before any
    /// record sealed with it): the vault first reads the keys topic as far as the
    /// record names, else up to its end; a key neither held nor erased then is missing.
    /// An error means the keys topic (or the store) could not be read: try again.
    pub async fn open(&self, bytes: &[u8]) -> Result<Opened> {
        if let Some(o) = self.try_open(bytes)? {
            return Ok(o);
        }
        // Usually the key is just behind the record. If it is still not held there
        // (compacted away, its erasure marker further on, a topic replaced), the end
        // decides.
        if let Some(offset) = key_offset(bytes).filter(|_| self.watermarks.is_some()) {
            let deadline = tokio::time::Instant::now() + NAMED_OFFSET_WAIT;
            if self.read_up_to(offset, 0, deadline).await
                && let Some(o) = self.try_open(bytes)?
            {
                return Ok(o);
            }
        }
        self.catch_up().await?;
        Ok(self.try_open(bytes)?.unwrap_or(Opened::Missing))
    }

    /// Waits until every key stored so far has been read.
    pub async fn catch_up(&self) -> Result<()> {
        let Some(watermarks) = self.watermarks.clone() else {
            return Ok(());
        };
        self.end_questions.fetch_add(1, Ordering::Relaxed);
        let topic = self.topic.clone();
        // A broker call that blocks (up to its timeout): off the async threads.
        let (low, high) = tokio::task::spawn_blocking(move || {
            let c = watermarks.lock().expect("watermarks lock");
            c.fetch_watermarks(&topic, 0, Duration::from_secs(10))
        })
        .await
        .map_err(|e| Error::Internal(format!("asking where the keys topic ends: {e}")))??;
        // Records below the first offset are gone (deleted or truncated): there is
        // nothing to wait for there.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        if self.read_up_to(high, low, deadline).await {
            Ok(())
        } else {
            Err(Error::Broker(
                "the keys topic was not read to its end within 10 s".into(),
            ))
        }
    }

    /// Waits until the keys topic is applied up to `offset` (records below `low` are
    /// gone), woken as each keys record is applied; false at `deadline`.
    async fn read_up_to(&self, offset: i64, low: i64, deadline: tokio::time::Instant) -> bool {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.applied.load(Ordering::Acquire).max(low) >= offset {
                return true;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return false;
            }
        }
    }

    /// How many times this vault asked the broker where the keys topic ends.
    pub fn end_questions(&self) -> u64 {
        self.end_questions.load(Ordering::Relaxed)
    }

    /// The record that erases one key (named by its record key on the keys topic, as
    /// [`Vault::keys_of`] gives it): the key's own record key with no key bytes. Unlike
    /// a tombstone, compaction keeps it, so every vault, now and after any restart,
    /// tells an erased key from a missing one.
    pub fn erasure_record(record_key: &str) -> Result<Vec<u8>> {
        let (s, id) = parse_record_key(record_key.as_bytes())
            .ok_or_else(|| Error::Data("not a subject key's record key".into()))?;
        SubjectKey {
            subject: hex(&s),
            key_id: hex(&id),
            key: Vec::new(),
            created_at: crate::now_ms(),
        }
        .to_avro()
    }

    /// A subject's erasure marker (record key and value for the keys topic), written
    /// with the markers of its keys: every vault then erases every key of the subject it
    /// holds, and for a while ([`keyring::ERASURE_HOLD_MS`]) makes no new one and erases
    /// any made elsewhere around the erasure, so nothing about the person is sealed
    /// with a live key between the erasure and its last step.
    /// `at` is the erasure's time in ms (its request's, so a replay writes the same).
    pub fn subject_erasure(s: &SubjectHash, at: i64) -> (String, Vec<u8>) {
        (keyring::subject_marker_key(s), at.to_string().into_bytes())
    }

    /// The keys topic's record keys of every key of these subjects: what to erase.
    /// Call after [`Vault::catch_up`] to include keys created elsewhere.
    pub fn keys_of(&self, subjects: &[SubjectHash]) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        for s in subjects {
            for (id, _) in self.keyring.keys(s)? {
                keys.push(record_key(s, &id));
            }
        }
        Ok(keys)
    }

    /// Tombstones keys that expired (up to `limit`): nothing sealed with them is left
    /// on any topic, and every vault then drops them. Returns how many.
    pub async fn sweep_expired(&self, limit: usize) -> Result<usize> {
        let expired = self.keyring.expired(keyring::today(), limit)?;
        let producer = self.producer()?;
        let names: Vec<String> = expired.iter().map(|(s, id)| record_key(s, id)).collect();
        let sent = futures::future::join_all(
            names
                .iter()
                .map(|k| producer.send(&self.topic, k.as_bytes(), &[])),
        )
        .await;
        for r in sent {
            r.map_err(|e| Error::Broker(format!("an expired key was not swept: {e}")))?;
        }
        Ok(expired.len())
    }

    /// How many subjects' keys are held in memory.
    pub fn cached_subjects(&self) -> usize {
        self.keyring.cached()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::subject_hash;

    fn msg(key: &str, payload: Option<Vec<u8>>) -> Message {
        Message {
            topic: "k".into(),
            partition: 0,
            offset: 0,
            key: Some(key.as_bytes().to_vec()),
            payload,
            timestamp_ms: None,
            replayed: false,
        }
    }

    /// A key id `n` that seals events today (it expires in 30 days).
    fn live(n: u8) -> KeyId {
        let mut id = [n; 8];
        id[..2].copy_from_slice(&(keyring::today() + 30).to_be_bytes());
        id
    }

    fn key_record(subject: &str, id: [u8; 8]) -> (String, Vec<u8>) {
        let s = subject_hash(subject);
        let rec = SubjectKey {
            subject: hex(&s),
            key_id: hex(&id),
            key: rand::random::<[u8; 32]>().to_vec(),
            created_at: 1,
        };
        (record_key(&s, &id), rec.to_avro().unwrap())
    }

    #[tokio::test]
    async fn a_sealed_record_opens_with_its_key_and_is_shredded_without_it() {
        let v = Vault::detached();
        let (k, rec) = key_record("profile-1", live(1));
        v.apply(&msg(&k, Some(rec)));
        let plain = b"jane.doe@example.com".to_vec();
        let sealed = v.seal(&subject_hash("profile-1"), &plain).await.unwrap();
        assert!(is_sealed(&sealed));
        assert!(
            !sealed.windows(8).any(|w| w == b"jane.doe"),
            "no plain text in a sealed record"
        );
        assert_eq!(v.open(&sealed).await.unwrap(), Opened::Plain(plain.clone()));
        // A record that was never sealed passes as it is.
        assert_eq!(
            v.open(b"\xC3\x01plain").await.unwrap(),
            Opened::Plain(b"\xC3\x01plain".to_vec())
        );
        // A forged or damaged record is an error, not a shredded one.
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(v.open(&bad).await.unwrap(), Opened::Corrupt);
        // The erasure marker destroys the key: the record is noise from then on.
        assert_eq!(
            v.keys_of(&[subject_hash("profile-1")]).unwrap(),
            vec![k.clone()]
        );
        v.apply(&msg(&k, Some(Vault::erasure_record(&k).unwrap())));
        assert_eq!(v.open(&sealed).await.unwrap(), Opened::Shredded);
        assert_eq!(v.keyring.len(), 0);
    }

    /// The audit's finding: losing the keys topic (or a keys topic cleaned by retention)
    /// made every record "shredded": counted, skipped, offsets moved on. A key that was
    /// erased and a key that is missing are told apart, after a restart too.
    #[tokio::test]
    async fn a_missing_key_is_not_an_erased_one() {
        let v = Vault::detached();
        let (k1, rec1) = key_record("profile-1", live(1));
        let (k2, rec2) = key_record("profile-2", live(2));
        let (k3, rec3) = key_record("profile-3", live(3));
        for (k, rec) in [(&k1, &rec1), (&k2, &rec2), (&k3, &rec3)] {
            v.apply(&msg(k, Some(rec.clone())));
        }
        let mut sealed = Vec::new();
        for s in ["profile-1", "profile-2", "profile-3"] {
            sealed.push(v.seal(&subject_hash(s), b"x").await.unwrap());
        }
        let [one, two, three] = <[Vec<u8>; 3]>::try_from(sealed).unwrap();
        // A vault that reads the topic afresh: profile-1 erased by a marker, profile-2 by
        // an older tombstone, profile-3's key lost with the topic's records.
        let fresh = Vault::detached();
        fresh.apply(&msg(&k1, Some(rec1)));
        fresh.apply(&msg(&k1, Some(Vault::erasure_record(&k1).unwrap())));
        fresh.apply(&msg(&k2, Some(rec2)));
        fresh.apply(&msg(&k2, None));
        assert_eq!(fresh.open(&one).await.unwrap(), Opened::Shredded);
        assert_eq!(fresh.open(&two).await.unwrap(), Opened::Shredded);
        assert_eq!(fresh.open(&three).await.unwrap(), Opened::Missing);
        // After compaction only the marker is left of profile-1's key: still erased.
        let compacted = Vault::detached();
        compacted.apply(&msg(&k1, Some(Vault::erasure_record(&k1).unwrap())));
        assert_eq!(compacted.open(&one).await.unwrap(), Opened::Shredded);
        // A key record that arrives after its marker (replayed out of order) stays erased.
        compacted.apply(&msg(&k1, Some(key_record("profile-1", live(1)).1)));
        assert_eq!(compacted.open(&one).await.unwrap(), Opened::Shredded);
        assert!(Vault::erasure_record("not-a-key").is_err());
    }

    /// A record names how far the keys topic must be read to hold its key; a record of
    /// the format before (no offset, marker `C3 5E`) opens as it did.
    #[tokio::test]
    async fn a_record_names_its_keys_offset_and_the_earlier_format_still_opens() {
        let v = Vault::detached();
        let (k, rec) = key_record("profile-1", live(1));
        v.apply(&msg(&k, Some(rec)));
        v.applied.store(41, Ordering::Release);
        v.stored.store(40, Ordering::Release);
        let sealed = v.seal(&subject_hash("profile-1"), b"x").await.unwrap();
        assert_eq!(sealed[..2], SEAL_MARKER);
        assert_eq!(sealed_subject(&sealed), Some(subject_hash("profile-1")));
        assert_eq!(key_offset(&sealed), Some(41));
        v.stored.store(57, Ordering::Release);
        let later = v.seal(&subject_hash("profile-1"), b"x").await.unwrap();
        assert_eq!(key_offset(&later), Some(57));

        // A record of the earlier format: no offset, no header authenticated.
        let key = v
            .keyring
            .get(&subject_hash("profile-1"), &live(1))
            .unwrap()
            .unwrap();
        let nonce = [5u8; 12];
        let mut older = SEAL_MARKER_V1.to_vec();
        older.extend_from_slice(&sealed[2..26]);
        older.extend_from_slice(&nonce);
        older.extend(
            cipher(&key)
                .encrypt(Nonce::from_slice(&nonce), &b"x"[..])
                .unwrap(),
        );
        assert_eq!(sealed_subject(&older), Some(subject_hash("profile-1")));
        assert_eq!(key_offset(&older), None);
        assert_eq!(v.open(&older).await.unwrap(), Opened::Plain(b"x".to_vec()));
        assert_eq!(v.open(&sealed).await.unwrap(), Opened::Plain(b"x".to_vec()));
        // Too short to hold a header and a tag: plain.
        assert!(!is_sealed(&sealed[..HEADER_LEN]));
        // The header is authenticated: a record whose named offset was changed does not
        // open (the fuzzer found it opening to its plain text).
        let mut moved = sealed.clone();
        moved[30] ^= 1;
        assert_eq!(v.open(&moved).await.unwrap(), Opened::Corrupt);
    }

    #[tokio::test]
    async fn a_vault_without_a_producer_cannot_create_keys() {
        let err = Vault::detached()
            .seal(&subject_hash("new-subject"), b"x")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no producer"), "{err}");
    }

    #[test]
    fn several_keys_of_one_subject_all_count_and_malformed_records_are_skipped() {
        let v = Vault::detached();
        for id in [live(1), live(2)] {
            let (k, rec) = key_record("anon-1", id);
            v.apply(&msg(&k, Some(rec)));
        }
        v.apply(&msg("not-a-key", Some(vec![1])));
        v.apply(&msg(
            &record_key(&subject_hash("x"), &live(3)),
            Some(vec![1]),
        ));
        assert_eq!(v.keyring.len(), 2);
        assert_eq!(v.keys_of(&[subject_hash("anon-1")]).unwrap().len(), 2);
    }

    #[test]
    fn record_keys_round_trip_and_name_no_value() {
        let s = subject_hash("jane@example.com");
        let k = record_key(&s, &[0xab; 8]);
        assert!(!k.contains("jane"));
        assert_eq!(parse_record_key(k.as_bytes()), Some((s, [0xab; 8])));
        assert_eq!(parse_record_key(b"zz/00"), None);
    }

    /// The audit's finding: every visitor's key was held in every service's memory for
    /// ever. Keys are kept in the store; memory holds the subjects used lately only.
    #[tokio::test]
    async fn memory_holds_a_bounded_number_of_subjects_and_the_store_the_rest() {
        let store: SharedStore = Arc::new(MemStore::default());
        let v = Vault {
            keyring: Arc::new(Keyring::new(store.clone(), 100)),
            ..Vault::detached()
        };
        let mut sealed = Vec::new();
        for n in 0..1000 {
            let subject = format!("anon-{n}");
            let (k, rec) = key_record(&subject, live((n % 250) as u8));
            v.apply(&msg(&k, Some(rec)));
            sealed.push(v.seal(&subject_hash(&subject), b"x").await.unwrap());
        }
        assert!(
            v.cached_subjects() <= 100,
            "{} subjects in memory",
            v.cached_subjects()
        );
        for s in &sealed {
            assert_eq!(v.open(s).await.unwrap(), Opened::Plain(b"x".to_vec()));
        }
        assert!(v.cached_subjects() <= 100);
        // A vault on the same store (a restart) has every key without reading the topic.
        let again = Vault {
            keyring: Arc::new(Keyring::new(store, 100)),
            ..Vault::detached()
        };
        assert_eq!(again.keyring.len(), 1000);
        assert_eq!(
            again.open(&sealed[0]).await.unwrap(),
            Opened::Plain(b"x".to_vec())
        );
    }

    /// Keys of events expire: a key stops sealing before the records it sealed can
    /// outlive it, and once expired and swept (a tombstone) what it sealed is gone on
    /// purpose, not missing. A key for a record that stays never expires.
    #[tokio::test]
    async fn event_keys_expire_with_the_events_and_lasting_keys_do_not() {
        let today = keyring::today();
        let week = Lifetime::for_retention(7 * 86_400_000);
        let fresh = keyring::new_key_id(week.new_expiry(false, today));
        assert!(week.seals(&fresh, false, today) && !week.seals(&fresh, true, today));
        // Sealing stops when a record sealed that day could outlive the key.
        assert!(week.seals(&fresh, false, today + 7));
        assert!(!week.seals(&fresh, false, today + 8));
        let lasting = keyring::new_key_id(week.new_expiry(true, today));
        assert!(week.seals(&lasting, true, today + 10_000) && !week.seals(&lasting, false, today));
        let forever = Lifetime::for_retention(-1);
        assert!(forever.seals(&lasting, false, today));

        let v = Vault::detached();
        let mut old = live(1);
        old[..2].copy_from_slice(&(today - 1).to_be_bytes());
        let (k, rec) = key_record("anon-1", old);
        v.apply(&msg(&k, Some(rec)));
        // An expired key seals nothing (a new one would be made: this vault cannot).
        assert!(v.seal(&subject_hash("anon-1"), b"x").await.is_err());
        assert_eq!(
            v.keyring.expired(today, 10).unwrap(),
            vec![(subject_hash("anon-1"), old)]
        );
        // A record it sealed before: readable until the sweep, then shredded (not missing).
        let mut sealed = SEAL_MARKER.to_vec();
        sealed.extend_from_slice(&subject_hash("anon-1"));
        sealed.extend_from_slice(&old);
        sealed.extend_from_slice(&[0; 12 + 20]);
        assert_eq!(v.open(&sealed).await.unwrap(), Opened::Corrupt);
        v.apply(&msg(&k, None));
        assert_eq!(v.open(&sealed).await.unwrap(), Opened::Shredded);
        assert!(v.keyring.expired(today, 10).unwrap().is_empty());
        assert!(
            !v.keyring.is_erased(&subject_hash("anon-1"), &old).unwrap(),
            "a sweep is no erasure"
        );
        // A key of a later day that the topic does not hold is missing, not expired.
        let (_, _) = key_record("anon-2", live(2));
        let mut missing = sealed.clone();
        missing[2..18].copy_from_slice(&subject_hash("anon-2"));
        missing[18..26].copy_from_slice(&live(2));
        assert_eq!(v.open(&missing).await.unwrap(), Opened::Missing);
    }

    /// The audit's finding: an erasure destroyed only the keys identity held at that
    /// moment, so a key another instance made meanwhile (profiles' timer, the visitor's
    /// next event at ingest) sealed the person's data with a live key. The subject's
    /// marker erases every key of it, also one made around the erasure and read after
    /// it, and no key is made for it for a while: sealing for it is refused.
    #[tokio::test]
    async fn a_subject_marker_erases_keys_made_around_the_erasure_too() {
        let s = subject_hash("profile-1");
        let v = Vault::detached();
        let (k1, rec1) = key_record("profile-1", live(1));
        v.apply(&msg(&k1, Some(rec1)));
        let before = v.seal(&s, b"before").await.unwrap();
        // Another instance made a key a moment after the erasure, before it read the
        // marker, and sealed with it.
        let elsewhere = Vault::detached();
        let now = crate::now_ms();
        let late = SubjectKey {
            subject: hex(&s),
            key_id: hex(&live(2)),
            key: vec![9; 32],
            created_at: now + 1_000,
        };
        let k2 = record_key(&s, &live(2));
        elsewhere.apply(&msg(&k2, Some(late.to_avro().unwrap())));
        let after = elsewhere.seal(&s, b"after").await.unwrap();

        let (marker_key, marker) = Vault::subject_erasure(&s, now);
        v.apply(&msg(&marker_key, Some(marker)));
        v.apply(&msg(&k2, Some(late.to_avro().unwrap())));
        assert_eq!(v.open(&before).await.unwrap(), Opened::Shredded);
        assert_eq!(v.open(&after).await.unwrap(), Opened::Shredded);
        assert!(v.keys_of(&[s]).unwrap().is_empty());
        assert!(matches!(v.seal(&s, b"x").await, Err(Error::Erased)));
        assert!(
            v.ensure_keys(&[s], false).await.is_ok(),
            "no key is made for it"
        );

        // Long after, the subject may come back (an unsuppressed visitor) with new keys.
        let old = Vault::detached();
        let (marker_key, marker) = Vault::subject_erasure(&s, now - keyring::ERASURE_HOLD_MS - 1);
        old.apply(&msg(&marker_key, Some(marker)));
        old.apply(&msg(&k2, Some(late.to_avro().unwrap())));
        assert_eq!(
            old.open(&after).await.unwrap(),
            Opened::Plain(b"after".to_vec())
        );
    }
}
