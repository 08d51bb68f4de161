//! The stages of one request, in the order it meets them:
//!
//! ```text
//! open record -> (proxy level: head size, target, token) | (tunnel: token still live, bound authority)
//!   -> decide (normalised path, policy) -> admit (rate, announced size)
//!   -> approval (held until a person decides, on `approval = "request"` routes) -> credential
//!   -> tripwire (the agent's head; its body as it streams) -> inject
//!   -> upstream -> respond (the one place a request is refused or answered)
//! ```
//!
//! A WebSocket upgrade takes the same stages (`proxy::websocket` recognises it before
//! `decide` and relays the session after `respond`, which hands it the audit record).
//!
//! The facts of the request travel in one [`Ctx`]: its audit record (which completes on every
//! path, see `audit::record`), the scheme, the checked authority and the token's claims. Each
//! stage takes the context and what the previous stage produced, and may stop with a [`Deny`];
//! [`respond`] turns the result into what the agent receives.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tracing::{warn, Instrument};

use super::body::{discard, AuditedBody, Holding, IdleBody, LimitedBody, ProxyBody, UpState};
use super::decode;
use super::forward::{BoxError, UpstreamBody};
use super::limits::{Admission, Slot};
use super::server::Drain;
use super::websocket::{self, Asked};
use super::Shared;
use crate::audit::record::Who;
use crate::audit::{Outcome, Record};
use crate::auth::{self, Claims};
use crate::authority::{self, Authority};
use crate::credential::Outgoing;
use crate::deny::{AuthStage, Deny, Fault};
use crate::inject::{self, Rewrite};
use crate::policy::{path, Allowed, Grant, Route, Scheme};
use crate::ratelimit::Verdict;
use crate::redact::RedactBody;
use crate::tripwire::{BodyScan, Hit, OnExfiltration};

/// Header carrying the request id on every response to the agent.
pub const REQUEST_ID: &str = "x-latchkey-request-id";

/// One authenticated request on its way through the stages.
pub struct Ctx {
    /// The audit record, completed when the request's life ends.
    pub rec: Record,
    /// `https` inside a tunnel, `http` for absolute-form requests.
    pub scheme: Scheme,
    /// The authority the request is bound to (CONNECT target or absolute-form host).
    pub authority: Arc<Authority>,
    /// The token's claims.
    pub claims: Arc<Claims>,
    /// Gateway mode: the route the URL named (`/gw/<id>/...`); only it decides. `None` in
    /// proxy mode, where the first matching route of the bound host does.
    pub route: Option<Arc<Route>>,
    /// What a WebSocket session opened by this request must hold for its whole life;
    /// `None` outside tunnels.
    pub tunnel: Option<TunnelHold>,
}

/// What outlives a request that turns into a WebSocket session: the tunnel's drain handle (the
/// session ends when latchkey shuts down) and its connection slots (the agent's connection
/// counts against `--max-connections` and `--max-connections-per-agent` until the session
/// ends, although the tunnel's HTTP connection is gone).
#[derive(Clone)]
pub struct TunnelHold {
    /// Resolves when latchkey begins to shut down.
    pub drain: Drain,
    /// The tunnel's connection slots, released when the last holder goes.
    pub slots: Arc<dyn std::any::Any + Send + Sync>,
}

/// The audit line's idea of who asked.
pub fn who(claims: &Claims) -> Who {
    Who {
        agent: Some(claims.sub.clone()),
        obo: claims.obo.clone(),
        session: Some(claims.jti.clone()),
        task: claims.task.clone(),
    }
}

/// Authenticate a proxy-level request (CONNECT or absolute form; 407 on failure).
pub fn authenticate(
    shared: &Shared,
    headers: &http::HeaderMap,
    rec: &mut Record,
) -> Result<Arc<Claims>, Deny> {
    let token = auth::token_from_header(headers.get(header::PROXY_AUTHORIZATION))?;
    verify_token(shared, &token, AuthStage::Proxy, rec)
}

/// Verify a presented token and check it is not revoked; `stage` says how a refusal is
/// answered. The claims are known before the revocation check so that a refused revoked token
/// is still attributed, and an expired token we signed still names who tried.
pub fn verify_token(
    shared: &Shared,
    token: &str,
    stage: AuthStage,
    rec: &mut Record,
) -> Result<Arc<Claims>, Deny> {
    let claims = match shared.keys.verify(token, stage) {
        Ok(c) => c,
        Err(deny) => {
            if matches!(deny, Deny::TokenExpired(_)) {
                if let Some(c) = shared.keys.claims_of_expired(token) {
                    rec.who = who(&c);
                }
            }
            return Err(deny);
        }
    };
    rec.who = who(&claims);
    shared.revocations.check(&claims, stage)?;
    Ok(claims)
}

/// Inside a tunnel, before anything else: the head's size, then the token the tunnel was
/// opened with must still be live (revocation, expiry and key retirement bite on every
/// request, not only at CONNECT), and the request must name the tunnel's authority.
pub fn check_live(shared: &Shared, ctx: &Ctx, parts: &Parts) -> Result<(), Deny> {
    check_head_size(parts)?;
    if ctx.claims.is_expired_at(auth::unix_now()) {
        return Err(Deny::TokenExpired(AuthStage::Tunnel));
    }
    shared.revocations.check(&ctx.claims, AuthStage::Tunnel)?;
    if !shared.keys.still_trusted(&ctx.claims) {
        // The signing key was retired since the tunnel opened: the issuer withdrew it.
        return Err(Deny::TokenRevoked(AuthStage::Tunnel));
    }
    check_bound_authority(parts, &ctx.authority, ctx.scheme.default_port())
}

/// Largest request head (target plus header names and values) accepted, and most headers.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one request head.
pub const MAX_HEADERS: usize = 100;

/// SECURITY: hyper's read-buffer limit is soft (one large read can pass it), so the parsed
/// head is measured again; an oversized head never reaches the shared upstream connection,
/// where the upstream's own limit would tear it down for every agent.
pub fn check_head_size(parts: &Parts) -> Result<(), Deny> {
    if parts.headers.len() > MAX_HEADERS {
        return Err(Deny::HeadersTooLarge(MAX_HEAD_BYTES));
    }
    let target = parts.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + parts.uri.authority().map_or(0, |a| a.as_str().len());
    let size = target
        + parts
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if size > MAX_HEAD_BYTES {
        return Err(Deny::HeadersTooLarge(MAX_HEAD_BYTES));
    }
    Ok(())
}

/// SECURITY: the request must address the host the tunnel was opened (and authorised) for:
/// absolute-form URI / `:authority` and every `Host` header. Stops the Host-header bypass
/// (coder/httpjail#57) and h2 `:authority` switching.
pub fn check_bound_authority(
    req: &Parts,
    bound: &Authority,
    default_port: u16,
) -> Result<(), Deny> {
    let mismatch = |got: String| Deny::HostMismatch {
        expected: bound.to_string(),
        got,
    };
    let check = |text: &str| {
        if bound.is_spelled(text, default_port) {
            return Ok(());
        }
        // SECURITY: the refusal is logged; an unparsed name goes there without userinfo.
        let parsed = Authority::parse(text, Some(default_port))
            .map_err(|_| mismatch(authority::without_userinfo(text).to_owned()))?;
        if parsed != *bound {
            return Err(mismatch(parsed.to_string()));
        }
        Ok(())
    };
    if let Some(a) = req.uri.authority() {
        check(a.as_str())?;
    }
    let mut hosts = req.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(mismatch("several Host headers".into())),
        (Some(h), None) => check(
            h.to_str()
                .map_err(|_| mismatch("a non-ASCII Host".into()))?,
        ),
        (None, _) if req.uri.authority().is_none() => Err(mismatch("no Host header".into())),
        (None, _) => Ok(()),
    }
}

/// Normalise the path and ask policy; the record learns the normalised path and the route.
pub fn decide(shared: &Shared, ctx: &mut Ctx, parts: &Parts) -> Result<(Allowed, String), Deny> {
    let normalized = path::normalize(parts.uri.path())
        .map_err(Deny::BadPath)?
        .into_owned();
    ctx.rec.path.clone_from(&normalized);
    let policies = shared.policies.load();
    let policy = policies.get(&ctx.claims.sub).ok_or_else(|| Deny::NoRoute {
        agent: ctx.claims.sub.clone(),
        method: parts.method.clone(),
        path: normalized.clone(),
        authority: ctx.authority.to_string(),
    })?;
    let grant = Grant(ctx.claims.routes.as_deref());
    let allowed = match &ctx.route {
        Some(route) => {
            policy.decide_route(route, &ctx.authority, &parts.method, &normalized, grant)?
        }
        None => policy.decide(
            ctx.scheme,
            &ctx.authority,
            &parts.method,
            &normalized,
            grant,
        )?,
    };
    ctx.rec
        .matched(allowed.route().id(), allowed.route().credential());
    Ok((allowed, normalized))
}

/// After policy (only allowed requests count against a limit) and before any credential is
/// touched or a byte goes upstream: the agent's requests in flight, the route's rate, and a
/// body announced larger than the route's limit. Returns that limit and the in-flight slot,
/// to be held until the response body ends.
pub async fn admit(
    shared: &Shared,
    ctx: &Ctx,
    allowed: &Allowed,
    parts: &Parts,
) -> Result<(u64, Slot), Deny> {
    // SECURITY: counted per agent across all its tunnels and HTTP/2 streams, so neither many
    // tunnels nor many streams per tunnel multiply what one agent holds upstream (each
    // request in flight holds at most one upstream connection). Checked before the rate, so
    // a refused request spends no rate.
    let max = shared.limits.max_requests_in_flight_per_agent;
    let in_flight = shared
        .limits_state
        .try_in_flight(&ctx.claims.sub, max)
        .ok_or(Deny::TooManyRequestsInFlight(max))?;
    let route = allowed.route();
    if let Some(rate) = route.rate() {
        if let Verdict::Deny { retry_after_secs } = shared
            .rate_limits
            .check(&ctx.claims.sub, route.id(), rate, &shared.metrics)
            .await
        {
            return Err(Deny::RateLimited { retry_after_secs });
        }
    }
    let limit = route.max_body().unwrap_or(shared.limits.max_body);
    // SECURITY: a body announced larger than the limit never reaches the upstream.
    if content_length(&parts.headers).is_some_and(|len| len > limit) {
        return Err(Deny::BodyTooLarge(limit));
    }
    Ok((limit, in_flight))
}

/// The shared tail of both paths: decide, admit, resolve and inject the credential, send
/// upstream, and stream the answer back (redacted where a credential went out). Takes the
/// agent's body out of `body` only once the request goes upstream; until then a refusal can
/// still read the rest of it.
pub async fn forward(
    shared: &Arc<Shared>,
    ctx: &mut Ctx,
    mut parts: Parts,
    body: &mut Option<Incoming>,
) -> Result<Response<ProxyBody>, Deny> {
    // A WebSocket upgrade (HTTP/1.1) or extended CONNECT (HTTP/2, rewritten to its GET here,
    // so policy sees the method an HTTP/1.1 agent would send). Only inside tunnels: a plain
    // `http://` request's and a gateway request's `Upgrade` is stripped like any hop-by-hop header.
    let ws = match (ctx.scheme, &ctx.tunnel) {
        (Scheme::Https, Some(_)) => websocket::asked(&mut parts),
        _ => None,
    };
    let (allowed, normalized) = decide(shared, ctx, &parts)?;
    let (limit, in_flight) = admit(shared, ctx, &allowed, &parts).await?;
    let credential = shared
        .credentials
        .resolve(allowed.route(), &ctx.claims)
        .await?;
    // SECURITY: the exfiltration tripwire, on the agent's head as it sent it (before `apply`
    // strips or injects anything, so latchkey's own credential is never flagged). A format is
    // allowed only where the route injects that kind (its own secret's format): the agent's
    // `Authorization` is replaced there anyway.
    let scan = allowed.route().scan_request().then(|| {
        let kind = credential.as_deref().and_then(|c| c.tripwire_kind());
        (shared.tripwire.load_full(), kind)
    });
    if let Some((tw, kind)) = &scan {
        if let Some(hit) = tw.find_in_head(&parts, *kind) {
            return Err(tripped(shared, ctx, hit).await);
        }
    }
    // A request held for a person's approval is held only once the tripwire has passed its
    // head: an approver is never asked about a request that carries a stolen credential.
    // (Resolving the credential above fetches nothing; a kind mints in `apply`, after.)
    let approved_body = super::approve::gate(shared, ctx, &allowed, &parts, body, limit).await?;
    let query = parts.uri.query().map(str::to_owned);
    let agent_version = parts.version;
    let head = parts.method == http::Method::HEAD;
    let rewrite = Rewrite {
        scheme: ctx.scheme,
        authority: &ctx.authority,
        path: &normalized,
        query: query.as_deref(),
        allowed: &allowed,
    };
    // SECURITY: an approved request sends exactly the bytes that were approved.
    let agent_body = match approved_body {
        Some(bytes) => Either::Right(Full::new(bytes)),
        None => Either::Left(body.take().expect("the agent's body is taken once, here")),
    };
    // An agent that stops sending mid-upload is ended like a stalled upstream: its body
    // breaks (`bad_body`), the upstream request is aborted, the slot freed.
    let idle = allowed
        .route()
        .idle_timeout()
        .unwrap_or(shared.limits.upstream_idle_timeout);
    let (limited, up_state) = LimitedBody::new(
        IdleBody::new(agent_body, idle),
        limit,
        ctx.rec.count_up(),
        inject::injected_header(allowed.route()).cloned(),
        scan.map(|(tw, kind)| BodyScan::new(tw, kind)),
    );
    let limited = limited.boxed_unsync() as UpstreamBody;
    let (upstream_body, needles) = match &credential {
        Some(credential) => {
            let applied = match credential
                .apply(Outgoing {
                    parts: &mut parts,
                    rewrite: &rewrite,
                    body: limited,
                    claims: &ctx.claims,
                    prepared: shared.credentials.prepared(),
                })
                .await
            {
                Ok(applied) => applied,
                // A kind that reads the body to sign it (hmac, SigV4 of a non-S3 body) sees
                // the limit or the tripwire as a broken body: say which it was.
                Err(Deny::BadBody) => {
                    return Err(match up_state.get() {
                        UpState::OverLimit => Deny::BodyTooLarge(limit),
                        UpState::Exfiltration(hit) => tripped(shared, ctx, hit).await,
                        _ => Deny::BadBody,
                    })
                }
                Err(deny) => return Err(deny),
            };
            ctx.rec.credential_used(credential.kind(), applied.detail);
            (applied.body, applied.needles)
        }
        None => {
            inject::apply(&mut parts, &rewrite, None, shared.credentials.prepared())?;
            (limited, None)
        }
    };
    if ws.is_some() {
        websocket::restore_upgrade_headers(&mut parts.headers);
    }
    let upstream_req = Request::from_parts(parts, upstream_body);
    // From here the credential may be on the wire: a cancelled or failed exchange is still
    // `decision: allow`.
    ctx.rec.set_sent(true);
    let sent_at = Instant::now();
    let resp = shared
        .upstream
        .send(upstream_req, allowed.route().timeout(), ws.is_some())
        .instrument(tracing::debug_span!("upstream"))
        .await;
    shared.metrics.observe_upstream(sent_at.elapsed());
    let resp = match resp {
        Ok(r) => r,
        Err(failed) => {
            ctx.rec.set_sent(failed.sent);
            return Err(match up_state.get() {
                UpState::OverLimit => Deny::BodyTooLarge(limit),
                // The body was cut off before the credential's first byte went up.
                UpState::Exfiltration(hit) => tripped(shared, ctx, hit).await,
                // The agent's body broke, not the upstream: say so, to the agent and the log.
                UpState::Broken => Deny::BadBody,
                UpState::Ok => failed.deny,
            });
        }
    };
    downstream(
        shared,
        ctx,
        resp,
        Downstream {
            agent_version,
            head,
            in_flight,
            needles,
            credential: allowed.route().credential().unwrap_or("?").to_owned(),
            websocket: ws,
            idle,
        },
    )
}

/// What the response side of [`forward`] needs from the request side.
struct Downstream {
    /// The HTTP version the agent speaks (HTTP/2 cannot carry a 101).
    agent_version: http::Version,
    /// A HEAD request: its answer's `Content-Length` is the resource's size, not a body's.
    head: bool,
    /// The agent's in-flight slot, held until the answer has been streamed.
    in_flight: Slot,
    /// The injected credential's forms, when the route has one.
    needles: Option<Arc<crate::redact::Needles>>,
    /// The credential's name, for the redaction warning.
    credential: String,
    /// The WebSocket upgrade the agent asked for, if it did.
    websocket: Option<Asked>,
    /// Longest silence between the upstream's body bytes.
    idle: std::time::Duration,
}

/// The upstream's answer on its way to the agent: head cleaned, extensions dropped, and on a
/// credentialed route decoded if it came compressed and redacted wherever the credential
/// shows.
fn downstream(
    shared: &Arc<Shared>,
    ctx: &Ctx,
    resp: Response<Incoming>,
    d: Downstream,
) -> Result<Response<ProxyBody>, Deny> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(asked) = d.websocket else {
            // SECURITY: a 101 nobody asked for would hand the agent a raw byte stream to the
            // upstream that no policy sees (and HTTP/2 has no 101 at all, RFC 9113 8.6): the
            // upstream's broken answer, said once, as a 502.
            let why = if d.agent_version == http::Version::HTTP_2 {
                "the upstream answered 101 Switching Protocols, which HTTP/2 cannot carry"
            } else {
                "the upstream switched protocols without being asked"
            };
            return Err(Deny::UpstreamProtocol(why.into()));
        };
        websocket::check_switch(&asked, resp.headers()).map_err(Deny::UpstreamProtocol)?;
        let mut headers = resp.headers().clone();
        inject::strip_response_headers(&mut headers);
        if let Some(needles) = &d.needles {
            if needles.redact_headers(&mut headers) {
                warn!(credential = %d.credential, request_id = %ctx.rec.request_id(), "upstream echoed the injected credential in a header; redacted");
                shared.metrics.record_redaction();
            }
        }
        return Ok(websocket::answer(
            resp,
            headers,
            websocket::Open {
                asked,
                shared: Arc::clone(shared),
                claims: Arc::clone(&ctx.claims),
                tunnel: ctx.tunnel.clone(),
                in_flight: d.in_flight,
            },
        ));
    }
    let (mut parts, body) = resp.into_parts();
    inject::strip_response_headers(&mut parts.headers);
    // SECURITY: the upstream's reason phrase (`HTTP/1.1 200 <anything>`) rides in an
    // extension that hyper's server writes back out verbatim, past every header filter and
    // redaction: drop it, on every route, so HTTP/1 agents get the canonical phrase. Nothing
    // else the upstream connection attached to the response is ours to pass on either.
    parts.extensions.clear();
    // The request stays in flight until its answer has been streamed to the agent; a stream
    // that stalls longer than the idle timeout ends as `body_error` / `upstream_timeout`.
    let body = Holding::new(IdleBody::new(body, d.idle), d.in_flight);
    let Some(needles) = d.needles else {
        return Ok(Response::from_parts(
            parts,
            body.map_err(BoxError::from).boxed_unsync(),
        ));
    };
    // SECURITY: an upstream that echoes the credential (debug endpoints, error pages) must
    // not hand it to the agent.
    let credential = d.credential;
    let request_id = ctx.rec.request_id().to_owned();
    if needles.redact_headers(&mut parts.headers) {
        warn!(%credential, %request_id, "upstream echoed the injected credential in a header; redacted");
        shared.metrics.record_redaction();
    }
    // The length may change; let the framing layer re-frame. A HEAD answer has no body to
    // redact, and its length is the resource's (S3 object sizes, download planning).
    if !d.head {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    // SECURITY: we asked for `identity`; an upstream that compressed anyway is decoded so
    // the echo cannot hide in gzip, br or zstd, and one we cannot decode is refused.
    let body = decode::decoded(&mut parts.headers, body)?;
    let metrics = Arc::clone(&shared.metrics);
    let on_redact = Box::new(move || {
        warn!(%credential, %request_id, "upstream echoed the injected credential in the body; redacted");
        metrics.record_redaction();
    });
    let body = RedactBody::new(body, needles, on_redact);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// A request caught carrying a credential: count it, say so once (a name or a kind, never
/// the value), revoke the session when `--on-exfiltration revoke`, and refuse. The audit line
/// records the refusal (`secret_in_request`).
async fn tripped(shared: &Shared, ctx: &Ctx, hit: Hit) -> Deny {
    let leak = hit.to_leak();
    let agent = ctx.claims.sub.as_str();
    shared.metrics.record_exfiltration(agent, hit.label());
    let revoke = shared.on_exfiltration == OnExfiltration::Revoke;
    warn!(
        agent,
        session = %ctx.claims.jti,
        request_id = %ctx.rec.request_id(),
        found = %leak,
        revoke,
        "request carried a credential; refused"
    );
    if revoke {
        // Boxed: the Redis publish is kilobytes of state the request path would carry always.
        Box::pin(revoke_session(shared, &ctx.claims)).await;
    }
    Deny::SecretInRequest(leak)
}

/// Revoke the session the way `latchkey token revoke JTI` does: the state dir first (this
/// replica enforces it from the next request), then Redis for every other replica.
async fn revoke_session(shared: &Shared, claims: &Claims) {
    if let Err(e) = shared.revocations.revoke_session(&claims.jti, claims.exp) {
        tracing::error!(session = %claims.jti, error = %e, "cannot revoke the session that tried to exfiltrate a credential");
    }
    if let Some(st) = &shared.redis {
        let what = auth::Revoked::Session {
            jti: claims.jti.clone(),
            exp: claims.exp,
        };
        if let Err(e) = auth::publish_revocation(st, &what).await {
            tracing::error!(session = %claims.jti, error = %e, "revoked locally, but the shared state (--redis) was not told");
        }
    }
}

/// The single exit of every request: stamp the request id, and either hand the answer over
/// with the record riding in its body (completed at the end of the stream), or refuse: log at
/// the level the fault calls for, complete the record, send the JSON denial at once, and deal
/// with the agent's unread body so that the agent actually reads that denial (see
/// [`unread_body`]). `expects_continue`: the request carried `Expect: 100-continue`.
pub async fn respond(
    rec: Record,
    outcome: Result<Response<ProxyBody>, Deny>,
    body: Option<Incoming>,
    expects_continue: bool,
) -> Response<AuditedBody> {
    let request_id = HeaderValue::from_str(rec.request_id()).ok();
    let mut resp = match outcome {
        Ok(resp) => answer(rec, resp),
        Err(deny) => {
            let resp = refuse(rec, &deny);
            match body {
                Some(body) if !http_body::Body::is_end_stream(&body) => {
                    unread_body(resp, body, expects_continue)
                }
                _ => resp,
            }
        }
    };
    if let Some(v) = request_id {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// A refusal sent while the agent's body is still unread. A client that is still uploading
/// when the answer comes either never reads it (it writes the whole body first, as Python
/// requests does, and meets a closed socket) or has its HTTP/2 stream reset under it (curl
/// reports a stream error, httpx hangs). So:
///
/// - `Expect: 100-continue`: the agent has sent no body yet and waits. It gets the refusal
///   instead of `100 Continue` (the body is never polled, which is what would make hyper send
///   the 100), and the body is held until the refusal has been sent: on HTTP/1.1 the
///   connection then closes (`Connection: close`: an unread body cannot be skipped), on
///   HTTP/2 the stream is reset with NO_ERROR after the answer (RFC 9113 section 8.1).
/// - Otherwise the refusal goes out at once while a task reads and throws away the rest
///   (bounded, see [`discard`]) so the agent finishes writing and reads the answer; past the
///   bound the connection (HTTP/1.1) or stream (HTTP/2, NO_ERROR) is closed.
fn unread_body(
    mut resp: Response<AuditedBody>,
    body: Incoming,
    expects_continue: bool,
) -> Response<AuditedBody> {
    if expects_continue {
        // HTTP/1.1 only in effect: hyper's HTTP/2 server drops connection-specific headers.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp.map(|b| b.holding(body));
    }
    tokio::spawn(discard(body));
    resp
}

/// Whether a request head carries `Expect: 100-continue`.
pub fn expects_continue(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The 200 that opens a CONNECT tunnel. Its line is complete once the answer is handed over
/// (`allow` here means the tunnel was opened; each request inside gets its own line), so it is
/// always written before the lines of the tunnel's requests.
pub fn tunnel_opened(mut rec: Record) -> Response<AuditedBody> {
    rec.set_sent(true);
    rec.responded(StatusCode::OK.as_u16());
    let request_id = HeaderValue::from_str(rec.request_id()).ok();
    rec.finish(Outcome::Ok, None);
    let mut resp = Response::new(AuditedBody::done(full(Bytes::new())));
    if let Some(v) = request_id {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// An answered request: the record completes when the response body does, or, for a
/// WebSocket session, when the relay ends.
fn answer(mut rec: Record, mut resp: Response<ProxyBody>) -> Response<AuditedBody> {
    rec.responded(resp.status().as_u16());
    if let Some(session) = resp
        .extensions_mut()
        .remove::<websocket::Relay>()
        .and_then(|r| r.take())
    {
        tokio::spawn(
            session
                .run(rec)
                .instrument(tracing::debug_span!("websocket")),
        );
        let (parts, body) = resp.into_parts();
        return Response::from_parts(parts, AuditedBody::done(body));
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, AuditedBody::new(body, rec))
}

/// A refused (or failed) request: complete the record now and build the JSON answer.
fn refuse(mut rec: Record, deny: &Deny) -> Response<AuditedBody> {
    deny.log(rec.request_id(), rec.who.agent.as_deref(), &rec.host);
    let outcome = match deny.fault() {
        Fault::Upstream => Outcome::UpstreamFailed,
        // No credentials at all: the 407 asks for them (git and Java send them only then).
        // Recorded as what it is, so that real refusals are not buried under one per
        // connection such a client opens.
        _ if matches!(deny, Deny::TokenMissing(AuthStage::Proxy)) => Outcome::Challenged,
        // Refused after the request had started going upstream (its body broke or grew past
        // the limit mid-stream): the credential went out, the body did not complete.
        _ if rec.is_sent() => Outcome::BodyError,
        _ => Outcome::Denied,
    };
    let resp = deny.to_response(rec.request_id());
    rec.responded(resp.status().as_u16());
    rec.delivered(resp.body().len() as u64);
    rec.finish(outcome, Some(deny.code()));
    let (parts, json) = resp.into_parts();
    Response::from_parts(parts, AuditedBody::done(full(json)))
}

/// A complete body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed_unsync()
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// One request inside an established tunnel.
pub async fn in_tunnel(
    shared: Arc<Shared>,
    authority: Arc<Authority>,
    claims: Arc<Claims>,
    req: Request<Incoming>,
    hold: TunnelHold,
) -> Response<AuditedBody> {
    let (parts, body) = req.into_parts();
    let mut rec =
        shared
            .recorder
            .open(&parts.method, authority.text(), parts.uri.path().to_owned());
    rec.who = who(&claims);
    let mut ctx = Ctx {
        rec,
        scheme: Scheme::Https,
        authority,
        claims,
        route: None,
        tunnel: Some(hold),
    };
    shared.recorder.sink().ready().await;
    let mut body = Some(body);
    let expects = expects_continue(&parts.headers);
    let outcome = match check_live(&shared, &ctx, &parts) {
        Ok(()) => forward(&shared, &mut ctx, parts, &mut body).await,
        Err(deny) => Err(deny),
    };
    respond(ctx.rec, outcome, body, expects).await
}

/// An absolute-form `http://host/path` request on the proxy connection itself. The first one
/// that authenticates moves the connection into the authenticated pool (`admission`).
pub async fn plain(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    admission: &Admission,
) -> Response<AuditedBody> {
    let (parts, body) = req.into_parts();
    let host_text = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    // SECURITY: the line never holds userinfo (`http://agent:TOKEN@host/`); the checked form
    // replaces this once the target parses.
    let mut rec = shared.recorder.open(
        &parts.method,
        authority::without_userinfo(&host_text).to_owned(),
        parts.uri.path().to_owned(),
    );
    shared.recorder.sink().ready().await;
    let mut body = Some(body);
    let expects = expects_continue(&parts.headers);
    let checked = (|| {
        check_head_size(&parts)?;
        if parts.uri.scheme_str() != Some("http") {
            return Err(Deny::BadRequest(
                "only http:// is proxied in absolute form; use CONNECT for https".into(),
            ));
        }
        let authority = Authority::parse(&host_text, Some(80))
            .map_err(|e| Deny::BadRequest(format!("request target: {e}")))?;
        rec.host = authority.text();
        let claims = authenticate(&shared, &parts.headers, &mut rec)?;
        if !admission.admit(&shared.limits_state, shared.limits.max_connections) {
            return Err(Deny::TooManyConnections("this proxy"));
        }
        check_bound_authority(&parts, &authority, 80)?;
        let slot = shared
            .limits_state
            .try_agent(&claims.sub, shared.limits.max_connections_per_agent)
            .ok_or(Deny::TooManyConnections("this agent"))?;
        Ok((Arc::new(authority), claims, slot))
    })();
    match checked {
        Ok((authority, claims, _slot)) => {
            let mut ctx = Ctx {
                rec,
                scheme: Scheme::Http,
                authority,
                claims,
                route: None,
                tunnel: None,
            };
            let outcome = forward(&shared, &mut ctx, parts, &mut body).await;
            respond(ctx.rec, outcome, body, expects).await
        }
        Err(deny) => respond(rec, Err(deny), body, expects).await,
    }
}

/// A request refused before it could be parsed into anything else (not a proxy request).
/// `body` is read a little before answering when given.
pub async fn refuse_early(
    shared: &Shared,
    method: &Method,
    body: Option<Incoming>,
    expects_continue: bool,
    deny: Deny,
) -> Response<AuditedBody> {
    let rec = shared.recorder.open(method, String::new(), String::new());
    respond(rec, Err(deny), body, expects_continue).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(target: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().uri(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn bound() -> Authority {
        Authority::parse("api.example.test", Some(443)).unwrap()
    }

    #[test]
    fn bound_authority_accepts_the_tunnel_host_in_any_spelling() {
        for host in [
            "api.example.test",
            "API.example.test:443",
            "api.example.test.",
        ] {
            let p = parts("/x", &[("host", host)]);
            assert!(check_bound_authority(&p, &bound(), 443).is_ok(), "{host}");
        }
        let p = parts("https://api.example.test/x", &[]);
        assert!(check_bound_authority(&p, &bound(), 443).is_ok());
    }

    #[test]
    fn bound_authority_refuses_another_host_port_or_a_second_host_header() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("/x", &[("host", "other.example.test")]),
            ("/x", &[("host", "api.example.test:8443")]),
            ("/x", &[("host", "api.example.test"), ("host", "other")]),
            ("/x", &[]),
            (
                "https://other.example.test/x",
                &[("host", "api.example.test")],
            ),
            (
                "https://api.example.test/x",
                &[("host", "other.example.test")],
            ),
            ("/x", &[("host", "api.example.test@evil")]),
        ];
        for (target, headers) in cases {
            let p = parts(target, headers);
            let err = check_bound_authority(&p, &bound(), 443).expect_err("refused");
            assert_eq!(err.code(), "host_mismatch", "{target} {headers:?}");
        }
    }

    #[test]
    fn head_size_counts_headers_and_target() {
        assert!(check_head_size(&parts("/x", &[("a", "b")])).is_ok());
        let many: Vec<(String, String)> = (0..=MAX_HEADERS)
            .map(|i| (format!("x-h{i}"), "v".to_owned()))
            .collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (&**k, &**v)).collect();
        let err = check_head_size(&parts("/x", &refs)).unwrap_err();
        assert_eq!(err.code(), "headers_too_large");
        let big = "v".repeat(MAX_HEAD_BYTES);
        let err = check_head_size(&parts("/x", &[("x-big", &big)])).unwrap_err();
        assert_eq!(err.code(), "headers_too_large");
        // The target counts too: neither part is too large alone, together they are.
        let long_target = format!("/{}", "a".repeat(40_000));
        let half = "v".repeat(30_000);
        assert!(check_head_size(&parts(&long_target, &[])).is_ok());
        assert!(check_head_size(&parts("/x", &[("x-half", &half)])).is_ok());
        let err = check_head_size(&parts(&long_target, &[("x-half", &half)])).unwrap_err();
        assert_eq!(err.code(), "headers_too_large");
        let just_under = "v".repeat(MAX_HEAD_BYTES - 100);
        assert!(check_head_size(&parts("/x", &[("x-big", &just_under)])).is_ok());
    }

    #[test]
    fn content_length_reads_only_a_clean_number() {
        let h = |v: &str| parts("/", &[("content-length", v)]).headers;
        assert_eq!(content_length(&h("42")), Some(42));
        assert_eq!(content_length(&h("4 2")), None);
        assert_eq!(content_length(&h("-1")), None);
        assert_eq!(content_length(&parts("/", &[]).headers), None);
    }
}
