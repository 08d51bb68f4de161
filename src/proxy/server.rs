//! The life of a connection and of each request.
//!
//! ```text
//! accept -> CONNECT: token -> host in a granted route? -> 200 -> TLS (SNI == CONNECT host)
//!             -> each inner request: token still live? -> Host == CONNECT authority?
//!                -> normalised path -> policy -> inject -> forward -> audit
//!        -> absolute-form http://: token -> same checks, plain HTTP upstream
//! ```
//!
//! Every request ends in exactly one audit event, written in one place (`finish`) whether it
//! was allowed, denied or failed upstream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn, Instrument};

use super::forward::UpstreamBody;
use super::Shared;
use crate::audit::{AuditEvent, Decision};
use crate::auth::{self, Claims};
use crate::authority::Authority;
use crate::inject;
use crate::policy::decision::{AuthStage, Deny};
use crate::policy::{path, Allowed, Grant, Scheme};
use crate::ratelimit::Verdict;
use crate::redact::RedactBody;
use std::sync::atomic::{AtomicU8, Ordering};

/// Body of every response latchkey sends to an agent.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

/// Header carrying the request id on every response to the agent.
pub const REQUEST_ID: &str = "x-latchkey-request-id";

/// Tells every connection to finish its in-flight work and close, and lets the server wait
/// until they all have.
#[derive(Clone)]
pub struct Drain {
    stop: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

impl Drain {
    /// A drain handle plus the trigger and the waiter.
    pub fn new() -> (Drain, watch::Sender<bool>, mpsc::Receiver<()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (alive_tx, alive_rx) = mpsc::channel(1);
        (
            Drain {
                stop: stop_rx,
                _alive: alive_tx,
            },
            stop_tx,
            alive_rx,
        )
    }

    /// Resolves once shutdown has begun.
    pub async fn stopped(&mut self) {
        let _ = self.stop.wait_for(|s| *s).await;
    }
}

/// Accept connections until `drain` says stop.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut drain: Drain) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.stopped() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let drain = drain.clone();
        tokio::spawn(
            serve_connection(stream, shared, drain).instrument(tracing::debug_span!("conn", %peer)),
        );
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, mut drain: Drain) {
    let _open = shared.metrics.connection();
    // Over the cap the connection is still read, so the agent gets a clear 429 (and an audit
    // line) rather than a reset.
    let slot = shared
        .limits_state
        .try_global(shared.limits.max_connections);
    let over_limit = slot.is_none();
    // Shared with the request handler so a CONNECT can carry the slot into its tunnel.
    let slot: ConnSlot = Arc::new(std::sync::Mutex::new(slot));
    let svc_shared = shared.clone();
    let svc_drain = drain.clone();
    let svc_slot = slot.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let drain = svc_drain.clone();
        let slot = svc_slot.clone();
        async move {
            if over_limit {
                let rec = Record::new(req.method(), String::new(), String::new());
                let deny = Deny::TooManyConnections("this proxy");
                return Ok::<_, Infallible>(finish(&shared, rec, Err(deny)).await);
            }
            Ok::<_, Infallible>(handle_proxy_request(req, shared, drain, slot).await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_read_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(!over_limit)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res { debug!(error = %e, "agent connection ended with an error"); }
        }
        _ = drain.stopped() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
    drop(slot);
}

/// What the audit line says about who asked: filled in as soon as the token is known.
#[derive(Default, Clone)]
struct Who {
    agent: Option<String>,
    obo: Option<String>,
    session: Option<String>,
    task: Option<String>,
}

impl Who {
    fn from_claims(c: &Claims) -> Who {
        Who {
            agent: Some(c.sub.clone()),
            obo: c.obo.clone(),
            session: Some(c.jti.clone()),
            task: c.task.clone(),
        }
    }
}

/// One request's record, completed by `finish`.
struct Record {
    request_id: String,
    /// Wall-clock time the request arrived (the audit line's `ts`).
    received: chrono::DateTime<chrono::Utc>,
    start: Instant,
    who: Who,
    method: String,
    host: String,
    path: String,
    route: Option<String>,
    credential: Option<String>,
}

impl Record {
    fn new(method: &Method, host: String, path: String) -> Record {
        Record {
            request_id: auth::new_id(),
            received: chrono::Utc::now(),
            start: Instant::now(),
            who: Who::default(),
            method: method.as_str().to_owned(),
            host,
            path,
            route: None,
            credential: None,
        }
    }

    fn allowed(&mut self, allowed: &Allowed) {
        self.route = Some(allowed.route().id().to_owned());
        self.credential = allowed.route().credential().map(str::to_owned);
    }
}

/// The single exit of every request: write the audit line, log one line, stamp the request id,
/// and turn a `Deny` into the JSON answer.
async fn finish(
    shared: &Shared,
    rec: Record,
    outcome: Result<Response<ProxyBody>, Deny>,
) -> Response<ProxyBody> {
    let duration_ms = rec.start.elapsed().as_secs_f64() * 1000.0;
    let (mut resp, decision, reason) = match outcome {
        Ok(resp) => (resp, Decision::Allow, None),
        Err(deny) => {
            if deny.is_upstream_fault() {
                warn!(agent = ?rec.who.agent, host = %rec.host, reason = deny.code(), detail = %deny, "upstream failed");
            } else {
                debug!(agent = ?rec.who.agent, host = %rec.host, reason = deny.code(), detail = %deny, "denied");
            }
            let code = deny.code();
            (
                deny_response(&deny, &rec.request_id),
                Decision::Deny,
                Some(code),
            )
        }
    };
    let status = resp.status().as_u16();
    shared.metrics.record_request(
        rec.who.agent.as_deref(),
        rec.route.as_deref(),
        decision.as_str(),
        reason.unwrap_or(""),
    );
    info!(
        request_id = %rec.request_id,
        agent = rec.who.agent.as_deref().unwrap_or("-"),
        method = %rec.method,
        host = %rec.host,
        status,
        route = rec.route.as_deref().unwrap_or("-"),
        reason = reason.unwrap_or("-"),
        ms = format_args!("{duration_ms:.2}"),
        "request"
    );
    if let Ok(v) = HeaderValue::from_str(&rec.request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    shared
        .audit
        .record(AuditEvent {
            ts: rec.received,
            request_id: rec.request_id,
            agent: rec.who.agent,
            on_behalf_of: rec.who.obo,
            session: rec.who.session,
            task: rec.who.task,
            route: rec.route,
            credential: rec.credential,
            decision,
            reason: reason.map(str::to_owned),
            replica: Some(shared.replica.clone()),
            method: rec.method,
            host: rec.host,
            path: rec.path,
            status,
            duration_ms,
        })
        .await;
    resp
}

/// The JSON denial body. The detail names what was refused and why, never a secret or token.
fn deny_response(deny: &Deny, request_id: &str) -> Response<ProxyBody> {
    let error = match deny.status() {
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => "upstream_failed",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "denied",
    };
    let body = serde_json::json!({
        "error": error,
        "reason": deny.code(),
        "detail": deny.to_string(),
        "request_id": request_id,
    });
    let mut bytes = serde_json::to_vec(&body).expect("a JSON value serialises");
    bytes.push(b'\n');
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = deny.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(secs) = deny.retry_after_secs() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if deny.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        h.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"latchkey\""),
        );
    }
    resp
}

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// Dispatch a request on the agent's proxy connection.
async fn handle_proxy_request(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    drain: Drain,
    slot: ConnSlot,
) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        handle_connect(req, shared, drain, slot).await
    } else if req.uri().scheme().is_some() {
        handle_plain(req, shared).await
    } else {
        let rec = Record::new(req.method(), String::new(), req.uri().path().to_owned());
        let deny = Deny::BadRequest(
            "latchkey is a forward proxy: send CONNECT host:port or an absolute-form http:// request"
                .into(),
        );
        finish(&shared, rec, Err(deny)).await
    }
}

/// Authenticate the proxy request (407 on failure). The claims are known before the
/// revocation check so that a refused revoked token is still attributed in the audit log.
fn authenticate(
    shared: &Shared,
    headers: &http::HeaderMap,
    rec: &mut Record,
) -> Result<Arc<Claims>, Deny> {
    let token = auth::token_from_header(headers.get(header::PROXY_AUTHORIZATION))?;
    let claims = match shared.keys.verify(&token, AuthStage::Proxy) {
        Ok(c) => c,
        Err(deny) => {
            // An expired token signed by us still names who tried: attribute the refusal.
            if matches!(deny, Deny::TokenExpired(_)) {
                if let Some(c) = shared.keys.claims_of_expired(&token) {
                    rec.who = Who::from_claims(&c);
                }
            }
            return Err(deny);
        }
    };
    rec.who = Who::from_claims(&claims);
    shared.revocations.check(&claims, AuthStage::Proxy)?;
    Ok(claims)
}

/// The accepted connection's global slot, handed to the tunnel on CONNECT.
type ConnSlot = Arc<std::sync::Mutex<Option<super::limits::GlobalSlot>>>;

async fn handle_connect(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    drain: Drain,
    conn_slot: ConnSlot,
) -> Response<ProxyBody> {
    let raw_authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let mut rec = Record::new(req.method(), raw_authority.clone(), String::new());
    let checked = (|| {
        let authority = Authority::parse(&raw_authority, None)
            .map_err(|e| Deny::BadRequest(format!("CONNECT target: {e}")))?;
        rec.host = authority.to_string();
        let claims = authenticate(&shared, req.headers(), &mut rec)?;
        let policies = shared.policies.load();
        let policy = policies
            .get(&claims.sub)
            .ok_or_else(|| Deny::HostNotAllowed {
                agent: claims.sub.clone(),
                host: authority.to_string(),
            })?;
        // SECURITY: refuse before any TLS: no leaf is minted for a host the agent may not use.
        if !policy.allows_host(Scheme::Https, &authority, Grant(claims.routes.as_deref())) {
            return Err(Deny::HostNotAllowed {
                agent: claims.sub.clone(),
                host: authority.to_string(),
            });
        }
        let slot = shared
            .limits_state
            .try_agent(&claims.sub, shared.limits.max_connections_per_agent)
            .ok_or(Deny::TooManyConnections("this agent"))?;
        Ok((authority, claims, slot))
    })();
    let (authority, claims, slot) = match checked {
        Ok(ok) => ok,
        Err(deny) => return finish(&shared, rec, Err(deny)).await,
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let tunnel_shared = shared.clone();
    // The tunnel outlives the HTTP connection it came from: it keeps counting against the cap.
    let global_slot = conn_slot
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    let span = tracing::debug_span!("tunnel", agent = %claims.sub, host = %authority);
    tokio::spawn(
        async move {
            let _slots = (slot, global_slot);
            match upgrade.await {
                Ok(upgraded) => {
                    let tunnel = Tunnel {
                        authority: Arc::new(authority),
                        claims,
                        shared: tunnel_shared,
                    };
                    tunnel.run(TokioIo::new(upgraded), drain).await;
                }
                Err(e) => debug!(error = %e, "CONNECT upgrade failed"),
            }
        }
        .instrument(span),
    );
    finish(&shared, rec, Ok(Response::new(full(Bytes::new())))).await
}

/// An established CONNECT tunnel: the authority and token it was opened with.
#[derive(Clone)]
struct Tunnel {
    authority: Arc<Authority>,
    claims: Arc<Claims>,
    shared: Arc<Shared>,
}

impl Tunnel {
    async fn run(self, io: TokioIo<hyper::upgrade::Upgraded>, mut drain: Drain) {
        let shared = self.shared.clone();
        let _open = shared.metrics.tunnel();
        let limits = &self.shared.limits;
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
        let start = match tokio::time::timeout(limits.handshake_timeout, acceptor).await {
            Ok(Ok(start)) => start,
            Ok(Err(e)) => return debug!(error = %e, "no TLS ClientHello in tunnel"),
            Err(_) => return debug!("TLS ClientHello timed out"),
        };
        // SECURITY: domain fronting guard. A client that names another host in SNI than in
        // CONNECT gets no certificate at all.
        if let Some(sni) = start.client_hello().server_name() {
            let sni_norm = sni.trim_end_matches('.').to_ascii_lowercase();
            if sni_norm
                != self
                    .authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
            {
                let mut rec =
                    Record::new(&Method::CONNECT, self.authority.to_string(), String::new());
                rec.who = Who::from_claims(&self.claims);
                let deny = Deny::HostMismatch {
                    expected: self.authority.host().to_owned(),
                    got: format!("TLS SNI {sni_norm}"),
                };
                let _ = finish(&self.shared, rec, Err(deny)).await;
                return;
            }
        }
        let config = match self
            .shared
            .leaves
            .server_config(self.authority.host())
            .await
        {
            Ok(c) => c,
            Err(e) => return tracing::error!(error = %e, "cannot mint a leaf certificate"),
        };
        let tls =
            match tokio::time::timeout(limits.handshake_timeout, start.into_stream(config)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(error = %e, "agent TLS handshake failed"),
                Err(_) => return debug!("agent TLS handshake timed out"),
            };
        let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        let this = self.clone();
        let service = service_fn(move |req| {
            let tunnel = this.clone();
            async move { Ok::<_, Infallible>(tunnel.handle(req).await) }
        });
        if is_h2 {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(100)
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => { if let Err(e) = res { debug!(error = %e, "h2 tunnel ended"); } }
                _ = drain.stopped() => { conn.as_mut().graceful_shutdown(); let _ = conn.await; }
            }
        } else {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => { if let Err(e) = res { debug!(error = %e, "h1 tunnel ended"); } }
                _ = drain.stopped() => { conn.as_mut().graceful_shutdown(); let _ = conn.await; }
            }
        }
    }

    /// One request inside the tunnel.
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let mut rec = Record::new(
            &parts.method,
            self.authority.to_string(),
            parts.uri.path().to_owned(),
        );
        rec.who = Who::from_claims(&self.claims);
        let outcome = self.forward(parts, body, &mut rec).await;
        finish(&self.shared, rec, outcome).await
    }

    async fn forward(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        rec: &mut Record,
    ) -> Result<Response<ProxyBody>, Deny> {
        let shared = &self.shared;
        // Revocation and expiry bite on every request, not only at CONNECT.
        let live = if let Err(deny) = check_head_size(&parts) {
            Err(deny)
        } else if self.claims.is_expired_at(auth::unix_now()) {
            Err(Deny::TokenExpired(AuthStage::Tunnel))
        } else if let Err(deny) = shared.revocations.check(&self.claims, AuthStage::Tunnel) {
            Err(deny)
        } else if !shared.keys.still_trusted(&self.claims) {
            // The signing key was retired since the tunnel opened: the issuer withdrew it.
            Err(Deny::TokenRevoked(AuthStage::Tunnel))
        } else {
            check_bound_authority(&parts, &self.authority, 443)
        };
        if let Err(deny) = live {
            return Err(refuse(body, deny).await);
        }
        forward_checked(
            shared,
            parts,
            body,
            rec,
            Scheme::Https,
            &self.authority,
            &self.claims,
        )
        .await
    }
}

/// Largest request head (target plus header names and values) accepted, and most headers.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;

/// SECURITY: hyper's read-buffer limit is soft (one large read can pass it), so the parsed
/// head is measured again; an oversized head never reaches the shared upstream connection,
/// where the upstream's own limit would tear it down for every agent.
fn check_head_size(parts: &http::request::Parts) -> Result<(), Deny> {
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

/// Read (and discard) a little of a refused request's body before answering. Answering while
/// the agent is still sending makes HTTP/2 reset the stream, and some clients (curl 7.88)
/// then lose the answer. Bounded in bytes and time: a refusal never waits on a slow agent.
async fn refuse(mut body: Incoming, deny: Deny) -> Deny {
    const DRAIN_BYTES: usize = 256 * 1024;
    const DRAIN_TIME: std::time::Duration = std::time::Duration::from_millis(500);
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut read = 0;
        while read < DRAIN_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    })
    .await;
    deny
}

/// SECURITY: the request must address the host the tunnel was opened (and authorised) for:
/// absolute-form URI / `:authority` and every `Host` header. Stops the Host-header bypass
/// (coder/httpjail#57) and h2 `:authority` switching.
fn check_bound_authority(
    req: &http::request::Parts,
    bound: &Authority,
    default_port: u16,
) -> Result<(), Deny> {
    let mismatch = |got: String| Deny::HostMismatch {
        expected: bound.to_string(),
        got,
    };
    if let Some(a) = req.uri.authority() {
        let parsed = Authority::parse(a.as_str(), Some(default_port))
            .map_err(|_| mismatch(a.as_str().to_owned()))?;
        if parsed != *bound {
            return Err(mismatch(parsed.to_string()));
        }
    }
    let mut hosts = req.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(mismatch("several Host headers".into())),
        (Some(h), None) => {
            let text = h
                .to_str()
                .map_err(|_| mismatch("a non-ASCII Host".into()))?;
            let parsed = Authority::parse(text, Some(default_port))
                .map_err(|_| mismatch(text.to_owned()))?;
            if parsed != *bound {
                return Err(mismatch(parsed.to_string()));
            }
        }
        (None, _) => {
            if req.uri.authority().is_none() {
                return Err(mismatch("no Host header".into()));
            }
        }
    }
    Ok(())
}

/// Absolute-form `http://host/path` on the proxy connection itself.
async fn handle_plain(req: Request<Incoming>, shared: Arc<Shared>) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let host_text = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let mut rec = Record::new(
        &parts.method,
        host_text.clone(),
        parts.uri.path().to_owned(),
    );
    let checked = (|| {
        check_head_size(&parts)?;
        if parts.uri.scheme_str() != Some("http") {
            return Err(Deny::BadRequest(
                "only http:// is proxied in absolute form; use CONNECT for https".into(),
            ));
        }
        let authority = Authority::parse(&host_text, Some(80))
            .map_err(|e| Deny::BadRequest(format!("request target: {e}")))?;
        rec.host = authority.to_string();
        let claims = authenticate(&shared, &parts.headers, &mut rec)?;
        check_bound_authority(&parts, &authority, 80)?;
        let slot = shared
            .limits_state
            .try_agent(&claims.sub, shared.limits.max_connections_per_agent)
            .ok_or(Deny::TooManyConnections("this agent"))?;
        Ok((authority, claims, slot))
    })();
    let outcome = match checked {
        Ok((authority, claims, _slot)) => {
            forward_checked(
                &shared,
                parts,
                body,
                &mut rec,
                Scheme::Http,
                &authority,
                &claims,
            )
            .await
        }
        Err(deny) => Err(refuse(body, deny).await),
    };
    finish(&shared, rec, outcome).await
}

/// The shared tail of both paths: normalise, decide, inject, forward, stream back.
async fn forward_checked(
    shared: &Arc<Shared>,
    mut parts: http::request::Parts,
    body: Incoming,
    rec: &mut Record,
    scheme: Scheme,
    authority: &Authority,
    claims: &Claims,
) -> Result<Response<ProxyBody>, Deny> {
    let decided = decide(shared, &parts, rec, scheme, authority, claims);
    let (allowed, normalized) = match decided {
        Ok(ok) => ok,
        Err(deny) => return Err(refuse(body, deny).await),
    };
    // After policy (only allowed requests count against a limit), before any credential is
    // touched or a byte goes upstream.
    if let Some(rate) = allowed.route().rate() {
        if let Verdict::Deny { retry_after_secs } = shared
            .rate_limits
            .check(&claims.sub, allowed.route().id(), rate, &shared.metrics)
            .await
        {
            return Err(refuse(body, Deny::RateLimited { retry_after_secs }).await);
        }
    }
    let limit = allowed.route().max_body().unwrap_or(shared.limits.max_body);
    // SECURITY: a body announced larger than the limit never reaches the upstream.
    if let Some(len) = content_length(&parts.headers) {
        if len > limit {
            return Err(refuse(body, Deny::BodyTooLarge(limit)).await);
        }
    }
    let secret = match inject::credential(&allowed, &shared.secrets).await {
        Ok(s) => s,
        Err(deny) => return Err(refuse(body, deny).await),
    };
    let query = parts.uri.query().map(str::to_owned);
    let injected = match inject::apply(
        &mut parts,
        scheme,
        authority,
        &normalized,
        query.as_deref(),
        &allowed,
        secret,
        &shared.prepared,
    ) {
        Ok(i) => i,
        Err(deny) => return Err(refuse(body, deny).await),
    };
    let (limited, body_state) = LimitedBody::new(body, limit);
    let upstream_req = Request::from_parts(parts, limited.boxed_unsync() as UpstreamBody);
    let sent = Instant::now();
    let resp = shared
        .upstream
        .send(upstream_req)
        .instrument(tracing::debug_span!("upstream"))
        .await;
    shared.metrics.observe_upstream(sent.elapsed());
    let resp = match resp {
        Ok(r) => r,
        Err(deny) => {
            return Err(match body_state.load(Ordering::Acquire) {
                BODY_OVER_LIMIT => Deny::BodyTooLarge(limit),
                // The agent's body broke, not the upstream: say so, to the agent and the log.
                BODY_BROKEN => Deny::BadBody,
                _ => deny,
            });
        }
    };
    let (mut parts, body) = resp.into_parts();
    inject::strip_response_headers(&mut parts.headers);
    let Some(needles) = injected.needles else {
        return Ok(Response::from_parts(parts, body.boxed_unsync()));
    };
    // SECURITY: an upstream that echoes the credential (debug endpoints, error pages) must
    // not hand it to the agent.
    let credential = allowed.route().credential().unwrap_or("?").to_owned();
    let request_id = rec.request_id.clone();
    if needles.redact_headers(&mut parts.headers) {
        warn!(%credential, %request_id, "upstream echoed the injected credential in a header; redacted");
        shared.metrics.record_redaction();
    }
    // The length may change; let the framing layer re-frame.
    parts.headers.remove(header::CONTENT_LENGTH);
    let metrics_shared = shared.clone();
    let on_redact = Box::new(move || {
        warn!(%credential, %request_id, "upstream echoed the injected credential in the body; redacted");
        metrics_shared.metrics.record_redaction();
    });
    let body = RedactBody::new(body, needles, on_redact);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// Normalise the path and ask policy. Fills the record as facts become known.
fn decide(
    shared: &Shared,
    parts: &http::request::Parts,
    rec: &mut Record,
    scheme: Scheme,
    authority: &Authority,
    claims: &Claims,
) -> Result<(Allowed, String), Deny> {
    let normalized = path::normalize(parts.uri.path())
        .map_err(Deny::BadPath)?
        .into_owned();
    rec.path.clone_from(&normalized);
    let policies = shared.policies.load();
    let policy = policies
        .get(&claims.sub)
        .ok_or_else(|| Deny::NoRoute(format!("no policy is loaded for agent {}", claims.sub)))?;
    let allowed = policy.decide(
        scheme,
        authority,
        &parts.method,
        &normalized,
        Grant(claims.routes.as_deref()),
    )?;
    rec.allowed(&allowed);
    Ok((allowed, normalized))
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The agent's request body, cut off with an error once it exceeds the route's limit (for
/// bodies whose size was not announced).
struct LimitedBody {
    inner: Incoming,
    left: u64,
    state: Arc<AtomicU8>,
}

/// `LimitedBody` states, read after a failed upstream exchange to say whose fault it was.
const BODY_OK: u8 = 0;
const BODY_OVER_LIMIT: u8 = 1;
const BODY_BROKEN: u8 = 2;

impl LimitedBody {
    fn new(inner: Incoming, limit: u64) -> (LimitedBody, Arc<AtomicU8>) {
        let state = Arc::new(AtomicU8::new(BODY_OK));
        (
            LimitedBody {
                inner,
                left: limit,
                state: state.clone(),
            },
            state,
        )
    }
}

/// Why an agent's body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("the request body exceeds the route's limit")]
struct BodyOverLimit;

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = super::forward::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > this.left {
                    this.state.store(BODY_OVER_LIMIT, Ordering::Release);
                    // SECURITY: an error (not an early end) aborts the upstream request, so
                    // the upstream never takes a truncated body for a complete one.
                    return Poll::Ready(Some(Err(Box::new(BodyOverLimit))));
                }
                this.left -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.store(BODY_BROKEN, Ordering::Release);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
