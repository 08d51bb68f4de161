//! Fuzz redaction: a credential-like secret in any of the forms `redact::encoded_forms` builds,
//! surrounded by arbitrary bytes, never survives `Needles::redact`, in that form or any other.
//!
//! Secrets are drawn from the token alphabet ([A-Za-z0-9_-], at least 8 bytes), as real API
//! keys are; a "secret" made of the replacement text's own characters could be rebuilt by the
//! replacement itself, which is no leak of anything the upstream sent.

#![no_main]

use latchkey::redact::{encoded_forms, Needles};
use libfuzzer_sys::fuzz_target;

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";

fuzz_target!(|input: (Vec<u8>, u8, Vec<u8>, Vec<u8>)| {
    let (raw, which, prefix, suffix) = input;
    let secret: Vec<u8> = raw
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()])
        .take(64)
        .collect();
    if secret.len() < 8 {
        return;
    }
    let forms = encoded_forms(&secret);
    let Some(needles) = Needles::new(forms.clone()) else {
        return;
    };
    let form = &forms[usize::from(which) % forms.len()];
    let mut data = prefix;
    data.extend_from_slice(form);
    data.extend_from_slice(&suffix);
    let out = needles.redact(&data).expect("the secret was in the input");
    for f in &forms {
        assert!(
            !out.windows(f.len()).any(|w| w == f.as_slice()),
            "a form of the secret survived redaction"
        );
    }
});
