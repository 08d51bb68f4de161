//! Fuzz the agent's credentials: `token_from_header` on arbitrary `Proxy-Authorization`
//! bytes, then `TokenKeys::verify` on whatever came out and on the raw text.
//!
//! SECURITY: nothing the fuzzer makes up can carry a valid EdDSA signature from a key it never
//! saw, so `verify` must refuse every input; an `Ok` here is an authentication bypass.

#![no_main]

use std::sync::OnceLock;

use http::HeaderValue;
use latchkey::auth::{token_from_header, TokenKeys};
use latchkey::deny::AuthStage;
use libfuzzer_sys::fuzz_target;

/// One key pair for the whole run: creating it per input would fuzz key generation instead.
fn keys() -> &'static TokenKeys {
    static KEYS: OnceLock<TokenKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir for the fuzz key pair");
        // The keys live in memory once loaded; the dir is removed when `dir` drops.
        TokenKeys::load_or_create(dir.path()).expect("a fresh key pair in an empty dir")
    })
}

/// `verify` must refuse `token` at both stages.
fn assert_refused(token: &str) {
    for stage in [AuthStage::Proxy, AuthStage::Tunnel] {
        if let Ok(claims) = keys().verify(token, stage) {
            panic!("forged token {token:?} accepted: {claims:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = HeaderValue::from_bytes(data) {
        if let Ok(token) = token_from_header(Some(&value)) {
            assert!(!token.is_empty(), "{data:?}: empty token extracted");
            assert_refused(&token);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        assert_refused(text);
    }
});
