//! The `oauth2` (refresh token) and `oauth2_client_credentials` kinds: an access token minted
//! at the provider's token endpoint, cached until shortly before it expires, refreshed once
//! however many requests need it.
//!
//! A connection is a typed document (`secrets::typed`) that `latchkey connect` writes:
//!
//! ```toml
//! kind = "oauth2"
//! provider = "github"                 # for `connections list`
//! connection = "github"               # the name routes use
//! user = "alice"                      # per-user connections only
//! token_url = "https://github.com/login/oauth/access_token"
//! client_id = "Iv1.0123"
//! scopes = ["repo"]
//! access_token_expires_at = "2026-11-29T23:59:00.000Z"
//! access_token_refresh_at = "2026-11-29T23:54:00.000Z"
//! [secret]
//! client_secret = "..."
//! refresh_token = "..."
//! access_token = "..."
//! ```
//!
//! The life of a token:
//! - A request finds the cached token fresh: it goes on at once (an atomic load and a clock
//!   read). Past `access_token_refresh_at` the request still uses it and starts one refresh in
//!   the background.
//! - A token too close to expiry to send: the request waits for the one refresh in flight for
//!   this credential (single flight), at most `Runtime::wait`, then 503
//!   `credential_unavailable`; the refresh itself runs in a task of its own with its own
//!   bound, so a provider's rotated refresh token is never lost to a request giving up.
//! - The refresh re-reads the stored document (another replica may have refreshed), calls the
//!   token endpoint, and writes the new document (rotated refresh token, new access token and
//!   its times) to the secret backend *before* the new access token is used.
//! - With `--redis`, a refresh holds a short Redis lock per credential; the other replicas
//!   wait for the lock and take the new token from the shared secret backend.
//! - `invalid_grant` marks the connection broken (in the document and in memory): requests get
//!   403 `connection_missing` naming `latchkey connect`, one warn line, a metric.
//!
//! This module must never put a token, a refresh token, a client secret or a token endpoint
//! body into an error, a log line or an audit detail.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::Uri;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::endpoint::{self, EndpointError, Endpoints};
use super::{Applied, Apply, Credential, Kind, KindError, Outgoing, Runtime};
use crate::deny::{Deny, Missing, MissingWhy};
use crate::inject;
use crate::policy::Route;
use crate::secrets::typed::{self, Stored, TypedDoc, SECRET_TABLE};
use crate::secrets::{validate_name, Secret};

/// The refresh-token kind's name.
pub const OAUTH2: &str = "oauth2";
/// The client-credentials kind's name.
pub const CLIENT_CREDENTIALS: &str = "oauth2_client_credentials";

/// After a failed refresh, requests are answered from the failure for this long instead of
/// calling the endpoint again (a down provider is not hammered by every request).
const BACKOFF: Duration = Duration::from_secs(2);
/// How long a replica's refresh lock lives in Redis: longer than one endpoint exchange plus
/// the write, short enough that a crashed replica does not block the others for long.
const LOCK_TTL: Duration = Duration::from_secs(20);
/// How many failed Redis calls a refresh retries before it goes on without the lock.
const LOCK_TRIES: u32 = 3;
/// After `invalid_grant` with replicas, how long to look for a refresh token another replica
/// rotated in before the connection is called broken.
const RACE_WINDOW: Duration = Duration::from_secs(1);
/// How often a replica waiting for another's refresh looks for the new token.
const POLL: Duration = Duration::from_millis(50);
/// Refresh at most this long before expiry (or a quarter of the lifetime, if shorter).
const REFRESH_EARLY: Duration = Duration::from_secs(300);
/// Never send a token that expires within this long (or a tenth of its lifetime).
const STALE_EARLY: Duration = Duration::from_secs(5);

/// Which grant mints the access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// `grant_type=refresh_token` with the stored refresh token (`oauth2`).
    Refresh,
    /// `grant_type=client_credentials` (`oauth2_client_credentials`).
    ClientCredentials,
}

impl Grant {
    fn kind(self) -> &'static str {
        match self {
            Grant::Refresh => OAUTH2,
            Grant::ClientCredentials => CLIENT_CREDENTIALS,
        }
    }
}

/// The secret name a connection is stored under: `NAME` for the operator's own connection,
/// `NAME.user.USER` for a user's. `None` when the user name cannot be part of a secret name
/// (letters, digits, `_`, `-`, `.` and `@`, which is stored as `.at.`).
pub fn connection_secret_name(connection: &str, user: Option<&str>) -> Option<String> {
    let name = match user {
        None => connection.to_owned(),
        Some(user) => {
            if user.is_empty() || user.contains("..") {
                return None;
            }
            format!("{connection}.user.{}", user.replace('@', ".at."))
        }
    };
    validate_name(&name).ok().map(|()| name)
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// An access token and when it must be replaced.
pub struct Token {
    /// The value (what the route's inject form puts on).
    pub value: Arc<Secret>,
    /// Expiry (ms since the epoch), when the provider gave one.
    pub expires_at: Option<i64>,
    /// When to start replacing it (ms since the epoch).
    pub refresh_at: Option<i64>,
}

impl Token {
    /// A token minted `now` that lives `expires_in` seconds.
    pub fn minted(value: Secret, now: i64, expires_in: Option<f64>) -> Token {
        let expires_at = expires_in.map(|s| now + (s.max(0.0) * 1000.0) as i64);
        let refresh_at = expires_at.map(|e| {
            let life = e - now;
            e - (life / 4).min(REFRESH_EARLY.as_millis() as i64)
        });
        Token {
            value: Arc::new(value),
            expires_at,
            refresh_at,
        }
    }

    /// Too close to expiry to send.
    pub fn stale(&self, now: i64) -> bool {
        match (self.expires_at, self.refresh_at) {
            (Some(e), Some(r)) => {
                let margin = ((e - r) / 2).min(STALE_EARLY.as_millis() as i64);
                now >= e - margin
            }
            (Some(e), None) => now >= e,
            _ => false,
        }
    }

    /// Time to mint the next one.
    pub fn due(&self, now: i64) -> bool {
        self.refresh_at.is_some_and(|r| now >= r) || self.stale(now)
    }
}

/// Why no token could be had: the provider refused the grant for good, or something on the
/// way is down. Clone, so one failed refresh answers every waiting request.
#[derive(Debug, Clone)]
pub enum Failure {
    /// `invalid_grant`: the connection must be made again.
    Broken,
    /// The endpoint, the backend or the lock failed; the detail names what, never a value.
    Unavailable(String),
}

type Inflight = Shared<BoxFuture<'static, Result<Arc<Token>, Failure>>>;

/// The per-credential state that outlives one build of the credential (a rotation writes a
/// new document, which builds a new credential): the cached token, the refresh in flight, the
/// last failure, and which refresh token was refused.
#[derive(Default)]
pub struct Conn {
    current: ArcSwapOption<Token>,
    inflight: Mutex<Option<(u64, Inflight)>>,
    generation: std::sync::atomic::AtomicU64,
    failed: Mutex<Option<(Instant, Failure)>>,
    /// Read on every request: lock-free.
    broken_for: ArcSwapOption<[u8; 32]>,
}

impl Conn {
    /// The cached token.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }
}

/// What a document says, checked.
pub struct Spec {
    grant: Grant,
    token_url: Uri,
    client_id: String,
    client_secret: Option<Secret>,
    scopes: Vec<String>,
    refresh_token: Option<Secret>,
    access: Option<Token>,
    broken: bool,
    connection: Option<String>,
    user: Option<String>,
}

fn invalid(msg: impl Into<String>) -> KindError {
    KindError::Invalid(msg.into())
}

fn text<'a>(doc: &'a TypedDoc, key: &str) -> Result<Option<&'a str>, KindError> {
    match doc.table.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("`{key}` must be a string"))),
    }
}

fn secret(doc: &TypedDoc, key: &str) -> Result<Option<Secret>, KindError> {
    match doc.table.get(SECRET_TABLE).and_then(|t| t.get(key)) {
        None => Ok(None),
        Some(toml::Value::String(s)) if s.is_empty() => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(Secret::new(s.as_bytes().to_vec()))),
        Some(_) => Err(invalid(format!("`secret.{key}` must be a string"))),
    }
}

fn time(doc: &TypedDoc, key: &str) -> Result<Option<i64>, KindError> {
    text(doc, key)?
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| d.timestamp_millis())
                .map_err(|_| invalid(format!("`{key}` must be an RFC 3339 time")))
        })
        .transpose()
}

/// An RFC 3339 time (UTC, milliseconds) for a document.
pub(crate) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Spec {
    /// Read and check a document of `grant`'s kind.
    pub fn parse(grant: Grant, doc: &TypedDoc) -> Result<Spec, KindError> {
        let token_url = text(doc, "token_url")?.ok_or_else(|| invalid("`token_url` is missing"))?;
        let token_url =
            endpoint::check_url(token_url).map_err(|e| invalid(format!("`token_url`: {e}")))?;
        let client_id = text(doc, "client_id")?
            .ok_or_else(|| invalid("`client_id` is missing"))?
            .to_owned();
        let scopes = match doc.table.get("scopes") {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| invalid("`scopes` must be a list of strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(invalid("`scopes` must be a list of strings")),
        };
        let client_secret = secret(doc, "client_secret")?;
        let refresh_token = secret(doc, "refresh_token")?;
        let access = match secret(doc, "access_token")? {
            Some(value) => Some(Token {
                value: Arc::new(value),
                expires_at: time(doc, "access_token_expires_at")?,
                refresh_at: time(doc, "access_token_refresh_at")?,
            }),
            None => None,
        };
        match grant {
            Grant::Refresh if refresh_token.is_none() && access.is_none() => {
                return Err(invalid(
                    "an oauth2 connection needs `secret.refresh_token` (or an access token); \
                     make one with `latchkey connect`",
                ))
            }
            Grant::ClientCredentials if client_secret.is_none() => {
                return Err(invalid(
                    "an oauth2_client_credentials credential needs `secret.client_secret`",
                ))
            }
            _ => {}
        }
        let broken = match text(doc, "status")? {
            None | Some("ok") => false,
            Some("broken") => true,
            Some(other) => {
                return Err(invalid(format!(
                    "`status` is {other:?}; it is \"ok\" or \"broken\""
                )))
            }
        };
        Ok(Spec {
            grant,
            token_url,
            client_id,
            client_secret,
            scopes,
            refresh_token,
            access,
            broken,
            connection: text(doc, "connection")?.map(str::to_owned),
            user: text(doc, "user")?.map(str::to_owned),
        })
    }
}

fn fingerprint(secret: &Secret) -> [u8; 32] {
    Sha256::digest(secret.expose()).into()
}

/// Builds `oauth2` / `oauth2_client_credentials` credentials, and keeps each one's
/// [`Conn`] across rebuilds.
pub struct OAuth2Kind {
    grant: Grant,
    runtime: Option<Arc<Runtime>>,
    conns: dashmap::DashMap<String, Arc<Conn>>,
}

impl OAuth2Kind {
    /// The kind for `grant`; without a runtime its credentials validate but cannot mint.
    pub fn new(grant: Grant, runtime: Option<Arc<Runtime>>) -> OAuth2Kind {
        OAuth2Kind {
            grant,
            runtime,
            conns: Default::default(),
        }
    }
}

impl Kind for OAuth2Kind {
    fn name(&self) -> &'static str {
        self.grant.kind()
    }

    fn build(&self, name: &str, doc: &TypedDoc) -> Result<Arc<dyn Credential>, KindError> {
        let mut spec = Spec::parse(self.grant, doc)?;
        let conn = self.conns.entry(name.to_owned()).or_default().clone();
        // The document's token is the newest one unless this process already holds a later
        // one (an OpenBao cache answering with an older version).
        if let Some(token) = spec.access.take() {
            let now = now_ms();
            let adopt = match conn.current.load_full() {
                None => true,
                Some(cur) if Arc::ptr_eq(&cur.value, &token.value) => false,
                Some(cur) => {
                    cur.value.expose() != token.value.expose()
                        && (cur.stale(now) || token.expires_at >= cur.expires_at)
                }
            };
            if adopt {
                conn.current.store(Some(Arc::new(token)));
            }
        }
        let detail = spec.user.as_ref().map(|u| format!("user={u}"));
        let refresh_print = spec.refresh_token.as_ref().map(fingerprint);
        Ok(Arc::new(OAuth2 {
            name: name.to_owned(),
            spec: Arc::new(spec),
            conn,
            runtime: self.runtime.clone(),
            detail,
            refresh_print,
        }))
    }
}

/// One OAuth connection (or client-credentials client), ready to go on requests.
pub struct OAuth2 {
    name: String,
    spec: Arc<Spec>,
    conn: Arc<Conn>,
    runtime: Option<Arc<Runtime>>,
    detail: Option<String>,
    refresh_print: Option<[u8; 32]>,
}

impl OAuth2 {
    fn missing(&self) -> Deny {
        Deny::ConnectionMissing(Missing {
            connection: self
                .spec
                .connection
                .clone()
                .unwrap_or_else(|| self.name.clone()),
            user: self.spec.user.clone(),
            why: MissingWhy::Broken,
        })
    }

    fn broken(&self) -> bool {
        if self.spec.broken {
            return true;
        }
        match (&*self.conn.broken_for.load(), &self.refresh_print) {
            (Some(refused), Some(ours)) => **refused == *ours,
            _ => false,
        }
    }

    fn unavailable(&self, why: &str) -> Deny {
        Deny::CredentialUnavailable(format!("{}: {why}", self.name))
    }

    fn put_on(&self, out: Outgoing<'_>, token: &Token) -> Result<Applied, Deny> {
        let injected = inject::apply(
            out.parts,
            out.rewrite,
            Some(token.value.clone()),
            out.prepared,
        )?;
        Ok(Applied {
            body: out.body,
            needles: injected.needles,
            detail: self.detail.clone(),
        })
    }

    /// The refresh in flight, or a new one (unless the cached token turned out fresh, or a
    /// refresh failed moments ago).
    fn refresh(&self) -> Result<Inflight, Deny> {
        let Some(runtime) = &self.runtime else {
            return Err(self.unavailable("this process cannot mint tokens"));
        };
        let mut slot = self
            .conn
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, fut)) = &*slot {
            return Ok(fut.clone());
        }
        let now = now_ms();
        if let Some(token) = self.conn.current.load_full() {
            if !token.due(now) {
                return Ok(futures_util::future::ready(Ok(token)).boxed().shared());
            }
        }
        if let Some((at, failure)) = &*self
            .conn
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            if at.elapsed() < BACKOFF {
                let failure = failure.clone();
                return Ok(futures_util::future::ready(Err(failure)).boxed().shared());
            }
        }
        let id = self
            .conn
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let job = Job {
            name: self.name.clone(),
            grant: self.spec.grant,
            conn: self.conn.clone(),
            runtime: runtime.clone(),
        };
        let handle = tokio::spawn(job.run(id));
        let fut: Inflight = async move {
            handle
                .await
                .unwrap_or_else(|_| Err(Failure::Unavailable("the token refresh failed".into())))
        }
        .boxed()
        .shared();
        *slot = Some((id, fut.clone()));
        Ok(fut)
    }

    async fn wait_for_token(&self) -> Result<Arc<Token>, Deny> {
        let fut = self.refresh()?;
        let wait = self
            .runtime
            .as_ref()
            .map_or(super::DEFAULT_WAIT, |r| r.wait);
        match tokio::time::timeout(wait, fut).await {
            Ok(Ok(token)) if token.stale(now_ms()) => {
                Err(self.unavailable("its token endpoint issued a token that has already expired"))
            }
            Ok(Ok(token)) => Ok(token),
            Ok(Err(Failure::Broken)) => Err(self.missing()),
            Ok(Err(Failure::Unavailable(why))) => Err(self.unavailable(&why)),
            Err(_) => Err(self.unavailable(&format!(
                "its token endpoint did not answer within {}; retry later",
                humantime::format_duration(wait)
            ))),
        }
    }
}

impl Credential for OAuth2 {
    fn kind(&self) -> &'static str {
        self.spec.grant.kind()
    }

    fn fits(&self, route: &Route) -> Result<(), String> {
        match route.inject() {
            Some(_) => Ok(()),
            None => Err(format!(
                "an {} credential needs an `inject` form on the route",
                self.kind()
            )),
        }
    }

    fn apply<'a>(&'a self, out: Outgoing<'a>) -> Apply<'a> {
        if self.broken() {
            return Apply::ready(Err(self.missing()));
        }
        let now = now_ms();
        if let Some(token) = &*self.conn.current.load() {
            if !token.stale(now) {
                if token.due(now) {
                    // Replace it in the background; this request goes on with the current one.
                    let _ = self.refresh();
                }
                return Apply::ready(self.put_on(out, token));
            }
        }
        Apply::pending(async move {
            let token = self.wait_for_token().await?;
            self.put_on(out, &token)
        })
    }
}

/// One refresh, run in a task of its own.
struct Job {
    name: String,
    grant: Grant,
    conn: Arc<Conn>,
    runtime: Arc<Runtime>,
}

impl Job {
    async fn run(self, id: u64) -> Result<Arc<Token>, Failure> {
        let result = self.locked().await;
        let metrics = &self.runtime.metrics;
        match &result {
            Ok((token, adopted)) => {
                // Taking from the store a token this process already holds is no event:
                // nothing was refreshed, nothing came from another replica.
                let already_held = *adopted
                    && self
                        .conn
                        .current
                        .load()
                        .as_deref()
                        .is_some_and(|c| c.value.expose() == token.value.expose());
                if !already_held {
                    metrics.record_credential_event(
                        &self.name,
                        if *adopted { "adopted" } else { "refreshed" },
                    );
                }
                self.conn.current.store(Some(token.clone()));
                *self
                    .conn
                    .failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
            }
            Err(failure) => {
                metrics.record_credential_event(
                    &self.name,
                    match failure {
                        Failure::Broken => "broken",
                        Failure::Unavailable(_) => "refresh_failed",
                    },
                );
                *self
                    .conn
                    .failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    Some((Instant::now(), failure.clone()));
            }
        }
        let mut slot = self
            .conn
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|(i, _)| *i == id) {
            *slot = None;
        }
        result.map(|(token, _)| token)
    }

    /// Take the cross-replica lock (when there is Redis), then refresh or adopt.
    async fn locked(&self) -> Result<(Arc<Token>, bool), Failure> {
        let Some(redis) = self.runtime.redis.clone() else {
            return self.refresh_now().await;
        };
        let key = format!("latchkey:credential:refresh:{}", self.name);
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let deadline = Instant::now() + LOCK_TTL;
        let seen = self.conn.current.load_full();
        let mut errors = 0;
        loop {
            let got: Result<Option<String>, _> = redis
                .query(
                    ::redis::cmd("SET")
                        .arg(&key)
                        .arg(&nonce)
                        .arg("NX")
                        .arg("PX")
                        .arg(LOCK_TTL.as_millis() as u64),
                )
                .await;
            match got {
                Ok(Some(_)) => {
                    let result = self.refresh_now().await;
                    let release = ::redis::Script::new(
                        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                         return redis.call('DEL', KEYS[1]) else return 0 end",
                    );
                    if let Err(e) = redis.eval::<i64>(release.key(&key).arg(&nonce)).await {
                        tracing::warn!(credential = %self.name, error = %e, "cannot release the token refresh lock; it expires by itself");
                    }
                    return result;
                }
                Ok(None) => {
                    // Another replica is refreshing: its new token arrives in the shared
                    // secret backend.
                    if let Some(token) = self.stored_token(seen.as_deref()).await? {
                        return Ok((token, true));
                    }
                    if Instant::now() >= deadline {
                        return Err(Failure::Unavailable(
                            "another replica holds the token refresh and has not finished".into(),
                        ));
                    }
                    tokio::time::sleep(POLL).await;
                }
                Err(e) if errors < LOCK_TRIES => {
                    // A slow answer is not an outage: ask again before going without the lock.
                    errors += 1;
                    tracing::debug!(credential = %self.name, error = %e, "Redis did not take the token refresh lock; trying again");
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => {
                    // SECURITY: without the lock two replicas may refresh at once; with a
                    // rotating provider the loser's invalid_grant is then recognised as a
                    // lost race (`refresh_now`), not a broken connection. Serving on is
                    // still better than refusing every request while Redis is down.
                    tracing::warn!(credential = %self.name, error = %e, "Redis is unreachable; refreshing the token without the cross-replica lock");
                    return self.refresh_now().await;
                }
            }
        }
    }

    /// The stored document's token, if it is newer than `seen` and not yet due.
    async fn stored_token(&self, seen: Option<&Token>) -> Result<Option<Arc<Token>>, Failure> {
        let (spec, _) = self.read().await?;
        if spec.broken {
            return Err(Failure::Broken);
        }
        let now = now_ms();
        Ok(spec.access.and_then(|t| {
            let newer = seen.is_none_or(|s| s.value.expose() != t.value.expose());
            (newer && !t.due(now)).then(|| Arc::new(t))
        }))
    }

    /// The stored document as the backend holds it now.
    async fn read(&self) -> Result<(Spec, TypedDoc), Failure> {
        let stored = self
            .runtime
            .secrets
            .get_fresh(&self.name)
            .await
            .map_err(|e| {
                tracing::error!(credential = %self.name, error = %e, "cannot read the connection from the secret backend");
                Failure::Unavailable("the secret backend cannot be read".into())
            })?
            .ok_or_else(|| Failure::Unavailable("it was removed from the secret store".into()))?;
        let doc = match typed::parse(&stored) {
            Ok(Stored::Typed(doc)) if doc.kind == self.grant.kind() => doc,
            _ => {
                return Err(Failure::Unavailable(
                    "its stored form changed to another kind".into(),
                ))
            }
        };
        let spec = Spec::parse(self.grant, &doc)
            .map_err(|e| Failure::Unavailable(format!("its stored form cannot be used ({e})")))?;
        Ok((spec, doc))
    }

    /// Refresh (or adopt what another process stored meanwhile), persist, and return the token.
    async fn refresh_now(&self) -> Result<(Arc<Token>, bool), Failure> {
        let (spec, mut doc) = self.read().await?;
        if spec.broken {
            return Err(Failure::Broken);
        }
        let now = now_ms();
        // Whatever is stored and not yet due is used, never refreshed again: another replica's
        // new token (adopted), or the very token this process already took from the store
        // while this job waited for the lock (a credential rebuilt from the changed store).
        // Refreshing that one would spend, and with a rotating provider burn, a refresh token
        // for nothing.
        if let Some(token) = &spec.access {
            if !token.due(now) {
                let token = Arc::new(Token {
                    value: token.value.clone(),
                    expires_at: token.expires_at,
                    refresh_at: token.refresh_at,
                });
                return Ok((token, true));
            }
        }
        let answer = mint(&self.runtime.endpoints, &spec).await;
        let minted = match answer {
            Ok(m) => m,
            Err(MintError::Refused(code))
                if code == "invalid_grant" && spec.grant == Grant::Refresh =>
            {
                // Another process may have used (and rotated away) this refresh token a
                // moment ago: then the store soon holds its successor, and this is a lost
                // race, not a broken connection.
                if let Some(adopted) = self.rotated_elsewhere(&spec).await {
                    return adopted;
                }
                self.mark_broken(&spec, &mut doc).await;
                return Err(Failure::Broken);
            }
            Err(e) => {
                tracing::warn!(credential = %self.name, error = %e, "cannot mint an access token");
                return Err(Failure::Unavailable(e.agent_detail()));
            }
        };
        let token = Token::minted(minted.access_token, now_ms(), minted.expires_in);
        // SECURITY: the new document (with a rotated refresh token, if the provider rotated
        // it) is stored before the new access token is used: a crash after this point loses
        // nothing, and a crash before it leaves the old refresh token, not a dangling one.
        set_token(&mut doc, &token, minted.refresh_token.as_ref());
        let text = Zeroizing::new(toml::to_string(&doc.table).map_err(|_| {
            Failure::Unavailable("the refreshed connection could not be encoded".into())
        })?);
        if let Err(e) = self
            .runtime
            .secrets
            .set(&self.name, typed::encode(&text))
            .await
        {
            tracing::error!(credential = %self.name, error = %e, "cannot store the refreshed token; not using it");
            return Err(Failure::Unavailable(
                "the refreshed token could not be stored in the secret backend".into(),
            ));
        }
        Ok((Arc::new(token), false))
    }

    /// After `invalid_grant`: whether the stored refresh token changed from the one `spec`
    /// sent (looked at for a moment when replicas share the store, at once otherwise), and
    /// if so the stored token (or a retry later).
    async fn rotated_elsewhere(&self, spec: &Spec) -> Option<Result<(Arc<Token>, bool), Failure>> {
        let sent = spec.refresh_token.as_ref().map(fingerprint);
        let until = Instant::now()
            + if self.runtime.redis.is_some() {
                RACE_WINDOW
            } else {
                Duration::ZERO
            };
        loop {
            if let Ok((now_spec, _)) = self.read().await {
                if now_spec.refresh_token.as_ref().map(fingerprint) != sent {
                    let now = now_ms();
                    return Some(match now_spec.access {
                        Some(t) if !t.due(now) => Ok((Arc::new(t), true)),
                        _ => Err(Failure::Unavailable(
                            "its refresh token was rotated by another replica; retry".into(),
                        )),
                    });
                }
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn mark_broken(&self, spec: &Spec, doc: &mut TypedDoc) {
        if let Some(rt) = &spec.refresh_token {
            self.conn.broken_for.store(Some(Arc::new(fingerprint(rt))));
        }
        let how = match &spec.user {
            Some(u) => format!(
                "latchkey connect {} --user {u}",
                spec.connection.as_deref().unwrap_or(&self.name)
            ),
            None => format!(
                "latchkey connect {}",
                spec.connection.as_deref().unwrap_or(&self.name)
            ),
        };
        tracing::warn!(credential = %self.name, reconnect = %how, "the provider refused the refresh token (invalid_grant); the connection is broken until it is made again");
        doc.table
            .insert("status".into(), toml::Value::String("broken".into()));
        doc.table
            .insert("broken_at".into(), toml::Value::String(rfc3339(now_ms())));
        let Ok(text) = toml::to_string(&doc.table).map(Zeroizing::new) else {
            return;
        };
        if let Err(e) = self
            .runtime
            .secrets
            .set(&self.name, typed::encode(&text))
            .await
        {
            tracing::error!(credential = %self.name, error = %e, "cannot record the broken connection in the secret backend");
        }
    }
}

/// Put `token` (and a rotated refresh token) into a connection document.
pub fn set_token(doc: &mut TypedDoc, token: &Token, refresh_token: Option<&Secret>) {
    let as_text = |s: &Secret| String::from_utf8_lossy(s.expose()).into_owned();
    let secrets = doc
        .table
        .entry(SECRET_TABLE)
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let toml::Value::Table(t) = secrets {
        t.insert(
            "access_token".into(),
            toml::Value::String(as_text(&token.value)),
        );
        if let Some(rt) = refresh_token {
            t.insert("refresh_token".into(), toml::Value::String(as_text(rt)));
        }
    }
    for (key, at) in [
        ("access_token_expires_at", token.expires_at),
        ("access_token_refresh_at", token.refresh_at),
    ] {
        match at {
            Some(ms) => {
                doc.table
                    .insert(key.into(), toml::Value::String(rfc3339(ms)));
            }
            None => {
                doc.table.remove(key);
            }
        }
    }
    doc.table.insert(
        "refreshed_at".into(),
        toml::Value::String(rfc3339(now_ms())),
    );
}

/// What a token endpoint answered.
pub struct Minted {
    /// The new access token.
    pub access_token: Secret,
    /// Its lifetime in seconds, when given.
    pub expires_in: Option<f64>,
    /// A new refresh token, when the provider issued (or rotated) one.
    pub refresh_token: Option<Secret>,
    /// The granted scopes, when the provider says.
    pub scope: Option<String>,
}

/// Why a token endpoint gave no token. Never holds a token or a body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MintError {
    /// The exchange failed.
    #[error("its token endpoint {0}")]
    Endpoint(#[from] EndpointError),
    /// The provider answered an OAuth error code (`invalid_grant`, `authorization_pending`...).
    #[error("its token endpoint refused: {0}")]
    Refused(String),
    /// Anything else that is not a token response.
    #[error("its token endpoint answered {0}")]
    Bad(String),
}

impl MintError {
    /// One phrase for the agent's `credential_unavailable` detail: what failed, without the
    /// endpoint's address (that goes to the operator's log with the full error).
    pub fn agent_detail(&self) -> String {
        match self {
            MintError::Endpoint(EndpointError::Timeout(..)) => {
                "its token endpoint did not answer in time".into()
            }
            MintError::Endpoint(EndpointError::Unreachable(..)) => {
                "its token endpoint cannot be reached".into()
            }
            MintError::Endpoint(EndpointError::BadUrl { .. } | EndpointError::BadCa { .. }) => {
                "its token endpoint is not configured usably".into()
            }
            MintError::Endpoint(EndpointError::BadAnswer(_)) => {
                "its token endpoint's answer could not be read".into()
            }
            MintError::Refused(code) => format!("its token endpoint refused ({code})"),
            MintError::Bad(what) => format!("its token endpoint answered {what}"),
        }
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    scope: Option<String>,
    error: Option<String>,
}

/// An OAuth error code as it may be shown: `[a-z0-9_.]` (RFC 6749 allows more, but a code
/// outside this set is not repeated, so nothing an endpoint says can smuggle text into logs).
fn safe_code(code: &str) -> String {
    if !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
    {
        code.to_owned()
    } else {
        "an unrecognised error".to_owned()
    }
}

/// POST `params` (plus the client's id and secret) to `token_url` and read a token response.
pub async fn token_request(
    endpoints: &Endpoints,
    token_url: &Uri,
    client_id: &str,
    client_secret: Option<&Secret>,
    params: &[(&str, &str)],
) -> Result<Minted, MintError> {
    let secret_text;
    let mut pairs: Vec<(&str, &str)> = params.to_vec();
    pairs.push(("client_id", client_id));
    if let Some(s) = client_secret {
        secret_text = Zeroizing::new(String::from_utf8_lossy(s.expose()).into_owned());
        pairs.push(("client_secret", &secret_text));
    }
    let body = endpoint::form(&pairs);
    let answer = endpoints
        .post(
            token_url,
            "application/x-www-form-urlencoded",
            Vec::new(),
            body,
        )
        .await?;
    parse_token_answer(answer.status, &answer.body)
}

/// Read a token endpoint's answer (RFC 6749 section 5).
pub fn parse_token_answer(status: http::StatusCode, body: &[u8]) -> Result<Minted, MintError> {
    let parsed: Option<TokenAnswer> = serde_json::from_slice(body).ok();
    let Some(mut t) = parsed else {
        return Err(MintError::Bad(format!(
            "{status} without a JSON token response"
        )));
    };
    if let Some(code) = &t.error {
        return Err(MintError::Refused(safe_code(code)));
    }
    if !status.is_success() {
        return Err(MintError::Bad(status.to_string()));
    }
    let Some(access) = t.access_token.take().filter(|a| !a.is_empty()) else {
        return Err(MintError::Bad("a response without an access_token".into()));
    };
    let expires_in = match &t.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        Some(_) => None,
    };
    Ok(Minted {
        access_token: Secret::new(access.into_bytes()),
        expires_in,
        refresh_token: t
            .refresh_token
            .take()
            .filter(|r| !r.is_empty())
            .map(|r| Secret::new(r.into_bytes())),
        scope: t.scope.take(),
    })
}

async fn mint(endpoints: &Endpoints, spec: &Spec) -> Result<Minted, MintError> {
    let scope = spec.scopes.join(" ");
    match spec.grant {
        Grant::Refresh => {
            let Some(rt) = &spec.refresh_token else {
                return Err(MintError::Refused("invalid_grant".into()));
            };
            let rt = Zeroizing::new(String::from_utf8_lossy(rt.expose()).into_owned());
            token_request(
                endpoints,
                &spec.token_url,
                &spec.client_id,
                spec.client_secret.as_ref(),
                &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
            )
            .await
        }
        Grant::ClientCredentials => {
            let mut params = vec![("grant_type", "client_credentials")];
            if !scope.is_empty() {
                params.push(("scope", &scope));
            }
            token_request(
                endpoints,
                &spec.token_url,
                &spec.client_id,
                spec.client_secret.as_ref(),
                &params,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_connections_have_names_of_their_own() {
        assert_eq!(connection_secret_name("github", None).unwrap(), "github");
        assert_eq!(
            connection_secret_name("github", Some("alice")).unwrap(),
            "github.user.alice"
        );
        assert_eq!(
            connection_secret_name("github", Some("alice@example.com")).unwrap(),
            "github.user.alice.at.example.com"
        );
        assert!(connection_secret_name("github", Some("a/../b")).is_none());
        assert!(connection_secret_name("github", Some("a b")).is_none());
        assert!(connection_secret_name("github", Some("")).is_none());
    }

    #[test]
    fn a_token_is_refreshed_early_and_not_sent_when_about_to_expire() {
        let t = Token::minted(Secret::new(b"x".to_vec()), 0, Some(3600.0));
        assert!(!t.due(3_000_000));
        assert!(t.due(3_300_000) && !t.stale(3_300_000));
        assert!(t.stale(3_595_000));
        let short = Token::minted(Secret::new(b"x".to_vec()), 0, Some(4.0));
        assert!(!short.due(2_999) && short.due(3_000));
        assert!(!short.stale(3_499) && short.stale(3_500));
        let forever = Token::minted(Secret::new(b"x".to_vec()), 0, None);
        assert!(!forever.due(i64::MAX / 2) && !forever.stale(i64::MAX / 2));
    }

    #[test]
    fn token_answers_are_read_and_errors_name_no_value() {
        let ok = parse_token_answer(
            http::StatusCode::OK,
            br#"{"access_token":"at-1","expires_in":60,"refresh_token":"rt-2","token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(ok.access_token.expose(), b"at-1");
        assert_eq!(ok.expires_in, Some(60.0));
        assert_eq!(ok.refresh_token.unwrap().expose(), b"rt-2");
        let refused = parse_token_answer(
            http::StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"rt-secret-123 is revoked"}"#,
        )
        .err()
        .unwrap();
        assert!(matches!(&refused, MintError::Refused(c) if c == "invalid_grant"));
        assert!(!refused.to_string().contains("rt-secret"));
        let odd = parse_token_answer(
            http::StatusCode::BAD_REQUEST,
            br#"{"error":"evil\nline at-999"}"#,
        )
        .err()
        .unwrap();
        assert!(!odd.to_string().contains("at-999"), "{odd}");
        let html = parse_token_answer(http::StatusCode::BAD_GATEWAY, b"<html>at-1</html>")
            .err()
            .unwrap();
        assert!(!html.to_string().contains("at-1"));
    }

    #[test]
    fn the_agent_is_not_told_the_token_endpoints_address() {
        let e = MintError::Endpoint(EndpointError::Unreachable(
            "https://auth.internal:8443/token".into(),
            "connection refused".into(),
        ));
        assert!(!e.agent_detail().contains("auth.internal"));
        assert!(
            e.to_string().contains("auth.internal"),
            "the operator's log has it"
        );
        let t = MintError::Endpoint(EndpointError::Timeout(
            "https://auth.internal/token".into(),
            Duration::from_secs(15),
        ));
        assert_eq!(
            t.agent_detail(),
            "its token endpoint did not answer in time"
        );
    }

    #[test]
    fn documents_are_checked_and_errors_name_no_value() {
        let doc = typed::parse_text(
            "kind = \"oauth2\"\ntoken_url = \"http://auth.example.com/token\"\nclient_id = \"c\"\n[secret]\nrefresh_token = \"rt-sekrit\"\n",
        )
        .unwrap();
        let err = Spec::parse(Grant::Refresh, &doc).err().unwrap().to_string();
        assert!(err.contains("loopback"), "{err}");
        assert!(!err.contains("sekrit"));
        let doc = typed::parse_text(
            "kind = \"oauth2\"\ntoken_url = \"https://auth.example.com/token\"\nclient_id = \"c\"\n",
        )
        .unwrap();
        let err = Spec::parse(Grant::Refresh, &doc).err().unwrap().to_string();
        assert!(err.contains("refresh_token"), "{err}");
        let doc = typed::parse_text(
            "kind = \"oauth2_client_credentials\"\ntoken_url = \"https://auth.example.com/token\"\nclient_id = \"c\"\n",
        )
        .unwrap();
        let err = Spec::parse(Grant::ClientCredentials, &doc)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("client_secret"), "{err}");
    }

    #[test]
    fn a_stored_token_round_trips_through_the_document() {
        let mut doc = typed::parse_text(
            "kind = \"oauth2\"\ntoken_url = \"https://a.example/t\"\nclient_id = \"c\"\n[secret]\nrefresh_token = \"rt-1\"\n",
        )
        .unwrap();
        let token = Token::minted(Secret::new(b"at-1".to_vec()), now_ms(), Some(60.0));
        set_token(&mut doc, &token, Some(&Secret::new(b"rt-2".to_vec())));
        let text = toml::to_string(&doc.table).unwrap();
        let again = typed::parse_text(&text).unwrap();
        let spec = Spec::parse(Grant::Refresh, &again).unwrap();
        assert_eq!(spec.refresh_token.unwrap().expose(), b"rt-2");
        let access = spec.access.unwrap();
        assert_eq!(access.value.expose(), b"at-1");
        assert_eq!(access.expires_at, token.expires_at);
        assert_eq!(access.refresh_at, token.refresh_at);
    }
}
