//! Configuration as an operator writes it (TOML), above all the destinations: kinds,
//! fields, consent, frequency caps and labels.
//!
//! Checked: no panic; a configuration that loads gives every destination a policy.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_activation::policy::Destination;
use tessera_common::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // In demo mode, which holds a pseudonym secret: without one no configuration loads.
    let Ok(config) = Config::parse(&format!("demo = true\n{text}")) else {
        return;
    };
    for d in config.activation.destinations {
        let _ = Destination::new(d, "fuzz".into());
    }
});
