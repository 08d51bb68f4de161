//! The approval stage of one request (`approval = "request"` on its route), between `admit`
//! and the credential: read the agent's body (bounded), show approvers what exactly would go
//! out, hold the request until a person decides, and hand back the very bytes that were
//! approved.
//!
//! SECURITY: the approval is bound to the request: its method, host, path and query are
//! fixed by the time it is held, and the body is read whole before anyone sees it, digested,
//! and sent upstream from that buffer, so an agent cannot change what goes out after the
//! approval. Each held request gets its own approval: a re-send, identical or not, is held
//! again, unless a person let the route through for the session for a while. What approvers
//! see never holds a credential header (the agent's `Authorization`, `x-api-key`, cookies:
//! `[redacted]`), and a body preview is withheld when the tripwire finds a credential in it.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use super::request::Ctx;
use super::Shared;
use crate::approval::{self, HeldRequest, Kind, Pending, Released};
use crate::audit::ApprovalFacts;
use crate::deny::Deny;
use crate::policy::{Allowed, Approval};

/// Largest body held for approval on a route that sets no `max_body`: the body is kept in
/// memory until someone decides, so the proxy-wide default (1 GiB) is far too much.
pub const DEFAULT_HELD_BODY: u64 = 1 << 20;

/// How long the agent has to send the whole body of a request that must be approved.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Hold the request when its route needs a person's approval. `Ok(None)`: no approval needed
/// (or the route is let through for this session), the agent's body streams as usual.
/// `Ok(Some(body))`: approved; `body` is exactly what was approved and what must go upstream.
pub async fn gate(
    shared: &Shared,
    ctx: &mut Ctx,
    allowed: &Allowed,
    parts: &Parts,
    body: &mut Option<Incoming>,
    limit: u64,
) -> Result<Option<Bytes>, Deny> {
    if allowed.route().approval() != Approval::Request {
        return Ok(None);
    }
    // Boxed: what a held request waits on (the approval store, a person) is several KiB of
    // state that every request's future would otherwise carry, approval route or not.
    Box::pin(held(shared, ctx, allowed, parts, body, limit)).await
}

/// The request on an approval route: allowed by an earlier approval for its session and
/// route, or held until a person decides.
async fn held(
    shared: &Shared,
    ctx: &mut Ctx,
    allowed: &Allowed,
    parts: &Parts,
    body: &mut Option<Incoming>,
    limit: u64,
) -> Result<Option<Bytes>, Deny> {
    let route = allowed.route();
    let holds = &shared.holds;
    let session = ctx.claims.jti.as_str();
    if let Some(a) = holds.allowed(session, route.id()).await {
        ctx.rec.approval(ApprovalFacts {
            approval_id: Some(a.approval_id),
            approver: Some(a.approver),
            approved: Some(format!("route {} for this session", a.route)),
            ..Default::default()
        });
        return Ok(None);
    }
    let slot = holds
        .reserve(&ctx.claims.sub)
        .ok_or(Deny::ApprovalQueueFull(holds.queue()))?;
    let limit = route.max_body().unwrap_or(DEFAULT_HELD_BODY).min(limit);
    let agent_body = body.take().expect("the agent's body is read once");
    let bytes = read_whole(agent_body, limit).await?;
    let digest = hex::encode(Sha256::digest(&bytes));
    let now = crate::auth::unix_now();
    let id = approval::store::new_id(Kind::Request);
    let preview = if shared.tripwire.load().find(&bytes, None).is_some() {
        "[withheld: the body carries what looks like a credential]".to_owned()
    } else {
        let end = bytes.len().min(approval::PREVIEW_BYTES);
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    };
    let pending = Pending {
        id: id.clone(),
        kind: Kind::Request,
        agent: ctx.claims.sub.clone(),
        on_behalf_of: ctx.claims.obo.clone(),
        task: ctx.claims.task.clone(),
        created: now,
        expires: now + holds.timeout().as_secs().max(1),
        replica: Some(holds.replica().to_owned()),
        request: Some(HeldRequest {
            request_id: ctx.rec.request_id().to_owned(),
            session: session.to_owned(),
            route: route.id().to_owned(),
            method: parts.method.to_string(),
            host: ctx.authority.to_string(),
            path: ctx.rec.path.clone(),
            query: parts.uri.query().map(str::to_owned),
            headers: shown_headers(&parts.headers),
            body_sha256: digest.clone(),
            body_bytes: bytes.len() as u64,
            body_preview: preview,
        }),
        grant: None,
    };
    ctx.rec.approval(ApprovalFacts {
        approval_id: Some(id.clone()),
        body_sha256: Some(digest.clone()),
        ..Default::default()
    });
    let released = holds.hold(pending, slot).await.map_err(|e| {
        tracing::error!(error = %e, "cannot record a held request; refusing it");
        Deny::StateUnavailable
    })?;
    let facts = |d: &approval::Decision| ApprovalFacts {
        approval_id: Some(id.clone()),
        approver: Some(d.approver.clone()),
        approved: d.approve.then(|| match d.for_secs {
            Some(s) => format!(
                "this request, and route {} for this session for {}",
                route.id(),
                humantime::format_duration(Duration::from_secs(s))
            ),
            None => "this request".to_owned(),
        }),
        body_sha256: Some(digest.clone()),
        ..Default::default()
    };
    match released {
        Released::Approved(d) => {
            ctx.rec.approval(facts(&d));
            Ok(Some(bytes))
        }
        Released::Denied(d) => {
            ctx.rec.approval(facts(&d));
            Err(Deny::ApprovalDenied {
                approver: d.approver,
                reason: d.reason,
            })
        }
        Released::TimedOut(d) => {
            ctx.rec.approval(facts(&d));
            Err(Deny::ApprovalTimeout(holds.timeout().as_secs()))
        }
    }
}

/// The whole body, at most `limit` bytes, within [`BODY_READ_TIMEOUT`]. Trailers are not
/// kept (a held request goes out with its body only).
async fn read_whole(mut body: Incoming, limit: u64) -> Result<Bytes, Deny> {
    let read = async {
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| Deny::BadBody)?;
            if let Ok(data) = frame.into_data() {
                if (buf.len() + data.len()) as u64 > limit {
                    return Err(Deny::BodyTooLarge(limit));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .map_err(|_| Deny::BadBody)?
}

/// Header names whose values are credentials or session material: never shown.
fn is_sensitive(name: &str) -> bool {
    const WORDS: &[&str] = &[
        "auth",
        "token",
        "key",
        "secret",
        "cookie",
        "session",
        "signature",
        "password",
        "credential",
    ];
    WORDS.iter().any(|w| name.contains(w))
}

/// The agent's headers as approvers see them: credential-bearing values `[redacted]`,
/// control characters dropped, long values cut.
pub fn shown_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            let name = k.as_str().to_owned();
            let value = if is_sensitive(&name) {
                "[redacted]".to_owned()
            } else {
                approval::clean_text(&String::from_utf8_lossy(v.as_bytes()), 256)
            };
            (name, value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_headers_are_never_shown_to_approvers() {
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer sk-live-123"),
            ("proxy-authorization", "Basic YWdlbnQ6dG9r"),
            ("x-api-key", "k-123"),
            ("api-key", "k-456"),
            ("cookie", "sid=1"),
            ("x-auth-token", "t"),
            ("x-amz-security-token", "t"),
            ("content-type", "application/json"),
        ] {
            h.insert(
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            );
        }
        let shown = shown_headers(&h);
        let text = format!("{shown:?}");
        for secret in ["sk-live", "YWdlbnQ", "k-123", "k-456", "sid=1"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(shown.contains(&("content-type".into(), "application/json".into())));
        assert_eq!(
            shown.iter().filter(|(_, v)| v == "[redacted]").count(),
            7,
            "{shown:?}"
        );
    }
}
