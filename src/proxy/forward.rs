//! The upstream client: pooled keep-alive connections (HTTP/2 when the upstream offers it by
//! ALPN), TLS always verified against the system roots plus `--upstream-ca` files, and
//! `--resolve` pins applied in our own connector so the address we dial is the address we chose.
//!
//! This module never sees policy or tokens; it gets a finished request and returns a response
//! or a typed upstream `Deny`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::dials::{DialSlot, Dials};
use super::limits::{GlobalSlot, Pool};
use super::readahead::ReadAheadStream;
use crate::deny::Deny;
use crate::netguard;

/// Errors a request body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body type of requests sent upstream (the agent's body, streamed).
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// How long a TCP connect may take before the upstream counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled connections are closed after this long (upstreams often close at 60 s).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// A `--resolve HOST:PORT:ADDR` pin: the admin says where a name lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvePin {
    /// Lower-case host name (no brackets).
    pub host: String,
    /// Port the pin applies to.
    pub port: u16,
    /// Address to dial.
    pub addr: IpAddr,
}

impl std::str::FromStr for ResolvePin {
    type Err = String;

    /// Parse curl's `HOST:PORT:ADDR` (ADDR may be a bracketed IPv6 literal).
    fn from_str(s: &str) -> Result<ResolvePin, String> {
        let mut parts = s.splitn(3, ':');
        let (Some(host), Some(port), Some(addr)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("--resolve {s:?} is not HOST:PORT:ADDR"));
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() {
            return Err(format!("--resolve {s:?} has an empty host"));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("--resolve {s:?} has an invalid port"))?;
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("--resolve {s:?}: {addr:?} is not an IP address"))?;
        Ok(ResolvePin { host, port, addr })
    }
}

/// Errors building the upstream client.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// An `--upstream-ca` file cannot be read or holds no certificate.
    #[error("cannot use upstream CA file {path}: {why}")]
    BadCaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// No root at all could be loaded.
    #[error("no trusted root certificates: neither the system store nor --upstream-ca gave any")]
    NoRoots,
}

/// The TCP half of the upstream connector: applies pins, resolves, refuses private
/// addresses that were not pinned, dials with a timeout.
#[derive(Clone)]
pub struct PinnedConnector {
    pins: Arc<HashMap<(String, u16), IpAddr>>,
    allow_private: bool,
    /// Connections being set up, per host (see `dials`).
    dials: Arc<Dials>,
    /// Upstream connections open (pooled idle ones included), capped at `max_open`.
    open: Pool,
    max_open: usize,
}

/// Connect error: `--max-upstream-connections` are already open.
#[derive(Debug, thiserror::Error)]
#[error("every upstream connection latchkey may open is in use")]
pub struct UpstreamPoolFull;

/// An upstream TCP connection holding its place in the upstream pool until it closes.
pub struct CountedStream {
    io: TokioIo<ReadAheadStream>,
    /// Until the upstream's first answer (for TLS its handshake flight).
    dialing: Option<Dialing>,
    _slot: GlobalSlot,
}

/// A TLS upstream connection that has not answered yet: its dial slot, and when it must have.
struct Dialing {
    _slot: DialSlot,
    due: Pin<Box<tokio::time::Sleep>>,
}

impl CountedStream {
    /// `answer_within`: for TLS, how long the upstream has to answer the handshake (the dial
    /// slot is held until it does); `None` for plain HTTP, where the slot goes at once.
    fn new(
        tcp: TcpStream,
        slot: GlobalSlot,
        dial: DialSlot,
        answer_within: Option<Duration>,
    ) -> Self {
        CountedStream {
            io: TokioIo::new(ReadAheadStream::new(tcp)),
            dialing: answer_within.map(|within| Dialing {
                _slot: dial,
                due: Box::pin(tokio::time::sleep(within)),
            }),
            _slot: slot,
        }
    }
}

impl hyper::rt::Read for CountedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(dialing) = &mut this.dialing {
            // SECURITY: an upstream that takes the connection and never answers its TLS
            // handshake would hold the dial slot (and the connection) for good, also when
            // the dial was made in the background for the pool.
            if dialing.due.as_mut().poll(cx).is_ready() {
                this.dialing = None;
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the upstream did not answer the TLS handshake in time",
                )));
            }
        }
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if read.is_ready() {
            this.dialing = None;
        }
        read
    }
}

impl hyper::rt::Write for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl hyper_util::client::legacy::connect::Connection for CountedStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.inner().get_ref().connected()
    }
}

/// Connect error: every address the name resolved to is private (see `netguard`).
#[derive(Debug, thiserror::Error)]
#[error("the upstream resolved only to private addresses (first: {0})")]
pub struct PrivateUpstream(pub IpAddr);

impl tower_service::Service<Uri> for PinnedConnector {
    type Response = CountedStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let pins = self.pins.clone();
        let allow_private = self.allow_private;
        let open = self.open.clone();
        let max_open = self.max_open;
        let dials = self.dials.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io_err("the upstream URI has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("http") => 80,
                _ => 443,
            });
            let dial = dials.enter(&host, port).await.map_err(|e| {
                tracing::debug!(%host, port, "background dial dropped: its request was served from the pool");
                std::io::Error::other(e)
            })?;
            // SECURITY: every upstream connection is a file descriptor; past the cap the
            // request fails rather than the process (EMFILE would break every agent).
            let slot = open
                .try_take(max_open)
                .ok_or_else(|| std::io::Error::other(UpstreamPoolFull))?;
            let addrs: Vec<SocketAddr> = if let Some(ip) = pins.get(&(host.clone(), port)) {
                // Pinned by the admin with --resolve: trusted, even on loopback.
                vec![SocketAddr::new(*ip, port)]
            } else {
                let resolved: Vec<SocketAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
                    vec![SocketAddr::new(ip, port)]
                } else {
                    tokio::time::timeout(
                        CONNECT_TIMEOUT,
                        tokio::net::lookup_host((host.as_str(), port)),
                    )
                    .await
                    .map_err(|_| io_err("DNS lookup timed out"))??
                    .collect()
                };
                // SECURITY: classify the very addresses we are about to dial, so a rebinding
                // DNS answer cannot pass the check and then point somewhere else.
                let public: Vec<SocketAddr> = resolved
                    .iter()
                    .copied()
                    .filter(|a| allow_private || !netguard::is_private(a.ip()))
                    .collect();
                if public.is_empty() {
                    if let Some(first) = resolved.first() {
                        return Err(std::io::Error::other(PrivateUpstream(first.ip())));
                    }
                }
                public
            };
            let mut last = io_err("the name resolved to no address");
            for addr in addrs {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        let tls = uri.scheme_str() == Some("https");
                        let within = tls.then_some(CONNECT_TIMEOUT);
                        return Ok(CountedStream::new(stream, slot, dial, within));
                    }
                    Ok(Err(e)) => last = e,
                    Err(_) => {
                        last =
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                    }
                }
            }
            Err(last)
        })
    }
}

fn io_err(msg: &'static str) -> std::io::Error {
    std::io::Error::other(msg)
}

/// The pooled upstream client.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<PinnedConnector>, UpstreamBody>,
    /// HTTP/1.1 only (ALPN `http/1.1`), for WebSocket upgrades: a 101 and the byte stream
    /// after it exist only in HTTP/1.1, and the pooled client above may pick HTTP/2.
    upgrades: Client<HttpsConnector<PinnedConnector>, UpstreamBody>,
    response_timeout: Duration,
}

impl Upstream {
    /// Build the client: system roots plus `extra_roots` PEM files, `pins` for `--resolve`,
    /// at most `max_connections` upstream connections open at once.
    pub fn try_new(
        extra_roots: &[PathBuf],
        pins: &[ResolvePin],
        response_timeout: Duration,
        allow_private: bool,
        max_connections: usize,
    ) -> Result<Upstream, ForwardError> {
        // A broken system store is not fatal when --upstream-ca gives roots.
        let mut roots = crate::tls::system_roots();
        for path in extra_roots {
            crate::tls::add_root_file(&mut roots, path).map_err(|why| ForwardError::BadCaFile {
                path: path.to_owned(),
                why,
            })?;
        }
        if roots.is_empty() {
            return Err(ForwardError::NoRoots);
        }
        let tls = crate::tls::client_config(roots);
        let tcp = PinnedConnector {
            pins: Arc::new(
                pins.iter()
                    .map(|p| ((p.host.clone(), p.port), p.addr))
                    .collect(),
            ),
            allow_private,
            dials: Arc::default(),
            open: Pool::default(),
            max_open: max_connections,
        };
        let https1 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp.clone());
        let upgrades = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // A connection that upgraded leaves the pool anyway; one that answered the upgrade
            // with a refusal is not worth keeping for the next one.
            .pool_max_idle_per_host(0)
            .build(https1);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(64)
            // Large windows so one multiplexed upstream connection carries big downloads at
            // full speed instead of waiting on WINDOW_UPDATEs every 64 KiB.
            .http2_initial_stream_window_size(Some(4 << 20))
            .http2_initial_connection_window_size(Some(8 << 20))
            .build(https);
        Ok(Upstream {
            client,
            upgrades,
            response_timeout,
        })
    }

    /// Send one request and wait for the response head (at most `head_timeout`, the route's
    /// own or `--upstream-timeout`). Bodies stream both ways. An `upgrade` request goes over
    /// HTTP/1.1 on a connection of its own, which the response's upgrade then takes over.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
        head_timeout: Option<Duration>,
        upgrade: bool,
    ) -> Result<Response<Incoming>, Failed> {
        let client = if upgrade {
            &self.upgrades
        } else {
            &self.client
        };
        let wait = head_timeout.unwrap_or(self.response_timeout);
        match tokio::time::timeout(wait, client.request(req)).await {
            // The wait covers connecting too, so the request may or may not have gone out:
            // count it as sent (the audit line must never understate what went upstream).
            Err(_) => Err(Failed {
                deny: Deny::UpstreamTimeout,
                sent: true,
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(Failed {
                deny: classify(&e),
                // Only a failure to connect (DNS, TCP, TLS, a private address) proves that no
                // byte of the request, and so no credential, reached the upstream.
                sent: !e.is_connect(),
            }),
        }
    }
}

/// An upstream exchange that failed before its response head.
#[derive(Debug)]
pub struct Failed {
    /// What the agent is told.
    pub deny: Deny,
    /// Whether the request may have reached the upstream (`false` only for connect failures).
    pub sent: bool,
}

/// Map a client error to the upstream reason the agent and the audit log see. The messages
/// name causes (refused, certificate), never the URI (its query may carry a credential).
fn classify(e: &hyper_util::client::legacy::Error) -> Deny {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut io_kind = None;
    while let Some(err) = source {
        if let Some(p) = err.downcast_ref::<PrivateUpstream>() {
            return Deny::UpstreamPrivate(p.0);
        }
        if err.downcast_ref::<UpstreamPoolFull>().is_some() {
            return Deny::UpstreamConnectionsExhausted;
        }
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Deny::UpstreamTls(tls.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(io.kind());
            if io.kind() == std::io::ErrorKind::TimedOut {
                return Deny::UpstreamTimeout;
            }
            // `io::Error::source` skips the wrapped error itself; look inside it instead.
            if let Some(inner) = io.get_ref() {
                source = Some(inner as &(dyn std::error::Error + 'static));
                continue;
            }
        }
        source = err.source();
    }
    if e.is_connect() {
        let why = match io_kind {
            Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".to_owned(),
            Some(kind) => kind.to_string(),
            None => "connect failed".to_owned(),
        };
        return Deny::UpstreamUnreachable(why);
    }
    let why = match io_kind {
        Some(kind) => kind.to_string(),
        None => innermost(e),
    };
    Deny::UpstreamProtocol(why)
}

fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A read of the upstream connection, as hyper makes it.
    async fn read_once(stream: &mut CountedStream) -> std::io::Result<usize> {
        let mut storage = [0u8; 64];
        let mut buf = hyper::rt::ReadBuf::new(&mut storage);
        std::future::poll_fn(|cx| {
            hyper::rt::Read::poll_read(Pin::new(&mut *stream), cx, buf.unfilled())
        })
        .await?;
        Ok(buf.filled().len())
    }

    #[tokio::test]
    async fn an_upstream_that_never_answers_the_handshake_is_given_up_and_frees_its_dial() {
        let dials = Arc::new(Dials::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Taken by the kernel's backlog, never answered.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let slot = Pool::default().try_take(8).unwrap();
        let dial = dials.enter("tarpit.test", addr.port()).await.unwrap();
        let mut stream = CountedStream::new(tcp, slot, dial, Some(Duration::from_millis(200)));
        assert_eq!(dials.in_progress("tarpit.test", addr.port()), 1);
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(5), read_once(&mut stream))
            .await
            .expect("the deadline ends the wait")
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(dials.in_progress("tarpit.test", addr.port()), 0);

        // An upstream that answers frees the slot at its first bytes, and the deadline is gone.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let _tarpit = listener.accept().await.unwrap(); // accepted at last
        let (mut server, _) = listener.accept().await.unwrap();
        let dial = dials.enter("tarpit.test", addr.port()).await.unwrap();
        let slot = Pool::default().try_take(8).unwrap();
        let mut stream = CountedStream::new(tcp, slot, dial, Some(Duration::from_millis(200)));
        server.write_all(b"\x16\x03\x03").await.unwrap();
        assert_eq!(read_once(&mut stream).await.unwrap(), 3);
        assert!(stream.dialing.is_none());
        assert_eq!(dials.in_progress("tarpit.test", addr.port()), 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.write_all(b"late").await.unwrap();
        assert_eq!(
            read_once(&mut stream).await.unwrap(),
            4,
            "no deadline once answered"
        );
    }

    #[test]
    fn resolve_pins_parse_like_curl() {
        let p: ResolvePin = "API.Test:8443:127.0.0.1".parse().unwrap();
        assert_eq!(p.host, "api.test");
        assert_eq!(p.port, 8443);
        let v6: ResolvePin = "h:443:[::1]".parse().unwrap();
        assert_eq!(v6.addr, "::1".parse::<IpAddr>().unwrap());
        for bad in [
            "h:443",
            "h:0:127.0.0.1",
            "h:x:127.0.0.1",
            ":443:127.0.0.1",
            "h:443:nope",
        ] {
            assert!(bad.parse::<ResolvePin>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ca_file_without_certificates_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("empty.pem");
        std::fs::write(&p, "not a pem").unwrap();
        let e = Upstream::try_new(&[p], &[], Duration::from_secs(1), false, 1)
            .err()
            .unwrap();
        assert!(e.to_string().contains("no certificate found"), "{e}");
    }
}
