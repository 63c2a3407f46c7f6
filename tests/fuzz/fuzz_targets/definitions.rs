//! Definition documents as the definitions API and the definitions folder take them:
//! segments, computed traits and triggers, in JSON or YAML.
//!
//! Byte 0 picks the kind (or none: found from the document) and the format. Checked:
//! no panic; a definition that is accepted builds into a definition set, and its stored
//! JSON form parses back to the same definition.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_profiles::catalog::{COMPUTED_TRAIT, Definition, DefinitionSet, SEGMENT, TRIGGER};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let kind = [None, Some(SEGMENT), Some(COMPUTED_TRAIT), Some(TRIGGER)][(pick & 3) as usize];
    let yaml = pick & 4 != 0;
    let Ok(def) = Definition::parse(text, yaml, kind) else {
        return;
    };
    let stored = def.to_json();
    let again = Definition::from_value(stored, Some(def.kind())).expect("its stored form parses");
    assert_eq!(again, def);
    let _ = DefinitionSet::build(vec![def], 1);
});
