//! A tracking-API request body, through the code the HTTP handler runs: Content-Encoding,
//! JSON, the batch envelope and every event's validation and normalisation.
//!
//! Byte 0 picks the endpoint and the encoding; the rest is the body. Checked: a refusal
//! is a 4xx with a code; every item of a batch is accepted or rejected once; every
//! accepted event and dead letter survives its Avro encoding unchanged.
#![no_main]
use std::io::Write;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tessera_common::records::AvroRecord;
use tessera_common::records::{DeadLetter, IngestedEvent};
use tessera_ingest::body::{Decoding, decode_body, events_of, parse_object};
use tessera_ingest::validate::{Limits, partition_key};

const ENDPOINTS: [&str; 7] = ["identify", "track", "page", "screen", "group", "alias", "batch"];
const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let endpoint = ENDPOINTS[(mode & 0x0f) as usize % ENDPOINTS.len()];
    // 0: plain; 1: the bytes as if gzip; 2: the bytes gzipped, which must come back whole.
    let (encoding, raw) = match mode >> 4 {
        1 => (Some("gzip"), body.to_vec()),
        2 => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(body).unwrap();
            (Some("x-gzip"), gz.finish().unwrap())
        }
        _ => (None, body.to_vec()),
    };
    let bytes = match decode_body(encoding, raw, LIMIT) {
        Ok(b) => b,
        Err(r) => {
            assert!(r.status.is_client_error(), "{} {}", r.status, r.code);
            assert!(mode >> 4 == 1 || body.len() > LIMIT, "{}", r.code);
            return;
        }
    };
    if mode >> 4 != 1 {
        assert_eq!(bytes, body, "decoding gave back other bytes");
    }
    let root = match parse_object(&bytes) {
        Ok(r) => r,
        Err(r) => {
            assert!(r.status.is_client_error());
            return;
        }
    };
    let items = match root.get("batch") {
        Some(Value::Array(a)) if endpoint == "batch" => a.len(),
        _ => 1,
    };
    let limits = Limits {
        max_event_bytes: 32 * 1024,
        max_depth: 32,
        max_string_bytes: 8 * 1024,
        future_tolerance_ms: 60_000,
    };
    let decoding = Decoding {
        limits: &limits,
        max_batch_events: 100,
        source: "fuzz",
        received_at: 1_700_000_000_000,
    };
    let mut admitted = None;
    let decoded = match events_of(endpoint, root, bytes.len(), &decoding, |n| {
        admitted = Some(n);
        Ok(())
    }) {
        Ok(d) => d,
        Err(r) => {
            assert!(r.status.is_client_error(), "{} {}", r.status, r.code);
            assert!(!r.reason.is_empty());
            return;
        }
    };
    assert_eq!(admitted, Some(items), "admission asked for another count");
    assert_eq!(decoded.accepted.len() + decoded.rejected.len(), items);
    assert_eq!(decoded.dead.len(), decoded.rejected.len());
    let mut indexes: Vec<u64> = decoded
        .rejected
        .iter()
        .map(|r| {
            assert!(r["error"].as_str().is_some_and(|c| !c.is_empty()), "{r}");
            r["index"].as_u64().expect("an index")
        })
        .collect();
    indexes.dedup();
    assert_eq!(indexes.len(), decoded.rejected.len(), "an item rejected twice");
    for e in &decoded.accepted {
        assert!(!e.message_id.is_empty());
        assert!(!partition_key(e).is_empty());
        assert!(e.user_id.is_some() || e.anonymous_id.is_some());
        let payload: Value = serde_json::from_str(&e.payload).expect("payload is JSON");
        assert!(payload.is_object());
        let back = IngestedEvent::from_avro(&e.to_avro().unwrap()).unwrap();
        assert_eq!(&back, e);
    }
    for d in &decoded.dead {
        let back = DeadLetter::from_avro(&d.to_avro().unwrap()).unwrap();
        assert_eq!(&back, d);
    }
});
