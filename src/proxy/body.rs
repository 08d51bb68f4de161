//! Bodies on the way through: the agent's request body going up (cut off at the route's
//! limit, counted, its trailers filtered like its head), every response going down to the
//! agent (counted, and carrying the request's audit record to the end of the stream), the
//! idle timeout on both, and the unread rest of a refused request's body.
//!
//! Every wrapper reports `is_end_stream` truthfully, before its first poll too: hyper's
//! HTTP/2 server puts END_STREAM on the HEADERS frame only when the body says it has ended,
//! and gRPC's trailers-only answers depend on it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http_body_util::BodyExt;

use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::forward::BoxError;
use crate::audit::record::ByteCount;
use crate::audit::{Outcome, Record};
use crate::inject;
use crate::tripwire::{BodyScan, Hit};

/// A body that keeps `guard` (a slot counted against a cap) alive until it ends or is
/// dropped: a request counts as in flight while its answer is still streaming.
pub struct Holding<B, G> {
    inner: B,
    _guard: G,
}

impl<B, G> Holding<B, G> {
    /// Hold `guard` for as long as `inner` lives.
    pub fn new(inner: B, guard: G) -> Holding<B, G> {
        Holding {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for Holding<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that ends with an [`IdleTimeout`] error when its sender goes silent for longer than
/// `idle` while it is being waited on (`--upstream-idle-timeout`, a route's `idle_timeout`).
/// The clock runs only while the reader waits on the inner body: a reader that is slow itself
/// (backpressure) never makes the sender look idle.
pub struct IdleBody<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

/// The error an [`IdleBody`] ends with.
#[derive(Debug, thiserror::Error)]
#[error("no body bytes for {0:?}")]
pub struct IdleTimeout(pub Duration);

impl<B> IdleBody<B> {
    /// Wrap `inner`, allowing `idle` between its frames.
    pub fn new(inner: B, idle: Duration) -> IdleBody<B> {
        IdleBody {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            armed: false,
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(polled) => {
                this.armed = false;
                Poll::Ready(polled.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.armed {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.timer.as_mut().reset(deadline);
                    this.armed = true;
                }
                match std::future::Future::poll(this.timer.as_mut(), cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeout(this.idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Body of every response latchkey sends to an agent, before [`AuditedBody`] wraps it.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// What happened to the agent's request body, read after a failed upstream exchange to say
/// whose fault it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpState {
    /// Nothing wrong (yet).
    Ok,
    /// The body went past the route's limit and was cut off.
    OverLimit,
    /// The agent's body broke (bad chunked framing, reset).
    Broken,
    /// The body (or a trailer) carried a credential and was cut off before it went up.
    Exfiltration(Hit),
}

/// The agent's request body, cut off with an error once it exceeds the route's limit (for
/// bodies whose size was not announced) or carries a credential (the exfiltration tripwire,
/// when the route scans), counting the bytes that go upstream, with its trailers filtered by
/// the same rules as its head (`inject::strip_request_trailers`).
pub struct LimitedBody<B = Incoming> {
    /// `None` once the body was cut off and its rest was handed to [`discard`].
    inner: Option<B>,
    left: u64,
    state: Arc<StateCell>,
    sent: ByteCount,
    /// The header the route injects: never accepted from the agent, in a trailer either.
    injected: Option<HeaderName>,
    /// The tripwire's scanner, holding back the tail of each chunk.
    scan: Option<BodyScan>,
    /// Trailers that arrived while bytes were held: sent after them.
    trailers: Option<HeaderMap>,
    /// The inner body ended (its held tail may still be going out).
    ended: bool,
}

/// Why an agent's body was cut off.
#[derive(Debug, thiserror::Error)]
enum CutOff {
    #[error("the request body exceeds the route's limit")]
    OverLimit,
    #[error("the request body carries a credential")]
    Credential,
}

#[derive(Default)]
struct StateCell {
    code: AtomicU8,
    hit: std::sync::OnceLock<Hit>,
}

impl<B> LimitedBody<B> {
    /// Wrap `inner`, allowing `limit` bytes and counting them into `sent`; `injected` is the
    /// header the route injects (dropped from trailers); `scan` searches the body for
    /// credentials. The second value reads the body's [`UpState`] later.
    pub fn new(
        inner: B,
        limit: u64,
        sent: ByteCount,
        injected: Option<HeaderName>,
        scan: Option<BodyScan>,
    ) -> (LimitedBody<B>, UpStateHandle) {
        let state = Arc::new(StateCell::default());
        let handle = UpStateHandle(state.clone());
        (
            LimitedBody {
                inner: Some(inner),
                left: limit,
                state,
                sent,
                injected,
                scan,
                trailers: None,
                ended: false,
            },
            handle,
        )
    }
}

/// Reads a [`LimitedBody`]'s state after the body itself moved into the upstream client.
pub struct UpStateHandle(Arc<StateCell>);

impl UpStateHandle {
    /// What happened to the body so far.
    pub fn get(&self) -> UpState {
        match self.0.code.load(Ordering::Acquire) {
            1 => UpState::OverLimit,
            2 => UpState::Broken,
            3 => self
                .0
                .hit
                .get()
                .cloned()
                .map_or(UpState::Ok, UpState::Exfiltration),
            _ => UpState::Ok,
        }
    }
}

/// What [`LimitedBody::poll_frame`] returns.
type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

impl<B: Body + Unpin + Send + 'static> LimitedBody<B> {
    /// Stop reading: hand the rest to [`discard`] (so the agent is still sending into an open
    /// stream when its refusal arrives: a client whose HTTP/2 stream is reset mid-upload may
    /// lose the answer) and end with an error. SECURITY: an error (not an early end) aborts
    /// the upstream request, so the upstream never takes a truncated body for a complete one.
    fn cut_off(&mut self, why: CutOff) -> Polled {
        if let (Some(rest), Ok(rt)) = (self.inner.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(discard(rest));
        }
        self.trailers = None;
        self.scan = None;
        Poll::Ready(Some(Err(Box::new(why))))
    }

    fn tripped(&mut self, hit: Hit) -> Polled {
        let _ = self.state.hit.set(hit);
        self.state.code.store(3, Ordering::Release);
        self.cut_off(CutOff::Credential)
    }

    fn held(&self) -> usize {
        self.scan.as_ref().map_or(0, BodyScan::held)
    }

    fn release(&mut self, data: Bytes) -> Polled {
        self.sent.fetch_add(data.len() as u64, Ordering::Release);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                // The held tail goes out (once decided), then the trailers, then the end.
                if let Some(scan) = this.scan.as_mut() {
                    let tail = scan.finish();
                    this.scan = None;
                    match tail {
                        Ok(tail) if !tail.is_empty() => return this.release(tail),
                        Ok(_) => {}
                        Err(hit) => return this.tripped(hit),
                    }
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                    let mut trailers = frame
                        .into_trailers()
                        .expect("a frame that is_trailers is trailers");
                    // SECURITY: the head was cleaned in `inject::apply`; a trailer must not
                    // bring back what was removed there (the agent's credential, the token,
                    // `Host`).
                    inject::strip_request_trailers(&mut trailers, this.injected.as_ref());
                    if let Some(scan) = this.scan.as_ref() {
                        if let Some(hit) = trailers.values().find_map(|v| scan.find(v.as_bytes())) {
                            return this.tripped(hit);
                        }
                    }
                    this.trailers = Some(trailers);
                    this.ended = true;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let len = data.len() as u64;
                    if len > this.left {
                        this.state.code.store(1, Ordering::Release);
                        return this.cut_off(CutOff::OverLimit);
                    }
                    this.left -= len;
                    let data = match this.scan.as_mut() {
                        None => data,
                        Some(scan) => match scan.push(data) {
                            Ok(data) => data,
                            Err(hit) => return this.tripped(hit),
                        },
                    };
                    // A chunk held back whole: read on (the inner body registered no waker).
                    if data.is_empty() && len > 0 {
                        continue;
                    }
                    return this.release(data);
                }
                Poll::Ready(Some(Err(e))) => {
                    this.state.code.store(2, Ordering::Release);
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let nothing_held = self.trailers.is_none() && self.held() == 0;
        nothing_held && (self.ended || self.inner.as_ref().is_none_or(Body::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        // The scan holds bytes back but never adds or drops any: what is left is the inner
        // body's rest plus what is held.
        let rest = match (&self.inner, self.ended) {
            (Some(inner), false) => inner.size_hint(),
            _ => SizeHint::with_exact(0),
        };
        let held = self.held() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + held);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// Read (and throw away) what is left of an agent's body whose request was refused, bounded
/// in bytes and time, alongside the refusal (never before it): a client still writing its
/// upload reads the answer only once it has finished writing, and dropping an unread body
/// early closes its connection (HTTP/1.1) or resets its stream (HTTP/2) under it. Past the
/// bound the body is dropped: a refused upload larger than this may still see its
/// connection closed before it reads the answer, but no agent makes latchkey read without end.
pub async fn discard<B: Body + Unpin>(mut body: B) {
    const DISCARD_BYTES: usize = 32 << 20;
    const DISCARD_TIME: Duration = Duration::from_secs(10);
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        let mut read = 0;
        while read < DISCARD_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.remaining()),
                _ => break,
            }
        }
    })
    .await;
}

/// Every response body an agent receives. For an answered request it owns the request's
/// audit record and completes it when the stream ends (`ok`), breaks (`body_error`), or is
/// dropped unfinished because the agent went away (`cancelled`, by the record's own `Drop`),
/// counting the bytes handed to the agent's connection on the way.
pub struct AuditedBody {
    inner: ProxyBody,
    record: Option<Record>,
}

impl AuditedBody {
    /// A body whose request's record was already completed (refusals: the JSON is tiny and
    /// the line says what was sent).
    pub fn done(inner: ProxyBody) -> AuditedBody {
        AuditedBody {
            inner,
            record: None,
        }
    }

    /// This body, keeping `guard` (the agent's unread request body) alive until it ends or is
    /// dropped: the request's stream is not reset before its refusal has been sent.
    pub fn holding(mut self, guard: Incoming) -> AuditedBody {
        let inner = std::mem::replace(
            &mut self.inner,
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        AuditedBody {
            inner: Holding::new(inner, guard).boxed_unsync(),
            record: self.record.take(),
        }
    }

    /// A body that completes `record` at its end.
    pub fn new(inner: ProxyBody, record: Record) -> AuditedBody {
        AuditedBody {
            inner,
            record: Some(record),
        }
    }

    fn finish(&mut self, outcome: Outcome, reason: Option<&'static str>) {
        if let Some(record) = self.record.take() {
            record.finish(outcome, reason);
        }
    }
}

impl Body for AuditedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(record), Some(data)) = (this.record.as_mut(), frame.data_ref()) {
                    record.delivered(data.len() as u64);
                }
                // hyper stops polling once a body says it has ended: complete here, not only
                // on `None`, or a finished response would be logged as cancelled.
                if this.inner.is_end_stream() {
                    this.finish(Outcome::Ok, None);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                // A stalled upstream (see `IdleBody`) is a timeout, not a broken answer.
                let reason = if is_idle_timeout(e.as_ref()) {
                    "upstream_timeout"
                } else {
                    "upstream_protocol"
                };
                this.finish(Outcome::BodyError, Some(reason));
            }
            Poll::Ready(None) => this.finish(Outcome::Ok, None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `e` (or what it wraps) is an [`IdleTimeout`].
fn is_idle_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<IdleTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

impl Drop for AuditedBody {
    fn drop(&mut self) {
        // A body with nothing left (an empty body hyper never polled, or one whose last
        // frame was taken) ended well; otherwise the record's own `Drop` says `cancelled`.
        if self.inner.is_end_stream() {
            self.finish(Outcome::Ok, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{stream, StreamExt};
    use http_body_util::{BodyExt, StreamBody};

    type Chunks = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>>;

    fn chunks(parts: Vec<Result<&'static str, &'static str>>) -> Chunks {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .into_iter()
            .map(|p| match p {
                Ok(s) => Ok(Frame::data(Bytes::from_static(s.as_bytes()))),
                Err(e) => Err(e.into()),
            })
            .collect();
        StreamBody::new(stream::iter(frames))
    }

    async fn read(body: LimitedBody<Chunks>) -> Result<Bytes, String> {
        body.collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_body_within_the_limit_passes_and_is_counted() {
        let count = ByteCount::default();
        let (body, state) = LimitedBody::new(
            chunks(vec![Ok("abc"), Ok("defg")]),
            7,
            count.clone(),
            None,
            None,
        );
        assert_eq!(read(body).await.unwrap(), "abcdefg");
        assert_eq!(count.load(Ordering::Acquire), 7);
        assert_eq!(state.get(), UpState::Ok);
    }

    #[tokio::test]
    async fn a_body_past_the_limit_ends_in_an_error_not_an_early_end() {
        let count = ByteCount::default();
        let (body, state) = LimitedBody::new(
            chunks(vec![Ok("abc"), Ok("defgh")]),
            7,
            count.clone(),
            None,
            None,
        );
        let err = read(body).await.unwrap_err();
        assert!(err.contains("exceeds the route's limit"), "{err}");
        assert_eq!(state.get(), UpState::OverLimit);
        // Only what went upstream is counted.
        assert_eq!(count.load(Ordering::Acquire), 3);
    }

    #[tokio::test]
    async fn trailers_going_up_are_filtered_like_the_head() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("authorization", "Bearer agent-own".parse().unwrap());
        trailers.insert("proxy-authorization", "Bearer token".parse().unwrap());
        trailers.insert("host", "evil.test".parse().unwrap());
        trailers.insert("x-api-key", "agent-key".parse().unwrap());
        trailers.insert("x-checksum", "sha256=abc".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::trailers(trailers)),
        ];
        let (body, state) = LimitedBody::new(
            StreamBody::new(stream::iter(frames)),
            100,
            ByteCount::default(),
            Some(HeaderName::from_static("x-api-key")),
            None,
        );
        let collected = body.collect().await.unwrap();
        let got = collected
            .trailers()
            .expect("the trailers frame still goes up");
        let names: Vec<&str> = got.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-checksum"]);
        assert_eq!(collected.to_bytes(), "abc");
        assert_eq!(state.get(), UpState::Ok);
    }

    fn scanner() -> Option<BodyScan> {
        let tw = crate::tripwire::Tripwire::new(vec![(
            std::sync::Arc::from("billing"),
            zeroize::Zeroizing::new(b"s3cr3t-value-0042".to_vec()),
        )]);
        Some(BodyScan::new(Arc::new(tw), None))
    }

    #[tokio::test]
    async fn a_body_carrying_a_credential_split_across_chunks_ends_in_an_error() {
        let count = ByteCount::default();
        let (body, state) = LimitedBody::new(
            chunks(vec![Ok("{\"k\":\"s3cr3t-va"), Ok("lue-0042\"}")]),
            100,
            count.clone(),
            None,
            scanner(),
        );
        let err = read(body).await.unwrap_err();
        assert!(err.contains("carries a credential"), "{err}");
        assert_eq!(
            state.get(),
            UpState::Exfiltration(Hit::Stored(std::sync::Arc::from("billing")))
        );
        // Not one byte of the value went upstream (what went is counted).
        assert!(count.load(Ordering::Acquire) < 7);
    }

    #[tokio::test]
    async fn a_scanned_clean_body_goes_up_whole_with_its_trailers() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", "sha256=abc".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"s3cr3t-va"))),
            Ok(Frame::data(Bytes::from_static(b"lue-0041 and more"))),
            Ok(Frame::trailers(trailers)),
        ];
        let count = ByteCount::default();
        let (body, state) = LimitedBody::new(
            StreamBody::new(stream::iter(frames)),
            100,
            count.clone(),
            None,
            scanner(),
        );
        let collected = body.collect().await.unwrap();
        assert!(collected.trailers().is_some());
        assert_eq!(collected.to_bytes(), "s3cr3t-value-0041 and more");
        assert_eq!(count.load(Ordering::Acquire), 26);
        assert_eq!(state.get(), UpState::Ok);
        // A credential in a trailer is caught too.
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-note", "s3cr3t-value-0042".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::trailers(trailers)),
        ];
        let (body, state) = LimitedBody::new(
            StreamBody::new(stream::iter(frames)),
            100,
            ByteCount::default(),
            None,
            scanner(),
        );
        assert!(body.collect().await.is_err());
        assert!(matches!(state.get(), UpState::Exfiltration(_)));
    }

    #[tokio::test]
    async fn a_silent_sender_ends_the_body_with_an_idle_timeout() {
        // One chunk, then nothing ever again.
        let frames = stream::iter(vec![Ok::<_, BoxError>(Frame::data(Bytes::from_static(
            b"first",
        )))])
        .chain(stream::pending());
        let mut body = IdleBody::new(StreamBody::new(frames), Duration::from_millis(50));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(is_idle_timeout(err.as_ref()), "{err}");
    }

    #[tokio::test]
    async fn a_slow_reader_never_makes_the_sender_look_idle() {
        let frames = stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
        ]);
        let mut body = IdleBody::new(StreamBody::new(frames), Duration::from_millis(20));
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        // The reader dawdles past the idle time; the next chunk was there all along.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "b"
        );
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_broken_agent_body_is_told_apart_from_an_oversized_one() {
        let (body, state) = LimitedBody::new(
            chunks(vec![Ok("ab"), Err("bad chunk size")]),
            100,
            ByteCount::default(),
            None,
            None,
        );
        assert!(read(body).await.is_err());
        assert_eq!(state.get(), UpState::Broken);
    }
}
