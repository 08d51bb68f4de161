//! Fuzz `inject::strip_request_trailers`: whatever names and values an agent puts in the
//! trailers of its request, none of what the head filter removes survives (its credential,
//! the latchkey token, `Host`, the route's injected header, `x-latchkey-*`, hop-by-hop fields
//! and the fields named in `Connection`), nor a framing field, and nothing else is touched.

#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use latchkey::inject::strip_request_trailers;
use libfuzzer_sys::fuzz_target;

/// Names that must never reach the upstream in a trailer.
const FORBIDDEN: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "host",
    "x-api-key",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "content-length",
    "content-encoding",
    "content-type",
    "expect",
];

fuzz_target!(|fields: Vec<(&str, &[u8])>| {
    let mut trailers = HeaderMap::new();
    for (name, value) in fields {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        trailers.append(name, value);
    }
    let listed: Vec<String> = trailers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let before = trailers.clone();
    let injected = HeaderName::from_static("x-api-key");
    strip_request_trailers(&mut trailers, Some(&injected));
    for name in trailers.keys() {
        let n = name.as_str();
        assert!(!FORBIDDEN.contains(&n), "{n} survived");
        assert!(!n.starts_with("proxy-") && !n.starts_with("x-latchkey-"), "{n} survived");
        assert!(!listed.iter().any(|l| l == n), "{n} was named in Connection");
        // What is kept is kept whole, values and order.
        let kept: Vec<_> = trailers.get_all(name).iter().collect();
        let orig: Vec<_> = before.get_all(name).iter().collect();
        assert_eq!(kept, orig, "{n} was altered");
    }
});
