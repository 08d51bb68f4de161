//! `--approval-webhook URL`: one JSON POST per pending approval, so a person hears about it
//! without watching a page (the `text` field is Slack-compatible).
//!
//! Fire and forget: each POST runs in a task of its own with a [`SEND_TIMEOUT`], so a slow or
//! dead receiver never delays the held request, its timeout, or the next announcement. The
//! payload names the agent, user, task, route and target, the body's digest and size: never a
//! body, a header, a query string, a secret or a token (the receiver is often a third party).

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::Pending;

/// Longest one POST may take, connecting included.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Most announcements in flight at once; beyond it, new ones are dropped with a warning
/// (the approval itself is unaffected and still listed).
const MAX_IN_FLIGHT: usize = 64;

/// Why the webhook URL cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--approval-webhook {0:?} must be an http:// or https:// URL")]
pub struct BadWebhook(pub String);

/// The webhook client.
pub struct Webhook {
    url: Uri,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a token of the receiver's (Slack hooks do): never printed.
        f.write_str("Webhook { .. }")
    }
}

impl Webhook {
    /// A client for `url` (system roots for https).
    pub fn try_new(url: &str) -> Result<Webhook, BadWebhook> {
        let parsed: Uri = url.parse().map_err(|_| BadWebhook(url.to_owned()))?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
            return Err(BadWebhook(url.to_owned()));
        }
        let tls = crate::tls::client_config(crate::tls::system_roots());
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(SEND_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Webhook {
            url: parsed,
            client: Client::builder(TokioExecutor::new()).build(https),
            in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// Announce `p` in the background.
    pub fn announce(&self, p: &Pending) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(approval = %p.id, "approval webhook busy; this announcement is dropped");
            return;
        };
        let body = serde_json::to_vec(&payload(p)).expect("a JSON value serialises");
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "latchkey")
            .body(Full::new(Bytes::from(body)));
        let Ok(req) = req else { return };
        let client = self.client.clone();
        let id = p.id.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(SEND_TIMEOUT, client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    tracing::debug!(approval = %id, "approval webhook delivered")
                }
                Ok(Ok(resp)) => {
                    tracing::warn!(approval = %id, status = resp.status().as_u16(), "approval webhook refused the announcement")
                }
                Ok(Err(e)) => tracing::warn!(approval = %id, error = %e, "approval webhook failed"),
                Err(_) => tracing::warn!(approval = %id, "approval webhook timed out"),
            }
        });
    }
}

/// The JSON announced for `p` (documented in the README).
pub fn payload(p: &Pending) -> serde_json::Value {
    let who = match &p.on_behalf_of {
        Some(u) => format!("{} (for {u})", p.agent),
        None => p.agent.clone(),
    };
    let expires = chrono::DateTime::from_timestamp(p.expires as i64, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    let task = p
        .task
        .as_deref()
        .map(|t| format!(" (task: {t})"))
        .unwrap_or_default();
    let command = format!("latchkey approvals approve {}", p.id);
    match (&p.request, &p.grant) {
        (Some(r), _) => serde_json::json!({
            "type": "approval_pending",
            "kind": "request",
            "id": p.id,
            "agent": p.agent,
            "on_behalf_of": p.on_behalf_of,
            "task": p.task,
            "session": r.session,
            "route": r.route,
            "method": r.method,
            "host": r.host,
            "path": r.path,
            "body_sha256": r.body_sha256,
            "body_bytes": r.body_bytes,
            "expires_at": expires,
            "approve_with": command,
            "text": format!(
                "latchkey: {who} wants to {} https://{}{} on route {}{task}; body {} bytes, sha256 {}. Approve with `{command}` or deny with `latchkey approvals deny {}` before {expires}.",
                r.method, r.host, r.path, r.route, r.body_bytes, &r.body_sha256[..12.min(r.body_sha256.len())], p.id
            ),
        }),
        (None, g) => {
            let routes = g.as_ref().map(|g| g.routes.clone()).unwrap_or_default();
            let ttl = g.as_ref().map_or(0, |g| g.ttl_secs);
            serde_json::json!({
                "type": "approval_pending",
                "kind": "session",
                "id": p.id,
                "agent": p.agent,
                "on_behalf_of": p.on_behalf_of,
                "task": p.task,
                "routes": routes,
                "ttl_secs": ttl,
                "expires_at": expires,
                "approve_with": command,
                "text": format!(
                    "latchkey: {who} asks for a session on {} for {}{task}. Approve with `{command}` or deny with `latchkey approvals deny {}` before {expires}.",
                    if routes.is_empty() { "every route".to_owned() } else { format!("routes {}", routes.join(", ")) },
                    humantime::format_duration(Duration::from_secs(ttl)),
                    p.id
                ),
            })
        }
    }
}
