//! The open audit record of one request: opened when the request arrives, completed exactly
//! once when its life ends, on every path.
//!
//! Completion is structural, not a convention: [`Record`]'s `Drop` completes a record nobody
//! finished as `cancelled` (the agent closed its socket or reset its stream, and hyper dropped
//! the handler or the response body), and [`Record::finish`] consumes the record. The proxy
//! moves an answered request's record into the response body wrapper, which finishes it at the
//! end of the stream with the byte counts; no `return` can forget the audit line.
//!
//! Completing writes the line (through [`AuditSink::record_now`], which never waits and never
//! drops), counts it in the metrics and logs one operator line (`debug` for a request served to
//! its end, `info` for the rest), so the three always agree.
//! Like the rest of `audit`, a record holds names, never a secret value or a token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;

use super::event::{ApprovalFacts, AuditEvent, Decision, Outcome};
use super::sink::AuditSink;
use crate::metrics::Metrics;

/// Opens records: the sink, the metrics and this replica's name, shared by every request.
pub struct Recorder {
    sink: AuditSink,
    metrics: Arc<Metrics>,
    replica: String,
}

impl Recorder {
    /// A recorder writing to `sink`, counting in `metrics`, naming `replica` in every line.
    pub fn new(sink: AuditSink, metrics: Arc<Metrics>, replica: String) -> Recorder {
        Recorder {
            sink,
            metrics,
            replica,
        }
    }

    /// The sink lines go to (for backpressure: [`AuditSink::ready`]).
    pub fn sink(&self) -> &AuditSink {
        &self.sink
    }

    /// Open the record of a request that just arrived.
    pub fn open(self: &Arc<Self>, method: &Method, host: String, path: String) -> Record {
        self.open_raw(method.as_str(), host, path)
    }

    /// Open the record of a request whose method is not known as an `http::Method` (a head
    /// that could not be parsed: `-`).
    pub fn open_raw(self: &Arc<Self>, method: &str, host: String, path: String) -> Record {
        Record {
            recorder: Arc::clone(self),
            request_id: crate::auth::new_id(),
            received: chrono::Utc::now(),
            start: Instant::now(),
            who: Who::default(),
            method: method.to_owned(),
            host,
            path,
            route: None,
            credential: None,
            credential_kind: None,
            credential_detail: None,
            sent: false,
            status: None,
            ttfb: None,
            bytes_up: None,
            bytes_down: 0,
            reason: None,
            approval: Default::default(),
            done: false,
        }
    }

    /// Write a line that is not a request's: a human decision (grant asked, approved,
    /// denied, timed out, cancelled). It takes its place in the same hash chain, never waits
    /// and is never dropped; `replica` is filled in here.
    pub fn note(&self, mut event: AuditEvent) {
        event.replica = Some(self.replica.clone());
        tracing::info!(
            agent = event.agent.as_deref().unwrap_or("-"),
            approval_id = event.approval.approval_id.as_deref().unwrap_or("-"),
            approver = event.approval.approver.as_deref().unwrap_or("-"),
            reason = event.reason.as_deref().unwrap_or("-"),
            "approval"
        );
        self.sink.record_now(event);
    }
}

/// Who asked: filled in as soon as the token is known (also for an expired token we signed).
#[derive(Debug, Default, Clone)]
pub struct Who {
    /// The token's `sub`.
    pub agent: Option<String>,
    /// The token's `obo`.
    pub obo: Option<String>,
    /// The token's `jti`.
    pub session: Option<String>,
    /// The token's `task`.
    pub task: Option<String>,
}

/// A count of request body bytes, shared with the body wrapper that forwards them (which may
/// live on in the upstream client after the handler is gone).
pub type ByteCount = Arc<AtomicU64>;

/// The facts of one request as they become known; completes exactly once (see the module
/// docs). Fields are the line's fields; the setters record milestones.
pub struct Record {
    recorder: Arc<Recorder>,
    request_id: String,
    received: chrono::DateTime<chrono::Utc>,
    start: Instant,
    /// Who asked.
    pub who: Who,
    method: String,
    /// Target authority as it is known (the checked form once parsed).
    pub host: String,
    /// Request path (normalised once policy saw it), never the query.
    pub path: String,
    route: Option<String>,
    credential: Option<String>,
    credential_kind: Option<&'static str>,
    credential_detail: Option<String>,
    /// The request went upstream: `decision: allow`.
    sent: bool,
    status: Option<u16>,
    ttfb: Option<Duration>,
    bytes_up: Option<ByteCount>,
    bytes_down: u64,
    /// Why the request is being refused, known before the refusal is sent (so a line
    /// completed on drop while the refusal waits still says why).
    reason: Option<&'static str>,
    /// The approval this request was held for (id, body digest), when its route needs one.
    approval: ApprovalFacts,
    done: bool,
}

impl Record {
    /// The request id (also sent to the agent as `x-latchkey-request-id`).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The route that matched and the name of its credential (if it has one).
    pub fn matched(&mut self, route: &str, credential: Option<&str>) {
        self.route = Some(route.to_owned());
        self.credential = credential.map(str::to_owned);
    }

    /// The kind of the credential put on the request, and what the kind says about that use
    /// (never a value).
    pub fn credential_used(&mut self, kind: &'static str, detail: Option<String>) {
        self.credential_kind = Some(kind);
        self.credential_detail = detail;
    }

    /// Whether the request (with its credential, if any) went upstream: `true` as it is
    /// handed to the upstream connection, so the decision is `allow` whatever happens next
    /// (the agent going away included); `false` again only when connecting failed, which
    /// proves nothing went out.
    pub fn set_sent(&mut self, sent: bool) {
        self.sent = sent;
    }

    /// Whether the request went upstream (see [`Record::set_sent`]).
    pub fn is_sent(&self) -> bool {
        self.sent
    }

    /// A counter for the request body bytes that go upstream.
    pub fn count_up(&mut self) -> ByteCount {
        let count = ByteCount::default();
        self.bytes_up = Some(Arc::clone(&count));
        count
    }

    /// The response head went to the agent with `status`.
    pub fn responded(&mut self, status: u16) {
        self.status = Some(status);
        self.ttfb = Some(self.start.elapsed());
    }

    /// The request was held for approval `id` with a body of digest `body_sha256`; `approver`
    /// and `approved` once a person decided.
    pub fn approval(&mut self, facts: ApprovalFacts) {
        self.approval = facts;
    }

    /// `n` more response body bytes went to the agent.
    pub fn delivered(&mut self, n: u64) {
        self.bytes_down += n;
    }

    /// Complete the record: how the request ended and, unless it ended well, why (a stable
    /// reason code). Consumes the record, so it cannot complete twice.
    pub fn finish(mut self, outcome: Outcome, reason: Option<&'static str>) {
        self.complete(outcome, reason);
    }

    fn complete(&mut self, outcome: Outcome, reason: Option<&'static str>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let reason = reason.or(self.reason);
        let duration = self.start.elapsed();
        let decision = if self.sent {
            Decision::Allow
        } else {
            Decision::Deny
        };
        let recorder = &*self.recorder;
        recorder.metrics.record_request(
            self.who.agent.as_deref(),
            self.route.as_deref(),
            decision.as_str(),
            outcome.as_str(),
            reason.unwrap_or(""),
        );
        let duration_ms = duration.as_secs_f64() * 1000.0;
        // The operator line. A request served to its end (and a 407 challenge, the first step
        // of clients that send credentials only when asked) is `debug`: the audit log already
        // has every request, and formatting and writing a second line on the request task
        // costs the proxy about a tenth of its CPU per request. What an operator acts on
        // (refusals, upstream failures, broken bodies, cancellations) stays at `info`.
        macro_rules! request_line {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    request_id = %self.request_id,
                    agent = self.who.agent.as_deref().unwrap_or("-"),
                    method = %self.method,
                    host = %self.host,
                    status = self.status.unwrap_or(0),
                    route = self.route.as_deref().unwrap_or("-"),
                    outcome = outcome.as_str(),
                    reason = reason.unwrap_or("-"),
                    ms = format_args!("{duration_ms:.2}"),
                    "request"
                )
            };
        }
        if matches!(outcome, Outcome::Ok | Outcome::Challenged) {
            request_line!(tracing::Level::DEBUG);
        } else {
            request_line!(tracing::Level::INFO);
        }
        let who = std::mem::take(&mut self.who);
        recorder.sink.record_now(AuditEvent {
            ts: self.received,
            request_id: std::mem::take(&mut self.request_id),
            agent: who.agent,
            on_behalf_of: who.obo,
            session: who.session,
            task: who.task,
            route: self.route.take(),
            credential: self.credential.take(),
            credential_kind: self.credential_kind.map(str::to_owned),
            credential_detail: self.credential_detail.take(),
            decision,
            outcome: Some(outcome),
            reason: reason.map(str::to_owned),
            replica: Some(recorder.replica.clone()),
            method: std::mem::take(&mut self.method),
            host: std::mem::take(&mut self.host),
            path: std::mem::take(&mut self.path),
            status: self.status,
            duration_ms,
            ttfb_ms: self.ttfb.map(|t| t.as_secs_f64() * 1000.0),
            bytes_up: Some(
                self.bytes_up
                    .as_ref()
                    .map_or(0, |c| c.load(Ordering::Acquire)),
            ),
            bytes_down: Some(self.bytes_down),
            approval: std::mem::take(&mut self.approval),
        });
    }
}

impl Drop for Record {
    /// Nobody finished the record: the future or body that held it was dropped, which is
    /// what happens when the agent goes away. SECURITY: this is the line a cancelling agent
    /// cannot escape.
    fn drop(&mut self) {
        self.complete(Outcome::Cancelled, None);
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("request_id", &self.request_id)
            .field("who", &self.who)
            .field("method", &self.method)
            .field("host", &self.host)
            .field("path", &self.path)
            .field("route", &self.route)
            .field("sent", &self.sent)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn recorder(dir: &tempfile::TempDir) -> (Arc<Recorder>, super::super::AuditWriter) {
        let (sink, writer) = AuditSink::open(&dir.path().join("audit.jsonl"))
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        (Arc::new(Recorder::new(sink, metrics, "r1".into())), writer)
    }

    fn lines(dir: &tempfile::TempDir) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.path().join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_dropped_record_is_written_once_as_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, writer) = recorder(&dir).await;
        let mut r = rec.open(&Method::POST, "h:443".into(), "/x".into());
        r.who.agent = Some("bot".into());
        r.matched("write", Some("gh"));
        r.set_sent(true);
        drop(r);
        drop(rec);
        writer.shutdown().await.unwrap();
        let l = lines(&dir);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0]["outcome"], "cancelled");
        assert_eq!(l[0]["decision"], "allow");
        assert_eq!(l[0]["agent"], "bot");
        assert_eq!(l[0]["credential"], "gh");
        assert!(l[0]["status"].is_null());
        assert!(l[0]["ttfb_ms"].is_null());
    }

    #[tokio::test]
    async fn a_finished_record_is_written_once_with_its_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, writer) = recorder(&dir).await;
        let mut r = rec.open(&Method::PUT, "h:443".into(), "/x".into());
        r.count_up().fetch_add(7, Ordering::Release);
        r.set_sent(true);
        r.responded(201);
        r.delivered(5);
        r.delivered(6);
        r.finish(Outcome::Ok, None);
        drop(rec);
        writer.shutdown().await.unwrap();
        let l = lines(&dir);
        assert_eq!(l.len(), 1, "{l:?}");
        assert_eq!(l[0]["outcome"], "ok");
        assert_eq!(l[0]["status"], 201);
        assert_eq!(l[0]["bytes_up"], 7);
        assert_eq!(l[0]["bytes_down"], 11);
        assert!(l[0]["ttfb_ms"].is_number());
        assert_eq!(l[0]["replica"], "r1");
    }

    #[tokio::test]
    async fn a_full_queue_spills_over_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, writer) = AuditSink::open_with_capacity(&dir.path().join("audit.jsonl"), 1)
            .await
            .unwrap();
        let rec = Arc::new(Recorder::new(sink, Arc::default(), "r".into()));
        // Completed from plain threads (no runtime, no waiting): the queue of one is full
        // almost at once, and everything else goes through the overflow queue.
        std::thread::scope(|s| {
            for t in 0..4 {
                let rec = &rec;
                s.spawn(move || {
                    for i in 0..500 {
                        let r = rec.open(&Method::GET, "h".into(), format!("/{t}/{i}"));
                        r.finish(Outcome::Ok, None);
                    }
                });
            }
        });
        drop(rec);
        writer.shutdown().await.unwrap();
        let l = lines(&dir);
        assert_eq!(l.len(), 2000);
        let mut paths: Vec<&str> = l.iter().map(|v| v["path"].as_str().unwrap()).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), 2000);
        crate::audit::verify(&dir.path().join("audit.jsonl")).unwrap();
    }
}
