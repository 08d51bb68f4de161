//! Fuzz `AgentPolicy::from_toml`: an operator's policy file, parsed at load and on reload.
//!
//! A bad file must come back as diagnostics, never as a panic: a panic on reload would take
//! down the proxy instead of keeping the old policy. Every diagnostic must say something,
//! since it is all the operator sees.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let file = Path::new("policies/fuzz.toml");
    if let Err(diags) = latchkey::policy::AgentPolicy::from_toml(file, text) {
        assert!(!diags.is_empty(), "{text:?}: refused without a diagnostic");
        for d in &diags {
            assert!(
                !d.to_string().is_empty(),
                "{text:?}: empty diagnostic {d:?}"
            );
            assert!(
                !d.message.trim().is_empty(),
                "{text:?}: diagnostic without a message: {d:?}"
            );
        }
    }
});
