//! Sealed records and the keys topic: a keys record (key and value) as read from
//! `privacy.keys`, and a record opened with the keys a vault holds.
//!
//! Checked: no panic; a sealed record changed anywhere never opens to its plain text
//! (it is corrupt, shredded, or no longer sealed at all and passes as it is).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_common::records::{AvroRecord, SubjectKey};
use tessera_common::message::Message;
use tessera_common::ids::subject_hash;
use tessera_common::vault::{Opened, Vault, is_sealed};

fn keys_record(key: &[u8], payload: Option<Vec<u8>>) -> Message {
    Message {
        topic: "privacy.keys".into(),
        partition: 0,
        offset: 0,
        key: Some(key.to_vec()),
        payload,
        timestamp_ms: None,
        replayed: false,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let vault = Vault::detached();
    // One real key, for subject "s", that never expires (its id's first two bytes).
    let s = subject_hash("s");
    let id = [0xff, 0xff, 7, 7, 7, 7, 7, 7];
    let key = SubjectKey {
        subject: hex(&s),
        key_id: hex(&id),
        key: vec![3; 32],
        created_at: 1,
    };
    vault.apply(&keys_record(
        format!("{}/{}", hex(&s), hex(&id)).as_bytes(),
        Some(key.to_avro().unwrap()),
    ));
    // A keys record from the input: the first byte splits key from value.
    let split = (data[0] as usize).min(data.len() - 1);
    let (rest, tail) = data[1..].split_at(split.min(data.len() - 1));
    vault.apply(&keys_record(rest, Some(tail.to_vec())));
    // Opening the input itself.
    let _ = futures::executor::block_on(vault.open(data));
    // A record sealed with the real key, with one byte changed where the input says.
    let plain = b"{\"email\":\"x@y.z\"}".to_vec();
    let sealed = futures::executor::block_on(vault.seal_lasting(&s, &plain)).unwrap();
    let at = u16::from_le_bytes([data[1], data[2]]) as usize % sealed.len();
    let mut changed = sealed.clone();
    changed[at] ^= data[3].max(1);
    match futures::executor::block_on(vault.open(&changed)).unwrap() {
        Opened::Plain(p) => {
            assert!(!is_sealed(&changed), "a changed sealed record opened");
            assert_eq!(p, changed);
        }
        Opened::Shredded | Opened::Missing | Opened::Corrupt => {}
    }
});
