//! Bodies on the way through: the agent's request body going up (cut off at the route's
//! limit, counted, its trailers filtered like its head), and every response going down to the agent (counted, and carrying the
//! request's audit record to the end of the stream).

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http_body_util::BodyExt;

use bytes::Bytes;
use http::HeaderName;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::forward::BoxError;
use crate::audit::record::ByteCount;
use crate::audit::{Outcome, Record};
use crate::inject;

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

/// Body of every response latchkey sends to an agent, before [`AuditedBody`] wraps it.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// What happened to the agent's request body, read after a failed upstream exchange to say
/// whose fault it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpState {
    /// Nothing wrong (yet).
    Ok,
    /// The body went past the route's limit and was cut off.
    OverLimit,
    /// The agent's body broke (bad chunked framing, reset).
    Broken,
}

/// The agent's request body, cut off with an error once it exceeds the route's limit (for
/// bodies whose size was not announced), counting the bytes that go upstream, with its
/// trailers filtered by the same rules as its head (`inject::strip_request_trailers`).
pub struct LimitedBody<B = Incoming> {
    /// `None` once the body went past the limit and its rest was handed to [`discard`].
    inner: Option<B>,
    left: u64,
    state: Arc<AtomicU8>,
    sent: ByteCount,
    /// The header the route injects: never accepted from the agent, in a trailer either.
    injected: Option<HeaderName>,
}

/// Why an agent's body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("the request body exceeds the route's limit")]
struct BodyOverLimit;

impl<B> LimitedBody<B> {
    /// Wrap `inner`, allowing `limit` bytes and counting them into `sent`; `injected` is the
    /// header the route injects (dropped from trailers). The second value reads the body's
    /// [`UpState`] later.
    pub fn new(
        inner: B,
        limit: u64,
        sent: ByteCount,
        injected: Option<HeaderName>,
    ) -> (LimitedBody<B>, UpStateHandle) {
        let state = Arc::new(AtomicU8::new(UpState::Ok as u8));
        let handle = UpStateHandle(state.clone());
        (
            LimitedBody {
                inner: Some(inner),
                left: limit,
                state,
                sent,
                injected,
            },
            handle,
        )
    }
}

/// Reads a [`LimitedBody`]'s state after the body itself moved into the upstream client.
pub struct UpStateHandle(Arc<AtomicU8>);

impl UpStateHandle {
    /// What happened to the body so far.
    pub fn get(&self) -> UpState {
        match self.0.load(Ordering::Acquire) {
            1 => UpState::OverLimit,
            2 => UpState::Broken,
            _ => UpState::Ok,
        }
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
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let mut trailers = frame
                    .into_trailers()
                    .expect("a frame that is_trailers is trailers");
                // SECURITY: the head was cleaned in `inject::apply`; a trailer must not bring
                // back what was removed there (the agent's credential, the token, `Host`).
                inject::strip_request_trailers(&mut trailers, this.injected.as_ref());
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > this.left {
                    this.state
                        .store(UpState::OverLimit as u8, Ordering::Release);
                    // Keep reading (and discarding) a bounded rest, so the agent is still
                    // sending into an open stream when its 413 arrives: a client whose HTTP/2
                    // stream is reset mid-upload may lose the answer.
                    if let (Some(rest), Ok(rt)) =
                        (this.inner.take(), tokio::runtime::Handle::try_current())
                    {
                        rt.spawn(discard(rest));
                    }
                    // SECURITY: an error (not an early end) aborts the upstream request, so
                    // the upstream never takes a truncated body for a complete one.
                    return Poll::Ready(Some(Err(Box::new(BodyOverLimit))));
                }
                this.left -= len;
                this.sent.fetch_add(len, Ordering::Release);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.store(UpState::Broken as u8, Ordering::Release);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// Read (and throw away) what is left of an agent's body whose request was refused, bounded
/// in bytes and time. Answering while the agent is still sending makes HTTP/2 reset the
/// stream, and some clients (curl 7.88) then lose the answer; a refusal never waits long on
/// a slow agent, though.
pub async fn discard<B: Body + Unpin>(mut body: B) {
    const DISCARD_BYTES: usize = 256 * 1024;
    const DISCARD_TIME: Duration = Duration::from_millis(500);
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
            Poll::Ready(Some(Err(_))) => this.finish(Outcome::BodyError, Some("upstream_protocol")),
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
    use futures_util::stream;
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
        let (body, state) =
            LimitedBody::new(chunks(vec![Ok("abc"), Ok("defg")]), 7, count.clone(), None);
        assert_eq!(read(body).await.unwrap(), "abcdefg");
        assert_eq!(count.load(Ordering::Acquire), 7);
        assert_eq!(state.get(), UpState::Ok);
    }

    #[tokio::test]
    async fn a_body_past_the_limit_ends_in_an_error_not_an_early_end() {
        let count = ByteCount::default();
        let (body, state) =
            LimitedBody::new(chunks(vec![Ok("abc"), Ok("defgh")]), 7, count.clone(), None);
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

    #[tokio::test]
    async fn a_broken_agent_body_is_told_apart_from_an_oversized_one() {
        let (body, state) = LimitedBody::new(
            chunks(vec![Ok("ab"), Err("bad chunk size")]),
            100,
            ByteCount::default(),
            None,
        );
        assert!(read(body).await.is_err());
        assert_eq!(state.get(), UpState::Broken);
    }
}
