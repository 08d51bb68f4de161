//! The dashboard, under `/ui/` on the admin listener (or `--ui-listen`): sign in with the
//! admin token, then a live tail of the audit log (server-sent events), live sessions with
//! revoke, pending approvals with approve/deny and their history, agents and routes with an
//! "explain" form. Server-rendered with minijinja templates (`src/ui/templates/`, embedded)
//! and one small static script; works offline (no external asset).
//!
//! SECURITY: safe to expose on a team network.
//! - Sign-in compares the admin token in constant time (digests of equal length, XOR-folded).
//! - The session cookie is random, `HttpOnly; SameSite=Strict; Path=/ui/` (and `Secure` when
//!   `--ui-secure-cookie` says the dashboard is served over TLS by a front proxy).
//! - Every POST needs the session's CSRF token (a hidden field), and an `Origin`, when sent,
//!   must be this host: a cross-site form post is refused twice over.
//! - Strict CSP: `default-src 'none'`, scripts and styles only from `/ui/static/`, no inline
//!   script, no framing; `nosniff`, `Referrer-Policy: same-origin` (so browsers send a real
//!   `Origin` on our own posts and nothing to other sites), `no-store` on every answer.
//! - Templates autoescape; the script writes only `textContent`. No secret or token is ever
//!   rendered: pages show names, ids, digests and what approvers see of held requests
//!   (credential headers already `[redacted]`, see `proxy::approve`).
//!
//! This module does not import the proxy: the admin listener hands it a [`Context`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use minijinja::{context, Environment};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::approval::{self, Holds, Narrowing};
use crate::audit::AuditEvent;
use crate::auth::{self, Revocations};
use crate::fsutil;
use crate::policy::Policies;
use crate::redis::Redis;

/// The admin token's file in the state dir (0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// How long a dashboard sign-in lasts.
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most dashboard sign-ins kept at once (the oldest is dropped beyond it).
const MAX_SESSIONS: usize = 256;
/// Largest form body accepted.
const MAX_FORM: usize = 16 * 1024;
/// Audit lines sent when a live tail starts.
const TAIL_BACKLOG: usize = 100;
/// How often the live tail looks for new lines.
const TAIL_POLL: Duration = Duration::from_millis(200);
/// Bytes read back from the end of the log for the backlog.
const TAIL_BACKLOG_BYTES: u64 = 256 * 1024;

const SESSION_COOKIE: &str = "lk_ui";
const LOGIN_COOKIE: &str = "lk_login";

/// The body of every dashboard answer.
pub type UiBody = BoxBody<Bytes, Infallible>;

/// Why the admin token cannot be read or made.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the admin token file {}", .path.display())]
pub struct AdminTokenError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The admin token: read from the state dir, created (0600) when missing or when `rotate`.
pub fn admin_token(
    state_dir: &Path,
    rotate: bool,
) -> Result<zeroize::Zeroizing<String>, AdminTokenError> {
    let path = state_dir.join(ADMIN_TOKEN_FILE);
    let err = |source| AdminTokenError {
        path: path.clone(),
        source,
    };
    if !rotate {
        if let Some(t) = read_admin_token(state_dir) {
            return Ok(t);
        }
    }
    fsutil::ensure_private_dir(state_dir).map_err(err)?;
    let bytes: [u8; 32] = rand::random();
    let token = zeroize::Zeroizing::new(format!("lka_{}", hex::encode(bytes)));
    fsutil::write_atomic(&path, format!("{}\n", token.as_str()).as_bytes(), 0o600).map_err(err)?;
    Ok(token)
}

/// The admin token if one was made (`latchkey admin token`).
pub fn read_admin_token(state_dir: &Path) -> Option<zeroize::Zeroizing<String>> {
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(state_dir.join(ADMIN_TOKEN_FILE)).ok()?);
    let t = text.trim();
    (!t.is_empty()).then(|| zeroize::Zeroizing::new(t.to_owned()))
}

/// SECURITY: equal-length digests compared without an early exit, so the time taken says
/// nothing about how much of a guess was right.
fn same_secret(a: &str, b: &str) -> bool {
    let (da, db) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// One signed-in dashboard user.
#[derive(Clone)]
struct UiSession {
    /// The CSRF token every POST of this session carries.
    csrf: String,
    /// The name they gave at sign-in (recorded as the approver).
    name: String,
    expires: Instant,
}

/// What the admin listener lends the dashboard for one request.
pub struct Context<'a> {
    /// The policies in force.
    pub policies: Arc<Policies>,
    /// Revoked sessions (to list live ones and to revoke).
    pub revocations: &'a Revocations,
    /// The shared state, to tell other replicas of a revocation.
    pub redis: Option<&'a Arc<Redis>>,
    /// Held requests and the approval store.
    pub holds: &'a Arc<Holds>,
}

/// The dashboard: templates, sign-ins, and where to read the log and the sessions.
pub struct Dashboard {
    env: Environment<'static>,
    sessions: DashMap<String, UiSession>,
    state_dir: PathBuf,
    audit_path: PathBuf,
    secure_cookie: bool,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dashboard { .. }")
    }
}

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("ui/templates/base.html")),
    ("login.html", include_str!("ui/templates/login.html")),
    ("tail.html", include_str!("ui/templates/tail.html")),
    ("sessions.html", include_str!("ui/templates/sessions.html")),
    (
        "approvals.html",
        include_str!("ui/templates/approvals.html"),
    ),
    ("agents.html", include_str!("ui/templates/agents.html")),
];
const APP_JS: &str = include_str!("ui/static/app.js");
const APP_CSS: &str = include_str!("ui/static/app.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

impl Dashboard {
    /// A dashboard reading `state_dir` (sessions, admin token) and `audit_path`.
    pub fn new(state_dir: &Path, audit_path: &Path, secure_cookie: bool) -> Dashboard {
        let mut env = Environment::new();
        for (name, text) in TEMPLATES {
            if let Err(e) = env.add_template(name, text) {
                panic!("the embedded template {name} does not parse: {e:#}");
            }
        }
        Dashboard {
            env,
            sessions: DashMap::new(),
            state_dir: state_dir.to_path_buf(),
            audit_path: audit_path.to_path_buf(),
            secure_cookie,
        }
    }

    /// Answer one request under `/ui/`. `stop` ends a live tail when the server shuts down.
    pub async fn handle<B>(
        &self,
        req: Request<B>,
        cx: Context<'_>,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Response<UiBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let query = parse_form(parts.uri.query().unwrap_or(""));
        match (&parts.method, path.as_str()) {
            (&Method::GET, "/ui/static/app.js") => {
                return asset("text/javascript; charset=utf-8", APP_JS)
            }
            (&Method::GET, "/ui/static/app.css") => {
                return asset("text/css; charset=utf-8", APP_CSS)
            }
            (&Method::GET, "/ui" | "/ui/") => {
                return redirect(if self.session(&parts.headers).is_some() {
                    "/ui/approvals"
                } else {
                    "/ui/login"
                })
            }
            (&Method::GET, "/ui/login") => return self.login_page(None),
            (&Method::POST, "/ui/login") => {
                let form = match read_form(body).await {
                    Ok(f) => f,
                    Err(resp) => return resp,
                };
                return self.login(&parts.headers, &form);
            }
            _ => {}
        }
        // Everything else needs a signed-in session.
        let Some((sid, session)) = self.session(&parts.headers) else {
            return if parts.method == Method::GET {
                redirect("/ui/login")
            } else {
                plain(StatusCode::FORBIDDEN, "sign in first\n")
            };
        };
        if parts.method == Method::POST {
            if !same_origin(&parts.headers) {
                return plain(StatusCode::FORBIDDEN, "cross-site request refused\n");
            }
            let form = match read_form(body).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            let csrf = form.get("csrf").map(String::as_str).unwrap_or("");
            if !same_secret(csrf, &session.csrf) {
                return plain(StatusCode::FORBIDDEN, "missing or wrong CSRF token\n");
            }
            return match path.as_str() {
                "/ui/logout" => {
                    self.sessions.remove(&sid);
                    let mut r = redirect("/ui/login");
                    r.headers_mut().insert(
                        header::SET_COOKIE,
                        HeaderValue::from_static(
                            "lk_ui=; Path=/ui/; Max-Age=0; HttpOnly; SameSite=Strict",
                        ),
                    );
                    r
                }
                "/ui/approvals/decide" => self.decide(&cx, &session, &form).await,
                "/ui/sessions/revoke" => self.revoke(&cx, &form).await,
                _ => plain(StatusCode::NOT_FOUND, "not found\n"),
            };
        }
        if parts.method != Method::GET {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match path.as_str() {
            "/ui/tail" => self.page(
                "tail.html",
                &session,
                context! { filters => &query, page => "tail" },
            ),
            "/ui/events" => self.events(&query, stop),
            "/ui/sessions" => self.sessions_page(&cx, &session, &query),
            "/ui/approvals" => self.approvals_page(&cx, &session, &query).await,
            "/ui/agents" => self.agents_page(&cx, &session, &query),
            _ => plain(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// The signed-in session named by the cookie, if live.
    fn session(&self, headers: &HeaderMap) -> Option<(String, UiSession)> {
        let sid = cookie(headers, SESSION_COOKIE)?;
        let s = self.sessions.get(&sid)?.clone();
        if s.expires <= Instant::now() {
            self.sessions.remove(&sid);
            return None;
        }
        Some((sid, s))
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Response<UiBody> {
        match self.env.get_template(name).and_then(|t| t.render(ctx)) {
            Ok(html) => html_response(StatusCode::OK, html),
            Err(e) => {
                tracing::error!(error = %e, template = name, "cannot render a dashboard page");
                plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot render this page\n",
                )
            }
        }
    }

    fn page(&self, name: &str, s: &UiSession, extra: minijinja::Value) -> Response<UiBody> {
        self.render(name, context! { csrf => &s.csrf, me => &s.name, ..extra })
    }

    fn login_page(&self, error: Option<&str>) -> Response<UiBody> {
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let mut r = self.render(
            "login.html",
            context! { login_csrf => &nonce, error => error },
        );
        if error.is_some() {
            *r.status_mut() = StatusCode::FORBIDDEN;
        }
        let cookie = format!(
            "{LOGIN_COOKIE}={nonce}; Path=/ui/; HttpOnly; SameSite=Strict; Max-Age=600{}",
            self.secure_flag()
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    }

    fn secure_flag(&self) -> &'static str {
        if self.secure_cookie {
            "; Secure"
        } else {
            ""
        }
    }

    /// Sign in: the login form's own CSRF (a cookie it must match), then the admin token.
    fn login(&self, headers: &HeaderMap, form: &HashMap<String, String>) -> Response<UiBody> {
        let expected = cookie(headers, LOGIN_COOKIE).unwrap_or_default();
        let sent = form.get("login_csrf").map(String::as_str).unwrap_or("");
        if expected.is_empty() || !same_secret(sent, &expected) || !same_origin(headers) {
            return plain(
                StatusCode::FORBIDDEN,
                "cross-site sign-in refused; reload the sign-in page\n",
            );
        }
        let Some(admin) = read_admin_token(&self.state_dir) else {
            return self.login_page(Some(
                "no admin token exists yet: run `latchkey admin token` on the server",
            ));
        };
        let given = form.get("token").map(String::as_str).unwrap_or("");
        if !same_secret(given.trim(), admin.as_str()) {
            tracing::warn!("dashboard sign-in with a wrong admin token");
            return self.login_page(Some("wrong admin token"));
        }
        let name = approval::clean_text(form.get("name").map(String::as_str).unwrap_or(""), 64);
        let name = if name.is_empty() {
            "admin".to_owned()
        } else {
            name
        };
        if self.sessions.len() >= MAX_SESSIONS {
            let oldest = self
                .sessions
                .iter()
                .min_by_key(|e| e.value().expires)
                .map(|e| e.key().clone());
            if let Some(k) = oldest {
                self.sessions.remove(&k);
            }
        }
        let sid = hex::encode(rand::random::<[u8; 32]>());
        self.sessions.insert(
            sid.clone(),
            UiSession {
                csrf: hex::encode(rand::random::<[u8; 32]>()),
                name: name.clone(),
                expires: Instant::now() + SESSION_TTL,
            },
        );
        tracing::info!(user = %name, "dashboard sign-in");
        let mut r = redirect("/ui/approvals");
        let cookie = format!(
            "{SESSION_COOKIE}={sid}; Path=/ui/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            SESSION_TTL.as_secs(),
            self.secure_flag()
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    }

    async fn approvals_page(
        &self,
        cx: &Context<'_>,
        s: &UiSession,
        query: &HashMap<String, String>,
    ) -> Response<UiBody> {
        let now = auth::unix_now();
        let list = match cx.holds.store().list().await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot list approvals");
                Vec::new()
            }
        };
        let pending: Vec<minijinja::Value> = list
            .iter()
            .filter(|(p, d)| d.is_none() && p.expires > now)
            .map(|(p, _)| {
                minijinja::Value::from_serialize(serde_json::json!({
                    "p": p,
                    "asked": approval::approved_text(p, None),
                    "left": p.expires - now,
                }))
            })
            .collect();
        let history: Vec<AuditEvent> = recent_lines(&self.audit_path, 2000)
            .into_iter()
            .filter(|e| e.approval.kind.as_deref() == Some("approval"))
            .rev()
            .take(50)
            .collect();
        let history: Vec<minijinja::Value> = history.iter().map(event_value).collect();
        self.page(
            "approvals.html",
            s,
            context! {
                page => "approvals",
                pending => pending,
                history => history,
                notice => query.get("notice"),
                error => query.get("error"),
            },
        )
    }

    async fn decide(
        &self,
        cx: &Context<'_>,
        s: &UiSession,
        form: &HashMap<String, String>,
    ) -> Response<UiBody> {
        let id = form.get("id").map(String::as_str).unwrap_or("");
        let approve = form.get("action").map(String::as_str) == Some("approve");
        let mut narrowing = Narrowing::default();
        let parse = |k: &str| -> Result<Option<Duration>, String> {
            match form.get(k).map(|v| v.trim()).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => humantime::parse_duration(v)
                    .map(Some)
                    .map_err(|e| format!("{k}: {v:?} is not a duration: {e}")),
            }
        };
        let result = async {
            narrowing.for_duration = parse("for")?;
            narrowing.ttl = parse("ttl")?;
            if let Some(r) = form
                .get("routes")
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
            {
                narrowing.routes = Some(
                    r.split(',')
                        .map(|r| r.trim().to_owned())
                        .filter(|r| !r.is_empty())
                        .collect(),
                );
            }
            let reason = form
                .get("reason")
                .map(String::as_str)
                .filter(|r| !r.trim().is_empty());
            approval::decide(cx.holds.store(), id, approve, &s.name, reason, &narrowing)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(d) => redirect(&format!(
                "/ui/approvals?notice={}",
                encode(&format!(
                    "{} {}",
                    if d.approve { "approved" } else { "denied" },
                    d.id
                ))
            )),
            Err(e) => redirect(&format!("/ui/approvals?error={}", encode(&e))),
        }
    }

    fn sessions_page(
        &self,
        cx: &Context<'_>,
        s: &UiSession,
        query: &HashMap<String, String>,
    ) -> Response<UiBody> {
        let live = live_sessions(&self.state_dir, cx.revocations);
        let rows: Vec<minijinja::Value> = live
            .iter()
            .map(|l| {
                minijinja::Value::from_serialize(serde_json::json!({
                    "jti": l.jti, "agent": l.agent, "obo": l.obo, "task": l.task,
                    "routes": l.routes.as_ref().map(|r| r.join(", ")),
                    "expires": rfc3339(l.exp),
                }))
            })
            .collect();
        self.page(
            "sessions.html",
            s,
            context! { page => "sessions", sessions => rows, notice => query.get("notice"), error => query.get("error") },
        )
    }

    async fn revoke(&self, cx: &Context<'_>, form: &HashMap<String, String>) -> Response<UiBody> {
        let jti = form.get("jti").map(String::as_str).unwrap_or("");
        let Some(line) = live_sessions(&self.state_dir, cx.revocations)
            .into_iter()
            .find(|l| l.jti == jti)
        else {
            return redirect(&format!(
                "/ui/sessions?error={}",
                encode("no live session with that id")
            ));
        };
        if let Err(e) = cx.revocations.revoke_session(&line.jti, line.exp) {
            tracing::error!(error = %e, "cannot revoke a session from the dashboard");
            return redirect(&format!(
                "/ui/sessions?error={}",
                encode("cannot revoke: see the server log")
            ));
        }
        if let Some(r) = cx.redis {
            let what = auth::Revoked::Session {
                jti: line.jti.clone(),
                exp: line.exp,
            };
            if let Err(e) = auth::publish_revocation(r, &what).await {
                tracing::error!(error = %e, "revoked locally, but the shared state (--redis) was not told");
                return redirect(&format!(
                    "/ui/sessions?error={}",
                    encode("revoked here, but Redis is unreachable: other replicas were NOT told")
                ));
            }
        }
        tracing::info!(session = %line.jti, agent = %line.agent, "session revoked from the dashboard");
        redirect(&format!(
            "/ui/sessions?notice={}",
            encode(&format!("revoked session {}", line.jti))
        ))
    }

    fn agents_page(
        &self,
        cx: &Context<'_>,
        s: &UiSession,
        query: &HashMap<String, String>,
    ) -> Response<UiBody> {
        let agents: Vec<minijinja::Value> = cx
            .policies
            .agents()
            .map(|p| {
                let routes: Vec<serde_json::Value> = p
                    .routes()
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "id": r.id(),
                            "host": r.host(),
                            "methods": r.methods().iter().map(|m| m.as_str()).collect::<Vec<_>>().join(" "),
                            "paths": r.paths().collect::<Vec<_>>().join(" "),
                            "credential": r.credential(),
                            "approval": match r.approval() {
                                crate::policy::Approval::None => "",
                                crate::policy::Approval::Session => "session",
                                crate::policy::Approval::Request => "request",
                            },
                        })
                    })
                    .collect();
                minijinja::Value::from_serialize(serde_json::json!({
                    "agent": p.agent(),
                    "max_ttl": p.max_ttl().map(|d| humantime::format_duration(d).to_string()),
                    "routes": routes,
                }))
            })
            .collect();
        let explained = match (query.get("agent"), query.get("method"), query.get("url")) {
            (Some(a), Some(m), Some(u)) if !a.is_empty() && !u.is_empty() => {
                Some(match crate::policy::explain(&cx.policies, a, m, u) {
                    Ok(e) => serde_json::json!({"allowed": e.allowed, "text": e.text}),
                    Err(e) => serde_json::json!({"allowed": false, "text": e}),
                })
            }
            _ => None,
        };
        self.page(
            "agents.html",
            s,
            context! {
                page => "agents",
                agents => agents,
                q => query,
                explained => explained.map(minijinja::Value::from_serialize),
            },
        )
    }

    /// The live tail: the last lines that match, then each new one as it is written, as
    /// server-sent events (one JSON audit line per event), until the client goes away or the
    /// server stops.
    fn events(
        &self,
        query: &HashMap<String, String>,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Response<UiBody> {
        let filter = Filter {
            agent: query.get("agent").filter(|v| !v.is_empty()).cloned(),
            decision: query.get("decision").filter(|v| !v.is_empty()).cloned(),
            route: query.get("route").filter(|v| !v.is_empty()).cloned(),
        };
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let path = self.audit_path.clone();
        tokio::spawn(async move {
            tokio::pin!(stop);
            tokio::select! {
                _ = follow(path, filter, tx) => {}
                _ = &mut stop => {}
            }
        });
        let mut resp = Response::new(BoxBody::new(EventStream { rx }));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        secure_headers(h);
        resp
    }
}

/// Which audit lines a live tail shows.
struct Filter {
    agent: Option<String>,
    decision: Option<String>,
    route: Option<String>,
}

impl Filter {
    fn matches(&self, e: &AuditEvent) -> bool {
        self.agent
            .as_deref()
            .is_none_or(|a| e.agent.as_deref() == Some(a))
            && self
                .decision
                .as_deref()
                .is_none_or(|d| e.decision.as_str() == d)
            && self
                .route
                .as_deref()
                .is_none_or(|r| e.route.as_deref() == Some(r))
    }
}

/// Send the backlog, then poll the log for new lines (following rotation and truncation).
async fn follow(path: PathBuf, filter: Filter, tx: mpsc::Sender<Bytes>) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let backlog: Vec<AuditEvent> = recent_lines(&path, TAIL_BACKLOG * 20)
        .into_iter()
        .filter(|e| filter.matches(e))
        .collect();
    let skip = backlog.len().saturating_sub(TAIL_BACKLOG);
    for e in &backlog[skip..] {
        if tx.send(sse(e)).await.is_err() {
            return;
        }
    }
    let mut pos = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut partial = Vec::new();
    let mut beat = Instant::now();
    loop {
        tokio::time::sleep(TAIL_POLL).await;
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            // Rotated or truncated: the new file is read from its start.
            pos = 0;
            partial.clear();
        }
        if len > pos {
            let Ok(mut f) = tokio::fs::File::open(&path).await else {
                continue;
            };
            if f.seek(std::io::SeekFrom::Start(pos)).await.is_err() {
                continue;
            }
            let mut buf = Vec::new();
            if f.read_to_end(&mut buf).await.is_err() {
                continue;
            }
            pos += buf.len() as u64;
            partial.extend_from_slice(&buf);
            while let Some(nl) = partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = partial.drain(..=nl).collect();
                if let Ok(e) = serde_json::from_slice::<AuditEvent>(&line) {
                    if filter.matches(&e) && tx.send(sse(&e)).await.is_err() {
                        return;
                    }
                }
            }
        }
        if beat.elapsed() > Duration::from_secs(15) {
            beat = Instant::now();
            if tx
                .send(Bytes::from_static(b": keep-alive\n\n"))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

fn sse(e: &AuditEvent) -> Bytes {
    let json = serde_json::to_string(e).expect("an audit event serialises");
    Bytes::from(format!("data: {json}\n\n"))
}

/// The server-sent event stream's body.
struct EventStream {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// The last lines of the audit log (at most `max`), oldest first.
fn recent_lines(path: &Path, max: usize) -> Vec<AuditEvent> {
    use std::io::{Read, Seek};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BACKLOG_BYTES);
    if f.seek(std::io::SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(max);
    lines[skip..]
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn event_value(e: &AuditEvent) -> minijinja::Value {
    minijinja::Value::from_serialize(e)
}

/// Sessions issued on this host that have neither expired nor been revoked (none when the
/// sessions file cannot be read: the page says there are none rather than failing).
fn live_sessions(state_dir: &Path, revs: &Revocations) -> Vec<auth::sessions::SessionLine> {
    auth::sessions::live(state_dir, revs).unwrap_or_default()
}

fn rfc3339(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// SECURITY: a POST whose `Origin` names another site is refused (browsers send it on
/// cross-site posts); one without `Origin` (old clients, curl) still needs the CSRF token.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    origin == format!("http://{host}") || origin == format!("https://{host}")
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

async fn read_form<B>(body: B) -> Result<HashMap<String, String>, Response<UiBody>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, MAX_FORM).collect().await {
        Ok(c) => Ok(parse_form(&String::from_utf8_lossy(&c.to_bytes()))),
        Err(_) => Err(plain(StatusCode::PAYLOAD_TOO_LARGE, "form too large\n")),
    }
}

/// `a=1&b=x+y` (application/x-www-form-urlencoded) into a map; the last value of a key wins.
fn parse_form(s: &str) -> HashMap<String, String> {
    s.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn full(body: impl Into<Bytes>) -> UiBody {
    BoxBody::new(Full::new(body.into()))
}

fn html_response(status: StatusCode, html: String) -> Response<UiBody> {
    let mut r = Response::new(full(html));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure_headers(r.headers_mut());
    r
}

fn asset(content_type: &'static str, text: &'static str) -> Response<UiBody> {
    let mut r = Response::new(full(text));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    secure_headers(r.headers_mut());
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response<UiBody> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    secure_headers(r.headers_mut());
    r
}

fn redirect(to: &str) -> Response<UiBody> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    secure_headers(r.headers_mut());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_templates_parse() {
        let d = Dashboard::new(Path::new("/nonexistent"), Path::new("/nonexistent"), false);
        for (name, _) in TEMPLATES {
            assert!(d.env.get_template(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(same_secret("lka_abc", "lka_abc"));
        assert!(!same_secret("lka_abc", "lka_abd"));
        assert!(!same_secret("", "lka_abc"));
    }

    #[test]
    fn forms_decode_plus_and_percent_and_keep_bad_escapes() {
        let f = parse_form("a=1+2&b=%41%2f&c=%zz&d=%4");
        assert_eq!(f["a"], "1 2");
        assert_eq!(f["b"], "A/");
        assert_eq!(f["c"], "%zz");
        assert_eq!(f["d"], "%4");
        assert_eq!(decode(&encode("x y/é")), "x y/é");
    }

    #[test]
    fn a_cross_site_origin_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8081"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8081"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
    }
}
