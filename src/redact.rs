//! Scrub the injected credential out of what an upstream sends back. Debug endpoints, error
//! pages and "echo" services reflect request headers; without this, an agent could learn the
//! real key by calling such an endpoint through an allowed route (superfly/tokenizer's echo
//! class). Bodies are scanned as they stream, with a small carry-over so a secret split across
//! two chunks is still caught, and without buffering the body.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use zeroize::Zeroizing;

/// What replaces every occurrence of a credential.
pub const REPLACEMENT: &[u8] = b"[REDACTED]";

/// Needles shorter than this are not searched for: they would match ordinary text, and a
/// secret that short is not worth protecting this way.
const MIN_NEEDLE: usize = 4;

/// The byte strings that reveal a credential: the secret itself and the encodings latchkey
/// put on the wire (percent-encoded, base64 in a Basic header).
pub struct Needles {
    needles: Vec<Zeroizing<Vec<u8>>>,
    /// Searchers built once per needle set, not per chunk. They hold their own copy of the
    /// needle (not zeroized on drop, like the injected `HeaderValue` itself).
    finders: Vec<memchr::memmem::Finder<'static>>,
    /// The same needles lower-cased, for header names: hyper and h2 lower-case every name, so
    /// `X-<Secret>` reaches us as `x-<secret>`.
    name_finders: Vec<memchr::memmem::Finder<'static>>,
    longest: usize,
}

impl std::fmt::Debug for Needles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Needles([redacted] x{})", self.needles.len())
    }
}

impl Needles {
    /// The set, or `None` when nothing is long enough to search for.
    pub fn new(candidates: Vec<Zeroizing<Vec<u8>>>) -> Option<Arc<Needles>> {
        let mut needles: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        for c in candidates {
            if c.len() >= MIN_NEEDLE && !needles.iter().any(|n| **n == *c) {
                needles.push(c);
            }
        }
        let longest = needles.iter().map(|n| n.len()).max()?;
        let finders = needles
            .iter()
            .map(|n| memchr::memmem::Finder::new(n.as_slice()).into_owned())
            .collect();
        let name_finders = needles
            .iter()
            .map(|n| {
                let lower = Zeroizing::new(n.to_ascii_lowercase());
                memchr::memmem::Finder::new(lower.as_slice()).into_owned()
            })
            .collect();
        Some(Arc::new(Needles {
            needles,
            finders,
            name_finders,
            longest,
        }))
    }

    /// Sorted, non-overlapping match ranges in `hay`.
    fn matches(&self, hay: &[u8]) -> Vec<(usize, usize)> {
        let mut found: Vec<(usize, usize)> = Vec::new();
        for f in &self.finders {
            let len = f.needle().len();
            found.extend(f.find_iter(hay).map(|i| (i, i + len)));
        }
        if found.len() > 1 {
            found.sort_unstable();
            let mut merged: Vec<(usize, usize)> = Vec::with_capacity(found.len());
            for (s, e) in found {
                match merged.last_mut() {
                    Some(last) if s < last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            found = merged;
        }
        found
    }

    /// Length of the longest suffix of `tail` that is a proper prefix of some needle: bytes
    /// that must wait for the next chunk before they can be released.
    fn pending_prefix(&self, tail: &[u8]) -> usize {
        let max = tail.len().min(self.longest - 1);
        (1..=max)
            .rev()
            .find(|&k| {
                let suffix = &tail[tail.len() - k..];
                self.needles.iter().any(|n| n.starts_with(suffix))
            })
            .unwrap_or(0)
    }

    /// Replace every occurrence in `bytes`; `None` when there was none.
    pub fn redact(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let m = self.matches(bytes);
        if m.is_empty() {
            return None;
        }
        Some(replace(bytes, &m))
    }

    /// Redact header values in place, and remove every field whose name holds a needle (in any
    /// case: a name cannot carry the replacement text); true if anything was changed.
    pub fn redact_headers(&self, headers: &mut HeaderMap) -> bool {
        // SECURITY: an upstream can echo the credential in a field *name* as easily as in a
        // value.
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| {
                self.name_finders
                    .iter()
                    .any(|f| f.find(name.as_str().as_bytes()).is_some())
            })
            .cloned()
            .collect();
        let mut changed = !doomed.is_empty();
        for name in doomed {
            headers.remove(name);
        }
        for value in headers.values_mut() {
            if let Some(clean) = self.redact(value.as_bytes()) {
                *value = HeaderValue::from_bytes(&clean)
                    .unwrap_or_else(|_| HeaderValue::from_static("[REDACTED]"));
                changed = true;
            }
        }
        changed
    }
}

fn replace(bytes: &[u8], matches: &[(usize, usize)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    for &(s, e) in matches {
        out.extend_from_slice(&bytes[at..s]);
        out.extend_from_slice(REPLACEMENT);
        at = e;
    }
    out.extend_from_slice(&bytes[at..]);
    out
}

/// A response body with every needle replaced. Chunks with no match and no partial match at
/// their end pass through without a copy.
pub struct RedactBody<B> {
    inner: B,
    needles: Arc<Needles>,
    carry: BytesMut,
    trailers: Option<HeaderMap>,
    done: bool,
    on_redact: Option<Box<dyn FnOnce() + Send>>,
}

impl<B> RedactBody<B> {
    /// Wrap `inner`; `on_redact` runs once, the first time something is replaced.
    pub fn new(inner: B, needles: Arc<Needles>, on_redact: Box<dyn FnOnce() + Send>) -> Self {
        RedactBody {
            inner,
            needles,
            carry: BytesMut::new(),
            trailers: None,
            done: false,
            on_redact: Some(on_redact),
        }
    }

    fn process(&mut self, chunk: Bytes) -> Bytes {
        let data = if self.carry.is_empty() {
            chunk
        } else {
            self.carry.extend_from_slice(&chunk);
            self.carry.split().freeze()
        };
        let matches = self.needles.matches(&data);
        let after_last = matches.last().map_or(0, |m| m.1);
        let hold = self.needles.pending_prefix(&data[after_last..]);
        let release = data.len() - hold;
        self.carry.extend_from_slice(&data[release..]);
        if matches.is_empty() {
            return data.slice(..release);
        }
        if let Some(f) = self.on_redact.take() {
            f();
        }
        Bytes::from(replace(&data[..release], &matches))
    }
}

impl<B> Body for RedactBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                if !this.carry.is_empty() {
                    // A proper prefix of a needle can never be a whole needle: release it.
                    return Poll::Ready(Some(Ok(Frame::data(this.carry.split().freeze()))));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.process(data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        if let Ok(mut trailers) = frame.into_trailers() {
                            if this.needles.redact_headers(&mut trailers) {
                                if let Some(f) = this.on_redact.take() {
                                    f();
                                }
                            }
                            this.trailers = Some(trailers);
                        }
                        this.done = true;
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.carry.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // The length may change; say nothing exact.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn needles(v: &[&str]) -> Arc<Needles> {
        Needles::new(
            v.iter()
                .map(|s| Zeroizing::new(s.as_bytes().to_vec()))
                .collect(),
        )
        .unwrap()
    }

    async fn run(chunks: &[&str], n: Arc<Needles>) -> (String, usize) {
        let owned: Vec<Result<Frame<Bytes>, Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from(c.to_string()))))
            .collect();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let body = RedactBody::new(
            StreamBody::new(futures_util::stream::iter(owned)),
            n,
            Box::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let out = body.collect().await.unwrap().to_bytes();
        (
            String::from_utf8(out.to_vec()).unwrap(),
            hits.load(Ordering::SeqCst),
        )
    }

    #[tokio::test]
    async fn secret_in_one_chunk_is_replaced() {
        let (out, hits) = run(&["token=SECRETVALUE;"], needles(&["SECRETVALUE"])).await;
        assert_eq!(out, "token=[REDACTED];");
        assert_eq!(hits, 1);
    }

    #[tokio::test]
    async fn secret_split_across_chunks_is_replaced() {
        for split in 1..11 {
            let s = "xxSECRETVALUEyy";
            let (a, b) = s.split_at(2 + split);
            let (out, _) = run(&[a, b], needles(&["SECRETVALUE"])).await;
            assert_eq!(out, "xx[REDACTED]yy", "split at {split}");
        }
        let (out, _) = run(&["SEC", "RET", "VAL", "UE"], needles(&["SECRETVALUE"])).await;
        assert_eq!(out, "[REDACTED]");
    }

    #[tokio::test]
    async fn near_misses_pass_through_unchanged() {
        let (out, hits) = run(&["SECRETVAL", "XE and SECRET"], needles(&["SECRETVALUE"])).await;
        assert_eq!(out, "SECRETVALXE and SECRET");
        assert_eq!(hits, 0);
    }

    #[tokio::test]
    async fn every_encoding_is_replaced() {
        let (out, _) = run(
            &["a=S3CR%2FT b=S3CR/T c=QmFzaWM="],
            needles(&["S3CR/T", "S3CR%2FT", "QmFzaWM="]),
        )
        .await;
        assert_eq!(out, "a=[REDACTED] b=[REDACTED] c=[REDACTED]");
    }

    #[test]
    fn headers_are_redacted() {
        let mut h = HeaderMap::new();
        h.insert("x-debug", HeaderValue::from_static("Bearer SECRETVALUE"));
        h.insert("x-ok", HeaderValue::from_static("fine"));
        assert!(needles(&["SECRETVALUE"]).redact_headers(&mut h));
        assert_eq!(h["x-debug"], "Bearer [REDACTED]");
        assert_eq!(h["x-ok"], "fine");
    }

    #[test]
    fn a_header_whose_name_holds_the_secret_is_removed_whatever_its_case() {
        let mut h = HeaderMap::new();
        h.insert("x-secretvalue-echo", HeaderValue::from_static("1"));
        h.insert("x-ok", HeaderValue::from_static("fine"));
        assert!(needles(&["SECRETVALUE"]).redact_headers(&mut h));
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-ok"]);
        assert!(!needles(&["SECRETVALUE"]).redact_headers(&mut h));
    }

    #[tokio::test]
    async fn trailers_are_redacted_in_names_and_values_and_counted() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-echo", HeaderValue::from_static("Bearer SECRETVALUE"));
        trailers.insert("x-secretvalue", HeaderValue::from_static("1"));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"clean"))),
            Ok(Frame::trailers(trailers)),
        ];
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let body = RedactBody::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            needles(&["SECRETVALUE"]),
            Box::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let collected = body.collect().await.unwrap();
        let t = collected.trailers().expect("trailers kept").clone();
        assert_eq!(t["x-echo"], "Bearer [REDACTED]");
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t.len(), 2);
        assert_eq!(collected.to_bytes(), "clean");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn short_needles_are_ignored_and_debug_hides_values() {
        assert!(Needles::new(vec![Zeroizing::new(b"abc".to_vec())]).is_none());
        let n = needles(&["SECRETVALUE"]);
        assert!(!format!("{n:?}").contains("SECRET"));
    }
}
