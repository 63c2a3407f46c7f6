//! Records as they are read from topics: every record type's Avro single-object
//! decoder, and the activation record's JSON form.
//!
//! Byte 0 picks the record type and whether the rest follows that type's own header (so
//! the datum decoder itself is reached, not only the header check). Checked: no panic,
//! and a record that decodes encodes back to the same record (compared as encoded).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_common::avro::MARKER;
use tessera_common::records::*;

fn check<T: AvroRecord>(bytes: &[u8], framed: bool) {
    let mut input = Vec::with_capacity(bytes.len() + 10);
    if framed {
        input.extend_from_slice(&MARKER);
        input.extend_from_slice(T::codec().fingerprint());
    }
    input.extend_from_slice(bytes);
    if let Ok(record) = T::from_avro(&input) {
        let bytes = record.to_avro().expect("a decoded record encodes");
        let again = T::from_avro(&bytes).expect("an encoded record decodes");
        // Compared as encoded: a float may be NaN, which equals nothing.
        assert_eq!(again.to_avro().unwrap(), bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let framed = pick & 0x80 != 0;
    match pick & 0x7f {
        0 => check::<IngestedEvent>(bytes, framed),
        1 => check::<ResolvedEvent>(bytes, framed),
        2 => check::<DeadLetter>(bytes, framed),
        3 => check::<ProfileMerge>(bytes, framed),
        4 => check::<ProfileSplit>(bytes, framed),
        5 => check::<IdentityCommand>(bytes, framed),
        6 => check::<ProfileTransfer>(bytes, framed),
        7 => check::<MembershipChange>(bytes, framed),
        8 => check::<TriggerFired>(bytes, framed),
        9 => check::<DefinitionChange>(bytes, framed),
        10 => check::<Activation>(bytes, framed),
        11 => check::<AuditEntry>(bytes, framed),
        12 => check::<SubjectKey>(bytes, framed),
        13 => check::<PrivacyAction>(bytes, framed),
        14 => check::<PrivacyReport>(bytes, framed),
        15 => check::<Suppression>(bytes, framed),
        _ => {
            // The activation record's JSON form, as a consumer of a JSON destination reads it.
            if let Ok(a) = Activation::decode(bytes)
                && let Ok(json) = a.to_json()
            {
                assert_eq!(Activation::decode(&json).expect("its own JSON decodes"), a);
            }
        }
    }
});
