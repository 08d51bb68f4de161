//! Put the real credential on an allowed request, after removing everything the agent sent
//! that could carry a credential of its own or confuse the upstream about framing.
//!
//! Only a policy `Allowed` can reach `apply`; the secret value lives here for the time it
//! takes to build one header or query parameter, in zeroizing buffers.

use std::sync::Arc;

use base64::Engine;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Uri, Version};
use zeroize::Zeroizing;

use crate::authority::Authority;
use crate::deny::Deny;
use crate::policy::{Allowed, Inject, Route, Scheme};
use crate::redact::{self, Needles};
use crate::secrets::Secret;

/// Hop-by-hop headers (RFC 9110 section 7.6.1) plus the legacy `proxy-connection`.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// Prefix of latchkey's own headers; never accepted from either side.
const OWN_PREFIX: &str = "x-latchkey-";

/// Remove from an agent's request: hop-by-hop headers and those named in `Connection`, every
/// `Proxy-*` header (the latchkey token travels there), `Authorization`, the header the route
/// injects, `Host` (rebuilt from the checked authority) and latchkey's own headers.
pub fn strip_request_headers(headers: &mut HeaderMap, injected: Option<&HeaderName>) {
    remove_connection_listed(headers);
    // `te: trailers` is the one TE value HTTP/2 permits (gRPC needs it); anything else goes.
    let keep_te = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in &HOP_BY_HOP {
        if *name == header::TE && keep_te {
            continue;
        }
        headers.remove(name);
    }
    // SECURITY: the agent may not bring its own credential; the only one upstream sees is ours.
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::HOST);
    if let Some(name) = injected {
        headers.remove(name);
    }
    remove_prefixed(headers);
}

/// Fields an agent may never send as a trailer, beyond what [`strip_request_headers`] removes:
/// framing and the fields an upstream must know before the body (RFC 9110 section 6.5.1). An
/// upstream that merges trailers into the head would otherwise let a trailer re-frame or
/// re-describe a body that has already been read.
const NOT_IN_TRAILERS: [HeaderName; 7] = [
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::CONTENT_TYPE,
    header::EXPECT,
    header::MAX_FORWARDS,
    header::TE,
];

/// Remove from the trailers of an agent's request everything [`strip_request_headers`]
/// removes from its head, and every field in [`NOT_IN_TRAILERS`] (`te: trailers` included);
/// what is left (checksums, `grpc-*`, application fields) goes upstream.
pub fn strip_request_trailers(trailers: &mut HeaderMap, injected: Option<&HeaderName>) {
    // SECURITY: the head filter alone would let a chunked HTTP/1.1 or HTTP/2 request carry
    // `Authorization`, the latchkey token or `Host` to an HTTP/2 upstream after its body.
    strip_request_headers(trailers, injected);
    for name in &NOT_IN_TRAILERS {
        trailers.remove(name);
    }
}

/// Remove from an upstream response: hop-by-hop headers, `Proxy-*` (an upstream must not make the
/// agent believe the proxy asked for credentials) and `x-latchkey-*` (no spoofed proxy verdicts).
pub fn strip_response_headers(headers: &mut HeaderMap) {
    remove_connection_listed(headers);
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    remove_prefixed(headers);
}

fn remove_connection_listed(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
}

fn remove_prefixed(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-") || k.as_str().starts_with(OWN_PREFIX))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// What `apply` put on the request, for the response side.
#[derive(Debug, Default)]
pub struct Injected {
    /// The credential as it can appear in a response (raw, percent-encoded, as sent), for
    /// redaction; `None` when the route injects nothing.
    pub needles: Option<Arc<Needles>>,
    /// The header the route injects, if it injects one: removed from the agent's trailers
    /// too ([`strip_request_trailers`]).
    pub header: Option<HeaderName>,
}

/// The facts an allowed request is rewritten from: where it goes (the checked scheme and
/// authority, the normalised path policy matched, the agent's raw query) and the route that
/// allowed it.
#[derive(Debug, Clone, Copy)]
pub struct Rewrite<'a> {
    /// `http` or `https` upstream.
    pub scheme: Scheme,
    /// The checked authority (CONNECT target or absolute-form host).
    pub authority: &'a Authority,
    /// The normalised path that policy matched.
    pub path: &'a str,
    /// The agent's raw query string, if any.
    pub query: Option<&'a str>,
    /// The route that allowed the request.
    pub allowed: &'a Allowed,
}

/// The header a route injects into, if it injects a header: the agent's copy is removed from
/// its head and its trailers ([`strip_request_trailers`]).
pub fn injected_header(route: &Route) -> Option<&HeaderName> {
    match route.inject() {
        Some(Inject::Header { name, .. }) => Some(name),
        _ => None,
    }
}

/// Rewrite an allowed request for the upstream: absolute URI from the checked authority and the
/// normalised path (so the upstream sees exactly what policy matched), stripped headers, and the
/// route's credential value (`secret`, from the `static` kind or a minted token) in the route's
/// inject form. A route without a credential passes `None`.
pub fn apply(
    parts: &mut Parts,
    rewrite: &Rewrite<'_>,
    secret: Option<Arc<Secret>>,
    cache: &PreparedCache,
) -> Result<Injected, Deny> {
    let route = rewrite.allowed.route();
    let prepared = match (route.credential(), secret) {
        (Some(_), Some(secret)) => Some(cache.get(route, &secret)?),
        // SECURITY: a credentialed route never goes out without its credential.
        (Some(name), None) => return Err(Deny::SecretUnavailable(name.to_owned())),
        (None, _) => None,
    };
    rewrite_head(parts, rewrite, prepared.as_deref())?;
    let header = injected_header(route).cloned();
    let Some(prepared) = prepared else {
        return Ok(Injected {
            needles: None,
            header,
        });
    };
    if let Some((name, value)) = &prepared.header {
        parts.headers.insert(name.clone(), value.clone());
    }
    parts.headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    Ok(Injected {
        needles: prepared.needles.clone(),
        header,
    })
}

/// Strip the agent's credentials and rebuild the target, putting nothing on: for kinds that
/// sign the finished request themselves (their own headers go on afterwards).
pub fn rebuild(parts: &mut Parts, rewrite: &Rewrite<'_>) -> Result<(), Deny> {
    rewrite_head(parts, rewrite, None)
}

fn rewrite_head(
    parts: &mut Parts,
    rewrite: &Rewrite<'_>,
    prepared: Option<&Prepared>,
) -> Result<(), Deny> {
    let Rewrite {
        scheme,
        authority,
        path,
        query,
        allowed,
    } = *rewrite;
    let route = allowed.route();
    let inject = route.inject();
    strip_request_headers(&mut parts.headers, injected_header(route));

    let scheme_str = match scheme {
        Scheme::Https => "https",
        Scheme::Http => "http",
    };
    let mut target = Zeroizing::new(String::with_capacity(
        scheme_str.len() + 3 + 64 + path.len() + query.map_or(0, str::len) + 64,
    ));
    target.push_str(scheme_str);
    target.push_str("://");
    authority.push_text(&mut target);
    target.push_str(path);

    match (inject, prepared) {
        (Some(Inject::Query { name }), Some(prepared)) => {
            target.push('?');
            let kept = push_query_without(&mut target, query.unwrap_or(""), name);
            if kept {
                target.push('&');
            }
            target.push_str(name);
            target.push('=');
            target.push_str(&prepared.query_value);
        }
        _ => {
            if let Some(q) = query {
                target.push('?');
                target.push_str(q);
            }
        }
    }
    parts.uri = Uri::try_from(target.as_str())
        .map_err(|_| Deny::BadRequest("the request target cannot be rebuilt".into()))?;
    parts.version = Version::HTTP_11;
    Ok(())
}

/// Header value, query value and redaction needles of one credential value on one route,
/// built once and reused while neither changes.
pub struct Prepared {
    header: Option<(HeaderName, HeaderValue)>,
    query_value: Zeroizing<String>,
    needles: Option<Arc<Needles>>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepared([redacted])")
    }
}

impl Prepared {
    fn build(route: &Route, secret: &Secret) -> Result<Prepared, Deny> {
        let mut query_value = Zeroizing::new(String::new());
        encode_component(secret.expose(), &mut query_value);
        let mut needles = redact::encoded_forms(secret.expose());
        needles.push(Zeroizing::new(query_value.as_bytes().to_vec()));
        let header = match route.inject() {
            Some(Inject::Header {
                name,
                prefix,
                suffix,
            }) => {
                let mut value = Zeroizing::new(Vec::with_capacity(
                    prefix.len() + secret.len() + suffix.len(),
                ));
                value.extend_from_slice(prefix.as_bytes());
                value.extend_from_slice(secret.expose());
                value.extend_from_slice(suffix.as_bytes());
                Some((name.clone(), sensitive_value(&value, route.credential())?))
            }
            Some(Inject::BasicUser { user }) => {
                let mut pair = Zeroizing::new(Vec::with_capacity(user.len() + 1 + secret.len()));
                pair.extend_from_slice(user.as_bytes());
                pair.push(b':');
                pair.extend_from_slice(secret.expose());
                let encoded =
                    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*pair));
                needles.push(Zeroizing::new(encoded.as_bytes().to_vec()));
                let mut value = Zeroizing::new(b"Basic ".to_vec());
                value.extend_from_slice(encoded.as_bytes());
                Some((
                    header::AUTHORIZATION,
                    sensitive_value(&value, route.credential())?,
                ))
            }
            _ => None,
        };
        Ok(Prepared {
            header,
            query_value,
            needles: Needles::new(needles),
        })
    }
}

/// Prebuilt injections per route, valid while the route's secret value is the same `Arc`
/// (the stores hand out the same `Arc<Secret>` until the value changes). Cleared on policy
/// reload so retired routes do not linger.
#[derive(Default)]
pub struct PreparedCache {
    entries: dashmap::DashMap<usize, PreparedEntry>,
}

/// A cache entry: valid while both `Arc`s are the ones the request holds.
type PreparedEntry = (Arc<Route>, Arc<Secret>, Arc<Prepared>);

impl PreparedCache {
    fn get(&self, route: &Arc<Route>, secret: &Arc<Secret>) -> Result<Arc<Prepared>, Deny> {
        let key = Arc::as_ptr(route) as usize;
        if let Some(entry) = self.entries.get(&key) {
            if Arc::ptr_eq(&entry.0, route) && Arc::ptr_eq(&entry.1, secret) {
                return Ok(entry.2.clone());
            }
        }
        let prepared = Arc::new(Prepared::build(route, secret)?);
        self.entries
            .insert(key, (route.clone(), secret.clone(), prepared.clone()));
        Ok(prepared)
    }

    /// Forget everything (after a policy reload).
    pub fn clear(&self) {
        self.entries.clear();
    }
}

fn sensitive_value(bytes: &[u8], credential: Option<&str>) -> Result<HeaderValue, Deny> {
    // SECURITY: a secret with CR/LF or other control bytes would split headers; refuse it
    // rather than inject it, and never echo it.
    let mut v = HeaderValue::from_bytes(bytes).map_err(|_| {
        Deny::SecretUnavailable(format!(
            "{} (its value is not valid in an HTTP header)",
            credential.unwrap_or("?")
        ))
    })?;
    // Keeps the value out of HPACK tables and out of `Debug` output.
    v.set_sensitive(true);
    Ok(v)
}

/// Append the agent's `query` to `out` without any parameter named `name`; true if anything
/// was kept. Each kept parameter keeps the separator that preceded it.
///
/// SECURITY: the agent's own copy of the parameter we inject is dropped in any encoding and
/// any case (`API_KEY`, `api%5Fkey`), and whichever separator introduces it: some upstreams
/// split on `;` as well as `&` and read the first copy, so `q=1;api_key=X` must not keep X.
fn push_query_without(out: &mut String, query: &str, name: &str) -> bool {
    let mut kept = false;
    // The separator in front of the pair being looked at.
    let mut sep = None;
    let mut rest = query;
    loop {
        let (pair, tail) = rest.split_at(rest.find(['&', ';']).unwrap_or(rest.len()));
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if !pair.is_empty() && !decode_component(key).eq_ignore_ascii_case(name.as_bytes()) {
            if let (true, Some(sep)) = (kept, sep) {
                out.push(sep);
            }
            out.push_str(pair);
            kept = true;
        }
        let mut tail = tail.chars();
        match tail.next() {
            Some(c) => sep = Some(c),
            None => return kept,
        }
        rest = tail.as_str();
    }
}

/// Percent-encode every byte outside RFC 3986 unreserved characters.
fn encode_component(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// Decode `%XX` and `+` in a query component (invalid escapes stay literal).
pub(crate) fn decode_component(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_credentials_and_hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer agent-own"),
        );
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("proxy-foo", HeaderValue::from_static("1"));
        h.insert("connection", HeaderValue::from_static("close, x-drop-me"));
        h.insert("x-drop-me", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-api-key", HeaderValue::from_static("agent-key"));
        h.insert("x-latchkey-request-id", HeaderValue::from_static("spoof"));
        h.insert("host", HeaderValue::from_static("evil.test"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_request_headers(&mut h, Some(&HeaderName::from_static("x-api-key")));
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"]);
    }

    #[test]
    fn trailers_lose_what_the_head_loses_and_framing_fields_but_keep_checksums() {
        let mut t = HeaderMap::new();
        t.insert(
            "authorization",
            HeaderValue::from_static("Bearer agent-own"),
        );
        t.insert(
            "proxy-authorization",
            HeaderValue::from_static("Bearer tok"),
        );
        t.insert("host", HeaderValue::from_static("evil.test"));
        t.insert("x-api-key", HeaderValue::from_static("agent-key"));
        t.insert("x-latchkey-verdict", HeaderValue::from_static("allow"));
        t.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        t.insert("content-length", HeaderValue::from_static("0"));
        t.insert("te", HeaderValue::from_static("trailers"));
        t.insert("trailer", HeaderValue::from_static("x-checksum"));
        t.insert("content-type", HeaderValue::from_static("text/evil"));
        t.insert("x-checksum", HeaderValue::from_static("sha256=abc"));
        t.insert("grpc-timeout", HeaderValue::from_static("1S"));
        strip_request_trailers(&mut t, Some(&HeaderName::from_static("x-api-key")));
        let mut left: Vec<&str> = t.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["grpc-timeout", "x-checksum"]);
    }

    #[test]
    fn te_trailers_survives_but_other_te_does_not() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_request_headers(&mut h, None);
        assert!(h.contains_key("te"));
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_request_headers(&mut h, None);
        assert!(!h.contains_key("te"));
    }

    #[test]
    fn response_cannot_spoof_proxy_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-latchkey-request-id", HeaderValue::from_static("spoof"));
        h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_response_headers(&mut h);
        assert_eq!(h.len(), 1);
    }

    fn without_api_key(query: &str) -> String {
        let mut out = String::new();
        push_query_without(&mut out, query, "api_key");
        out
    }

    #[test]
    fn the_agents_copy_of_the_injected_parameter_goes_in_any_case_and_after_any_separator() {
        let cases = [
            ("", ""),
            ("q=1", "q=1"),
            ("api_key=X", ""),
            ("q=1&api_key=X&r=2", "q=1&r=2"),
            ("q=1&API_KEY=X", "q=1"),
            ("q=1;api_key=X", "q=1"),
            ("q=1;Api_Key=X;r=2", "q=1;r=2"),
            ("api_key=X;q=1", "q=1"),
            ("q=1&%41PI%5fKEY=X", "q=1"),
            ("q=1;api_key", "q=1"),
            ("q=1&api_key=", "q=1"),
            ("q=a;b&r=2", "q=a;b&r=2"),
            ("q=1&&r=2&", "q=1&r=2"),
            ("api_keys=1&x_api_key=2", "api_keys=1&x_api_key=2"),
        ];
        for (query, want) in cases {
            assert_eq!(without_api_key(query), want, "{query:?}");
        }
    }

    #[test]
    fn query_components_round_trip() {
        let mut s = String::new();
        encode_component(b"a b&c=d/\xff", &mut s);
        assert_eq!(s, "a%20b%26c%3Dd%2F%FF");
        assert_eq!(decode_component("api%5Fkey"), b"api_key");
        assert_eq!(decode_component("a+b%2"), b"a b%2");
        assert_eq!(decode_component("%"), b"%");
    }
}
