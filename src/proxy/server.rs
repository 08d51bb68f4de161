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
    let svc_shared = shared.clone();
    let svc_drain = drain.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let drain = svc_drain.clone();
        async move { Ok::<_, Infallible>(handle_proxy_request(req, shared, drain).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_read_timeout)
        .max_buf_size(64 * 1024)
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
            ts: chrono::Utc::now(),
            request_id: rec.request_id,
            agent: rec.who.agent,
            on_behalf_of: rec.who.obo,
            session: rec.who.session,
            task: rec.who.task,
            route: rec.route,
            credential: rec.credential,
            decision,
            reason: reason.map(str::to_owned),
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
) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        handle_connect(req, shared, drain).await
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

/// Authenticate the proxy request (407 on failure).
fn authenticate(shared: &Shared, req: &Request<Incoming>) -> Result<Claims, Deny> {
    let token = auth::token_from_header(req.headers().get(header::PROXY_AUTHORIZATION))?;
    let claims = shared.keys.verify(&token, AuthStage::Proxy)?;
    if shared.revocations.is_revoked(&claims) {
        return Err(Deny::TokenRevoked(AuthStage::Proxy));
    }
    Ok(claims)
}

async fn handle_connect(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    drain: Drain,
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
        let claims = authenticate(&shared, &req)?;
        rec.who = Who::from_claims(&claims);
        rec.host = authority.to_string();
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
        Ok((authority, claims))
    })();
    let (authority, claims) = match checked {
        Ok(ok) => ok,
        Err(deny) => return finish(&shared, rec, Err(deny)).await,
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let tunnel_shared = shared.clone();
    let span = tracing::debug_span!("tunnel", agent = %claims.sub, host = %authority);
    tokio::spawn(
        async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let tunnel = Tunnel {
                        authority: Arc::new(authority),
                        claims: Arc::new(claims),
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
        let mut rec = Record::new(
            req.method(),
            self.authority.to_string(),
            req.uri().path().to_owned(),
        );
        rec.who = Who::from_claims(&self.claims);
        let outcome = self.forward(req, &mut rec).await;
        finish(&self.shared, rec, outcome).await
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        rec: &mut Record,
    ) -> Result<Response<ProxyBody>, Deny> {
        let shared = &self.shared;
        // Revocation and expiry bite on every request, not only at CONNECT.
        if self.claims.is_expired_at(auth::unix_now()) {
            return Err(Deny::TokenExpired(AuthStage::Tunnel));
        }
        if shared.revocations.is_revoked(&self.claims) {
            return Err(Deny::TokenRevoked(AuthStage::Tunnel));
        }
        check_bound_authority(&req, &self.authority, 443)?;
        forward_checked(
            shared,
            req,
            rec,
            Scheme::Https,
            &self.authority,
            &self.claims,
        )
        .await
    }
}

/// SECURITY: the request must address the host the tunnel was opened (and authorised) for:
/// absolute-form URI / `:authority` and every `Host` header. Stops the Host-header bypass
/// (coder/httpjail#57) and h2 `:authority` switching.
fn check_bound_authority<B>(
    req: &Request<B>,
    bound: &Authority,
    default_port: u16,
) -> Result<(), Deny> {
    let mismatch = |got: String| Deny::HostMismatch {
        expected: bound.to_string(),
        got,
    };
    if let Some(a) = req.uri().authority() {
        let parsed = Authority::parse(a.as_str(), Some(default_port))
            .map_err(|_| mismatch(a.as_str().to_owned()))?;
        if parsed != *bound {
            return Err(mismatch(parsed.to_string()));
        }
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
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
            if req.uri().authority().is_none() {
                return Err(mismatch("no Host header".into()));
            }
        }
    }
    Ok(())
}

/// Absolute-form `http://host/path` on the proxy connection itself.
async fn handle_plain(req: Request<Incoming>, shared: Arc<Shared>) -> Response<ProxyBody> {
    let host_text = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let mut rec = Record::new(req.method(), host_text.clone(), req.uri().path().to_owned());
    let outcome = async {
        if req.uri().scheme_str() != Some("http") {
            return Err(Deny::BadRequest(
                "only http:// is proxied in absolute form; use CONNECT for https".into(),
            ));
        }
        let authority = Authority::parse(&host_text, Some(80))
            .map_err(|e| Deny::BadRequest(format!("request target: {e}")))?;
        rec.host = authority.to_string();
        let claims = authenticate(&shared, &req)?;
        rec.who = Who::from_claims(&claims);
        check_bound_authority(&req, &authority, 80)?;
        forward_checked(&shared, req, &mut rec, Scheme::Http, &authority, &claims).await
    }
    .await;
    finish(&shared, rec, outcome).await
}

/// The shared tail of both paths: normalise, decide, inject, forward, stream back.
async fn forward_checked(
    shared: &Shared,
    req: Request<Incoming>,
    rec: &mut Record,
    scheme: Scheme,
    authority: &Authority,
    claims: &Claims,
) -> Result<Response<ProxyBody>, Deny> {
    let normalized = path::normalize(req.uri().path())
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
        req.method(),
        &normalized,
        Grant(claims.routes.as_deref()),
    )?;
    rec.allowed(&allowed);
    let query = req.uri().query().map(str::to_owned);
    let (mut parts, body) = req.into_parts();
    inject::apply(
        &mut parts,
        scheme,
        authority,
        &normalized,
        query.as_deref(),
        &allowed,
        &shared.secrets,
    )?;
    let upstream_req = Request::from_parts(parts, body.boxed_unsync() as UpstreamBody);
    let sent = Instant::now();
    let resp = shared
        .upstream
        .send(upstream_req)
        .instrument(tracing::debug_span!("upstream"))
        .await;
    shared.metrics.observe_upstream(sent.elapsed());
    let resp = resp?;
    let (mut parts, body) = resp.into_parts();
    inject::strip_response_headers(&mut parts.headers);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}
