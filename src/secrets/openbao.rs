//! The OpenBao / HashiCorp Vault backend: credentials in a KV v2 engine, over HTTP(S).
//!
//! A credential `NAME` lives at `<mount>/data/<prefix>NAME`, field `value`:
//!
//! ```text
//! read    GET    /v1/<mount>/data/<prefix>NAME          -> .data.data.value
//! write   POST   /v1/<mount>/data/<prefix>NAME          {"data":{"value":"..."}}
//! list    GET    /v1/<mount>/metadata/<prefix>?list=true -> .data.keys
//! delete  DELETE /v1/<mount>/metadata/<prefix>NAME      (every version)
//! ```
//!
//! Authentication is a token (`BAO_TOKEN` / `VAULT_TOKEN`) or an AppRole login whose token is
//! renewed (`auth/token/renew-self`) before its lease ends, and replaced by a fresh login when
//! renewal is refused. Every HTTP call has a timeout, so a silent OpenBao costs a bounded wait.
//!
//! This module must never put a secret value or a token into an error, a log line or a
//! `Debug` output: errors carry the credential's name, the HTTP status and OpenBao's own error
//! strings (which name paths and permissions, never values).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{validate_name, Secret, SecretMeta, StoreError};

/// Largest answer read from OpenBao; a KV v2 entry or a listing is far smaller.
const MAX_ANSWER: usize = 4 << 20;
/// Renew an AppRole token once less than this share of its lease is left.
const RENEW_WHEN_LEFT: f64 = 1.0 / 3.0;

/// How latchkey authenticates to OpenBao.
pub enum OpenBaoAuth {
    /// A token given by the operator (`BAO_TOKEN` or `VAULT_TOKEN`).
    Token(Secret),
    /// AppRole: `role_id` and `secret_id` exchanged at `auth/approle/login` for a token that
    /// latchkey renews.
    AppRole {
        /// The role id (not secret on its own).
        role_id: String,
        /// The secret id.
        secret_id: Secret,
    },
}

impl fmt::Debug for OpenBaoAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SECURITY: neither the token nor the secret id.
        match self {
            OpenBaoAuth::Token(_) => f.write_str("Token([redacted])"),
            OpenBaoAuth::AppRole { role_id, .. } => f
                .debug_struct("AppRole")
                .field("role_id", role_id)
                .field("secret_id", &"[redacted]")
                .finish(),
        }
    }
}

/// Where the KV v2 engine is and how to reach it. Validated by [`OpenBao::try_new`].
#[derive(Debug)]
pub struct OpenBaoConfig {
    /// Base address, `http://host:port` or `https://host:port` (no path).
    pub addr: String,
    /// The KV v2 mount, e.g. `secret`.
    pub mount: String,
    /// Prepended to every credential name: empty, or ending in `/` (e.g. `latchkey/`).
    pub prefix: String,
    /// Credentials for OpenBao itself.
    pub auth: OpenBaoAuth,
    /// Bound on every HTTP exchange with OpenBao (connect, request, whole answer).
    pub timeout: Duration,
}

/// Why OpenBao could not be used. No variant carries a secret value or a token.
#[derive(Debug, thiserror::Error)]
pub enum OpenBaoError {
    /// The configuration is unusable (address, mount or prefix).
    #[error("invalid OpenBao setting: {0}")]
    Config(String),
    /// The credential name is not valid.
    #[error(transparent)]
    Name(#[from] StoreError),
    /// No TCP/TLS connection or the exchange broke off.
    #[error("OpenBao at {addr} could not be reached: {reason}")]
    Unreachable {
        /// The configured address.
        addr: String,
        /// The transport error.
        reason: String,
    },
    /// OpenBao did not answer within the timeout.
    #[error("OpenBao at {addr} did not answer within {}", humantime::format_duration(*timeout))]
    Timeout {
        /// The configured address.
        addr: String,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// OpenBao answered with an error status.
    #[error("OpenBao refused to {what}: HTTP {status}{}", if errors.is_empty() { String::new() } else { format!(" ({errors})") })]
    Refused {
        /// The operation, e.g. `read latchkey/github`.
        what: String,
        /// The HTTP status.
        status: u16,
        /// OpenBao's `errors` strings, joined.
        errors: String,
    },
    /// The answer is not what the KV v2 API returns.
    #[error("OpenBao's answer to {what} is not a KV v2 answer: {reason}")]
    BadAnswer {
        /// The operation.
        what: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The value cannot be stored: OpenBao keeps JSON strings.
    #[error("the value for secret {0:?} is not UTF-8 text, which OpenBao (JSON) cannot hold")]
    NotText(String),
}

impl OpenBaoError {
    /// Whether OpenBao itself is out of reach (as opposed to refusing or misbehaving).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            OpenBaoError::Unreachable { .. } | OpenBaoError::Timeout { .. }
        )
    }
}

/// A token and when it must be renewed (AppRole only).
struct Lease {
    obtained: Instant,
    duration: Duration,
    renewable: bool,
}

/// The OpenBao KV v2 client. `Send + Sync`; cheap to share behind an `Arc`.
pub struct OpenBao {
    addr: String,
    mount: String,
    prefix: String,
    auth: OpenBaoAuth,
    timeout: Duration,
    client: crate::tls::OwnClient,
    token: ArcSwapOption<Secret>,
    lease: Mutex<Option<Lease>>,
    /// Serialises logins and renewals so concurrent callers do not log in twice.
    login: tokio::sync::Mutex<()>,
}

impl fmt::Debug for OpenBao {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenBao")
            .field("addr", &self.addr)
            .field("mount", &self.mount)
            .field("prefix", &self.prefix)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// `[A-Za-z0-9_.-]` segments joined by `/`: nothing that could climb out of the mount.
fn valid_path(text: &str) -> bool {
    text.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    })
}

impl OpenBao {
    /// Check the settings and build the HTTP client (system roots for https). Performs no
    /// network I/O: an OpenBao that is down at start-up is reported by the first call.
    pub fn try_new(config: OpenBaoConfig) -> Result<OpenBao, OpenBaoError> {
        let addr = config.addr.trim_end_matches('/').to_owned();
        let uri: http::Uri = addr
            .parse()
            .map_err(|_| OpenBaoError::Config(format!("the address {addr:?} is not a URL")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https"))
            || uri.authority().is_none()
            || !matches!(uri.path(), "" | "/")
        {
            return Err(OpenBaoError::Config(format!(
                "the address {addr:?} must be http(s)://host:port without a path"
            )));
        }
        let mount = config.mount.trim_matches('/').to_owned();
        if !valid_path(&mount) {
            return Err(OpenBaoError::Config(format!(
                "the mount {:?} must be path segments of A-Z a-z 0-9 _ . -",
                config.mount
            )));
        }
        let prefix = config.prefix.trim_start_matches('/').to_owned();
        if !prefix
            .strip_suffix('/')
            .map_or(prefix.is_empty(), valid_path)
        {
            return Err(OpenBaoError::Config(format!(
                "the prefix {:?} must be empty or folders ending in '/', e.g. latchkey/",
                config.prefix
            )));
        }
        let client = crate::tls::own_client(crate::tls::system_roots(), config.timeout);
        let token = match &config.auth {
            OpenBaoAuth::Token(t) => Some(Arc::new(Secret::new(t.expose().to_vec()))),
            OpenBaoAuth::AppRole { .. } => None,
        };
        Ok(OpenBao {
            addr,
            mount,
            prefix,
            auth: config.auth,
            timeout: config.timeout,
            client,
            token: ArcSwapOption::new(token),
            lease: Mutex::new(None),
            login: tokio::sync::Mutex::new(()),
        })
    }

    /// `OpenBao at ADDR, KV v2 MOUNT/data/PREFIX`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "OpenBao at {} (KV v2 {}/data/{})",
            self.addr, self.mount, self.prefix
        )
    }

    /// The current value of `name`, or `None` when OpenBao has no such secret (or only
    /// deleted versions).
    pub async fn read(&self, name: &str) -> Result<Option<Secret>, OpenBaoError> {
        validate_name(name)?;
        let what = || format!("read {}{name}", self.prefix);
        let path = format!("/v1/{}/data/{}{name}", self.mount, self.prefix);
        let (status, body) = self.call(Method::GET, &path, None, &what).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        expect_success(status, &body, &what)?;
        #[derive(Deserialize)]
        struct Answer {
            data: Option<Outer>,
        }
        #[derive(Deserialize)]
        struct Outer {
            data: Option<Inner>,
        }
        #[derive(Deserialize)]
        struct Inner {
            value: Option<String>,
        }
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|_| OpenBaoError::BadAnswer {
                what: what(),
                reason: "not the JSON of a KV v2 read",
            })?;
        // A secret deleted in OpenBao (latest version soft-deleted) reads as `data: null`.
        let Some(inner) = answer.data.and_then(|d| d.data) else {
            return Ok(None);
        };
        let value = inner.value.ok_or_else(|| OpenBaoError::BadAnswer {
            what: what(),
            reason: "the entry has no field \"value\"",
        })?;
        // SECURITY: the String moves into the zeroizing Secret without a copy.
        Ok(Some(Secret::new(value.into_bytes())))
    }

    /// Writes `value` as a new version of `name`.
    pub async fn write(&self, name: &str, value: &Secret) -> Result<(), OpenBaoError> {
        validate_name(name)?;
        if value.is_empty() {
            return Err(StoreError::EmptyValue {
                name: name.to_owned(),
            }
            .into());
        }
        let text = std::str::from_utf8(value.expose())
            .map_err(|_| OpenBaoError::NotText(name.to_owned()))?;
        #[derive(Serialize)]
        struct Body<'a> {
            data: Data<'a>,
        }
        #[derive(Serialize)]
        struct Data<'a> {
            value: &'a str,
        }
        let mut body = Zeroizing::new(Vec::with_capacity(text.len() + 32));
        serde_json::to_writer(
            &mut *body,
            &Body {
                data: Data { value: text },
            },
        )
        .expect("serialising a string to a Vec cannot fail");
        let what = || format!("write {}{name}", self.prefix);
        let path = format!("/v1/{}/data/{}{name}", self.mount, self.prefix);
        // The request buffer handed to hyper is not zeroized (Bytes cannot be); this runs in
        // the short-lived `latchkey secret set`, not in the proxy.
        let (status, answer) = self
            .call(
                Method::POST,
                &path,
                Some(Bytes::copy_from_slice(&body)),
                &what,
            )
            .await?;
        expect_success(status, &answer, &what)
    }

    /// Deletes `name` with every version and its metadata; `Ok(false)` when it did not exist.
    pub async fn delete(&self, name: &str) -> Result<bool, OpenBaoError> {
        if self.metadata(name).await?.is_none() {
            return Ok(false);
        }
        let what = || format!("delete {}{name}", self.prefix);
        let path = format!("/v1/{}/metadata/{}{name}", self.mount, self.prefix);
        let (status, body) = self.call(Method::DELETE, &path, None, &what).await?;
        expect_success(status, &body, &what)?;
        Ok(true)
    }

    /// Names (directly under the prefix) and dates, sorted by name; never values.
    pub async fn list(&self) -> Result<Vec<SecretMeta>, OpenBaoError> {
        let what = || format!("list {}", self.prefix);
        let path = format!("/v1/{}/metadata/{}?list=true", self.mount, self.prefix);
        let (status, body) = self.call(Method::GET, &path, None, &what).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        expect_success(status, &body, &what)?;
        #[derive(Deserialize)]
        struct Answer {
            data: Keys,
        }
        #[derive(Deserialize)]
        struct Keys {
            keys: Vec<String>,
        }
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|_| OpenBaoError::BadAnswer {
                what: what(),
                reason: "not the JSON of a KV v2 listing",
            })?;
        let mut out = Vec::new();
        // Folders (`sub/`) and names latchkey could not use are not credentials.
        for name in answer
            .data
            .keys
            .into_iter()
            .filter(|k| validate_name(k).is_ok())
        {
            if let Some(meta) = self.metadata(&name).await? {
                out.push(meta);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Whether `name` exists (by its metadata; the value is not fetched).
    pub async fn contains(&self, name: &str) -> Result<bool, OpenBaoError> {
        Ok(self.metadata(name).await?.is_some())
    }

    async fn metadata(&self, name: &str) -> Result<Option<SecretMeta>, OpenBaoError> {
        validate_name(name)?;
        let what = || format!("read the metadata of {}{name}", self.prefix);
        let path = format!("/v1/{}/metadata/{}{name}", self.mount, self.prefix);
        let (status, body) = self.call(Method::GET, &path, None, &what).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        expect_success(status, &body, &what)?;
        #[derive(Deserialize)]
        struct Answer {
            data: Meta,
        }
        #[derive(Deserialize)]
        struct Meta {
            created_time: String,
            updated_time: String,
        }
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|_| OpenBaoError::BadAnswer {
                what: what(),
                reason: "not the JSON of KV v2 metadata",
            })?;
        let time = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| OpenBaoError::BadAnswer {
                    what: what(),
                    reason: "a metadata time is not RFC 3339",
                })
        };
        Ok(Some(SecretMeta {
            name: name.to_owned(),
            created: time(&answer.data.created_time)?,
            updated: time(&answer.data.updated_time)?,
        }))
    }

    /// One authenticated exchange. With AppRole, a refused token (403) triggers one fresh
    /// login and one retry: the token may have expired while latchkey was idle.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        what: &(dyn Fn() -> String + Sync),
    ) -> Result<(StatusCode, Bytes), OpenBaoError> {
        let token = self.token().await?;
        let first = self
            .exchange(method.clone(), path, body.clone(), Some(&token), what)
            .await?;
        if first.0 == StatusCode::FORBIDDEN && matches!(self.auth, OpenBaoAuth::AppRole { .. }) {
            let token = self.relogin(&token).await?;
            return self.exchange(method, path, body, Some(&token), what).await;
        }
        Ok(first)
    }

    /// The token to use now: renewed first when an AppRole lease is running out.
    async fn token(&self) -> Result<Arc<Secret>, OpenBaoError> {
        if let OpenBaoAuth::Token(_) = self.auth {
            return Ok(self
                .token
                .load_full()
                .expect("a token-authenticated client always holds its token"));
        }
        if let Some(token) = self.token.load_full() {
            if !self.lease_running_out() {
                return Ok(token);
            }
        }
        let _guard = self.login.lock().await;
        // Someone else may have renewed or logged in while we waited.
        let current = self.token.load_full();
        match current {
            Some(token) if !self.lease_running_out() => Ok(token),
            Some(token) if self.lease_renewable() => match self.renew(&token).await {
                Ok(()) => Ok(token),
                Err(e) => {
                    tracing::warn!(error = %e, "OpenBao token renewal failed; logging in again");
                    self.approle_login().await
                }
            },
            _ => self.approle_login().await,
        }
    }

    fn lease_running_out(&self) -> bool {
        let lease = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        match &*lease {
            // A lease of 0 means the token does not expire.
            Some(l) if l.duration.is_zero() => false,
            Some(l) => l.obtained.elapsed() >= l.duration.mul_f64(1.0 - RENEW_WHEN_LEFT),
            None => true,
        }
    }

    fn lease_renewable(&self) -> bool {
        let lease = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        lease.as_ref().is_some_and(|l| {
            l.renewable && l.obtained.elapsed() < l.duration && !l.duration.is_zero()
        })
    }

    /// Log in again unless another caller already replaced `stale`.
    async fn relogin(&self, stale: &Arc<Secret>) -> Result<Arc<Secret>, OpenBaoError> {
        let _guard = self.login.lock().await;
        if let Some(current) = self.token.load_full() {
            if !Arc::ptr_eq(&current, stale) {
                return Ok(current);
            }
        }
        self.approle_login().await
    }

    /// `POST auth/approle/login`; stores the token and its lease. Caller holds `login`.
    async fn approle_login(&self) -> Result<Arc<Secret>, OpenBaoError> {
        let OpenBaoAuth::AppRole { role_id, secret_id } = &self.auth else {
            unreachable!("approle_login is only called for AppRole authentication");
        };
        let what = || "log in with AppRole".to_owned();
        let secret_id = std::str::from_utf8(secret_id.expose())
            .map_err(|_| OpenBaoError::Config("the AppRole secret_id is not UTF-8".into()))?;
        #[derive(Serialize)]
        struct Login<'a> {
            role_id: &'a str,
            secret_id: &'a str,
        }
        let body = Zeroizing::new(
            serde_json::to_vec(&Login { role_id, secret_id })
                .expect("serialising strings to a Vec cannot fail"),
        );
        let (status, answer) = self
            .exchange(
                Method::POST,
                "/v1/auth/approle/login",
                Some(Bytes::copy_from_slice(&body)),
                None,
                &what,
            )
            .await?;
        expect_success(status, &answer, &what)?;
        let auth = parse_auth(&answer, &what)?;
        let token = Arc::new(Secret::new(auth.client_token.into_bytes()));
        self.token.store(Some(token.clone()));
        *self.lease.lock().unwrap_or_else(PoisonError::into_inner) = Some(Lease {
            obtained: Instant::now(),
            duration: Duration::from_secs(auth.lease_duration),
            renewable: auth.renewable,
        });
        tracing::debug!(
            lease_s = auth.lease_duration,
            "logged in to OpenBao with AppRole"
        );
        Ok(token)
    }

    /// `POST auth/token/renew-self`; updates the lease. Caller holds `login`.
    async fn renew(&self, token: &Secret) -> Result<(), OpenBaoError> {
        let what = || "renew its token".to_owned();
        let (status, answer) = self
            .exchange(
                Method::POST,
                "/v1/auth/token/renew-self",
                Some(Bytes::from_static(b"{}")),
                Some(token),
                &what,
            )
            .await?;
        expect_success(status, &answer, &what)?;
        let auth = parse_auth(&answer, &what)?;
        *self.lease.lock().unwrap_or_else(PoisonError::into_inner) = Some(Lease {
            obtained: Instant::now(),
            duration: Duration::from_secs(auth.lease_duration),
            renewable: auth.renewable,
        });
        tracing::debug!(lease_s = auth.lease_duration, "renewed the OpenBao token");
        Ok(())
    }

    /// One HTTP exchange, bounded by the timeout from connect to the last byte of the answer.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        token: Option<&Secret>,
        what: &(dyn Fn() -> String + Sync),
    ) -> Result<(StatusCode, Bytes), OpenBaoError> {
        let uri = format!("{}{path}", self.addr);
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            // SECURITY: marked sensitive so it stays out of Debug output and HPACK tables.
            let mut v = HeaderValue::from_bytes(token.expose()).map_err(|_| {
                OpenBaoError::Config("the OpenBao token is not a valid header value".into())
            })?;
            v.set_sensitive(true);
            req = req.header("x-vault-token", v);
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|_| OpenBaoError::Config(format!("cannot build a request to {path}")))?;
        let unreachable = |reason: String| OpenBaoError::Unreachable {
            addr: self.addr.clone(),
            reason,
        };
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| unreachable(error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, OpenBaoError>((status, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                tracing::debug!(what = %what(), "OpenBao timed out");
                Err(OpenBaoError::Timeout {
                    addr: self.addr.clone(),
                    timeout: self.timeout,
                })
            }
        }
    }
}

/// The `auth` block of a login or renewal answer.
#[derive(Deserialize)]
struct AuthBlock {
    client_token: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

fn parse_auth(body: &[u8], what: &(dyn Fn() -> String + Sync)) -> Result<AuthBlock, OpenBaoError> {
    #[derive(Deserialize)]
    struct Answer {
        auth: Option<AuthBlock>,
    }
    serde_json::from_slice::<Answer>(body)
        .ok()
        .and_then(|a| a.auth)
        .ok_or_else(|| OpenBaoError::BadAnswer {
            what: what(),
            reason: "no auth block with a client_token",
        })
}

/// `Ok` for 2xx; otherwise `Refused` with OpenBao's error strings.
fn expect_success(
    status: StatusCode,
    body: &[u8],
    what: &(dyn Fn() -> String + Sync),
) -> Result<(), OpenBaoError> {
    if status.is_success() {
        return Ok(());
    }
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<String>,
    }
    let mut errors = serde_json::from_slice::<Errors>(body)
        .map(|e| e.errors.join("; "))
        .unwrap_or_default();
    // OpenBao's messages are short; a long one is cut rather than flooding a log line.
    if errors.len() > 300 {
        let mut cut = 300;
        while !errors.is_char_boundary(cut) {
            cut -= 1;
        }
        errors.truncate(cut);
        errors.push('…');
    }
    Err(OpenBaoError::Refused {
        what: what(),
        status: status.as_u16(),
        errors,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(addr: &str, mount: &str, prefix: &str) -> OpenBaoConfig {
        OpenBaoConfig {
            addr: addr.into(),
            mount: mount.into(),
            prefix: prefix.into(),
            auth: OpenBaoAuth::Token(Secret::new(b"root-token-value".to_vec())),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn settings_are_validated() {
        OpenBao::try_new(config("http://127.0.0.1:8200", "secret", "latchkey/")).unwrap();
        OpenBao::try_new(config("https://bao.example:8200/", "/kv/", "")).unwrap();
        OpenBao::try_new(config("http://127.0.0.1:8200", "kv", "a/b-c/")).unwrap();
        for (addr, mount, prefix) in [
            ("ftp://x", "secret", "latchkey/"),
            ("127.0.0.1:8200", "secret", "latchkey/"),
            ("http://x/v1", "secret", "latchkey/"),
            ("http://x", "", "latchkey/"),
            ("http://x", "se cret", "latchkey/"),
            ("http://x", "secret", "latchkey"),
            ("http://x", "secret", "../"),
            ("http://x", "secret", "a//"),
        ] {
            let err = OpenBao::try_new(config(addr, mount, prefix)).unwrap_err();
            assert!(
                matches!(err, OpenBaoError::Config(_)),
                "{addr} {mount} {prefix}"
            );
        }
    }

    #[test]
    fn debug_output_never_contains_the_token() {
        let bao = OpenBao::try_new(config("http://127.0.0.1:1", "secret", "latchkey/")).unwrap();
        assert!(!format!("{bao:?}").contains("root-token-value"));
        let approle = OpenBaoAuth::AppRole {
            role_id: "r".into(),
            secret_id: Secret::new(b"the-secret-id".to_vec()),
        };
        assert!(!format!("{approle:?}").contains("the-secret-id"));
    }

    #[tokio::test]
    async fn an_unreachable_openbao_is_a_quick_typed_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let bao = OpenBao::try_new(config(
            &format!("http://127.0.0.1:{port}"),
            "secret",
            "latchkey/",
        ))
        .unwrap();
        let err = bao.read("gh").await.unwrap_err();
        assert!(err.is_unreachable(), "{err:?}");
        assert!(!err.to_string().contains("root-token-value"));
    }

    #[tokio::test]
    async fn a_silent_openbao_times_out() {
        // Accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut cfg = config(&format!("http://{addr}"), "secret", "latchkey/");
        cfg.timeout = Duration::from_millis(200);
        let bao = OpenBao::try_new(cfg).unwrap();
        let started = Instant::now();
        let err = bao.read("gh").await.unwrap_err();
        assert!(matches!(err, OpenBaoError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        hold.abort();
    }

    #[test]
    fn refusals_carry_openbao_errors_cut_to_size() {
        let body =
            serde_json::to_vec(&serde_json::json!({"errors": ["permission denied"]})).unwrap();
        let err = expect_success(StatusCode::FORBIDDEN, &body, &|| "read x".into()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "OpenBao refused to read x: HTTP 403 (permission denied)"
        );
        let long = serde_json::to_vec(&serde_json::json!({"errors": ["é".repeat(400)]})).unwrap();
        let err = expect_success(StatusCode::BAD_REQUEST, &long, &|| "w".into()).unwrap_err();
        assert!(err.to_string().len() < 400);
    }
}
