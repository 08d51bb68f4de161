//! Human decisions: session grants (`approval = "session"`) and held requests
//! (`approval = "request"`), where they are kept, how a person decides them, and the audit
//! line of every step.
//!
//! One design for every decider (the CLI, the dashboard of any replica): a pending approval is
//! a 0600 JSON file in `<state-dir>/approvals/` and, with `--redis`, a Redis key; a decision is
//! written next to it, first writer wins (a hard link that fails if the file exists; `SET NX`
//! in Redis). The proxy that holds a request polls for the decision of what it holds (every
//! [`hold::POLL_EVERY`]), so a decision taken anywhere releases the request within a second.
//! The proxy writes every audit line (the CLI never touches the log, whose chain has one
//! writer): its own held requests directly, grants as its watcher first sees them, claimed so
//! that one replica writes each line once.
//!
//! `store` owns the files and keys, `hold` the proxy's side (held requests, the watcher), and
//! `notify` the webhook. This module never sees a secret value or a token: what it keeps of a
//! request is its method, host, path, query, redacted headers, a digest and a preview of the
//! body, and it does not import the proxy (the proxy imports it).

pub mod hold;
pub mod notify;
pub mod store;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::audit::{ApprovalFacts, AuditEvent, Decision as AuditDecision, Outcome};

pub use hold::{Holds, Released};
pub use store::{Store, StoreError};

/// What a pending approval asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One held request, bound to its method, host, path, query and body digest.
    Request,
    /// A session grant: a token for these routes, this long.
    Session,
}

impl Kind {
    /// `request` or `session`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Session => "session",
        }
    }
}

/// A pending approval, as approvers see it. Everything here may be shown to a person with
/// the admin token or state-dir access: no secret, no token, no credential header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// Random id (hex), unique; what `approvals approve ID` names.
    pub id: String,
    /// Grant or held request.
    pub kind: Kind,
    /// The agent asking.
    pub agent: String,
    /// The user the agent acts for.
    pub on_behalf_of: Option<String>,
    /// The task label.
    pub task: Option<String>,
    /// When it was asked (unix seconds).
    pub created: u64,
    /// When it stops waiting (unix seconds): a decision after this is refused.
    pub expires: u64,
    /// The replica holding the request (held requests only).
    #[serde(default)]
    pub replica: Option<String>,
    /// The held request (kind `request`).
    #[serde(default)]
    pub request: Option<HeldRequest>,
    /// The grant asked for (kind `session`).
    #[serde(default)]
    pub grant: Option<GrantAsk>,
}

/// What approvers see of a held request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldRequest {
    /// The request's id (its own audit line has it too).
    pub request_id: String,
    /// The session (token `jti`) the request came in.
    pub session: String,
    /// The route that matched.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// `host:port`.
    pub host: String,
    /// Normalised path.
    pub path: String,
    /// Query string as the agent sent it (before any credential is injected).
    pub query: Option<String>,
    /// The agent's headers, credential-bearing ones replaced by `[redacted]`.
    pub headers: Vec<(String, String)>,
    /// SHA-256 (hex) of the exact body that goes upstream if approved.
    pub body_sha256: String,
    /// Body length in bytes.
    pub body_bytes: u64,
    /// The first [`PREVIEW_BYTES`] of the body as text (invalid UTF-8 replaced), or a note
    /// saying why it is withheld.
    pub body_preview: String,
}

/// Bytes of a held body shown to approvers.
pub const PREVIEW_BYTES: usize = 4096;

/// A session grant's ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantAsk {
    /// Route ids the token would carry (empty: every route of the agent).
    pub routes: Vec<String>,
    /// Requested token lifetime in seconds.
    pub ttl_secs: u64,
    /// Every route id the grant could cover (the asked ones, or all of the agent's routes
    /// when none were named): what an approver may narrow to.
    #[serde(default)]
    pub offered: Vec<String>,
}

/// A person's (or the clock's) decision on one pending approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The pending approval decided.
    pub id: String,
    /// Approved or not.
    pub approve: bool,
    /// Who decided (`timeout` when the wait ran out).
    pub approver: String,
    /// Their reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// When (unix seconds).
    pub at: u64,
    /// Grants: the routes approved (a subset of those asked; `None` = as asked).
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    /// Grants: the lifetime approved in seconds (at most the one asked; `None` = as asked).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Held requests: also let this route through for this session for this many seconds.
    #[serde(default)]
    pub for_secs: Option<u64>,
    /// Nobody decided in time.
    #[serde(default)]
    pub timed_out: bool,
}

/// A route let through for one session for a while ("approve this route for this session
/// for N minutes").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowance {
    /// The session (token `jti`).
    pub session: String,
    /// The agent.
    pub agent: String,
    /// The route.
    pub route: String,
    /// Until when (unix seconds).
    pub until: u64,
    /// The approval that granted it.
    pub approval_id: String,
    /// Who granted it.
    pub approver: String,
}

/// Why a decision could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// No pending approval has this id (here or in Redis).
    #[error("no pending approval {0}; see `latchkey approvals list`")]
    Unknown(String),
    /// Somebody decided first.
    #[error("approval {id} was already {} by {by}", if *.approved { "approved" } else { "denied" })]
    AlreadyDecided {
        /// The approval.
        id: String,
        /// Whether it was approved.
        approved: bool,
        /// By whom.
        by: String,
    },
    /// It is past its wait.
    #[error("approval {0} has expired")]
    Expired(String),
    /// The narrowing asked for does not fit what was asked.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a person narrows what they approve.
#[derive(Debug, Clone, Default)]
pub struct Narrowing {
    /// Grants: only these routes (each must be among those asked).
    pub routes: Option<Vec<String>>,
    /// Grants: a shorter lifetime.
    pub ttl: Option<Duration>,
    /// Held requests: let this route through for this session for this long, too.
    pub for_duration: Option<Duration>,
}

/// Longest "this route for this session" a person can grant in one decision.
pub const MAX_FOR: Duration = Duration::from_secs(24 * 3600);

/// Whether `id` can name an approval (hex and dashes, at most 64 characters): ids become file
/// names, so nothing else is ever accepted.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A name for the audit log: printable, at most 64 characters (an approver name and a reason
/// are typed by people and shown back to agents and in terminals).
pub fn clean_text(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(max)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Decide a pending approval: check it exists, is not expired and that the narrowing fits
/// what was asked, then record the decision (first decider wins). Used by the CLI and the
/// dashboard alike.
pub async fn decide(
    store: &Store,
    id: &str,
    approve: bool,
    approver: &str,
    reason: Option<&str>,
    narrowing: &Narrowing,
) -> Result<Decision, DecideError> {
    if !valid_id(id) {
        return Err(DecideError::Unknown(id.to_owned()));
    }
    let pending = store
        .pending(id)
        .await?
        .ok_or_else(|| DecideError::Unknown(id.to_owned()))?;
    if let Some(d) = store.decision(id).await? {
        return Err(DecideError::AlreadyDecided {
            id: id.to_owned(),
            approved: d.approve,
            by: d.approver,
        });
    }
    let now = crate::auth::unix_now();
    if pending.expires <= now {
        return Err(DecideError::Expired(id.to_owned()));
    }
    let approver = clean_text(approver, 64);
    if approver.is_empty() {
        return Err(DecideError::Invalid("say who decides (--as NAME)".into()));
    }
    let mut decision = Decision {
        id: id.to_owned(),
        approve,
        approver,
        reason: reason.map(|r| clean_text(r, 200)).filter(|r| !r.is_empty()),
        at: now,
        routes: None,
        ttl_secs: None,
        for_secs: None,
        timed_out: false,
    };
    if approve {
        match (&pending.kind, &pending.grant) {
            (Kind::Session, Some(ask)) => {
                if narrowing.for_duration.is_some() {
                    return Err(DecideError::Invalid(
                        "--for applies to held requests; narrow a session grant with --routes and --ttl".into(),
                    ));
                }
                if let Some(routes) = &narrowing.routes {
                    if routes.is_empty() {
                        return Err(DecideError::Invalid(
                            "--routes must name at least one route (deny instead)".into(),
                        ));
                    }
                    let offered = if ask.offered.is_empty() {
                        &ask.routes
                    } else {
                        &ask.offered
                    };
                    if !offered.is_empty() {
                        if let Some(extra) = routes.iter().find(|r| !offered.contains(r)) {
                            return Err(DecideError::Invalid(format!(
                                "route {extra:?} was not asked for (asked: {})",
                                offered.join(", ")
                            )));
                        }
                    }
                    decision.routes = Some(routes.clone());
                }
                if let Some(ttl) = narrowing.ttl {
                    if ttl.as_secs() > ask.ttl_secs || ttl.as_secs() == 0 {
                        return Err(DecideError::Invalid(format!(
                            "--ttl may only shorten the {} s asked for",
                            ask.ttl_secs
                        )));
                    }
                    decision.ttl_secs = Some(ttl.as_secs());
                }
            }
            _ => {
                if narrowing.routes.is_some() || narrowing.ttl.is_some() {
                    return Err(DecideError::Invalid(
                        "--routes and --ttl narrow session grants; a held request is approved as it is".into(),
                    ));
                }
                if let Some(d) = narrowing.for_duration {
                    if d.is_zero() || d > MAX_FOR {
                        return Err(DecideError::Invalid(format!(
                            "--for must be between 1 s and {} h",
                            MAX_FOR.as_secs() / 3600
                        )));
                    }
                    decision.for_secs = Some(d.as_secs());
                }
            }
        }
    }
    match store.decide(&decision).await? {
        None => Ok(decision),
        Some(first) => Err(DecideError::AlreadyDecided {
            id: id.to_owned(),
            approved: first.approve,
            by: first.approver,
        }),
    }
}

/// One step in an approval's life, as its audit line names it (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The approval was asked for (a request held, a grant requested).
    Requested,
    /// A person approved.
    Approved,
    /// A person denied.
    Denied,
    /// Nobody decided in time.
    TimedOut,
    /// The agent went away while its request was held.
    Cancelled,
}

impl Step {
    /// The line's `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Step::Requested => "approval_requested",
            Step::Approved => "approved",
            Step::Denied => "approval_denied",
            Step::TimedOut => "approval_timeout",
            Step::Cancelled => "approval_cancelled",
        }
    }

    /// The step a decision is.
    pub fn of(d: &Decision) -> Step {
        match (d.approve, d.timed_out) {
            (true, _) => Step::Approved,
            (false, true) => Step::TimedOut,
            (false, false) => Step::Denied,
        }
    }

    /// Short name used for claims and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Requested => "requested",
            Step::Approved => "approved",
            Step::Denied => "denied",
            Step::TimedOut => "timeout",
            Step::Cancelled => "cancelled",
        }
    }
}

/// What the person approved (or was asked to), in words for the audit line.
pub fn approved_text(p: &Pending, d: Option<&Decision>) -> String {
    match (&p.request, &p.grant) {
        (Some(r), _) => match d.and_then(|d| d.for_secs) {
            Some(secs) => format!(
                "this request, and route {} for session {} for {}",
                r.route,
                r.session,
                humantime::format_duration(Duration::from_secs(secs))
            ),
            None => "this request".to_owned(),
        },
        (None, Some(g)) => {
            let routes = d.and_then(|d| d.routes.clone()).unwrap_or(g.routes.clone());
            let ttl = d.and_then(|d| d.ttl_secs).unwrap_or(g.ttl_secs);
            format!(
                "session for {} for {}",
                if routes.is_empty() {
                    "every route".to_owned()
                } else {
                    format!("routes {}", routes.join(","))
                },
                humantime::format_duration(Duration::from_secs(ttl))
            )
        }
        (None, None) => String::new(),
    }
}

/// The audit line of one step of `p` (with the decision, when the step is one).
pub fn audit_event(p: &Pending, step: Step, d: Option<&Decision>) -> AuditEvent {
    let now = chrono::Utc::now();
    let waited = (now.timestamp() as u64).saturating_sub(p.created) as f64 * 1000.0;
    let (request_id, session, route, method, host, path, digest) = match (&p.request, &p.grant) {
        (Some(r), _) => (
            r.request_id.clone(),
            Some(r.session.clone()),
            Some(r.route.clone()),
            r.method.clone(),
            r.host.clone(),
            r.path.clone(),
            Some(r.body_sha256.clone()),
        ),
        (None, g) => (
            p.id.clone(),
            None,
            g.as_ref()
                .map(|g| g.routes.join(","))
                .filter(|r| !r.is_empty()),
            "GRANT".to_owned(),
            String::new(),
            String::new(),
            None,
        ),
    };
    let outcome = match step {
        Step::Requested => None,
        Step::Approved => Some(Outcome::Ok),
        Step::Denied | Step::TimedOut => Some(Outcome::Denied),
        Step::Cancelled => Some(Outcome::Cancelled),
    };
    AuditEvent {
        ts: now,
        request_id,
        agent: Some(p.agent.clone()),
        on_behalf_of: p.on_behalf_of.clone(),
        session,
        task: p.task.clone(),
        route,
        credential: None,
        credential_kind: None,
        credential_detail: None,
        decision: if step == Step::Approved {
            AuditDecision::Allow
        } else {
            AuditDecision::Deny
        },
        outcome,
        reason: Some(step.reason().to_owned()),
        replica: None,
        method,
        host,
        path,
        status: None,
        duration_ms: if step == Step::Requested { 0.0 } else { waited },
        ttfb_ms: None,
        bytes_up: None,
        bytes_down: None,
        approval: ApprovalFacts {
            kind: Some("approval".to_owned()),
            approval_id: Some(p.id.clone()),
            approver: match step {
                Step::Requested => None,
                Step::Cancelled => Some("agent".to_owned()),
                _ => d.map(|d| d.approver.clone()),
            },
            approved: Some(approved_text(p, d)),
            body_sha256: digest,
        },
    }
}

#[cfg(test)]
mod tests;
