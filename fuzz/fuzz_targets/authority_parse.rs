//! Fuzz `Authority::parse`: the CONNECT target, the `Host` header and policy host patterns all
//! go through it, so every layer must agree on its output.
//!
//! Beyond "never panics", an accepted authority must be canonical: its `Display` parses back
//! to the same value, with or without a default port.

#![no_main]

use latchkey::authority::Authority;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Option<u16>, &str)| {
    let (default_port, s) = input;
    let Ok(a) = Authority::parse(s, default_port) else {
        return;
    };
    let shown = a.to_string();
    for port in [None, default_port] {
        match Authority::parse(&shown, port) {
            Ok(b) => assert_eq!(a, b, "{s:?} -> {shown:?} re-parses differently"),
            Err(e) => panic!("{s:?} -> {shown:?} does not re-parse: {e:?}"),
        }
    }
});
