//! Identity: the identity rules file (TOML) and the identifiers the rules take out of
//! an event.
//!
//! Byte 0 says whether the rest is a rules file or an event (JSON) read with the
//! embedded rules. Checked: no panic; every identifier taken out is already in its
//! normalised form (normalising it again changes nothing) and not blocked.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tessera_identity::rules::{DEFAULT_RULES, Rules};

fn embedded() -> &'static Rules {
    static RULES: OnceLock<Rules> = OnceLock::new();
    RULES.get_or_init(|| Rules::parse(DEFAULT_RULES, "embedded").unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if pick & 1 == 0 {
        let _ = Rules::parse(text, "fuzz");
        return;
    }
    let Ok(message) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    let rules = embedded();
    let (ids, _) = rules.extract(&message);
    for id in ids {
        assert!(!rules.is_blocked(&id.value), "a blocked value was taken");
        assert_eq!(
            rules.normalise(&id.kind, &id.value).as_deref(),
            Some(id.value.as_str()),
            "{} is not stable under normalisation",
            id.kind
        );
    }
    let _ = rules.fuzzy_fields(&message);
});
