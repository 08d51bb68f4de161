//! Why latchkey refused a request or could not complete it: a typed [`Deny`], and who is at
//! fault ([`Fault`]). This is the only place that maps a refusal to what the agent sees (status,
//! the body's `error` word, `Proxy-Authenticate`, `Retry-After`) and to the operator log level.
//!
//! A low-level module: it knows HTTP status codes and nothing of the proxy, policy or audit.
//! A `Deny`'s `Display` text is sent to the agent as `detail`, so it never holds a secret or a
//! token (a credential *name* at most).

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};

/// Where a token check ran: at the CONNECT / plain-proxy level (407), inside a tunnel (403),
/// or on a gateway request (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStage {
    /// The proxy request itself (CONNECT or absolute-form HTTP): the client may retry with
    /// credentials, so the answer is 407.
    Proxy,
    /// A request inside an established tunnel: the tunnel cannot re-authenticate, so 403.
    Tunnel,
    /// A gateway-mode request (`/gw/<route>/...`): no proxy is involved, the token is the
    /// SDK's API key, so the answer is what an API sends: 401 with `WWW-Authenticate: Bearer`.
    Gateway,
}

/// What a missing token's refusal tells the agent to do, by where it was missing.
fn token_missing_hint(stage: &AuthStage) -> &'static str {
    match stage {
        AuthStage::Gateway => {
            "no token: send the latchkey token as the API key (Authorization: Bearer, x-api-key or api-key)"
        }
        _ => "no token: send the latchkey token as the proxy password or as Proxy-Authorization: Bearer",
    }
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

/// What the exfiltration tripwire found in a request: a stored credential (by name) or a
/// well-known credential format (by kind). Never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leak {
    /// An encoding of the value of the stored credential of this name.
    Stored(String),
    /// Something in this well-known credential format, which the route does not inject.
    Format(&'static str),
}

impl std::fmt::Display for Leak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leak::Stored(name) => write!(f, "the value of stored credential {name}"),
            Leak::Format(kind) => write!(
                f,
                "what looks like a {kind} credential, a kind this route does not inject"
            ),
        }
    }
}

/// Which OAuth connection a request needed and why it cannot be used (`connection_missing`).
/// Holds names only: the connection, the user, the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// The connection (the route's credential name).
    pub connection: String,
    /// The delegating user on a `per_user` route.
    pub user: Option<String>,
    /// Why: never connected, or broken by the provider.
    pub why: MissingWhy,
}

/// Why a connection cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingWhy {
    /// No connection was ever made (nothing stored under its name).
    NeverConnected,
    /// The route acts per user and the token names no user (`obo`).
    NoUser,
    /// The provider refused the stored refresh token (`invalid_grant`): revoked, expired or
    /// rotated away; only a new authorisation helps.
    Broken,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.connection;
        match (&self.why, &self.user) {
            (MissingWhy::NoUser, _) => write!(
                f,
                "connection {c} is made per user and this token acts for no user; issue the                  token with --on-behalf-of USER, and that user runs: latchkey connect {c} --user USER"
            ),
            (MissingWhy::NeverConnected, Some(u)) => write!(
                f,
                "user {u} has not connected {c}; to connect, run: latchkey connect {c} --user {u}"
            ),
            (MissingWhy::NeverConnected, None) => write!(
                f,
                "{c} is not connected; to connect, run: latchkey connect {c}"
            ),
            (MissingWhy::Broken, Some(u)) => write!(
                f,
                "the connection {c} of user {u} was refused by its provider (invalid_grant);                  to reconnect, run: latchkey connect {c} --user {u}"
            ),
            (MissingWhy::Broken, None) => write!(
                f,
                "the connection {c} was refused by its provider (invalid_grant); to reconnect,                  run: latchkey connect {c}"
            ),
        }
    }
}

/// A refusal. Each variant says when it fires; `status` and `code` are the only mapping to
/// what the agent sees and what the audit log records.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Deny {
    /// No `Proxy-Authorization` header (or an empty one); in gateway mode, none of
    /// `Authorization: Bearer`, `x-api-key`, `api-key`.
    #[error("{}", token_missing_hint(.0))]
    TokenMissing(AuthStage),
    /// The token is malformed, wrongly signed, or has the wrong issuer/audience/claims.
    #[error("the token is not valid: {1}")]
    TokenInvalid(AuthStage, &'static str),
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
    /// No route of the agent matches the method and path on this host (or the agent has no
    /// policy loaded at all, e.g. its file was removed while a tunnel was open).
    #[error("{method} {path} matches no route of agent {agent} for {authority}")]
    NoRoute {
        agent: String,
        method: Method,
        path: String,
        authority: String,
    },
    /// A route matches, but the token was issued with `--route` narrowing that leaves it out.
    #[error(
        "route {route} matches {method} {path} on {authority} but is not granted to this token"
    )]
    RouteNotGranted {
        route: String,
        method: Method,
        path: String,
        authority: String,
    },
    /// A route matches, but it injects a credential over plain `http://` without
    /// `insecure_http = true`.
    #[error(
        "route {route} injects a credential and insecure_http is not set, so {method} {path} \
         over plain http to {authority} is refused"
    )]
    InsecureHttpRefused {
        route: String,
        method: Method,
        path: String,
        authority: String,
    },
    /// A route matches the path, but not the method.
    #[error(
        "{method} is not allowed for {path} on {authority}: route {route} allows only {allowed}"
    )]
    MethodNotAllowed {
        route: String,
        method: Method,
        path: String,
        authority: String,
        /// The route's methods, comma-separated.
        allowed: String,
    },
    /// A gateway request (`/gw/<route>/...`) names no route of the token's agent (another
    /// agent's route, a misspelt id, or no id at all).
    #[error("agent {agent} has no route {route:?}; gateway URLs are /gw/<route-id>/<path>")]
    UnknownRoute { agent: String, route: String },
    /// A gateway request names a route whose host is a wildcard: it names no single upstream
    /// to send to, so only proxy mode can use it.
    #[error(
        "route {route} names the wildcard host {host}, which is no single upstream: gateway \
         mode cannot use it (use proxy mode, HTTPS_PROXY, for this route)"
    )]
    GatewayWildcard { route: String, host: String },
    /// The path cannot be normalised safely.
    #[error("unsafe path: {0}")]
    BadPath(BadPath),
    /// The request to the proxy itself is malformed (not CONNECT, not absolute-form, bad authority).
    #[error("bad proxy request: {0}")]
    BadRequest(String),
    /// The route's credential is not in the secret store (or the store cannot be read).
    #[error("credential {0} is not available in the secret store")]
    SecretUnavailable(String),
    /// The route's credential exists but cannot be put on this request now: its stored form
    /// cannot be used, or what it needs to mint or sign (a token endpoint, a role to assume)
    /// did not answer in time. The detail names the credential and the cause, never a value.
    #[error("credential {0}")]
    CredentialUnavailable(String),
    /// The route acts with an OAuth connection that does not exist or no longer works: the
    /// delegating user (or the operator) never ran `latchkey connect`, the token names no
    /// user on a `per_user` route, or the provider refused the refresh token
    /// (`invalid_grant`). The detail names the command that makes (or remakes) the
    /// connection, never a token.
    #[error("{0}")]
    ConnectionMissing(Missing),
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
    /// The agent already has `--max-requests-in-flight-per-agent` requests in flight, across
    /// all its tunnels and HTTP/2 streams (HTTP/2 would otherwise multiply its budget by the
    /// streams per connection).
    #[error("too many requests in flight for this agent (at most {0}); retry later")]
    TooManyRequestsInFlight(usize),
    /// Every one of latchkey's `--max-upstream-connections` is in use, so no new upstream
    /// connection could be opened for this request.
    #[error("latchkey has no upstream connection to spare; retry later")]
    UpstreamConnectionsExhausted,
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
    /// The request (its target, a header value or its body) carries a stored credential's
    /// value or a well-known credential format the route does not inject: the exfiltration
    /// tripwire.
    #[error("the request carries {0}; latchkey does not let a credential leave this way")]
    SecretInRequest(Leak),
    /// A route with a signing credential (`aws_sigv4`, `hmac`) matched, but latchkey cannot
    /// sign this request correctly (no agent signature to replace, an unsupported algorithm
    /// or payload mode, broken `aws-chunked` framing): it is refused, never sent half-signed.
    #[error("latchkey cannot sign this request: {0}")]
    CannotSign(String),
    /// The agent signed the request for a service or region other than the route's
    /// `service` / `region`.
    #[error("the request is signed for {signed}, but route {route} allows only {allowed}")]
    SigningScopeNotAllowed {
        route: String,
        /// `service/region` from the agent's credential scope.
        signed: String,
        /// What the route names.
        allowed: String,
    },
    /// The route has `approval = "request"` and a person denied this held request (or the
    /// session grant it needed). The detail names the approver and their reason.
    #[error("{approver} denied this request{}", .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    ApprovalDenied {
        /// Who decided (a name given at sign-in or on the command line).
        approver: String,
        /// Their reason, if they gave one.
        reason: Option<String>,
    },
    /// The route has `approval = "request"` and nobody decided within `--approval-timeout`
    /// (the number of seconds).
    #[error("nobody approved this request within {0} s")]
    ApprovalTimeout(u64),
    /// The agent already has `--approval-queue` requests held for approval; the excess is
    /// refused at once instead of piling up.
    #[error(
        "this agent already has {0} requests waiting for approval; retry once they are decided"
    )]
    ApprovalQueueFull(usize),
}

impl Deny {
    /// The HTTP status the agent receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Deny::TokenMissing(stage)
            | Deny::TokenInvalid(stage, _)
            | Deny::TokenExpired(stage)
            | Deny::TokenRevoked(stage) => match stage {
                AuthStage::Proxy => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                AuthStage::Tunnel => StatusCode::FORBIDDEN,
                AuthStage::Gateway => StatusCode::UNAUTHORIZED,
            },
            Deny::HostNotAllowed { .. }
            | Deny::HostMismatch { .. }
            | Deny::NoRoute { .. }
            | Deny::RouteNotGranted { .. }
            | Deny::InsecureHttpRefused { .. }
            | Deny::MethodNotAllowed { .. }
            | Deny::UnknownRoute { .. }
            | Deny::GatewayWildcard { .. }
            | Deny::SecretInRequest(_)
            | Deny::ConnectionMissing(_)
            | Deny::SigningScopeNotAllowed { .. }
            | Deny::ApprovalDenied { .. }
            | Deny::ApprovalTimeout(_) => StatusCode::FORBIDDEN,
            Deny::BadPath(_) | Deny::BadRequest(_) | Deny::CannotSign(_) => StatusCode::BAD_REQUEST,
            Deny::SecretUnavailable(_) | Deny::CredentialUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Deny::UpstreamUnreachable(_) | Deny::UpstreamTls(_) | Deny::UpstreamProtocol(_) => {
                StatusCode::BAD_GATEWAY
            }
            Deny::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Deny::UpstreamPrivate(_) => StatusCode::FORBIDDEN,
            Deny::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Deny::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Deny::BadBody => StatusCode::BAD_REQUEST,
            Deny::TooManyConnections(_)
            | Deny::TooManyRequestsInFlight(_)
            | Deny::ApprovalQueueFull(_)
            | Deny::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Deny::StateUnavailable | Deny::UpstreamConnectionsExhausted => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Stable snake_case reason for the JSON body and the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            Deny::TokenMissing(_) => "token_missing",
            Deny::TokenInvalid(..) => "token_invalid",
            Deny::TokenExpired(_) => "token_expired",
            Deny::TokenRevoked(_) => "token_revoked",
            Deny::HostNotAllowed { .. } => "host_not_allowed",
            Deny::HostMismatch { .. } => "host_mismatch",
            // Gateway mode's "no such route" is the same answer as proxy mode's: nothing of
            // this agent's policy allows the request.
            Deny::NoRoute { .. } | Deny::UnknownRoute { .. } | Deny::GatewayWildcard { .. } => {
                "no_route"
            }
            Deny::RouteNotGranted { .. } => "route_not_granted",
            Deny::InsecureHttpRefused { .. } => "insecure_http_refused",
            Deny::MethodNotAllowed { .. } => "method_not_allowed",
            Deny::BadPath(_) => "bad_path",
            Deny::BadRequest(_) => "bad_request",
            Deny::SecretUnavailable(_) => "secret_unavailable",
            Deny::CredentialUnavailable(_) => "credential_unavailable",
            Deny::ConnectionMissing(_) => "connection_missing",
            Deny::UpstreamUnreachable(_) => "upstream_unreachable",
            Deny::UpstreamTls(_) => "upstream_tls",
            Deny::UpstreamTimeout => "upstream_timeout",
            Deny::UpstreamProtocol(_) => "upstream_protocol",
            Deny::UpstreamPrivate(_) => "upstream_private",
            Deny::BodyTooLarge(_) => "body_too_large",
            Deny::HeadersTooLarge(_) => "headers_too_large",
            Deny::BadBody => "bad_body",
            Deny::TooManyConnections(_) => "too_many_connections",
            Deny::TooManyRequestsInFlight(_) => "too_many_requests_in_flight",
            Deny::UpstreamConnectionsExhausted => "upstream_connections_exhausted",
            Deny::RateLimited { .. } => "rate_limited",
            Deny::StateUnavailable => "state_unavailable",
            Deny::SecretInRequest(_) => "secret_in_request",
            Deny::CannotSign(_) => "cannot_sign",
            Deny::SigningScopeNotAllowed { .. } => "signing_scope_not_allowed",
            Deny::ApprovalDenied { .. } => "approval_denied",
            Deny::ApprovalTimeout(_) => "approval_timeout",
            Deny::ApprovalQueueFull(_) => "approval_queue_full",
        }
    }

    /// The `Retry-After` seconds to send with this refusal, if it is worth retrying soon.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Deny::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            Deny::TooManyConnections(_)
            | Deny::TooManyRequestsInFlight(_)
            | Deny::ApprovalQueueFull(_)
            | Deny::UpstreamConnectionsExhausted
            | Deny::StateUnavailable => Some(1),
            _ => None,
        }
    }

    /// Who is at fault. The one classification the body word, the log level and
    /// `Proxy-Authenticate` derive from (`status` agrees with it: a test checks every variant).
    pub fn fault(&self) -> Fault {
        match self {
            Deny::UpstreamUnreachable(_)
            | Deny::UpstreamTls(_)
            | Deny::UpstreamTimeout
            | Deny::UpstreamProtocol(_) => Fault::Upstream,
            Deny::SecretUnavailable(_)
            | Deny::CredentialUnavailable(_)
            | Deny::StateUnavailable
            | Deny::UpstreamConnectionsExhausted => Fault::Us,
            _ => Fault::Agent,
        }
    }

    /// The `error` word of the JSON body: what kind of failure the agent is looking at.
    pub fn error_word(&self) -> &'static str {
        match self.fault() {
            Fault::Agent => "denied",
            Fault::Upstream => "upstream_failed",
            Fault::Us => "unavailable",
        }
    }

    /// Whether the answer asks the client to authenticate to the proxy (407 with
    /// `Proxy-Authenticate`): only for token problems at the proxy level, never inside a
    /// tunnel, where the client cannot re-authenticate.
    pub fn asks_for_proxy_auth(&self) -> bool {
        self.auth_stage() == Some(AuthStage::Proxy)
    }

    /// Whether the answer asks for an API key as an API would (401 with `WWW-Authenticate:
    /// Bearer`): token problems of a gateway request, where no proxy is involved.
    pub fn asks_for_bearer(&self) -> bool {
        self.auth_stage() == Some(AuthStage::Gateway)
    }

    /// Where the token check that refused ran, for token refusals.
    fn auth_stage(&self) -> Option<AuthStage> {
        match self {
            Deny::TokenMissing(stage)
            | Deny::TokenInvalid(stage, _)
            | Deny::TokenExpired(stage)
            | Deny::TokenRevoked(stage) => Some(*stage),
            _ => None,
        }
    }

    /// Log this refusal once, at the level its fault calls for: the agent's mistakes at
    /// `debug` (the audit log records them), the upstream's at `warn`, ours at `error`.
    pub fn log(&self, request_id: &str, agent: Option<&str>, host: &str) {
        let agent = agent.unwrap_or("-");
        let reason = self.code();
        match self.fault() {
            Fault::Agent => {
                tracing::debug!(%request_id, agent, host, reason, detail = %self, "denied")
            }
            Fault::Upstream => {
                tracing::warn!(%request_id, agent, host, reason, detail = %self, "upstream failed")
            }
            Fault::Us => {
                tracing::error!(%request_id, agent, host, reason, detail = %self, "cannot serve the request")
            }
        }
    }

    /// The answer the agent receives: `{"error","reason","detail","request_id"}` as JSON with
    /// the status, `Retry-After` and `Proxy-Authenticate` this refusal calls for. The detail
    /// names what was refused and why, never a secret or a token.
    pub fn to_response(&self, request_id: &str) -> Response<Bytes> {
        let body = serde_json::json!({
            "error": self.error_word(),
            "reason": self.code(),
            "detail": self.to_string(),
            "request_id": request_id,
        });
        let mut bytes = serde_json::to_vec(&body).expect("a JSON value serialises");
        bytes.push(b'\n');
        let mut resp = Response::new(Bytes::from(bytes));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after_secs() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.asks_for_proxy_auth() {
            h.insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"latchkey\""),
            );
        }
        if self.asks_for_bearer() {
            // RFC 6750 section 3: no error code when no token came, `invalid_token` otherwise.
            let challenge = if matches!(self, Deny::TokenMissing(_)) {
                "Bearer realm=\"latchkey\""
            } else {
                "Bearer realm=\"latchkey\", error=\"invalid_token\""
            };
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        resp
    }
}

/// Who caused a refusal or failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The agent sent something the policy or the protocol does not allow (4xx, `denied`,
    /// logged at `debug`).
    Agent,
    /// The upstream could not be reached or broke the exchange (502/504, `upstream_failed`,
    /// logged at `warn`).
    Upstream,
    /// latchkey itself cannot serve the request now: its secret backend or shared state is
    /// unavailable (503, `unavailable`, logged at `error`).
    Us,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of every variant (and both stages of the token ones).
    fn every_variant() -> Vec<Deny> {
        let m = || Method::POST;
        vec![
            Deny::TokenMissing(AuthStage::Proxy),
            Deny::TokenMissing(AuthStage::Gateway),
            Deny::TokenInvalid(AuthStage::Proxy, "bad signature"),
            Deny::TokenInvalid(AuthStage::Gateway, "bad signature"),
            Deny::TokenExpired(AuthStage::Proxy),
            Deny::TokenExpired(AuthStage::Tunnel),
            Deny::TokenExpired(AuthStage::Gateway),
            Deny::TokenRevoked(AuthStage::Proxy),
            Deny::TokenRevoked(AuthStage::Tunnel),
            Deny::TokenRevoked(AuthStage::Gateway),
            Deny::HostNotAllowed {
                agent: "a".into(),
                host: "h:443".into(),
            },
            Deny::HostMismatch {
                expected: "h:443".into(),
                got: "o:443".into(),
            },
            Deny::NoRoute {
                agent: "a".into(),
                method: m(),
                path: "/x".into(),
                authority: "h:443".into(),
            },
            Deny::RouteNotGranted {
                route: "r".into(),
                method: m(),
                path: "/x".into(),
                authority: "h:443".into(),
            },
            Deny::InsecureHttpRefused {
                route: "r".into(),
                method: m(),
                path: "/x".into(),
                authority: "h:80".into(),
            },
            Deny::MethodNotAllowed {
                route: "r".into(),
                method: m(),
                path: "/x".into(),
                authority: "h:443".into(),
                allowed: "GET".into(),
            },
            Deny::UnknownRoute {
                agent: "a".into(),
                route: "r".into(),
            },
            Deny::GatewayWildcard {
                route: "r".into(),
                host: "*.example.com".into(),
            },
            Deny::BadPath(BadPath::AboveRoot),
            Deny::BadRequest("x".into()),
            Deny::SecretUnavailable("gh".into()),
            Deny::CredentialUnavailable("gh: its token endpoint did not answer".into()),
            Deny::UpstreamUnreachable("refused".into()),
            Deny::UpstreamTls("bad cert".into()),
            Deny::UpstreamTimeout,
            Deny::UpstreamProtocol("reset".into()),
            Deny::UpstreamPrivate(std::net::Ipv4Addr::LOCALHOST.into()),
            Deny::BodyTooLarge(10),
            Deny::HeadersTooLarge(64),
            Deny::BadBody,
            Deny::TooManyConnections("this agent"),
            Deny::TooManyRequestsInFlight(256),
            Deny::UpstreamConnectionsExhausted,
            Deny::RateLimited {
                retry_after_secs: 6,
            },
            Deny::StateUnavailable,
            Deny::SecretInRequest(Leak::Stored("billing".into())),
            Deny::SecretInRequest(Leak::Format("github")),
            Deny::CannotSign("no SigV4 signature to replace".into()),
            Deny::SigningScopeNotAllowed {
                route: "s3".into(),
                signed: "sqs/us-east-1".into(),
                allowed: "s3/eu-west-1".into(),
            },
            Deny::ConnectionMissing(Missing {
                connection: "github".into(),
                user: Some("alice".into()),
                why: MissingWhy::NeverConnected,
            }),
            Deny::ApprovalDenied {
                approver: "alice".into(),
                reason: Some("not in prod".into()),
            },
            Deny::ApprovalTimeout(60),
            Deny::ApprovalQueueFull(16),
        ]
    }

    #[test]
    fn gateway_token_problems_are_401_with_a_bearer_challenge_not_407() {
        for d in [
            Deny::TokenMissing(AuthStage::Gateway),
            Deny::TokenInvalid(AuthStage::Gateway, "bad signature"),
            Deny::TokenExpired(AuthStage::Gateway),
            Deny::TokenRevoked(AuthStage::Gateway),
        ] {
            let resp = d.to_response("r");
            assert_eq!(resp.status(), 401, "{d:?}");
            assert!(!resp.headers().contains_key(header::PROXY_AUTHENTICATE));
            let challenge = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
            assert!(
                challenge.starts_with("Bearer realm=\"latchkey\""),
                "{challenge}"
            );
            assert_eq!(
                challenge.contains("invalid_token"),
                !matches!(d, Deny::TokenMissing(_))
            );
        }
        let d = Deny::TokenMissing(AuthStage::Gateway);
        assert!(d.to_string().contains("x-api-key"), "{d}");
        for d in every_variant().iter().filter(|d| d.status() != 401) {
            let resp = d.to_response("r");
            assert!(
                !resp.headers().contains_key(header::WWW_AUTHENTICATE),
                "{d:?}"
            );
        }
    }

    #[test]
    fn unknown_and_wildcard_gateway_routes_are_403_no_route() {
        let d = Deny::UnknownRoute {
            agent: "bot".into(),
            route: "nope".into(),
        };
        assert_eq!((d.status().as_u16(), d.code()), (403, "no_route"));
        assert!(d.to_string().contains("/gw/<route-id>/"));
        let d = Deny::GatewayWildcard {
            route: "many".into(),
            host: "*.example.com".into(),
        };
        assert_eq!((d.status().as_u16(), d.code()), (403, "no_route"));
        assert!(d.to_string().contains("proxy mode"), "{d}");
    }

    #[test]
    fn approval_denied_is_403_and_names_the_approver_and_reason() {
        let d = Deny::ApprovalDenied {
            approver: "alice".into(),
            reason: Some("not in prod".into()),
        };
        assert_eq!(d.status(), 403);
        assert_eq!(d.code(), "approval_denied");
        assert_eq!(d.fault(), Fault::Agent);
        assert_eq!(d.to_string(), "alice denied this request: not in prod");
        let d = Deny::ApprovalDenied {
            approver: "bob".into(),
            reason: None,
        };
        assert_eq!(d.to_string(), "bob denied this request");
        assert!(d.retry_after_secs().is_none());
    }

    #[test]
    fn approval_timeout_is_403_without_retry_after() {
        let d = Deny::ApprovalTimeout(60);
        assert_eq!(d.status(), 403);
        assert_eq!(d.code(), "approval_timeout");
        assert_eq!(d.fault(), Fault::Agent);
        assert!(d.to_string().contains("60 s"));
        assert!(!d
            .to_response("r")
            .headers()
            .contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn approval_queue_full_is_429_with_retry_after() {
        let d = Deny::ApprovalQueueFull(16);
        assert_eq!(d.status(), 429);
        assert_eq!(d.code(), "approval_queue_full");
        assert_eq!(d.fault(), Fault::Agent);
        assert_eq!(d.to_response("r").headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn secret_in_request_is_403_the_agents_fault_and_names_no_value() {
        let d = Deny::SecretInRequest(Leak::Stored("billing".into()));
        assert_eq!(d.status(), 403);
        assert_eq!(d.code(), "secret_in_request");
        assert_eq!(d.fault(), Fault::Agent);
        assert!(d.to_string().contains("stored credential billing"));
        let d = Deny::SecretInRequest(Leak::Format("github"));
        assert!(d.to_string().contains("github credential"));
    }

    #[test]
    fn connection_missing_is_403_and_names_the_command() {
        let d = Deny::ConnectionMissing(Missing {
            connection: "github".into(),
            user: Some("alice".into()),
            why: MissingWhy::NeverConnected,
        });
        assert_eq!(d.status(), 403);
        assert_eq!(d.code(), "connection_missing");
        assert_eq!(d.fault(), Fault::Agent);
        assert!(d
            .to_string()
            .contains("latchkey connect github --user alice"));
        let d = Deny::ConnectionMissing(Missing {
            connection: "google".into(),
            user: None,
            why: MissingWhy::Broken,
        });
        let text = d.to_string();
        assert!(text.contains("invalid_grant"), "{text}");
        assert!(text.ends_with("latchkey connect google"), "{text}");
        let v: serde_json::Value = serde_json::from_slice(d.to_response("r").body()).unwrap();
        assert_eq!(v["reason"], "connection_missing");
        assert_eq!(v["error"], "denied");
    }

    #[test]
    fn fault_agrees_with_status_for_every_variant() {
        for d in every_variant() {
            let s = d.status().as_u16();
            match d.fault() {
                Fault::Agent => assert!((400..500).contains(&s), "{d:?} is {s}"),
                Fault::Upstream => assert!(s == 502 || s == 504, "{d:?} is {s}"),
                Fault::Us => assert!(s == 503, "{d:?} is {s}"),
            }
        }
    }

    #[test]
    fn only_proxy_level_token_problems_ask_for_proxy_auth() {
        for d in every_variant() {
            let resp = d.to_response("req-1");
            let challenged = resp.headers().contains_key(header::PROXY_AUTHENTICATE);
            assert_eq!(challenged, d.status() == 407, "{d:?}");
        }
    }

    #[test]
    fn the_old_no_route_is_four_reasons() {
        let mut codes: Vec<&str> = every_variant()
            .iter()
            .map(Deny::code)
            .filter(|c| {
                [
                    "no_route",
                    "route_not_granted",
                    "insecure_http_refused",
                    "method_not_allowed",
                ]
                .contains(c)
            })
            .collect();
        // Gateway mode's unknown and wildcard routes are `no_route` too.
        let mut seen = Vec::new();
        codes.retain(|c| {
            let first = !seen.contains(c);
            seen.push(*c);
            first
        });
        assert_eq!(
            codes,
            [
                "no_route",
                "route_not_granted",
                "insecure_http_refused",
                "method_not_allowed"
            ]
        );
    }

    #[test]
    fn response_body_says_error_reason_detail_and_request_id() {
        let d = Deny::UpstreamTimeout;
        let resp = d.to_response("req-9");
        assert_eq!(resp.status(), 504);
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(v["error"], "upstream_failed");
        assert_eq!(v["reason"], "upstream_timeout");
        assert_eq!(v["request_id"], "req-9");
        assert_eq!(
            Deny::SecretUnavailable("gh".into())
                .to_response("r")
                .headers()[header::CACHE_CONTROL],
            "no-store"
        );
        let v: serde_json::Value =
            serde_json::from_slice(Deny::StateUnavailable.to_response("r").body()).unwrap();
        assert_eq!(v["error"], "unavailable");
        let v: serde_json::Value =
            serde_json::from_slice(Deny::BadBody.to_response("r").body()).unwrap();
        assert_eq!(v["error"], "denied");
    }

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
        assert_eq!(d.to_response("r").headers()[header::RETRY_AFTER], "6");
    }

    #[test]
    fn too_many_requests_in_flight_is_429_the_agents_fault_with_retry_after() {
        let d = Deny::TooManyRequestsInFlight(4);
        assert_eq!(d.status(), 429);
        assert_eq!(d.code(), "too_many_requests_in_flight");
        assert_eq!(d.fault(), Fault::Agent);
        assert_eq!(d.to_response("r").headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn upstream_connections_exhausted_is_503_and_our_fault() {
        let d = Deny::UpstreamConnectionsExhausted;
        assert_eq!(d.status(), 503);
        assert_eq!(d.code(), "upstream_connections_exhausted");
        assert_eq!(d.fault(), Fault::Us);
        assert_eq!(d.to_response("r").headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn state_unavailable_is_503_and_our_fault() {
        assert_eq!(Deny::StateUnavailable.status(), 503);
        assert_eq!(Deny::StateUnavailable.code(), "state_unavailable");
        assert_eq!(Deny::StateUnavailable.fault(), Fault::Us);
    }

    #[test]
    fn upstream_faults_map_to_502_and_504() {
        assert_eq!(Deny::UpstreamUnreachable("x".into()).status(), 502);
        assert_eq!(Deny::UpstreamTls("x".into()).status(), 502);
        assert_eq!(Deny::UpstreamTimeout.status(), 504);
        assert_eq!(Deny::UpstreamTimeout.fault(), Fault::Upstream);
        assert_eq!(Deny::BadBody.fault(), Fault::Agent);
    }
}
