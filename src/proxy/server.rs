//! The life of a connection: accept, serve HTTP/1.1 on the proxy port, open CONNECT tunnels
//! and terminate TLS inside them, and stop cleanly when told to drain.
//!
//! ```text
//! accept -> CONNECT: token -> host in a granted route? -> 200 -> TLS (SNI == CONNECT host)
//!             -> each inner request: request::in_tunnel
//!        -> absolute-form http://: request::plain
//!        -> origin-form /gw/<route>/...: gateway::handle
//! ```
//!
//! What happens to each request (and its audit record) is `request`'s business; this module
//! owns sockets, TLS and shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn, Instrument};

use super::body::AuditedBody;
use super::gateway;
use super::limits::Admission;
use super::primed::Primed;
use super::readahead::{tunnel_stream, TunnelStream};
use super::request::{self, who};
use super::Shared;
use crate::audit::Outcome;
use crate::auth::Claims;
use crate::authority::{self, Authority};
use crate::deny::Deny;
use crate::policy::{Grant, Scheme};

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

/// Accept connections on `listener` until `drain` says stop, handing each to `serve`. An
/// accept error (EMFILE and friends) backs off briefly instead of spinning.
pub async fn accept_loop<F, Fut>(listener: TcpListener, mut drain: Drain, serve: F)
where
    F: Fn(TcpStream, SocketAddr, Drain) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.stopped() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(serve(stream, peer, drain.clone()));
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A hyper connection that can be asked to finish its in-flight requests and close.
pub trait Drainable: Future<Output = Result<(), hyper::Error>> {
    /// Stop taking new requests; the future resolves once the in-flight ones are done.
    fn start_draining(self: Pin<&mut Self>);
}

impl<I, S> Drainable for hyper::server::conn::http1::Connection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn start_draining(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Drainable for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn start_draining(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> Drainable for hyper::server::conn::http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn start_draining(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serve one connection to its end, or, once shutdown begins, until its in-flight requests
/// are done. `what` names the connection in the debug line of an abnormal end, which is
/// returned for the caller to judge (see [`refused_by_hyper`]).
pub async fn serve_until_drained<C: Drainable>(
    conn: C,
    mut drain: Drain,
    what: &'static str,
) -> Option<hyper::Error> {
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            let e = res.err()?;
            debug!(error = %e, "{what} ended with an error");
            Some(e)
        }
        _ = drain.stopped() => {
            conn.as_mut().start_draining();
            let _ = conn.await;
            None
        }
    }
}

/// The answer hyper sent by itself when a request head could not be parsed, as the status it
/// sent and the refusal it amounts to. Such a head never becomes a request for our handler,
/// but it did reach latchkey, so it still gets its audit line. `None` when hyper sent nothing
/// (the connection closed, timed out, or spoke HTTP/2 on an HTTP/1 connection).
pub fn refused_by_hyper(e: &hyper::Error) -> Option<(u16, Deny)> {
    // hyper reports the kind only through its fixed descriptions: 414 for "URI too long",
    // 431 for an over-large head, 400 for the other head parse errors (its `on_error`).
    let text = e.to_string();
    if e.is_parse_too_large() {
        let status = if text.contains("URI too long") {
            414
        } else {
            431
        };
        return Some((status, Deny::HeadersTooLarge(request::MAX_HEAD_BYTES)));
    }
    if e.is_parse() && !text.contains("HTTP2 preface") && !text.contains("internal error") {
        return Some((
            400,
            Deny::BadRequest(format!("the request head could not be parsed: {text}")),
        ));
    }
    None
}

/// Write the line of a head hyper refused (see [`refused_by_hyper`]); inside a tunnel it is
/// attributed to the tunnel's token.
fn record_refused_head(shared: &Shared, e: &hyper::Error, host: String, claims: Option<&Claims>) {
    let Some((status, deny)) = refused_by_hyper(e) else {
        return;
    };
    let mut rec = shared.recorder.open_raw("-", host, String::new());
    if let Some(c) = claims {
        rec.who = who(c);
    }
    deny.log(rec.request_id(), rec.who.agent.as_deref(), &rec.host);
    rec.responded(status);
    rec.finish(Outcome::Denied, Some(deny.code()));
}

/// Accept agent connections on the proxy port until `drain` says stop.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, drain: Drain) {
    accept_loop(listener, drain, move |stream, peer, drain| {
        let _ = stream.set_nodelay(true);
        serve_connection(stream, shared.clone(), drain)
            .instrument(tracing::debug_span!("conn", %peer))
    })
    .await;
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, drain: Drain) {
    let _open = shared.metrics.connection();
    // SECURITY: until a request on it authenticates, a connection sits in a pool of its own,
    // bounded and separate from the authenticated one, and has a short deadline: idle
    // sockets from anyone who can reach the port never take what agents use.
    let pending = shared
        .limits_state
        .enter_pending(shared.limits.max_unauthenticated_connections);
    serve_http(stream, pending, shared.clone(), drain).await;
}

/// Accept agent connections on the TLS listener (`--listen-tls`) until `drain` says stop:
/// TLS with latchkey's own certificate first, then the same HTTP/1.1 service as the plain
/// listener (CONNECT tunnels, absolute-form requests, gateway requests).
pub async fn serve_tls(
    listener: TcpListener,
    shared: Arc<Shared>,
    drain: Drain,
    config: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    accept_loop(listener, drain, move |stream, peer, drain| {
        let _ = stream.set_nodelay(true);
        serve_tls_connection(stream, acceptor.clone(), shared.clone(), drain)
            .instrument(tracing::debug_span!("conn", %peer, tls = true))
    })
    .await;
}

async fn serve_tls_connection(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    drain: Drain,
) {
    let _open = shared.metrics.connection();
    // SECURITY: the handshake is done by a connection that has not authenticated: it holds
    // a place in the unauthenticated pool (and may be evicted from it) from the first byte,
    // and must finish within the first-request deadline.
    let pending = shared
        .limits_state
        .enter_pending(shared.limits.max_unauthenticated_connections);
    let eviction = pending.eviction();
    let limit = shared
        .limits
        .handshake_timeout
        .min(shared.limits.first_request_timeout);
    let tls = tokio::select! {
        r = tokio::time::timeout(limit, acceptor.accept(stream)) => match r {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return debug!(error = %e, "TLS handshake on the TLS listener failed"),
            Err(_) => return debug!("TLS handshake on the TLS listener timed out"),
        },
        _ = eviction.evicted() => return debug!("unauthenticated TLS connection closed to make room for a newer one"),
    };
    serve_http(tls, pending, shared.clone(), drain).await;
}

/// Serve HTTP/1.1 on an agent connection (plain or TLS) to its end.
async fn serve_http<I>(
    io: I,
    pending: super::limits::PendingSlot,
    shared: Arc<Shared>,
    drain: Drain,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let eviction = pending.eviction();
    let admission = Arc::new(Admission::pending(pending));
    let svc_shared = shared.clone();
    let svc_drain = drain.clone();
    let svc_admission = admission.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let shared = svc_shared.clone();
        let drain = svc_drain.clone();
        let admission = svc_admission.clone();
        async move {
            let mut resp = dispatch(req, shared, drain, &admission).await;
            // SECURITY: a connection refused at the proxy level (no or a bad token, a host
            // not granted, over a cap) is closed after the answer rather than kept alive to
            // try again with its slot still held.
            if !admission.is_admitted() || resp.status() == StatusCode::TOO_MANY_REQUESTS {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_read_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let served = serve_until_drained(conn, drain, "agent connection");
    tokio::pin!(served);
    let deadline = tokio::time::sleep(shared.limits.first_request_timeout);
    tokio::pin!(deadline);
    let (mut deadline_passed, mut evicted) = (false, false);
    // Dropping `served` closes the socket; a request in progress still gets its audit line
    // (its record completes on drop).
    let ended = loop {
        tokio::select! {
            ended = &mut served => break ended,
            _ = &mut deadline, if !deadline_passed => {
                deadline_passed = true;
                if !admission.is_admitted() {
                    debug!("not authenticated within the first-request timeout; closing");
                    break None;
                }
            }
            _ = eviction.evicted(), if !evicted => {
                evicted = true;
                if !admission.is_admitted() {
                    debug!("unauthenticated connection closed to make room for a newer one");
                    break None;
                }
            }
        }
    };
    if let Some(e) = ended {
        record_refused_head(&shared, &e, String::new(), None);
    }
    drop(admission);
}

/// Dispatch a request on the agent's proxy connection.
async fn dispatch(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    drain: Drain,
    admission: &Admission,
) -> Response<AuditedBody> {
    if req.method() == Method::CONNECT {
        connect(req, shared, drain, admission).await
    } else if req.uri().scheme().is_some() {
        // SECURITY: absolute form is always proxy mode, even with a `/gw/` path: the target
        // it names is checked as a proxy target, never taken as a gateway request.
        request::plain(shared, req, admission).await
    } else if gateway::is_gateway(req.uri()) {
        gateway::handle(shared, req, admission).await
    } else {
        let (parts, body) = req.into_parts();
        let deny = Deny::BadRequest(
            "latchkey is a forward proxy: send CONNECT host:port or an absolute-form http:// \
             request, or use gateway mode: /gw/<route-id>/<path>"
                .into(),
        );
        let expects = request::expects_continue(&parts.headers);
        request::refuse_early(&shared, &parts.method, Some(body), expects, deny).await
    }
}

/// CONNECT: authenticate, check the host against the agent's granted routes, its connection
/// cap and the authenticated pool, answer 200 and hand the upgraded connection to a
/// [`Tunnel`].
async fn connect(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    drain: Drain,
    admission: &Admission,
) -> Response<AuditedBody> {
    let raw_authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    // SECURITY: the line never holds userinfo, where agents put their token; the checked
    // form replaces this once the target parses.
    let mut rec = shared.recorder.open(
        req.method(),
        authority::without_userinfo(&raw_authority).to_owned(),
        String::new(),
    );
    let checked = (|| {
        // A CONNECT target is `host:port` (RFC 9110 9.3.6); `https://host:443/` is not one.
        if req.uri().scheme().is_some() || req.uri().path_and_query().is_some() {
            return Err(Deny::BadRequest(
                "CONNECT target: send host:port, not a URL".into(),
            ));
        }
        let authority = Authority::parse(&raw_authority, None)
            .map_err(|e| Deny::BadRequest(format!("CONNECT target: {e}")))?;
        rec.host = authority.to_string();
        let claims = request::authenticate(&shared, req.headers(), &mut rec)?;
        let host_not_allowed = || Deny::HostNotAllowed {
            agent: claims.sub.clone(),
            host: authority.to_string(),
        };
        let policies = shared.policies.load();
        let policy = policies.get(&claims.sub).ok_or_else(host_not_allowed)?;
        // SECURITY: refuse before any TLS: no leaf is minted for a host the agent may not use.
        if !policy.allows_host(Scheme::Https, &authority, Grant(claims.routes.as_deref())) {
            return Err(host_not_allowed());
        }
        let slot = shared
            .limits_state
            .try_agent(&claims.sub, shared.limits.max_connections_per_agent)
            .ok_or(Deny::TooManyConnections("this agent"))?;
        if !admission.admit(&shared.limits_state, shared.limits.max_connections) {
            return Err(Deny::TooManyConnections("this proxy"));
        }
        Ok((authority, claims, slot))
    })();
    let (authority, claims, slot) = match checked {
        Ok(ok) => ok,
        Err(deny) => return request::respond(rec, Err(deny), None, false).await,
    };
    let upgrade = hyper::upgrade::on(&mut req);
    // The tunnel outlives the HTTP connection it came from: it keeps counting against the cap.
    let global_slot = admission.take_slot();
    let span = tracing::debug_span!("tunnel", agent = %claims.sub, host = %authority);
    // Held by the tunnel and by every WebSocket session opened in it, which outlive the
    // tunnel's HTTP connection: the agent's connection counts against the caps until the
    // last of them ends.
    let slots: Arc<dyn std::any::Any + Send + Sync> = Arc::new((slot, global_slot));
    let tunnel = Tunnel {
        authority: Arc::new(authority),
        claims,
        shared: shared.clone(),
        slots,
    };
    tokio::spawn(
        async move {
            match upgrade.await {
                Ok(upgraded) => tunnel.run(tunnel_stream(upgraded), drain).await,
                Err(e) => debug!(error = %e, "CONNECT upgrade failed"),
            }
        }
        .instrument(span),
    );
    request::tunnel_opened(rec)
}

/// An established CONNECT tunnel: the authority and token it was opened with.
#[derive(Clone)]
struct Tunnel {
    authority: Arc<Authority>,
    claims: Arc<Claims>,
    shared: Arc<Shared>,
    /// The agent's connection slots (see `connect`).
    slots: Arc<dyn std::any::Any + Send + Sync>,
}

impl Tunnel {
    async fn run(self, io: TunnelStream, drain: Drain) {
        let shared = self.shared.clone();
        let _open = shared.metrics.tunnel();
        // Each stage that is large and passes is boxed, so the task, which lives as long as
        // the tunnel, is sized for what it waits on now: a handshake's state is freed when it
        // is done, and a tunnel not used yet holds its TLS session and little else.
        let Some(tls) = Box::pin(self.handshake(io)).await else {
            return;
        };
        let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let header_read_timeout = shared.limits.header_read_timeout;
        let (authority, claims) = (self.authority.clone(), self.claims.clone());
        let svc_drain = drain.clone();
        let service = service_fn(move |req| {
            let Tunnel {
                authority,
                claims,
                shared,
                slots,
            } = self.clone();
            let hold = request::TunnelHold {
                drain: svc_drain.clone(),
                slots,
            };
            async move {
                Ok::<_, Infallible>(request::in_tunnel(shared, authority, claims, req, hold).await)
            }
        });
        if is_h2 {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(100)
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                // RFC 8441: WebSocket over an HTTP/2 stream (extended CONNECT).
                .enable_connect_protocol()
                .serve_connection(TokioIo::new(tls), service);
            // HTTP/2 errors end the connection, not one request: no line of their own.
            let _ = Box::pin(serve_until_drained(conn, drain, "h2 tunnel")).await;
            return;
        }
        // The HTTP/1 connection (and hyper's two 8 KiB buffers) is built when the first
        // request begins, not for a tunnel the agent has opened but not used yet. Its head is
        // still due within the header read timeout of the tunnel being ready, as every later
        // head is of the connection going idle (hyper's timer).
        let mut drain = drain;
        let head_due = tokio::time::Instant::now() + header_read_timeout;
        let waited = tokio::select! {
            r = tokio::time::timeout_at(head_due, Primed::first_byte(tls)) => r,
            _ = drain.stopped() => return,
        };
        let io = match waited {
            Ok(Ok(Some(io))) => io,
            Ok(Ok(None)) => return debug!("tunnel closed before its first request"),
            Ok(Err(e)) => return debug!(error = %e, "tunnel failed before its first request"),
            Err(_) => return debug!("no request in the tunnel within the header read timeout"),
        };
        let shared = shared.clone();
        Box::pin(async move {
            let begun = Arc::new(AtomicBool::new(false));
            let service = {
                let begun = begun.clone();
                service_fn(move |req| {
                    begun.store(true, Ordering::Relaxed);
                    service.call(req)
                })
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(io), service)
                // WebSocket: after its 101 the connection belongs to `proxy::websocket`.
                .with_upgrades();
            let served = serve_until_drained(conn, drain, "h1 tunnel");
            tokio::pin!(served);
            let first_head = tokio::time::sleep_until(head_due);
            tokio::pin!(first_head);
            let mut head_checked = false;
            let ended = loop {
                tokio::select! {
                    ended = &mut served => break ended,
                    _ = &mut first_head, if !head_checked => {
                        head_checked = true;
                        if !begun.load(Ordering::Relaxed) {
                            debug!("first request head in the tunnel not complete within the header read timeout");
                            break None;
                        }
                    }
                }
            };
            if let Some(e) = ended {
                record_refused_head(&shared, &e, authority.to_string(), Some(&claims));
            }
        })
        .await;
    }

    /// The agent's TLS handshake inside the tunnel, with latchkey's leaf for the CONNECT host.
    /// `None` (after saying why) when there is no session to serve.
    async fn handshake(
        &self,
        io: TunnelStream,
    ) -> Option<tokio_rustls::server::TlsStream<TunnelStream>> {
        let shared = &self.shared;
        let limits = &shared.limits;
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
        let start = match tokio::time::timeout(limits.handshake_timeout, acceptor).await {
            Ok(Ok(start)) => start,
            Ok(Err(e)) => {
                debug!(error = %e, "no TLS ClientHello in tunnel");
                return None;
            }
            Err(_) => {
                debug!("TLS ClientHello timed out");
                return None;
            }
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
                let mut rec = shared.recorder.open(
                    &Method::CONNECT,
                    self.authority.to_string(),
                    String::new(),
                );
                rec.who = who(&self.claims);
                let deny = Deny::HostMismatch {
                    expected: self.authority.host().to_owned(),
                    got: format!("TLS SNI {sni_norm}"),
                };
                deny.log(rec.request_id(), rec.who.agent.as_deref(), &rec.host);
                // The agent gets no certificate rather than an answer; the line still says
                // what it would have been told.
                rec.responded(deny.status().as_u16());
                rec.finish(Outcome::Denied, Some(deny.code()));
                return None;
            }
        }
        let config = match shared.leaves.server_config(self.authority.host()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot mint a leaf certificate");
                return None;
            }
        };
        match tokio::time::timeout(limits.handshake_timeout, start.into_stream(config)).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(e)) => {
                debug!(error = %e, "agent TLS handshake failed");
                None
            }
            Err(_) => {
                debug!("agent TLS handshake timed out");
                None
            }
        }
    }
}
