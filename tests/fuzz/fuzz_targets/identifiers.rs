//! Normalisation of identifier and profile text: email, phone (with the region picked by
//! byte 0), names, dates, postcodes and addresses.
//!
//! Checked: no panic, and normalising is idempotent: a stored identifier normalises to
//! itself, so a lookup of the stored form finds the same person.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_common::text;
use tessera_identity::rules::{Normalise, normalise};

const REGIONS: [phonenumber::country::Id; 4] = [
    phonenumber::country::Id::US,
    phonenumber::country::Id::GB,
    phonenumber::country::Id::DE,
    phonenumber::country::Id::JP,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(raw) = std::str::from_utf8(rest) else {
        return;
    };
    let region = REGIONS[(pick & 3) as usize];
    for how in [
        Normalise::Trim,
        Normalise::Lowercase,
        Normalise::Email,
        Normalise::Phone,
        Normalise::Name,
        Normalise::Text,
        Normalise::Date,
        Normalise::Postcode,
        Normalise::Address,
    ] {
        if let Some(once) = normalise(how, raw, region) {
            assert!(!once.is_empty(), "{how:?} gave an empty value");
            assert_eq!(
                normalise(how, &once, region).as_deref(),
                Some(once.as_str()),
                "{how:?} is not idempotent"
            );
        }
    }
    let folded = text::fold(raw, pick & 4 != 0);
    assert_eq!(text::fold(&folded, pick & 4 != 0), folded, "fold is not idempotent");
    let _ = text::normalise_address(raw);
    let _ = text::normalise_postcode(raw);
});
