//! Fuzz `policy::normalize`: the request path that policy matches on and that is forwarded
//! upstream byte for byte.
//!
//! Beyond "never panics", this checks the promises the path module makes to policy: an
//! accepted path is absolute and canonical (no empty, `.` or `..` segment), carries none of
//! the encodings that upstreams read differently, and is a fixed point of `normalize`.
//! SECURITY: a canonical form that still held `/../` or `%2F` would let a path rule be
//! sidestepped.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(out) = latchkey::policy::normalize(raw) else {
        return;
    };
    let out: &str = &out;

    assert!(out.starts_with('/'), "{raw:?} -> {out:?}: not absolute");
    assert!(!out.contains("//"), "{raw:?} -> {out:?}: empty segment");
    // Segment-wise, so a trailing "/." or "/.." is caught as well as "/./" and "/../".
    for seg in out[1..].split('/') {
        assert!(
            seg != "." && seg != "..",
            "{raw:?} -> {out:?}: dot segment {seg:?} left in"
        );
    }
    let upper = out.to_ascii_uppercase();
    for forbidden in ["%2F", "%5C", "%00"] {
        assert!(
            !upper.contains(forbidden),
            "{raw:?} -> {out:?}: {forbidden} left in"
        );
    }

    match latchkey::policy::normalize(out) {
        Ok(again) => assert_eq!(again, out, "{raw:?} -> {out:?}: not idempotent"),
        Err(e) => panic!("{raw:?} -> {out:?}: the normal form is refused: {e:?}"),
    }
});
