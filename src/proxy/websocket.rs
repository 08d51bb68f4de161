//! WebSocket sessions through a tunnel: an HTTP/1.1 `Upgrade: websocket` request (RFC 6455),
//! or an HTTP/2 agent's extended CONNECT with `:protocol websocket` (RFC 8441) translated to an
//! HTTP/1.1 upgrade upstream. The upgrade request goes through every stage of a request
//! (`request::forward`: policy on `GET <path>`, the agent's credential stripped, ours injected,
//! the tripwire); this module recognises it, puts back the upgrade headers `inject::apply`
//! strips, checks the upstream's 101, and relays the two byte streams until either side closes
//! or the token stops being good (revoked, expired, its key retired) or latchkey shuts down.
//!
//! Frames are relayed raw, never buffered, parsed or redacted (see SECURITY.md); the session's
//! one audit line completes when the relay ends, with its duration and byte counts.
//! This module never sees secret values: the credential went out in the upgrade request.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::debug;

use super::body::ProxyBody;
use super::limits::Slot;
use super::request::TunnelHold;
use super::server::Drain;
use super::Shared;
use crate::audit::{Outcome, Record};
use crate::auth::{self, Claims};

/// RFC 6455 section 1.3: appended to the key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// How often a live session re-checks its token's revocation and signing key. A revocation
/// ends the session within this long of the replica learning of it; the check is an
/// in-memory lookup.
const RECHECK: Duration = Duration::from_secs(1);

/// What a WebSocket upgrade request carries on to the response side.
pub struct Asked {
    /// The `Sec-WebSocket-Key` sent upstream: the agent's (HTTP/1.1) or ours (RFC 8441, where
    /// the agent sends none).
    key: HeaderValue,
    /// The agent's side of the upgrade.
    agent: OnUpgrade,
    /// The agent speaks HTTP/2 (extended CONNECT): it gets a 200, not a 101.
    h2: bool,
}

/// Whether `parts` asks for a WebSocket session latchkey relays, taking the agent's upgrade
/// handle out of the request. An HTTP/2 extended CONNECT is rewritten into the `GET` it stands
/// for (policy then sees `GET <path>`, as for an HTTP/1.1 agent).
///
/// SECURITY: only `websocket` is upgraded. Any other `Upgrade` (`h2c` above all) stays a
/// hop-by-hop header that `inject::apply` strips: an h2c upgrade through a proxy that checks
/// only the first request would open an HTTP/2 connection to the upstream whose later
/// requests no policy sees (h2c smuggling, SECURITY-NOTES.md). A request that names
/// `websocket` among other protocols is not a WebSocket upgrade either.
pub fn asked(parts: &mut Parts) -> Option<Asked> {
    if parts.version == Version::HTTP_2 {
        let protocol = parts.extensions.get::<hyper::ext::Protocol>()?;
        if parts.method != Method::CONNECT || !protocol.as_str().eq_ignore_ascii_case("websocket") {
            return None;
        }
        let agent = parts.extensions.remove::<OnUpgrade>()?;
        parts.extensions.remove::<hyper::ext::Protocol>();
        parts.method = Method::GET;
        let mut raw = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut raw);
        let key = HeaderValue::try_from(base64::engine::general_purpose::STANDARD.encode(raw))
            .expect("base64 is a valid header value");
        parts.headers.insert(header::SEC_WEBSOCKET_KEY, key.clone());
        return Some(Asked {
            key,
            agent,
            h2: true,
        });
    }
    if parts.method != Method::GET || parts.version != Version::HTTP_11 {
        return None;
    }
    let upgrade = single(&parts.headers, &header::UPGRADE)?;
    if !upgrade.as_bytes().eq_ignore_ascii_case(b"websocket") {
        return None;
    }
    if !has_token(&parts.headers, "upgrade") {
        return None;
    }
    let key = single(&parts.headers, &header::SEC_WEBSOCKET_KEY)?.clone();
    let agent = parts.extensions.remove::<OnUpgrade>()?;
    Some(Asked {
        key,
        agent,
        h2: false,
    })
}

/// After `inject::apply` stripped the hop-by-hop headers: ask the upstream for the upgrade.
pub fn restore_upgrade_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // RFC 8441 agents send the version too; an HTTP/1.1 agent that left it out gets the
    // upstream's 426 as it would without latchkey.
}

/// The one value of `name`, or `None` when it is absent or repeated.
fn single<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a HeaderValue> {
    let mut all = headers.get_all(name).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => Some(v),
        _ => None,
    }
}

/// Whether a comma-separated header (`Connection`) lists `token`.
fn has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 section 4.2.2).
pub fn accept_for(key: &[u8]) -> String {
    let mut input = Vec::with_capacity(key.len() + ACCEPT_GUID.len());
    input.extend_from_slice(key);
    input.extend_from_slice(ACCEPT_GUID);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// SECURITY: the upstream's 101 must be the answer to what was asked: `Upgrade: websocket`,
/// `Connection: upgrade` and the accept value of the key we sent. Anything else is the
/// upstream's broken (or hostile) answer, and no byte stream is opened on it.
pub fn check_switch(asked: &Asked, headers: &HeaderMap) -> Result<(), String> {
    let upgrade_ok = single(headers, &header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !upgrade_ok || !has_token(headers, "upgrade") {
        return Err("the upstream switched protocols without Upgrade: websocket".into());
    }
    let expected = accept_for(asked.key.as_bytes());
    match single(headers, &header::SEC_WEBSOCKET_ACCEPT) {
        Some(v) if v.as_bytes() == expected.as_bytes() => Ok(()),
        _ => Err("the upstream's Sec-WebSocket-Accept does not match the key sent".into()),
    }
}

/// Everything the relay needs once the agent has its answer. Rides to `request::respond` in
/// the response's extensions (which need `Clone`, hence the shared cell), where the audit
/// record joins it.
#[derive(Clone)]
pub struct Relay(Arc<Mutex<Option<Session>>>);

/// One WebSocket session between its 101 and its end.
pub struct Session {
    agent: OnUpgrade,
    upstream: OnUpgrade,
    shared: Arc<Shared>,
    claims: Arc<Claims>,
    drain: Option<Drain>,
    /// The tunnel's connection slots: the agent's connection lives on in the session.
    _slots: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// The agent's in-flight slot: a session holds an upstream connection for its whole life.
    _in_flight: Slot,
}

impl Relay {
    /// Take the session out (once).
    pub fn take(&self) -> Option<Session> {
        self.0.lock().ok()?.take()
    }
}

/// The parts of the agent's answer that [`answer`] needs besides the upstream's response.
pub struct Open {
    /// From [`asked`].
    pub asked: Asked,
    /// Shared state, for the relay's token checks.
    pub shared: Arc<Shared>,
    /// The token the tunnel was opened with.
    pub claims: Arc<Claims>,
    /// The tunnel's drain handle (shutdown ends the session) and connection slots.
    pub tunnel: Option<TunnelHold>,
    /// The agent's in-flight slot.
    pub in_flight: Slot,
}

/// The agent's answer to a switched upgrade: the upstream's head (already cleaned and
/// redacted by the caller) as a 101 for an HTTP/1.1 agent or a 200 for an HTTP/2 one, with an
/// empty body and the [`Relay`] in its extensions.
pub fn answer(
    mut upstream: Response<Incoming>,
    mut headers: HeaderMap,
    open: Open,
) -> Response<ProxyBody> {
    let upstream_side = hyper::upgrade::on(&mut upstream);
    let status = if open.asked.h2 {
        // RFC 8441 section 5: the HTTP/2 answer is a 2xx without the RFC 6455 handshake.
        headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        StatusCode::OK
    } else {
        restore_upgrade_headers(&mut headers);
        StatusCode::SWITCHING_PROTOCOLS
    };
    let mut resp = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp.extensions_mut()
        .insert(Relay(Arc::new(Mutex::new(Some(Session {
            agent: open.asked.agent,
            upstream: upstream_side,
            shared: open.shared,
            claims: open.claims,
            drain: open.tunnel.as_ref().map(|t| t.drain.clone()),
            _slots: open.tunnel.map(|t| t.slots),
            _in_flight: open.in_flight,
        })))));
    resp
}

/// Why a session ended, as the audit line says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Either side closed (or the connection broke).
    Closed(Result<(), ()>),
    /// The token was revoked or its signing key retired.
    Revoked,
    /// The token expired.
    Expired,
    /// latchkey is shutting down.
    Shutdown,
}

impl Session {
    /// Relay until the session ends, then complete `rec` (its status is already set).
    pub async fn run(self, mut rec: Record) {
        let Session {
            agent,
            upstream,
            shared,
            claims,
            mut drain,
            _slots,
            _in_flight,
        } = self;
        let (agent, upstream) = match tokio::join!(agent, upstream) {
            (Ok(a), Ok(u)) => (a, u),
            (a, u) => {
                debug!(agent = ?a.err(), upstream = ?u.err(), "WebSocket upgrade did not complete");
                // The agent went away between its 101 and the switch, or the upstream did.
                return rec.finish(Outcome::Cancelled, None);
            }
        };
        let up = rec.count_up();
        let down = Arc::new(AtomicU64::new(0));
        let mut agent_io = Counted {
            io: TokioIo::new(agent),
            written: down.clone(),
        };
        let mut upstream_io = Counted {
            io: TokioIo::new(upstream),
            written: up,
        };
        let expires_in = Duration::from_secs(claims.exp.saturating_sub(auth::unix_now()));
        let end = {
            let relay = tokio::io::copy_bidirectional(&mut agent_io, &mut upstream_io);
            tokio::pin!(relay);
            let expiry = tokio::time::sleep(expires_in);
            tokio::pin!(expiry);
            let mut recheck = tokio::time::interval(RECHECK);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    r = &mut relay => break End::Closed(r.map(|_| ()).map_err(|_| ())),
                    _ = &mut expiry => break End::Expired,
                    _ = recheck.tick() => {
                        // SECURITY: the same checks as every request in the tunnel
                        // (`request::check_live`), for as long as the session lives.
                        if claims.is_expired_at(auth::unix_now()) {
                            break End::Expired;
                        }
                        if shared.revocations.is_revoked(&claims)
                            || !shared.keys.still_trusted(&claims)
                        {
                            break End::Revoked;
                        }
                    }
                    _ = stopped(&mut drain) => break End::Shutdown,
                }
            }
        };
        if !matches!(end, End::Closed(_)) {
            // Ended by latchkey: close both sides (TLS close_notify to the agent) rather than
            // leave them to notice. No Close frame: the relay does not track frame boundaries.
            let _ = tokio::time::timeout(Duration::from_secs(1), agent_io.shutdown()).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), upstream_io.shutdown()).await;
        }
        rec.delivered(down.load(Ordering::Acquire));
        let (outcome, reason) = match end {
            End::Closed(Ok(())) => (Outcome::Ok, None),
            End::Closed(Err(())) => (Outcome::Cancelled, None),
            End::Revoked => (Outcome::BodyError, Some("token_revoked")),
            End::Expired => (Outcome::BodyError, Some("token_expired")),
            End::Shutdown => (Outcome::BodyError, Some("shutting_down")),
        };
        debug!(?end, "WebSocket session ended");
        rec.finish(outcome, reason);
    }
}

async fn stopped(drain: &mut Option<Drain>) {
    match drain {
        Some(d) => d.stopped().await,
        None => std::future::pending().await,
    }
}

/// A side of the relay, counting the bytes written to it.
struct Counted<T> {
    io: T,
    written: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.fetch_add(*n as u64, Ordering::Release);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_6455_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn head(lines: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder()
            .method("GET")
            .uri("/ws")
            .version(Version::HTTP_11);
        for (k, v) in lines {
            b = b.header(*k, *v);
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        // What hyper's HTTP/1.1 server puts there for an upgrade request.
        let on = hyper::upgrade::on(http::Request::new(()));
        parts.extensions.insert(on);
        parts
    }

    #[test]
    fn only_a_plain_websocket_upgrade_is_recognised() {
        let ws = [
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert!(asked(&mut head(&ws)).is_some());
        let h2c = [
            ("upgrade", "h2c"),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ];
        assert!(asked(&mut head(&h2c)).is_none());
        let both = [
            ("upgrade", "websocket, h2c"),
            ("connection", "upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert!(asked(&mut head(&both)).is_none());
        let no_connection = [
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert!(asked(&mut head(&no_connection)).is_none());
        let no_key = [("upgrade", "websocket"), ("connection", "upgrade")];
        assert!(asked(&mut head(&no_key)).is_none());
        let mut post = head(&ws);
        post.method = Method::POST;
        assert!(asked(&mut post).is_none());
    }

    #[test]
    fn a_switch_must_carry_the_right_accept() {
        let asked = asked(&mut head(&[
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]))
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert(
            "sec-websocket-accept",
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".parse().unwrap(),
        );
        assert!(check_switch(&asked, &h).is_ok());
        h.insert("sec-websocket-accept", "AAAA".parse().unwrap());
        assert!(check_switch(&asked, &h).is_err());
        h.insert(
            "sec-websocket-accept",
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".parse().unwrap(),
        );
        h.insert("upgrade", "h2c".parse().unwrap());
        assert!(check_switch(&asked, &h).is_err());
    }
}
