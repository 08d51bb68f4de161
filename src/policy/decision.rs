//! The outcome of every check on a request: a typed `Deny` with its status and stable code.
//! This is the only place that maps a refusal to an HTTP status.

use http::StatusCode;

/// Where a token check ran: at the CONNECT / plain-proxy level (407) or inside a tunnel (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStage {
    /// The proxy request itself (CONNECT or absolute-form HTTP): the client may retry with
    /// credentials, so the answer is 407.
    Proxy,
    /// A request inside an established tunnel: the tunnel cannot re-authenticate, so 403.
    Tunnel,
}

/// Why a path cannot be normalised safely (`bad_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    /// The request target is not an absolute path (e.g. `*` or empty).
    #[error("the path does not start with '/'")]
    NotAbsolute,
    /// `%2F` would let `a%2Fb` match as one segment upstream may split.
    #[error("the path contains an encoded '/' (%2F)")]
    EncodedSlash,
    /// `%5C` / `\` are path separators for some upstreams.
    #[error("the path contains a backslash or an encoded backslash (%5C)")]
    Backslash,
    /// NUL truncates paths in some upstreams.
    #[error("the path contains a NUL byte")]
    Nul,
    /// A `%` not followed by two hex digits.
    #[error("the path contains an invalid percent-escape")]
    InvalidEscape,
    /// `..` that would climb above `/`.
    #[error("the path climbs above the root with '..'")]
    AboveRoot,
    /// A segment such as `..;` that servlet containers treat as `..`.
    #[error("the path contains a '..;' segment")]
    DotDotSemicolon,
    /// A byte that is not allowed in a path at all (control characters, spaces, non-ASCII).
    #[error("the path contains a character that is not allowed")]
    InvalidChar,
}

/// A refusal. Each variant says when it fires; `status` and `code` are the only mapping to
/// what the agent sees and what the audit log records.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Deny {
    /// No `Proxy-Authorization` header (or an empty one).
    #[error(
        "no token: send the latchkey token as the proxy password or as Proxy-Authorization: Bearer"
    )]
    TokenMissing,
    /// The token is malformed, wrongly signed, or has the wrong issuer/audience/claims.
    #[error("the token is not valid: {0}")]
    TokenInvalid(&'static str),
    /// The token's `exp` has passed.
    #[error("the token has expired")]
    TokenExpired(AuthStage),
    /// The token (its session or its agent) was revoked.
    #[error("the token has been revoked")]
    TokenRevoked(AuthStage),
    /// CONNECT (or absolute-form HTTP) to a host that none of the agent's granted routes names.
    #[error("host {host} is not in any route granted to agent {agent}")]
    HostNotAllowed { agent: String, host: String },
    /// The inner `Host` / `:authority` / absolute URI differs from the CONNECT authority.
    #[error("the request names host {got} but the tunnel was opened to {expected}")]
    HostMismatch { expected: String, got: String },
    /// Method and path match no route granted to this token.
    #[error("{0}")]
    NoRoute(String),
    /// The path cannot be normalised safely.
    #[error("unsafe path: {0}")]
    BadPath(BadPath),
    /// The request to the proxy itself is malformed (not CONNECT, not absolute-form, bad authority).
    #[error("bad proxy request: {0}")]
    BadRequest(String),
    /// The route's credential is not in the secret store (or the store cannot be read).
    #[error("credential {0} is not available in the secret store")]
    SecretUnavailable(String),
    /// Connecting to the upstream failed (refused, DNS, unreachable).
    #[error("the upstream could not be reached: {0}")]
    UpstreamUnreachable(String),
    /// The upstream's TLS certificate or handshake failed verification.
    #[error("TLS to the upstream failed: {0}")]
    UpstreamTls(String),
    /// The upstream did not answer in time.
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// The upstream answered with something that is not valid HTTP, or reset mid-response.
    #[error("the upstream broke the exchange: {0}")]
    UpstreamProtocol(String),
    /// The upstream name resolved to a loopback, private, link-local, CGNAT, multicast or
    /// unspecified address and was not pinned by `--resolve` (SSRF guard).
    #[error(
        "the upstream address {0} is private; pin it with --resolve or allow private upstreams"
    )]
    UpstreamPrivate(std::net::IpAddr),
    /// The request body is larger than the route's (or the proxy's) limit.
    #[error("the request body exceeds the limit of {0} bytes")]
    BodyTooLarge(u64),
    /// The request head is larger than latchkey accepts (hyper's buffer limit is soft, so the
    /// size is checked again on the parsed headers).
    #[error("the request headers exceed {0} bytes")]
    HeadersTooLarge(usize),
    /// The agent's request body broke off or was malformed (e.g. bad chunked framing).
    #[error("the request body was malformed or cut off by the client")]
    BadBody,
    /// Too many open connections overall or for this agent.
    #[error("too many open connections for {0}; retry later")]
    TooManyConnections(&'static str),
    /// The agent exceeded the route's `rate` (per agent and route, GCRA).
    #[error("rate limit of this route exceeded; retry in {retry_after_secs} s")]
    RateLimited {
        /// Seconds until a request would pass (sent as `Retry-After`).
        retry_after_secs: u64,
    },
    /// The shared session state (Redis) has been unreachable for longer than the grace
    /// period and the token was issued after the last sync, so whether it was revoked in the
    /// meantime cannot be known.
    #[error(
        "the shared session state is unreachable and this token is newer than the last sync; \
         retry later"
    )]
    StateUnavailable,
}

impl Deny {
    /// The HTTP status the agent receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Deny::TokenMissing | Deny::TokenInvalid(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Deny::TokenExpired(AuthStage::Proxy) | Deny::TokenRevoked(AuthStage::Proxy) => {
                StatusCode::PROXY_AUTHENTICATION_REQUIRED
            }
            Deny::TokenExpired(AuthStage::Tunnel) | Deny::TokenRevoked(AuthStage::Tunnel) => {
                StatusCode::FORBIDDEN
            }
            Deny::HostNotAllowed { .. } | Deny::HostMismatch { .. } | Deny::NoRoute(_) => {
                StatusCode::FORBIDDEN
            }
            Deny::BadPath(_) | Deny::BadRequest(_) => StatusCode::BAD_REQUEST,
            Deny::SecretUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Deny::UpstreamUnreachable(_) | Deny::UpstreamTls(_) | Deny::UpstreamProtocol(_) => {
                StatusCode::BAD_GATEWAY
            }
            Deny::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Deny::UpstreamPrivate(_) => StatusCode::FORBIDDEN,
            Deny::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Deny::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Deny::BadBody => StatusCode::BAD_REQUEST,
            Deny::TooManyConnections(_) | Deny::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Deny::StateUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Stable snake_case reason for the JSON body and the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            Deny::TokenMissing => "token_missing",
            Deny::TokenInvalid(_) => "token_invalid",
            Deny::TokenExpired(_) => "token_expired",
            Deny::TokenRevoked(_) => "token_revoked",
            Deny::HostNotAllowed { .. } => "host_not_allowed",
            Deny::HostMismatch { .. } => "host_mismatch",
            Deny::NoRoute(_) => "no_route",
            Deny::BadPath(_) => "bad_path",
            Deny::BadRequest(_) => "bad_request",
            Deny::SecretUnavailable(_) => "secret_unavailable",
            Deny::UpstreamUnreachable(_) => "upstream_unreachable",
            Deny::UpstreamTls(_) => "upstream_tls",
            Deny::UpstreamTimeout => "upstream_timeout",
            Deny::UpstreamProtocol(_) => "upstream_protocol",
            Deny::UpstreamPrivate(_) => "upstream_private",
            Deny::BodyTooLarge(_) => "body_too_large",
            Deny::HeadersTooLarge(_) => "headers_too_large",
            Deny::BadBody => "bad_body",
            Deny::TooManyConnections(_) => "too_many_connections",
            Deny::RateLimited { .. } => "rate_limited",
            Deny::StateUnavailable => "state_unavailable",
        }
    }

    /// The `Retry-After` seconds to send with this refusal, if it is worth retrying soon.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Deny::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            Deny::TooManyConnections(_) | Deny::StateUnavailable => Some(1),
            _ => None,
        }
    }

    /// Who is at fault: true when the upstream failed (logged at `warn`), false for the agent.
    pub fn is_upstream_fault(&self) -> bool {
        matches!(
            self,
            Deny::UpstreamUnreachable(_)
                | Deny::UpstreamTls(_)
                | Deny::UpstreamTimeout
                | Deny::UpstreamProtocol(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_token_is_407_at_connect_and_403_in_tunnel() {
        assert_eq!(Deny::TokenExpired(AuthStage::Proxy).status(), 407);
        assert_eq!(Deny::TokenExpired(AuthStage::Tunnel).status(), 403);
        assert_eq!(
            Deny::TokenRevoked(AuthStage::Tunnel).code(),
            "token_revoked"
        );
    }

    #[test]
    fn rate_limited_is_429_with_its_retry_after() {
        let d = Deny::RateLimited {
            retry_after_secs: 6,
        };
        assert_eq!(d.status(), 429);
        assert_eq!(d.code(), "rate_limited");
        assert_eq!(d.retry_after_secs(), Some(6));
    }

    #[test]
    fn state_unavailable_is_503() {
        assert_eq!(Deny::StateUnavailable.status(), 503);
        assert_eq!(Deny::StateUnavailable.code(), "state_unavailable");
        assert!(!Deny::StateUnavailable.is_upstream_fault());
    }

    #[test]
    fn upstream_faults_map_to_502_and_504() {
        assert_eq!(Deny::UpstreamUnreachable("x".into()).status(), 502);
        assert_eq!(Deny::UpstreamTls("x".into()).status(), 502);
        assert_eq!(Deny::UpstreamTimeout.status(), 504);
        assert!(Deny::UpstreamTimeout.is_upstream_fault());
        assert!(!Deny::NoRoute("x".into()).is_upstream_fault());
    }
}
