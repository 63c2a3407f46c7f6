//! Crypto-shredding: how a person is erased from topics, which are logs.
//!
//! Every record that carries a person's data is **sealed** with a key of its *subject*:
//! the ingest subject of an event (a hash of its anonymousId or userId), the profile id
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
//! has its own id, so none is lost.
//!
//! A sealed record: `C3 5E` | subject hash (16 bytes) | key id (8) | nonce (12) |
//! AES-256-GCM ciphertext and tag of the plain record. Anything else is plain.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::kafka::{Producer, consumer_config};
use crate::records::{AvroRecord, SubjectKey};
use crate::runner::Message;
use crate::{Error, Result};

pub const SEAL_MARKER: [u8; 2] = [0xC3, 0x5E];
const HEADER_LEN: usize = 2 + 16 + 8 + 12;

/// A subject's name on the keys topic and in sealed records.
pub type SubjectHash = [u8; 16];

/// A keyed hash ([`crate::ids::keyed_hash`]): the keys topic's record keys and a sealed
/// record's header name the subject, and nobody without the pseudonym secret can tell
/// whose key it is by hashing a list of ids.
pub fn subject_hash(subject: &str) -> SubjectHash {
    crate::ids::keyed_hash("subject-key", &[subject])[..16]
        .try_into()
        .expect("16 bytes")
}

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

pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.len() > HEADER_LEN && bytes[..2] == SEAL_MARKER
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

/// Keys are kept as their 32 bytes (about 90 bytes per key with the map) and expanded
/// for each use: a million people hold two million keys.
#[derive(Default)]
struct Keys {
    by_subject: HashMap<SubjectHash, Vec<(KeyId, [u8; 32])>>,
    /// Keys whose erasure was seen (about 24 bytes each: erasures are rare).
    erased: HashSet<(SubjectHash, KeyId)>,
    /// The fingerprint of the pseudonym secret the deployment's ids were made with
    /// ([`SECRET_RECORD_KEY`]).
    secret_fingerprint: Option<String>,
}

/// The keys topic's record of the deployment's pseudonym secret: its fingerprint
/// ([`crate::ids::secret_fingerprint`]), written by the first service that starts, checked
/// by every later one. A subject hash is hex, so it cannot be mistaken for one.
const SECRET_RECORD_KEY: &str = "~pseudonym-secret";

/// A key's id: random, so instances creating keys for one subject at once never collide.
type KeyId = [u8; 8];

impl Keys {
    fn get(&self, s: &SubjectHash, id: &[u8; 8]) -> Option<Aes256Gcm> {
        self.by_subject
            .get(s)?
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, key)| cipher(key))
    }
}

fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new_from_slice(key).expect("32-byte key")
}

/// The keyring of one service instance: follows `privacy.keys`, creates keys for new
/// subjects, seals and opens records.
pub struct Vault {
    topic: String,
    producer: Option<Arc<Producer>>,
    keys: Arc<RwLock<Keys>>,
    /// The next offset of the keys topic not applied yet.
    applied: Arc<AtomicI64>,
    /// Asks the broker where the keys topic ends (`None`: a vault of fixed keys).
    watermarks: Option<std::sync::Mutex<BaseConsumer>>,
}

impl Vault {
    /// Reads the whole keys topic, then keeps following it until `shutdown`. With a
    /// producer the vault can create keys (seal); without, it only opens.
    pub async fn follow(
        kafka: &KafkaConfig,
        topic: String,
        client_id: &str,
        producer: Option<Arc<Producer>>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Vault>> {
        let keys: Arc<RwLock<Keys>> = Arc::default();
        let applied = Arc::new(AtomicI64::new(0));
        let (k, a) = (keys.clone(), applied.clone());
        crate::table::follow(
            kafka,
            &topic,
            &format!("{client_id}-keys"),
            move |m: &Message| {
                apply(&k, m);
                a.store(m.offset + 1, Ordering::Release);
            },
            shutdown,
        )
        .await?;
        let watermarks: BaseConsumer =
            consumer_config(kafka, client_id, &format!("{client_id}-keys-watermarks")).create()?;
        Ok(Arc::new(Vault {
            topic,
            producer,
            keys,
            applied,
            watermarks: Some(std::sync::Mutex::new(watermarks)),
        }))
    }

    /// Seals `plain` with a key of subject `s`, creating (and storing on the keys
    /// topic, acknowledged) one if the subject has none yet.
    pub async fn seal(&self, s: &SubjectHash, plain: &[u8]) -> Result<Vec<u8>> {
        if let Some(sealed) = self.seal_known(s, plain)? {
            return Ok(sealed);
        }
        self.ensure_keys(&[*s]).await?;
        Ok(self.seal_known(s, plain)?.expect("the key was just added"))
    }

    /// Gives every subject that has none a key, all stored at once (one round trip to
    /// the broker however many there are).
    pub async fn ensure_keys(&self, subjects: &[SubjectHash]) -> Result<()> {
        let missing: std::collections::BTreeSet<SubjectHash> = {
            let keys = self.keys.read().expect("keys lock");
            subjects
                .iter()
                .filter(|s| !keys.by_subject.contains_key(*s))
                .copied()
                .collect()
        };
        let created = futures::future::join_all(missing.iter().map(|s| self.create_key(s))).await;
        created.into_iter().collect()
    }

    async fn create_key(&self, s: &SubjectHash) -> Result<()> {
        let s = *s;
        let producer = self.producer.as_ref().ok_or_else(|| {
            Error::Invalid("this vault only opens records: it has no producer".into())
        })?;
        let key: [u8; 32] = rand::random();
        let key_id: [u8; 8] = rand::random();
        let record = SubjectKey {
            subject: hex(&s),
            key_id: hex(&key_id),
            key: key.to_vec(),
            created_at: crate::now_ms(),
        };
        producer
            .send(
                &self.topic,
                record_key(&s, &key_id).as_bytes(),
                &record.to_avro()?,
            )
            .await
            .map_err(|e| Error::Invalid(format!("the subject key was not stored: {e}")))?;
        self.keys
            .write()
            .expect("keys lock")
            .by_subject
            .entry(s)
            .or_default()
            .push((key_id, key));
        Ok(())
    }

    fn seal_known(&self, s: &SubjectHash, plain: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some((key_id, key)) = self
            .keys
            .read()
            .expect("keys lock")
            .by_subject
            .get(s)
            .and_then(|v| v.first().copied())
        else {
            return Ok(None);
        };
        let nonce: [u8; 12] = rand::random();
        let ct = cipher(&key)
            .encrypt(Nonce::from_slice(&nonce), plain)
            .map_err(|e| Error::Invalid(format!("sealing failed: {e}")))?;
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
        out.extend_from_slice(&SEAL_MARKER);
        out.extend_from_slice(s);
        out.extend_from_slice(&key_id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(Some(out))
    }

    /// A vault that follows no topic: it holds the keys records [`apply`](Self::apply)
    /// hands it, and only opens (tools, tests and fuzzing).
    pub fn detached() -> Vault {
        Vault {
            topic: String::new(),
            producer: None,
            keys: Arc::default(),
            applied: Arc::default(),
            watermarks: None,
        }
    }

    /// Checks that this process's pseudonym secret is the deployment's (the one its ids
    /// were made with, recorded on the keys topic), recording it if the deployment has
    /// none yet. Another secret would name every person differently: their keys, their
    /// profiles, their erasure.
    pub async fn check_secret(&self) -> Result<()> {
        let mine = crate::ids::secret_fingerprint();
        let recorded = || {
            self.keys
                .read()
                .expect("keys lock")
                .secret_fingerprint
                .clone()
        };
        if recorded().is_none() {
            let producer = self.producer.as_ref().ok_or_else(|| {
                Error::Invalid("this vault only opens records: it has no producer".into())
            })?;
            producer
                .send(&self.topic, SECRET_RECORD_KEY.as_bytes(), mine.as_bytes())
                .await
                .map_err(|e| {
                    Error::Invalid(format!("the secret's fingerprint was not stored: {e}"))
                })?;
            // Read it back: of instances starting at once with different secrets, the
            // last record wins and the others refuse to start.
            self.catch_up().await?;
        }
        if recorded().as_deref() == Some(mine.as_str()) {
            return Ok(());
        }
        Err(Error::Config(
            "privacy.pseudonym_secret is not the one this deployment's ids were made with \
             (the keys topic records its fingerprint): every service must use the same \
             secret, and it never changes"
                .into(),
        ))
    }

    /// Takes in one record of the keys topic (a key, or a tombstone that destroys one).
    pub fn apply(&self, m: &Message) {
        apply(&self.keys, m)
    }

    /// Opens a record without waiting: `None` when it is sealed with a key this vault
    /// has not seen (yet, or any more).
    fn try_open(&self, bytes: &[u8]) -> Option<Opened> {
        if !is_sealed(bytes) {
            return Some(Opened::Plain(bytes.to_vec()));
        }
        let s: SubjectHash = bytes[2..18].try_into().expect("16 bytes");
        let id: [u8; 8] = bytes[18..26].try_into().expect("8 bytes");
        let cipher = {
            let keys = self.keys.read().expect("keys lock");
            match keys.get(&s, &id) {
                Some(c) => c,
                None if keys.erased.contains(&(s, id)) => return Some(Opened::Shredded),
                None => return None,
            }
        };
        Some(
            match cipher.decrypt(
                Nonce::from_slice(&bytes[26..HEADER_LEN]),
                &bytes[HEADER_LEN..],
            ) {
                Ok(p) => Opened::Plain(p),
                Err(_) => Opened::Corrupt,
            },
        )
    }

    /// Opens a record. A key not seen yet may be on its way (it is stored before any
    /// record sealed with it): the vault first reads the keys topic up to its end; a key
    /// neither held nor erased then is missing. An error means the keys topic could not
    /// be read: try again.
    pub async fn open(&self, bytes: &[u8]) -> Result<Opened> {
        if let Some(o) = self.try_open(bytes) {
            return Ok(o);
        }
        self.catch_up().await?;
        Ok(self.try_open(bytes).unwrap_or(Opened::Missing))
    }

    /// Waits until every key stored so far has been read.
    pub async fn catch_up(&self) -> Result<()> {
        let Some(watermarks) = &self.watermarks else {
            return Ok(());
        };
        let (low, high) = {
            let c = watermarks.lock().expect("watermarks lock");
            c.fetch_watermarks(&self.topic, 0, Duration::from_secs(10))?
        };
        // Records below the first offset are gone (deleted or truncated): there is
        // nothing to wait for there.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.applied.load(Ordering::Acquire).max(low) < high {
            if Instant::now() > deadline {
                return Err(Error::Invalid(
                    "the keys topic was not read to its end within 10 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// The record that erases one key (named by its record key on the keys topic, as
    /// [`Vault::keys_of`] gives it): the key's own record key with no key bytes. Unlike
    /// a tombstone, compaction keeps it, so every vault, now and after any restart,
    /// tells an erased key from a missing one.
    pub fn erasure_record(record_key: &str) -> Result<Vec<u8>> {
        let (s, id) = parse_record_key(record_key.as_bytes())
            .ok_or_else(|| Error::Invalid("not a subject key's record key".into()))?;
        SubjectKey {
            subject: hex(&s),
            key_id: hex(&id),
            key: Vec::new(),
            created_at: crate::now_ms(),
        }
        .to_avro()
    }

    /// The keys topic's record keys of every key of these subjects: what to erase.
    /// Call after [`Vault::catch_up`] to include keys created elsewhere.
    pub fn keys_of(&self, subjects: &[SubjectHash]) -> Vec<String> {
        let keys = self.keys.read().expect("keys lock");
        subjects
            .iter()
            .flat_map(|s| {
                keys.by_subject
                    .get(s)
                    .into_iter()
                    .flatten()
                    .map(move |(id, _)| record_key(s, id))
            })
            .collect()
    }

    /// How many keys this instance holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        let keys = self.keys.read().expect("keys lock");
        keys.by_subject.values().map(Vec::len).sum()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn apply(keys: &RwLock<Keys>, m: &Message) {
    if m.key.as_deref() == Some(SECRET_RECORD_KEY.as_bytes()) {
        let fingerprint = m
            .payload
            .as_deref()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        keys.write().expect("keys lock").secret_fingerprint = fingerprint;
        return;
    }
    let Some((s, id)) = m.key.as_deref().and_then(parse_record_key) else {
        tracing::warn!(
            offset = m.offset,
            "a keys record with a malformed key, skipped"
        );
        return;
    };
    let mut keys = keys.write().expect("keys lock");
    let record = match m.payload.as_deref() {
        // A tombstone (an erasure before erasure markers): the key is destroyed.
        None | Some([]) => None,
        Some(bytes) => match SubjectKey::from_avro(bytes) {
            Ok(r) => Some(r.key),
            Err(_) => {
                tracing::warn!(offset = m.offset, "an unreadable keys record, skipped");
                return;
            }
        },
    };
    match record.as_deref().map(<[u8; 32]>::try_from) {
        Some(Ok(key)) if !keys.erased.contains(&(s, id)) => {
            let v = keys.by_subject.entry(s).or_default();
            if !v.iter().any(|(k, _)| *k == id) {
                v.push((id, key));
            }
        }
        Some(Ok(_)) => {}
        // An erasure marker (no key bytes) or a tombstone.
        Some(Err(_)) | None => {
            if record.as_deref().is_some_and(|k| !k.is_empty()) {
                tracing::warn!(
                    offset = m.offset,
                    "a keys record with a malformed key, skipped"
                );
                return;
            }
            if let Some(v) = keys.by_subject.get_mut(&s) {
                v.retain(|(k, _)| *k != id);
                if v.is_empty() {
                    keys.by_subject.remove(&s);
                }
            }
            keys.erased.insert((s, id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(key: &str, payload: Option<Vec<u8>>) -> Message {
        Message {
            topic: "k".into(),
            partition: 0,
            offset: 0,
            key: Some(key.as_bytes().to_vec()),
            payload,
            timestamp_ms: None,
        }
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
        let (k, rec) = key_record("profile-1", [1; 8]);
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
        assert_eq!(v.keys_of(&[subject_hash("profile-1")]), vec![k.clone()]);
        v.apply(&msg(&k, Some(Vault::erasure_record(&k).unwrap())));
        assert_eq!(v.open(&sealed).await.unwrap(), Opened::Shredded);
        assert!(v.is_empty());
    }

    /// The audit's finding: losing the keys topic (or a keys topic cleaned by retention)
    /// made every record "shredded": counted, skipped, offsets moved on. A key that was
    /// erased and a key that is missing are told apart, after a restart too.
    #[tokio::test]
    async fn a_missing_key_is_not_an_erased_one() {
        let v = Vault::detached();
        let (k1, rec1) = key_record("profile-1", [1; 8]);
        let (k2, rec2) = key_record("profile-2", [2; 8]);
        let (k3, rec3) = key_record("profile-3", [3; 8]);
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
        compacted.apply(&msg(&k1, Some(key_record("profile-1", [1; 8]).1)));
        assert_eq!(compacted.open(&one).await.unwrap(), Opened::Shredded);
        assert!(Vault::erasure_record("not-a-key").is_err());
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
        for id in [[1; 8], [2; 8]] {
            let (k, rec) = key_record("anon-1", id);
            v.apply(&msg(&k, Some(rec)));
        }
        v.apply(&msg("not-a-key", Some(vec![1])));
        v.apply(&msg(
            &record_key(&subject_hash("x"), &[3; 8]),
            Some(vec![1]),
        ));
        assert_eq!(v.len(), 2);
        assert_eq!(v.keys_of(&[subject_hash("anon-1")]).len(), 2);
    }

    #[test]
    fn record_keys_round_trip_and_name_no_value() {
        let s = subject_hash("jane@example.com");
        let k = record_key(&s, &[0xab; 8]);
        assert!(!k.contains("jane"));
        assert_eq!(parse_record_key(k.as_bytes()), Some((s, [0xab; 8])));
        assert_eq!(parse_record_key(b"zz/00"), None);
    }
}
