//! Gateway (base-URL) mode: `/gw/<route-id>/<path>` on latchkey's own listener, in origin
//! form, for SDKs that ignore `HTTPS_PROXY` or cannot be given a CA. The SDK gets
//! `http://127.0.0.1:8080/gw/<route-id>` as its base URL and the latchkey token as its API
//! key; the request goes to `https://<route host>/<path>` under that route's rules.
//!
//! ```text
//! /gw/<id>/<rest> -> head size -> token (Authorization: Bearer | x-api-key | api-key; 401)
//!   -> not in the query -> <id> split off the raw path
//!   -> the token's agent has route <id>, with a single host -> token headers removed
//!   -> request::forward (normalised <rest>, only route <id> decides) -> request::respond
//! ```
//!
//! This module owns only what differs from proxy mode: where the token comes from, how the
//! target is chosen, and that nothing the agent sends can choose another upstream (the
//! route's host is the authority; `Host` is ignored and rebuilt). It never decides policy
//! itself and never forwards: both are `request`'s stages.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderName, Request, Response, Uri};
use hyper::body::Incoming;

use super::body::AuditedBody;
use super::limits::Admission;
use super::request::{self, Ctx};
use super::Shared;
use crate::audit::Record;
use crate::auth::{Claims, MAX_TOKEN_LEN};
use crate::deny::{AuthStage, BadPath, Deny};
use crate::policy::Scheme;

/// The path prefix of gateway requests.
pub const PREFIX: &str = "/gw/";

/// The API-key headers SDKs send, besides `Authorization: Bearer`: Anthropic's `x-api-key`
/// and Azure OpenAI's `api-key`.
const KEY_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

/// Whether an origin-form request is addressed to the gateway (`/gw` or `/gw/...`).
pub fn is_gateway(uri: &Uri) -> bool {
    uri.scheme().is_none()
        && uri.authority().is_none()
        && (uri.path() == "/gw" || uri.path().starts_with(PREFIX))
}

/// The route id and the upstream path of a gateway target, split on the raw path before any
/// normalisation, so that no `..` or escape can move a request from one route to another:
/// the id is the first segment exactly as sent, and the rest is normalised on its own (a
/// `..` above its root is refused as `bad_path`).
fn split_target(path: &str) -> Result<(&str, &str), Deny> {
    let usage = || Deny::BadRequest("gateway URLs are /gw/<route-id>/<path>".into());
    let after = path.strip_prefix(PREFIX).ok_or_else(usage)?;
    let (id, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    };
    if id.is_empty() {
        return Err(usage());
    }
    // SECURITY: `/gw/../other/x` and `/gw/./x` would name another route after normalisation.
    if id == "." || id == ".." {
        return Err(Deny::BadPath(BadPath::AboveRoot));
    }
    Ok((id, rest))
}

/// The route id as it may appear in a refusal: a valid id, or a placeholder for anything
/// else (escapes, other characters, an id longer than any sane policy holds).
fn printable_id(id: &str) -> String {
    let valid = id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        id.to_owned()
    } else {
        "(not a route id)".to_owned()
    }
}

/// The latchkey token of a gateway request: `Authorization: Bearer`, `x-api-key` or
/// `api-key`. Each may appear (SDKs differ), but they must all carry the same token: two
/// different values are refused, since latchkey would have to guess which one is meant.
fn token_from_headers(headers: &HeaderMap) -> Result<String, Deny> {
    let invalid = |why| Deny::TokenInvalid(AuthStage::Gateway, why);
    let mut found: Option<String> = None;
    let mut take = |value: &str| -> Result<(), Deny> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(());
        }
        if value.len() > MAX_TOKEN_LEN {
            return Err(invalid("the token is too long"));
        }
        match &found {
            Some(v) if v != value => Err(Deny::BadRequest(
                "the request carries different API keys in Authorization, x-api-key and \
                 api-key; send the latchkey token once"
                    .into(),
            )),
            Some(_) => Ok(()),
            None => {
                found = Some(value.to_owned());
                Ok(())
            }
        }
    };
    for value in headers.get_all(header::AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| invalid("the Authorization header is not ASCII"))?
            .trim();
        let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
        if text.is_empty() {
            continue;
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(invalid(
                "gateway mode takes the token as Authorization: Bearer, x-api-key or api-key",
            ));
        }
        take(rest)?;
    }
    for name in &KEY_HEADERS {
        for value in headers.get_all(name) {
            let text = value
                .to_str()
                .map_err(|_| invalid("the API key header is not ASCII"))?;
            take(text)?;
        }
    }
    found.ok_or(Deny::TokenMissing(AuthStage::Gateway))
}

/// SECURITY: the token belongs in a header, which latchkey removes; in the query string it
/// would go upstream with the rest of the query (and into the upstream's logs). Looked for
/// as sent and percent-decoded.
fn check_query(query: Option<&str>, token: &str) -> Result<(), Deny> {
    let Some(query) = query else {
        return Ok(());
    };
    let decoded = crate::inject::decode_component(query);
    let found = decoded
        .windows(token.len().max(1))
        .any(|w| w == token.as_bytes());
    if query.contains(token) || found {
        return Err(Deny::BadRequest(
            "the latchkey token is in the query string, where it would reach the upstream; \
             send it only as the API key header"
                .into(),
        ));
    }
    Ok(())
}

/// One gateway request, from its arrival to its answer (the audit record completes on every
/// path, as in proxy mode). A request that authenticates moves its connection into the
/// authenticated pool.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    admission: &Admission,
) -> Response<AuditedBody> {
    let (parts, body) = req.into_parts();
    let expects = request::expects_continue(&parts.headers);
    let raw_rest = split_target(parts.uri.path()).map_or("", |(_, rest)| rest);
    // The host is unknown until the route is: the line gets it once the target is checked.
    let mut rec = shared
        .recorder
        .open(&parts.method, String::new(), raw_rest.to_owned());
    shared.recorder.sink().ready().await;
    let mut body = Some(body);
    match admit(&shared, parts, &mut rec, admission) {
        Ok(admitted) => {
            // Held until the answer is handed over, as for an absolute-form request.
            let _slot = admitted.slot;
            let mut ctx = Ctx {
                rec,
                scheme: Scheme::Https,
                authority: Arc::new(admitted.authority),
                claims: admitted.claims,
                route: Some(admitted.route),
                // No WebSocket in gateway mode: its `Upgrade` is stripped as hop-by-hop.
                tunnel: None,
            };
            let outcome = request::forward(&shared, &mut ctx, admitted.parts, &mut body).await;
            request::respond(ctx.rec, outcome, body, expects).await
        }
        Err(deny) => request::respond(rec, Err(deny), body, expects).await,
    }
}

/// A gateway request that may go on to `forward`.
struct Admitted {
    /// Its head, rewritten to the upstream path, the token headers and `Host` gone.
    parts: http::request::Parts,
    /// The token's claims.
    claims: Arc<Claims>,
    /// The route the URL named.
    route: Arc<crate::policy::Route>,
    /// That route's single upstream.
    authority: crate::authority::Authority,
    /// The agent's connection slot.
    slot: super::limits::Slot,
}

/// Everything before `forward`: head size, target, token, caps, the named route and its
/// single host; then the head is rewritten for `forward` (origin-form upstream path, the
/// token headers and `Host` gone).
fn admit(
    shared: &Shared,
    mut parts: http::request::Parts,
    rec: &mut Record,
    admission: &Admission,
) -> Result<Admitted, Deny> {
    request::check_head_size(&parts)?;
    // Authenticate before looking at the target: which route ids exist is no business of a
    // caller without a token, and every later refusal is attributed.
    let token = zeroize::Zeroizing::new(token_from_headers(&parts.headers)?);
    let claims = request::verify_token(shared, &token, AuthStage::Gateway, rec)?;
    check_query(parts.uri.query(), &token)?;
    let (id, rest) = split_target(parts.uri.path())?;
    let (id, rest) = (id.to_owned(), rest.to_owned());
    if !admission.admit(&shared.limits_state, shared.limits.max_connections) {
        return Err(Deny::TooManyConnections("this proxy"));
    }
    let slot = shared
        .limits_state
        .try_agent(&claims.sub, shared.limits.max_connections_per_agent)
        .ok_or(Deny::TooManyConnections("this agent"))?;
    let unknown = || Deny::UnknownRoute {
        agent: claims.sub.clone(),
        route: printable_id(&id),
    };
    let policies = shared.policies.load();
    let route = policies
        .get(&claims.sub)
        .and_then(|p| p.route(&id))
        .cloned()
        .ok_or_else(unknown)?;
    let authority = route
        .gateway_authority()
        .ok_or_else(|| Deny::GatewayWildcard {
            route: route.id().to_owned(),
            host: route.host().to_owned(),
        })?;
    rec.host = authority.text();
    // SECURITY: the token never goes upstream, in whichever header it came. `Host` (which
    // names latchkey, or whatever the agent wrote) is ignored: the upstream is the route's
    // host alone, and `inject::apply` rebuilds the target from it.
    parts.headers.remove(header::AUTHORIZATION);
    for name in &KEY_HEADERS {
        parts.headers.remove(name);
    }
    parts.headers.remove(header::HOST);
    let target = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    };
    parts.uri = Uri::try_from(target)
        .map_err(|_| Deny::BadRequest("the gateway path cannot be rebuilt".into()))?;
    Ok(Admitted {
        parts,
        claims,
        route,
        authority,
        slot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_route_id_is_the_first_raw_segment_and_the_rest_is_the_upstream_path() {
        assert_eq!(
            split_target("/gw/openai/v1/chat").unwrap(),
            ("openai", "/v1/chat")
        );
        assert_eq!(split_target("/gw/openai").unwrap(), ("openai", "/"));
        assert_eq!(split_target("/gw/openai/").unwrap(), ("openai", "/"));
        // Traversal stays inside the route's own path, where normalisation refuses it.
        assert_eq!(split_target("/gw/a/../b/x").unwrap(), ("a", "/../b/x"));
        assert_eq!(split_target("/gw/%2e%2e/b").unwrap(), ("%2e%2e", "/b"));
        for bad in ["/gw/../b/x", "/gw/./x"] {
            assert_eq!(split_target(bad).unwrap_err().code(), "bad_path", "{bad}");
        }
        for bad in ["/gw", "/gw/", "/gw//x"] {
            assert_eq!(
                split_target(bad).unwrap_err().code(),
                "bad_request",
                "{bad}"
            );
        }
    }

    #[test]
    fn is_gateway_takes_only_origin_form_under_gw() {
        let u = |s: &str| s.parse::<Uri>().unwrap();
        assert!(is_gateway(&u("/gw/x/y")));
        assert!(is_gateway(&u("/gw")));
        assert!(!is_gateway(&u("/gwx/y")));
        assert!(!is_gateway(&u("/x/gw/y")));
        assert!(!is_gateway(&u("http://127.0.0.1:8080/gw/x/y")));
    }

    #[test]
    fn the_token_comes_from_any_one_key_header() {
        for h in [
            headers(&[("authorization", "Bearer tok")]),
            headers(&[("authorization", "bearer  tok ")]),
            headers(&[("x-api-key", "tok")]),
            headers(&[("api-key", "tok")]),
            // The same token in two places (some SDKs send both) is one token.
            headers(&[("authorization", "Bearer tok"), ("x-api-key", "tok")]),
        ] {
            assert_eq!(token_from_headers(&h).unwrap(), "tok", "{h:?}");
        }
    }

    #[test]
    fn missing_different_or_non_bearer_tokens_are_refused() {
        let code = |pairs: &[(&str, &str)]| token_from_headers(&headers(pairs)).unwrap_err();
        let d = code(&[]);
        assert_eq!((d.code(), d.status().as_u16()), ("token_missing", 401));
        assert_eq!(code(&[("x-api-key", " ")]).code(), "token_missing");
        let d = code(&[("authorization", "Bearer a"), ("x-api-key", "b")]);
        assert_eq!((d.code(), d.status().as_u16()), ("bad_request", 400));
        assert!(!d.to_string().contains('a') || !d.to_string().contains(" b"));
        assert_eq!(
            code(&[("x-api-key", "a"), ("x-api-key", "b")]).code(),
            "bad_request"
        );
        let d = code(&[("authorization", "Basic Zm9vOmJhcg==")]);
        assert_eq!((d.code(), d.status().as_u16()), ("token_invalid", 401));
        let long = "t".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(code(&[("api-key", &long)]).code(), "token_invalid");
    }

    #[test]
    fn a_token_in_the_query_is_refused_as_sent_or_encoded() {
        assert!(check_query(None, "abc.def").is_ok());
        assert!(check_query(Some("model=x&n=1"), "abc.def").is_ok());
        for q in ["key=abc.def", "k=abc%2Edef", "k=%61bc.def&x=1"] {
            assert_eq!(
                check_query(Some(q), "abc.def").unwrap_err().code(),
                "bad_request",
                "{q}"
            );
        }
    }

    #[test]
    fn only_valid_route_ids_are_echoed() {
        assert_eq!(printable_id("openai-chat_1.v2"), "openai-chat_1.v2");
        assert_eq!(printable_id("%2e%2e"), "(not a route id)");
        assert_eq!(printable_id(&"a".repeat(500)), "(not a route id)");
    }
}
