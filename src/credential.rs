//! Credential kinds: what latchkey puts on one allowed request.
//!
//! A route names a credential; a credential has a kind (`../shared/DESIGN.md`, Credential
//! kinds). The request path asks [`Credentials::resolve`] for the route's credential and then
//! hands the request to [`Credential::apply`]: the kind strips and rebuilds the head (through
//! `inject`), puts on what it owns (a stored value, a minted token, a signature) and may wrap
//! the body (a streaming signature). The request path knows nothing else about kinds.
//!
//! Stored forms live in the secret backends (`secrets`): a `static` credential is its raw
//! value; every other kind is a typed document (`secrets::typed`) whose `kind` key picks the
//! [`Kind`] that builds it. Built credentials are cached per name and stored value, so the
//! per-request cost of a static credential is one map lookup and an `Arc` clone.
//!
//! Kinds that mint (`oauth2`, `oauth2_client_credentials`: `oauth2`; `github_app`) share a
//! [`Runtime`] (token endpoint client, secret backend, Redis, metrics, the request wait) and
//! keep their tokens in memory across rebuilds. A `per_user` route resolves the connection of
//! the token's `obo` user. `endpoint` is their HTTP client.
//!
//! This module must never put a secret value into an error, a log line, a span or an audit
//! field: errors and audit details name the credential and say what went wrong.

pub mod endpoint;
mod fixed;
pub mod github_app;
pub mod hmac;
pub mod oauth2;
pub mod sigv4;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http_body_util::combinators::UnsyncBoxBody;

use crate::auth::Claims;
use crate::deny::{Deny, Missing, MissingWhy};
use crate::inject::{PreparedCache, Rewrite};
use crate::metrics::Metrics;
use crate::policy::Route;
use crate::redact::Needles;
use crate::secrets::typed::{self, Stored, TypedDoc};
use crate::secrets::{Secret, Secrets};
use crate::tripwire;

pub use fixed::Fixed;

/// Errors a request body may end with (the same type as `proxy::forward::BoxError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way upstream (the same type as `proxy::forward::UpstreamBody`).
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// One credential of one kind, built from its stored form, ready to go on requests.
pub trait Credential: Send + Sync + 'static {
    /// The kind's name as policy and the audit log spell it (`static`, `oauth2`, ...).
    fn kind(&self) -> &'static str;

    /// Whether `route` can use this credential (its inject form, service, paths...), as
    /// `policy check` asks before anything is served. `Err` says why, in one sentence.
    fn fits(&self, route: &Route) -> Result<(), String>;

    /// The credential-format family of what this credential puts on requests, if it has
    /// one: the exfiltration tripwire lets an agent send that format on this route, because
    /// the kind replaces the agent's copy anyway.
    fn tripwire_kind(&self) -> Option<tripwire::Kind> {
        None
    }

    /// Strip the agent's credentials, rebuild the target and put this credential on the
    /// request. Runs once per allowed request; a kind that must wait (a token refresh) does so
    /// here, bounded, and answers `Deny::CredentialUnavailable` when it cannot.
    fn apply<'a>(&'a self, out: Outgoing<'a>) -> Apply<'a>;
}

/// What a kind works on: the request (head to rewrite, body to pass on or wrap) and the facts
/// it may need (where it goes, who asks).
pub struct Outgoing<'a> {
    /// The agent's request head, still as the agent sent it.
    pub parts: &'a mut Parts,
    /// Where it goes and which route allowed it.
    pub rewrite: &'a Rewrite<'a>,
    /// The body, already limited and scanned; pass it on or wrap it.
    pub body: Body,
    /// The token's claims (the delegating user for per-user credentials).
    pub claims: &'a Claims,
    /// Prebuilt header values per route and value (`inject::apply`).
    pub prepared: &'a PreparedCache,
}

/// What a kind put on the request, for the response side and the audit line.
pub struct Applied {
    /// The body to send upstream.
    pub body: Body,
    /// The forms of what went out that must be redacted if the upstream echoes them.
    pub needles: Option<Arc<Needles>>,
    /// A short, non-secret note for the audit line (whose connection, which role).
    pub detail: Option<String>,
}

/// The answer of [`Credential::apply`]: ready at once (a static value: no allocation, no
/// await) or a future (a kind that must mint or fetch first).
pub enum Apply<'a> {
    /// Done already.
    Ready(Option<Result<Applied, Deny>>),
    /// Still working.
    Pending(Pin<Box<dyn Future<Output = Result<Applied, Deny>> + Send + 'a>>),
}

impl<'a> Apply<'a> {
    /// A finished answer.
    pub fn ready(result: Result<Applied, Deny>) -> Apply<'a> {
        Apply::Ready(Some(result))
    }

    /// An answer still to be worked out.
    pub fn pending(fut: impl Future<Output = Result<Applied, Deny>> + Send + 'a) -> Apply<'a> {
        Apply::Pending(Box::pin(fut))
    }
}

impl Future for Apply<'_> {
    type Output = Result<Applied, Deny>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Apply::Ready(r) => Poll::Ready(r.take().expect("an Apply is polled after completion")),
            Apply::Pending(f) => f.as_mut().poll(cx),
        }
    }
}

/// Why a stored credential cannot be built. Names the problem, never a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KindError {
    /// The typed document is broken.
    #[error(transparent)]
    Document(#[from] typed::TypedError),
    /// No kind of that name exists.
    #[error("unknown credential kind {0:?} (known: {known})", known = KNOWN_KINDS.join(", "))]
    UnknownKind(String),
    /// The document does not hold what the kind needs.
    #[error("{0}")]
    Invalid(String),
}

/// Kind names accepted by `secret set --kind` and in typed documents.
pub const KNOWN_KINDS: &[&str] = &[
    "static",
    "aws_sigv4",
    "hmac",
    oauth2::OAUTH2,
    oauth2::CLIENT_CREDENTIALS,
    github_app::GITHUB_APP,
];

/// What kinds that mint tokens need while serving: the client for token endpoints, the
/// secret backend (to persist a rotated refresh token and read another replica's), Redis (one
/// refresh at a time across replicas), the metrics, and how long a request may wait.
pub struct Runtime {
    /// Token endpoints (system roots plus `--upstream-ca`).
    pub endpoints: Arc<endpoint::Endpoints>,
    /// The configured secret backend.
    pub secrets: Arc<Secrets>,
    /// Shared state when `--redis` is given.
    pub redis: Option<Arc<crate::redis::Redis>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The longest a request waits for a token to be minted before it is answered 503
    /// `credential_unavailable` (the minting goes on in the background).
    pub wait: Duration,
}

/// How long a request waits for a token by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
/// How long one token endpoint exchange may take (in the background).
pub const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(15);

/// Builds credentials of one kind from their typed documents. A kind with shared state (an
/// HTTP client for token endpoints, a Redis handle for refresh locks) holds it here.
pub trait Kind: Send + Sync + 'static {
    /// The kind's name (`oauth2`, `aws_sigv4`, ...).
    fn name(&self) -> &'static str;
    /// Build the credential `name` from its document. No I/O: a document is checked here,
    /// and what must be fetched is fetched in `Credential::apply`.
    fn build(&self, name: &str, doc: &TypedDoc) -> Result<Arc<dyn Credential>, KindError>;
}

/// The kinds latchkey knows, without any runtime state (for `secret set --kind` and
/// `policy check`, which build credentials to validate them): a kind that must reach an
/// endpoint (a token endpoint, STS) answers `credential_unavailable` if one of these is ever
/// applied.
pub fn kinds() -> Vec<Box<dyn Kind>> {
    vec![
        Box::new(oauth2::OAuth2Kind::new(oauth2::Grant::Refresh, None)),
        Box::new(oauth2::OAuth2Kind::new(
            oauth2::Grant::ClientCredentials,
            None,
        )),
        Box::new(github_app::GithubAppKind::new(None)),
        Box::new(sigv4::SigV4Kind::new(None)),
        Box::new(hmac::HmacKind),
    ]
}

/// The kinds latchkey serves with: those that mint tokens share `runtime`; those that call
/// endpoints through the proxy's own upstream client (STS: its roots, `--resolve` pins and
/// private-address guard) use `transport` (without one they answer `credential_unavailable`).
pub fn serving_kinds(
    runtime: Arc<Runtime>,
    transport: Option<Arc<dyn Transport>>,
) -> Vec<Box<dyn Kind>> {
    vec![
        Box::new(oauth2::OAuth2Kind::new(
            oauth2::Grant::Refresh,
            Some(runtime.clone()),
        )),
        Box::new(oauth2::OAuth2Kind::new(
            oauth2::Grant::ClientCredentials,
            Some(runtime.clone()),
        )),
        Box::new(github_app::GithubAppKind::new(Some(runtime))),
        Box::new(sigv4::SigV4Kind::new(transport)),
        Box::new(hmac::HmacKind),
    ]
}

/// A response latchkey's own call got (to STS, a token endpoint): status, head, whole body.
pub type Fetched = http::Response<Bytes>;

/// How credential kinds reach the endpoints they need (an STS, a token endpoint): the
/// proxy's upstream client, handed in by `app` so this module does not depend on `proxy`.
pub trait Transport: Send + Sync + 'static {
    /// Send `req` and read the whole response (bounded by the implementation). `Err` is one
    /// sentence saying why there is no response.
    fn fetch(
        &self,
        req: http::Request<Body>,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, String>> + Send + '_>>;
}

/// Build a credential from its stored value with `kinds`.
pub fn build(
    name: &str,
    secret: &Arc<Secret>,
    kinds: &[Box<dyn Kind>],
) -> Result<Arc<dyn Credential>, KindError> {
    match typed::parse(secret)? {
        Stored::Static(_) => Ok(Arc::new(Fixed::new(secret.clone()))),
        Stored::Typed(doc) => {
            let kind = kinds
                .iter()
                .find(|k| k.name() == doc.kind)
                .ok_or_else(|| KindError::UnknownKind(doc.kind.clone()))?;
            kind.build(name, &doc)
        }
    }
}

/// Check a typed document's text as `secret set NAME --kind KIND` reads it, before it is
/// stored: it must be of `kind` and build.
pub fn check_document(name: &str, kind: &str, text: &str) -> Result<Secret, KindError> {
    let doc = typed::parse_text(text)?;
    if doc.kind != kind {
        return Err(KindError::Invalid(format!(
            "the document says kind = {:?} but --kind is {kind:?}",
            doc.kind
        )));
    }
    let stored = Arc::new(typed::encode(text));
    build(name, &stored, &kinds())?;
    Ok(Arc::try_unwrap(stored).unwrap_or_else(|_| typed::encode(text)))
}

/// A built credential and the stored value it was built from.
type Built = (Arc<Secret>, Arc<dyn Credential>);

/// The credentials of every route, resolved from the secret backend and built once per
/// stored value.
pub struct Credentials {
    secrets: Arc<Secrets>,
    kinds: Vec<Box<dyn Kind>>,
    built: dashmap::DashMap<String, Built>,
    prepared: PreparedCache,
}

impl Credentials {
    /// Credentials read from `secrets`, built by `kinds`.
    pub fn new(secrets: Arc<Secrets>, kinds: Vec<Box<dyn Kind>>) -> Credentials {
        Credentials {
            secrets,
            kinds,
            built: Default::default(),
            prepared: PreparedCache::default(),
        }
    }

    /// Prebuilt header values (per route and value), for `Outgoing::prepared`.
    pub fn prepared(&self) -> &PreparedCache {
        &self.prepared
    }

    /// Forget everything built (policies changed: routes are new objects).
    pub fn clear(&self) {
        self.prepared.clear();
    }

    /// The credential `route` uses for the request of `claims`, built: `Ok(None)` when the
    /// route injects nothing. Waits on the secret backend at most for its bounded fetch.
    /// A missing credential, or a backend that cannot answer, is `SecretUnavailable`; a stored
    /// form that cannot be built is `CredentialUnavailable`.
    ///
    /// A `per_user` route resolves the connection of the token's `obo` user
    /// ([`oauth2::connection_secret_name`]); a user without one is `ConnectionMissing`,
    /// naming the command that makes it.
    pub async fn resolve(
        &self,
        route: &Route,
        claims: &Claims,
    ) -> Result<Option<Arc<dyn Credential>>, Deny> {
        let Some(connection) = route.credential() else {
            return Ok(None);
        };
        let missing = |user: Option<&str>, why| {
            Deny::ConnectionMissing(Missing {
                connection: connection.to_owned(),
                user: user.map(str::to_owned),
                why,
            })
        };
        let per_user;
        let (name, user) = if route.per_user() {
            let user = claims
                .obo
                .as_deref()
                .ok_or_else(|| missing(None, MissingWhy::NoUser))?;
            // A user name that cannot be part of a secret name cannot have connected.
            per_user = oauth2::connection_secret_name(connection, Some(user))
                .ok_or_else(|| missing(Some(user), MissingWhy::NeverConnected))?;
            (per_user.as_str(), Some(user))
        } else {
            (connection, None)
        };
        let secret = match self.secrets.get(name).await {
            Ok(Some(secret)) => secret,
            Ok(None) if user.is_some() => return Err(missing(user, MissingWhy::NeverConnected)),
            Ok(None) => return Err(Deny::SecretUnavailable(name.to_owned())),
            Err(e) => {
                // Our fault, not the agent's: the operator gets the cause, the agent one phrase.
                tracing::error!(credential = name, error = %e, "secret backend cannot answer");
                return Err(Deny::SecretUnavailable(format!(
                    "{name} ({})",
                    e.agent_detail()
                )));
            }
        };
        if let Some(entry) = self.built.get(name) {
            if Arc::ptr_eq(&entry.0, &secret) {
                return Ok(Some(entry.1.clone()));
            }
        }
        let credential = build(name, &secret, &self.kinds).map_err(|e| {
            tracing::error!(credential = name, error = %e, "stored credential cannot be used");
            Deny::CredentialUnavailable(format!("{name}: its stored form cannot be used ({e})"))
        })?;
        self.built
            .insert(name.to_owned(), (secret, credential.clone()));
        Ok(Some(credential))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_value_builds_a_static_credential() {
        let secret = Arc::new(Secret::new(b"ghp_abc".to_vec()));
        let c = build("gh", &secret, &kinds()).unwrap();
        assert_eq!(c.kind(), "static");
    }

    #[test]
    fn an_unknown_kind_is_named_and_no_value_is() {
        let secret = Arc::new(typed::encode(
            "kind = \"carrier_pigeon\"\n[secret]\nkey = \"sekrit-value-1\"\n",
        ));
        let err = build("bird", &secret, &kinds()).err().expect("refused");
        let text = err.to_string();
        assert!(text.contains("carrier_pigeon"), "{text}");
        assert!(!text.contains("sekrit"), "{text}");
    }

    #[test]
    fn a_document_of_another_kind_than_declared_is_refused() {
        let err = check_document("x", "oauth2", "kind = \"hmac\"\n").unwrap_err();
        assert!(err.to_string().contains("--kind"), "{err}");
    }
}
