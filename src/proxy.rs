//! The proxy: accept agent connections, authenticate, intercept TLS, decide, inject, forward,
//! audit. `server` owns sockets, TLS and shutdown; `request` owns the stages of one request
//! and its audit record; `body` the bodies on the way through (`decode` undoes an
//! upstream's compression where redaction must read the body); `forward` the upstream client;
//! `gateway` the base-URL mode (`/gw/<route>/...` in origin form, the token as an API key);
//! `primed` a tunnel's stream with its first byte read ahead; `readahead` sockets read a chunk
//! at a time under TLS while a body streams; `dials` the upstream connections being set up.

/// `AsyncWrite` methods of a stream wrapper that writes straight to its `$field`.
macro_rules! write_through {
    ($field:ident) => {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.$field.is_write_vectored()
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
        }
    };
}

pub mod admin;
pub mod approve;
pub mod body;
pub mod decode;
pub mod dials;
pub mod forward;
pub mod gateway;
pub mod limits;
pub mod primed;
pub mod readahead;
pub mod request;
pub mod server;
pub mod websocket;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::audit::Recorder;
use crate::auth::{Revocations, TokenKeys};
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::secrets::Secrets;
use crate::tls::LeafCache;

pub use forward::{ResolvePin, Upstream};

/// Everything a request needs, shared by all connections. Read-mostly: the policy sits behind
/// `ArcSwap` so a reload never blocks a request.
pub struct Shared {
    /// Compiled policies of every agent.
    pub policies: ArcSwap<Policies>,
    /// Token verification.
    pub keys: TokenKeys,
    /// Revoked sessions and agents (reloaded by a background task).
    pub revocations: Revocations,
    /// The secret backend: the encrypted file store (re-read when the file changes) or
    /// OpenBao behind its TTL cache.
    pub secrets: Arc<Secrets>,
    /// Leaf certificates per host.
    pub leaves: LeafCache,
    /// The pooled upstream client.
    pub upstream: Upstream,
    /// Opens each request's audit record (the log, the metrics, this replica's name).
    pub recorder: Arc<Recorder>,
    /// Limits and timeouts.
    pub limits: Limits,
    /// Where policies are loaded from (for hot reload).
    pub policies_dir: PathBuf,
    /// Counters for the admin listener.
    pub metrics: Arc<Metrics>,
    /// Every route's credential, built per kind from the secret backend (and prebuilt
    /// injected header values and redaction needles per route and value).
    pub credentials: crate::credential::Credentials,
    /// Open connections overall and per agent, checked against `limits`.
    pub limits_state: limits::ConnLimits,
    /// Request rate limits per (agent, route): local, or shared through Redis.
    pub rate_limits: crate::ratelimit::RateLimits,
    /// The exfiltration tripwire: every stored credential's needles and the format prefixes,
    /// rebuilt by the reload loop when the secrets change.
    pub tripwire: ArcSwap<crate::tripwire::Tripwire>,
    /// What a tripped request costs the session.
    pub on_exfiltration: crate::tripwire::OnExfiltration,
    /// The shared state, when `--redis` is given (to publish a revocation).
    pub redis: Option<Arc<crate::redis::Redis>>,
    /// Requests held for a person's approval, and the store of approvals.
    pub holds: Arc<crate::approval::Holds>,
    /// The dashboard (served by the admin listener and `--ui-listen`).
    pub ui: Arc<crate::ui::Dashboard>,
}

/// Timeouts and sizes that bound what one agent can make the proxy hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for an agent to send a complete request head (slowloris guard). hyper
    /// starts it whenever it waits for a head, so it also bounds an idle keep-alive connection.
    pub header_read_timeout: Duration,
    /// Time a new connection has to authenticate (a CONNECT or absolute-form request with a
    /// valid token) before it is closed: shorter than `header_read_timeout`, because until
    /// then anyone who can reach the port holds it.
    pub first_request_timeout: Duration,
    /// Time allowed for the TLS handshake inside a tunnel.
    pub handshake_timeout: Duration,
    /// Time allowed for the upstream to send its response head (a route's `timeout` wins).
    pub upstream_timeout: Duration,
    /// Longest silence between body bytes, either way, before the exchange is ended (a
    /// route's `idle_timeout` wins).
    pub upstream_idle_timeout: Duration,
    /// How long graceful shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Largest request body on routes that set no `max_body`.
    pub max_body: u64,
    /// Most authenticated agent connections (and tunnels) open at once.
    pub max_connections: usize,
    /// Most connections that have not authenticated yet; a separate pool, so they can never
    /// take what authenticated agents use (the oldest is closed to make room).
    pub max_unauthenticated_connections: usize,
    /// Most tunnels plus in-flight plain requests per agent.
    pub max_connections_per_agent: usize,
    /// Most requests one agent may have in flight at once, across all its tunnels and
    /// HTTP/2 streams (each holds at most one upstream connection while in flight).
    pub max_requests_in_flight_per_agent: usize,
    /// Most upstream connections open at once, pooled idle ones included.
    pub max_upstream_connections: usize,
    /// Whether the three connection caps are defaults that may be lowered to fit the file
    /// descriptor limit at start (with a warning) rather than stop the start.
    pub fit_fd_caps: bool,
}

/// File descriptors kept aside for everything that is not a connection: listeners, the audit
/// log, policy and secret files, Redis, the resolver.
pub const FD_RESERVE: u64 = 128;

impl Limits {
    /// Lower the three connection caps in proportion so that they need at most `available`
    /// file descriptors (each stays at least 1).
    pub fn fit_to(&mut self, available: u64) {
        let needed = self.fds_needed() - FD_RESERVE;
        let room = available.saturating_sub(FD_RESERVE);
        if needed <= room {
            return;
        }
        let scale = |n: usize| ((n as u64 * room) / needed).max(1) as usize;
        self.max_connections = scale(self.max_connections);
        self.max_unauthenticated_connections = scale(self.max_unauthenticated_connections);
        self.max_upstream_connections = scale(self.max_upstream_connections);
    }

    /// File descriptors the caps may need at once: one per connection of every pool, plus
    /// [`FD_RESERVE`].
    pub fn fds_needed(&self) -> u64 {
        [
            self.max_connections,
            self.max_unauthenticated_connections,
            self.max_upstream_connections,
        ]
        .iter()
        .map(|&n| n as u64)
        .sum::<u64>()
            + FD_RESERVE
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            fit_fd_caps: true,
            header_read_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(600),
            upstream_idle_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(10),
            max_body: 1 << 30,
            max_connections: 4096,
            max_unauthenticated_connections: 1024,
            max_connections_per_agent: 512,
            max_requests_in_flight_per_agent: 256,
            max_upstream_connections: 4096,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_caps_shrink_in_proportion_to_fit_the_fd_limit() {
        let mut l = Limits::default();
        let needed = l.fds_needed();
        l.fit_to(needed + 10);
        assert_eq!(l.fds_needed(), needed, "caps that fit are left alone");
        l.fit_to(600);
        assert!(l.fds_needed() <= 600, "{}", l.fds_needed());
        assert!(l.max_connections > l.max_unauthenticated_connections);
        l.fit_to(1);
        assert_eq!(
            (
                l.max_connections,
                l.max_unauthenticated_connections,
                l.max_upstream_connections
            ),
            (1, 1, 1)
        );
    }
}
