//! `latchkey connect` and `latchkey connections list`: run an OAuth authorisation once and
//! store the connection (an `oauth2` typed credential) in the secret backend.
//!
//! Two flows:
//! - authorization code with PKCE (S256) through the user's browser: latchkey listens on a
//!   one-shot loopback port (`http://127.0.0.1:PORT/callback`, RFC 8252), prints the URL,
//!   opens a browser only where one is available, checks `state`, and exchanges the code with
//!   its verifier;
//! - the device authorization grant (RFC 8628, `--device`) for hosts without a browser: prints
//!   the verification URL and user code, and polls the token endpoint at the interval the
//!   provider asks for (slowing down when told).
//!
//! Provider presets (GitHub, Google) fill in the endpoints; `generic` takes them as flags. A
//! reconnect (or a user's connection) reuses the endpoints and client of the connection it
//! replaces, or of the operator's connection of the same name.
//!
//! This module must never print or put into an error a code, a verifier, a token or a client
//! secret: what it shows are URLs the user must open (which carry none of them), names and
//! times.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::credential::endpoint::{self, EndpointError, Endpoints};
use crate::credential::oauth2::{
    self, connection_secret_name, now_ms, rfc3339, token_request, MintError, Token,
};
use crate::secrets::typed::{self, Stored, TypedDoc, SECRET_TABLE};
use crate::secrets::{Secret, Secrets};

/// A provider's endpoints and habits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// `github`, `google` or `generic`.
    pub name: String,
    /// The authorization endpoint (code flow).
    pub authorize_url: Option<String>,
    /// The token endpoint.
    pub token_url: Option<String>,
    /// The device authorization endpoint (device flow).
    pub device_url: Option<String>,
    /// Scopes asked for when none are given.
    pub default_scopes: Vec<String>,
    /// Extra authorize parameters (Google needs `access_type=offline` for a refresh token).
    pub extra_authorize: Vec<(String, String)>,
}

/// The preset of `name` (`github`, `google`), or an empty `generic` one.
pub fn preset(name: &str) -> Provider {
    let s = |v: &str| Some(v.to_owned());
    match name {
        "github" => Provider {
            name: "github".into(),
            authorize_url: s("https://github.com/login/oauth/authorize"),
            token_url: s("https://github.com/login/oauth/access_token"),
            device_url: s("https://github.com/login/device/code"),
            default_scopes: vec![],
            extra_authorize: vec![],
        },
        "google" => Provider {
            name: "google".into(),
            authorize_url: s("https://accounts.google.com/o/oauth2/v2/auth"),
            token_url: s("https://oauth2.googleapis.com/token"),
            device_url: s("https://oauth2.googleapis.com/device/code"),
            default_scopes: vec!["openid".into(), "email".into()],
            extra_authorize: vec![
                ("access_type".into(), "offline".into()),
                ("prompt".into(), "consent".into()),
            ],
        },
        other => Provider {
            name: other.to_owned(),
            authorize_url: None,
            token_url: None,
            device_url: None,
            default_scopes: vec![],
            extra_authorize: vec![],
        },
    }
}

/// Why a connection could not be made. Never holds a code, a token or a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A flag or the stored template is missing something.
    #[error("{0}")]
    Config(String),
    /// A URL is not usable.
    #[error(transparent)]
    Url(#[from] EndpointError),
    /// The provider refused or failed.
    #[error(transparent)]
    Token(#[from] MintError),
    /// The user denied access, or the provider sent an error to the redirect.
    #[error("the provider answered the authorisation with {0}")]
    Denied(String),
    /// Nothing arrived in time.
    #[error("no authorisation arrived within {0:?}")]
    Timeout(Duration),
    /// The loopback listener failed.
    #[error("the redirect listener failed: {0}")]
    Listener(std::io::Error),
    /// The secret backend failed.
    #[error("the secret backend failed: {0}")]
    Store(String),
}

/// What `latchkey connect` is asked to do (flags already read).
pub struct ConnectRequest {
    /// The connection name routes use.
    pub name: String,
    /// The user the connection belongs to (`--user`).
    pub user: Option<String>,
    /// `--provider` (default: `name` when it is a preset, else `generic`).
    pub provider: Option<String>,
    /// Overrides of the provider's endpoints.
    pub authorize_url: Option<String>,
    /// Token endpoint override.
    pub token_url: Option<String>,
    /// Device endpoint override.
    pub device_url: Option<String>,
    /// Scopes (default: the stored template's, else the provider's).
    pub scopes: Option<Vec<String>>,
    /// The client id (default: the stored template's).
    pub client_id: Option<String>,
    /// The client secret (default: the stored template's; public clients have none).
    pub client_secret: Option<Secret>,
    /// Use the device flow.
    pub device: bool,
    /// Port of the redirect listener (0: any free port).
    pub redirect_port: u16,
    /// Try to open a browser.
    pub open_browser: bool,
    /// How long to wait for the user.
    pub timeout: Duration,
    /// Extra roots for the token endpoint (`--upstream-ca`).
    pub extra_roots: Vec<PathBuf>,
}

/// What was stored.
#[derive(Debug)]
pub struct Connected {
    /// The secret name the connection is stored under.
    pub secret_name: String,
    /// Scopes granted (or asked for, when the provider did not say).
    pub scopes: Vec<String>,
    /// When the access token expires.
    pub expires_at: Option<String>,
    /// Whether a refresh token was issued.
    pub refreshable: bool,
}

/// The settings of an existing connection document, used as defaults.
#[derive(Default)]
struct Template {
    provider: Option<String>,
    authorize_url: Option<String>,
    token_url: Option<String>,
    device_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<Secret>,
    scopes: Option<Vec<String>>,
}

async fn template(secrets: &Secrets, name: &str) -> Result<Option<Template>, ConnectError> {
    let Some(stored) = secrets
        .get_fresh(name)
        .await
        .map_err(|e| ConnectError::Store(e.to_string()))?
    else {
        return Ok(None);
    };
    let Ok(Stored::Typed(doc)) = typed::parse(&stored) else {
        return Ok(None);
    };
    if doc.kind != oauth2::OAUTH2 {
        return Ok(None);
    }
    let text = |k: &str| doc.table.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    Ok(Some(Template {
        provider: text("provider"),
        authorize_url: text("authorize_url"),
        token_url: text("token_url"),
        device_url: text("device_url"),
        client_id: text("client_id"),
        client_secret: doc
            .table
            .get(SECRET_TABLE)
            .and_then(|t| t.get("client_secret"))
            .and_then(|v| v.as_str())
            .map(|s| Secret::new(s.as_bytes().to_vec())),
        scopes: doc.table.get("scopes").and_then(|v| v.as_array()).map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        }),
    }))
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A PKCE verifier (43 characters of 32 random bytes) and its S256 challenge.
pub fn pkce() -> (Zeroizing<String>, String) {
    let verifier = Zeroizing::new(b64url(&rand::random::<[u8; 32]>()));
    let challenge = b64url(&Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// Run the flow and store the connection. Progress (URLs to open, codes to enter) goes to
/// `say`.
pub async fn connect(
    mut req: ConnectRequest,
    secrets: &Secrets,
    say: &mut (dyn Write + Send),
) -> Result<Connected, ConnectError> {
    let secret_name = connection_secret_name(&req.name, req.user.as_deref()).ok_or_else(|| {
        ConnectError::Config(format!(
            "{:?} (with user {:?}) cannot name a connection: letters, digits, '_', '-', '.' \
             and '@' only",
            req.name, req.user
        ))
    })?;
    // Defaults: this connection's previous document, else the operator's connection of the
    // same name (a user's connection uses the operator's client), else the preset.
    let mut tmpl = template(secrets, &secret_name).await?;
    if tmpl.is_none() && req.user.is_some() {
        tmpl = template(secrets, &req.name).await?;
    }
    let tmpl = tmpl.unwrap_or_default();
    let provider_name = req
        .provider
        .clone()
        .or(tmpl.provider.clone())
        .unwrap_or_else(|| match req.name.as_str() {
            "github" | "google" => req.name.clone(),
            _ => "generic".into(),
        });
    let p = preset(&provider_name);
    let pick = |flag: &Option<String>, stored: &Option<String>, preset: &Option<String>| {
        flag.clone().or(stored.clone()).or(preset.clone())
    };
    let authorize_url = pick(&req.authorize_url, &tmpl.authorize_url, &p.authorize_url);
    let token_url = pick(&req.token_url, &tmpl.token_url, &p.token_url).ok_or_else(|| {
        ConnectError::Config(format!(
            "provider {provider_name} has no token endpoint; give --token-url"
        ))
    })?;
    let device_url = pick(&req.device_url, &tmpl.device_url, &p.device_url);
    let client_id = req
        .client_id
        .clone()
        .or(tmpl.client_id.clone())
        .ok_or_else(|| ConnectError::Config("give the OAuth app's --client-id".into()))?;
    let client_secret = req.client_secret.take().or(tmpl.client_secret);
    let scopes = req
        .scopes
        .clone()
        .or(tmpl.scopes.clone())
        .unwrap_or(p.default_scopes.clone());
    let token_uri = endpoint::check_url(&token_url)?;
    let endpoints = Endpoints::new(&req.extra_roots, crate::credential::ENDPOINT_TIMEOUT)?;

    let minted = if req.device {
        let device_url = device_url.clone().ok_or_else(|| {
            ConnectError::Config(format!(
                "provider {provider_name} has no device endpoint; give --device-url"
            ))
        })?;
        device_flow(
            &endpoints,
            &endpoint::check_url(&device_url)?,
            &token_uri,
            &client_id,
            client_secret.as_ref(),
            &scopes,
            req.timeout,
            say,
        )
        .await?
    } else {
        let authorize_url = authorize_url.clone().ok_or_else(|| {
            ConnectError::Config(format!(
                "provider {provider_name} has no authorization endpoint; give --authorize-url \
                 (or use --device)"
            ))
        })?;
        code_flow(
            &endpoints,
            &authorize_url,
            &token_uri,
            &client_id,
            client_secret.as_ref(),
            &scopes,
            &p.extra_authorize,
            &req,
            say,
        )
        .await?
    };

    let granted: Vec<String> = match &minted.scope {
        Some(s) => s
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        None => scopes.clone(),
    };
    let now = now_ms();
    let token = Token::minted(
        Secret::new(minted.access_token.expose().to_vec()),
        now,
        minted.expires_in,
    );
    let mut table = toml::Table::new();
    let s = |v: &str| toml::Value::String(v.to_owned());
    table.insert("kind".into(), s(oauth2::OAUTH2));
    table.insert("provider".into(), s(&provider_name));
    table.insert("connection".into(), s(&req.name));
    if let Some(u) = &req.user {
        table.insert("user".into(), s(u));
    }
    table.insert("token_url".into(), s(&token_url));
    if let Some(a) = &authorize_url {
        table.insert("authorize_url".into(), s(a));
    }
    if let Some(d) = &device_url {
        table.insert("device_url".into(), s(d));
    }
    table.insert("client_id".into(), s(&client_id));
    table.insert(
        "scopes".into(),
        toml::Value::Array(granted.iter().map(|g| s(g)).collect()),
    );
    table.insert("connected_at".into(), s(&rfc3339(now)));
    let mut secret_table = toml::Table::new();
    if let Some(cs) = &client_secret {
        secret_table.insert(
            "client_secret".into(),
            s(&String::from_utf8_lossy(cs.expose())),
        );
    }
    table.insert(SECRET_TABLE.into(), toml::Value::Table(secret_table));
    let mut doc = TypedDoc {
        kind: oauth2::OAUTH2.into(),
        table,
    };
    oauth2::set_token(&mut doc, &token, minted.refresh_token.as_ref());
    let text = Zeroizing::new(
        toml::to_string(&doc.table)
            .map_err(|e| ConnectError::Store(format!("cannot encode the connection: {e}")))?,
    );
    secrets
        .set(&secret_name, typed::encode(&text))
        .await
        .map_err(|e| ConnectError::Store(e.to_string()))?;
    Ok(Connected {
        secret_name,
        scopes: granted,
        expires_at: token.expires_at.map(rfc3339),
        refreshable: minted.refresh_token.is_some(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn code_flow(
    endpoints: &Endpoints,
    authorize_url: &str,
    token_uri: &http::Uri,
    client_id: &str,
    client_secret: Option<&Secret>,
    scopes: &[String],
    extra: &[(String, String)],
    req: &ConnectRequest,
    say: &mut (dyn Write + Send),
) -> Result<oauth2::Minted, ConnectError> {
    endpoint::check_url(authorize_url)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", req.redirect_port))
        .await
        .map_err(ConnectError::Listener)?;
    let port = listener
        .local_addr()
        .map_err(ConnectError::Listener)?
        .port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let state = b64url(&rand::random::<[u8; 24]>());
    let (verifier, challenge) = pkce();
    let mut url = url::Url::parse(authorize_url).map_err(|_| EndpointError::BadUrl {
        url: authorize_url.to_owned(),
        why: "it is not a URL",
    })?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", &redirect_uri)
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        if !scopes.is_empty() {
            q.append_pair("scope", &scopes.join(" "));
        }
        for (k, v) in extra {
            q.append_pair(k, v);
        }
    }
    let _ = writeln!(
        say,
        "Open this URL in a browser to connect {}{}:\n\n  {url}\n\nWaiting for the provider to redirect to {redirect_uri} ...",
        req.name,
        req.user
            .as_deref()
            .map(|u| format!(" for user {u}"))
            .unwrap_or_default()
    );
    let _ = say.flush();
    if req.open_browser {
        open_browser(url.as_str());
    }
    let code = tokio::time::timeout(req.timeout, wait_for_code(&listener, &state))
        .await
        .map_err(|_| ConnectError::Timeout(req.timeout))??;
    let minted = token_request(
        endpoints,
        token_uri,
        client_id,
        client_secret,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &redirect_uri),
            ("code_verifier", &verifier),
        ],
    )
    .await?;
    Ok(minted)
}

/// Open `url` in the user's browser when there is one (a display and `xdg-open`, or macOS's
/// `open`); otherwise do nothing: the URL is printed anyway.
fn open_browser(url: &str) {
    let has_display = std::env::var_os("DISPLAY").is_some_and(|d| !d.is_empty())
        || std::env::var_os("WAYLAND_DISPLAY").is_some_and(|d| !d.is_empty());
    let opener = if cfg!(target_os = "macos") {
        Some("open")
    } else if has_display {
        Some("xdg-open")
    } else {
        None
    };
    let Some(opener) = opener else { return };
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(opener).is_file()));
    if on_path {
        let _ = std::process::Command::new(opener)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

const PAGE_OK: &str = "<!doctype html><title>latchkey</title><p>Connected. You can close this tab and return to the terminal.</p>";
const PAGE_FAIL: &str =
    "<!doctype html><title>latchkey</title><p>The connection was not made; see the terminal.</p>";

/// Accept redirects until one carries our `state`: its `code`, or the provider's error.
/// Requests to other paths, or with another state (a page racing the real redirect), are
/// answered and ignored.
async fn wait_for_code(
    listener: &tokio::net::TcpListener,
    state: &str,
) -> Result<Zeroizing<String>, ConnectError> {
    loop {
        let (mut sock, _) = listener.accept().await.map_err(ConnectError::Listener)?;
        let mut buf = Zeroizing::new(vec![0u8; 16 * 1024]);
        let mut n = 0;
        // Read the head only (a GET has no body), bounded.
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while n < buf.len() {
                let got = sock.read(&mut buf[n..]).await?;
                if got == 0 {
                    break;
                }
                n += got;
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        if !matches!(read, Ok(Ok(()))) {
            continue;
        }
        let head = String::from_utf8_lossy(&buf[..n]);
        let target = head
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("GET "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path != "/callback" {
            respond(&mut sock, "404 Not Found", "not here").await;
            continue;
        }
        let mut code = None;
        let mut got_state = None;
        let mut error = None;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "code" => code = Some(Zeroizing::new(v.into_owned())),
                "state" => got_state = Some(v.into_owned()),
                "error" => error = Some(v.into_owned()),
                _ => {}
            }
        }
        // SECURITY: only the redirect that carries our state counts (CSRF, RFC 6749 10.12).
        if got_state.as_deref() != Some(state) {
            respond(&mut sock, "400 Bad Request", PAGE_FAIL).await;
            continue;
        }
        if let Some(e) = error {
            respond(&mut sock, "200 OK", PAGE_FAIL).await;
            let shown: String = e
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(64)
                .collect();
            return Err(ConnectError::Denied(shown));
        }
        match code {
            Some(c) if !c.is_empty() => {
                respond(&mut sock, "200 OK", PAGE_OK).await;
                return Ok(c);
            }
            _ => respond(&mut sock, "400 Bad Request", PAGE_FAIL).await,
        }
    }
}

async fn respond(sock: &mut tokio::net::TcpStream, status: &str, body: &str) {
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

#[derive(serde::Deserialize)]
struct DeviceAnswer {
    device_code: Option<String>,
    user_code: Option<String>,
    verification_uri: Option<String>,
    verification_url: Option<String>,
    verification_uri_complete: Option<String>,
    expires_in: Option<u64>,
    interval: Option<u64>,
    error: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn device_flow(
    endpoints: &Endpoints,
    device_uri: &http::Uri,
    token_uri: &http::Uri,
    client_id: &str,
    client_secret: Option<&Secret>,
    scopes: &[String],
    timeout: Duration,
    say: &mut (dyn Write + Send),
) -> Result<oauth2::Minted, ConnectError> {
    let scope = scopes.join(" ");
    let mut pairs = vec![("client_id", client_id)];
    if !scope.is_empty() {
        pairs.push(("scope", &scope));
    }
    // A confidential client authenticates at the device endpoint too (RFC 8628 3.1).
    let secret_text =
        client_secret.map(|s| Zeroizing::new(String::from_utf8_lossy(s.expose()).into_owned()));
    if let Some(s) = &secret_text {
        pairs.push(("client_secret", s));
    }
    let answer = endpoints
        .post(
            device_uri,
            "application/x-www-form-urlencoded",
            Vec::new(),
            endpoint::form(&pairs),
        )
        .await?;
    let device: DeviceAnswer = serde_json::from_slice(&answer.body).map_err(|_| {
        MintError::Bad(format!(
            "{} from the device endpoint, not a device authorization response",
            answer.status
        ))
    })?;
    if let Some(e) = device.error {
        return Err(MintError::Refused(e.chars().take(64).collect()).into());
    }
    let (Some(device_code), Some(user_code), Some(verify)) = (
        device.device_code.map(Zeroizing::new),
        device.user_code,
        device.verification_uri.or(device.verification_url),
    ) else {
        return Err(MintError::Bad(
            "a device authorization response without device_code, user_code or verification_uri"
                .into(),
        )
        .into());
    };
    let _ = writeln!(
        say,
        "To connect, open {verify} on any device and enter the code: {user_code}"
    );
    if let Some(complete) = &device.verification_uri_complete {
        let _ = writeln!(say, "Or open: {complete}");
    }
    let _ = writeln!(say, "Waiting for the authorisation ...");
    let _ = say.flush();
    let mut interval = Duration::from_secs(device.interval.unwrap_or(5).max(1));
    let lifetime = device
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(timeout)
        .min(timeout);
    let deadline = tokio::time::Instant::now() + lifetime;
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(ConnectError::Timeout(lifetime));
        }
        match token_request(
            endpoints,
            token_uri,
            client_id,
            client_secret,
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", &device_code),
            ],
        )
        .await
        {
            Ok(m) => return Ok(m),
            Err(MintError::Refused(code)) if code == "authorization_pending" => {}
            Err(MintError::Refused(code)) if code == "slow_down" => {
                interval += Duration::from_secs(5);
            }
            Err(MintError::Refused(code)) => return Err(ConnectError::Denied(code)),
            Err(e) => return Err(e.into()),
        }
    }
}

/// One row of `latchkey connections list`.
#[derive(Debug, serde::Serialize)]
pub struct ConnectionRow {
    /// The connection name routes use.
    pub name: String,
    /// The secret it is stored under.
    pub secret: String,
    /// The kind (`oauth2`, `oauth2_client_credentials`, `github_app`).
    pub kind: String,
    /// The provider preset.
    pub provider: String,
    /// Whose it is (per-user connections).
    pub user: Option<String>,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// When the stored access token expires.
    pub expires_at: Option<String>,
    /// `ok`, `refreshes on next use`, `broken (...)`, `expired (no refresh token ...)`.
    pub health: String,
}

/// Every minting credential in the backend, without a single token.
pub async fn list(secrets: &Secrets) -> Result<Vec<ConnectionRow>, ConnectError> {
    let metas = secrets
        .list()
        .await
        .map_err(|e| ConnectError::Store(e.to_string()))?;
    let mut rows = Vec::new();
    for meta in metas {
        let Ok(Some(stored)) = secrets.get_fresh(&meta.name).await else {
            continue;
        };
        let Ok(Stored::Typed(doc)) = typed::parse(&stored) else {
            continue;
        };
        if ![
            oauth2::OAUTH2,
            oauth2::CLIENT_CREDENTIALS,
            crate::credential::github_app::GITHUB_APP,
        ]
        .contains(&doc.kind.as_str())
        {
            continue;
        }
        let text = |k: &str| doc.table.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let has_secret = |k: &str| {
            doc.table
                .get(SECRET_TABLE)
                .and_then(|t| t.get(k))
                .and_then(|v| v.as_str())
                .is_some_and(|v| !v.is_empty())
        };
        let expires_at = text("access_token_expires_at");
        let expired = expires_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| t.timestamp_millis() <= now_ms());
        let health = if text("status").as_deref() == Some("broken") {
            format!(
                "broken: the provider refused the refresh token{}; reconnect",
                text("broken_at")
                    .map(|t| format!(" at {t}"))
                    .unwrap_or_default()
            )
        } else if doc.kind == oauth2::OAUTH2 && expired && !has_secret("refresh_token") {
            "expired and not refreshable; reconnect".into()
        } else if expired || (doc.kind != oauth2::OAUTH2 && !has_secret("access_token")) {
            "ok (a token is minted on next use)".into()
        } else {
            "ok".into()
        };
        rows.push(ConnectionRow {
            name: text("connection").unwrap_or_else(|| meta.name.clone()),
            secret: meta.name.clone(),
            kind: doc.kind.clone(),
            provider: text("provider").unwrap_or_else(|| {
                if doc.kind == crate::credential::github_app::GITHUB_APP {
                    "github_app".into()
                } else {
                    "generic".into()
                }
            }),
            user: text("user"),
            scopes: doc
                .table
                .get("scopes")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            expires_at,
            health,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_challenge_is_the_s256_of_the_verifier() {
        let (v, c) = pkce();
        assert_eq!(v.len(), 43);
        assert_eq!(c, b64url(&Sha256::digest(v.as_bytes())));
        // RFC 7636 appendix B.
        assert_eq!(
            b64url(&Sha256::digest(
                b"dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
            )),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn presets_know_github_and_google() {
        let g = preset("github");
        assert!(g.token_url.unwrap().starts_with("https://github.com/"));
        assert!(g.device_url.is_some());
        let google = preset("google");
        assert!(google
            .extra_authorize
            .contains(&("access_type".into(), "offline".into())));
        assert!(preset("acme").token_url.is_none());
    }
}
