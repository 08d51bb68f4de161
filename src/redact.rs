//! Scrub the injected credential out of what an upstream sends back. Debug endpoints, error
//! pages and "echo" services reflect request headers; without this, an agent could learn the
//! real key by calling such an endpoint through an allowed route (superfly/tokenizer's echo
//! class). Bodies are scanned as they stream, with a small carry-over so a secret split across
//! two chunks is still caught, and without buffering the body.
//!
//! What is searched for ([`encoded_forms`]): the secret raw, percent-encoded (minimal, every
//! byte, upper and lower hex, `+` for space), base64 (standard and URL-safe, whole and as the
//! stable core at each of the three alignments inside a longer base64 run), hex (both cases),
//! JSON `\u00XX` for every byte (both cases) and the JSON string forms common encoders write
//! (`\"`, `\\`, `\/`, `\u003c`...). Compressed bodies are decoded before they get here
//! (`proxy::decode`). This module never logs, and needles never leave it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aho_corasick::{AhoCorasick, AhoCorasickKind, Input, MatchKind};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use zeroize::Zeroizing;

/// What replaces every occurrence of a credential.
pub const REPLACEMENT: &[u8] = b"[REDACTED]";

/// Needles shorter than this are not searched for: they would match ordinary text, and a
/// secret that short is not worth protecting this way.
const MIN_NEEDLE: usize = 4;

/// How long the tail of a chunk that could begin a needle is held back waiting for the next
/// chunk. Streams (SSE, token streams) must not lag by an inter-chunk interval; once this
/// passes the tail goes out (if at most half a needle, see `Needles::may_release`), and a
/// needle it begins is still cut short when its remainder arrives (the agent sees a prefix
/// and `[REDACTED]`, never the whole secret).
pub const HOLD: Duration = Duration::from_millis(5);

/// The byte strings that reveal a credential: its encodings ([`encoded_forms`]) and the forms
/// latchkey put on the wire (the query value, the Basic header's base64).
pub struct Needles {
    needles: Vec<Zeroizing<Vec<u8>>>,
    /// One automaton for all needles, built once per needle set, not per chunk: a single pass
    /// per chunk whatever the number of encodings. It holds its own copy of the needles (not
    /// zeroized on drop, like the injected `HeaderValue` itself).
    searcher: AhoCorasick,
    /// The same needles matched in any ASCII case, for header names: hyper and h2 lower-case
    /// every name, so `X-<Secret>` reaches us as `x-<secret>`.
    name_searcher: AhoCorasick,
    /// `starts[b]`: some needle begins with byte `b` (a cheap first test for held tails).
    starts: [bool; 256],
    longest: usize,
    /// No haystack shorter than this can hold a needle: most header values are skipped
    /// without running the automaton.
    shortest: usize,
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
        let shortest = needles.iter().map(|n| n.len()).min()?;
        let patterns = needles.iter().map(|n| n.as_slice());
        // Leftmost-longest, the semantics that keep the SIMD prefilter (Teddy) on the whole
        // pass; `matches` restarts just after each match's start so that one encoding cannot
        // shadow another that starts inside it (overlapping search is ~40x slower).
        // A contiguous NFA, not the DFA `build_auto` picks for this few patterns: there are
        // two searchers per route and credential, a DFA of ~25 encodings is 290-470 KiB and
        // an NFA a small fraction, and a response scan is the prefilter's work either way
        // (`inject` bench `redact/64KiB_no_match` unchanged; BENCHMARKS.md, round two).
        let searcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .kind(Some(AhoCorasickKind::ContiguousNFA))
            .build(patterns.clone())
            .expect("a few hundred short literal patterns fit the automaton's limits");
        let name_searcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .kind(Some(AhoCorasickKind::ContiguousNFA))
            .ascii_case_insensitive(true)
            .build(patterns)
            .expect("a few hundred short literal patterns fit the automaton's limits");
        let mut starts = [false; 256];
        for n in &needles {
            starts[usize::from(n[0])] = true;
        }
        Some(Arc::new(Needles {
            needles,
            searcher,
            name_searcher,
            starts,
            longest,
            shortest,
        }))
    }

    /// Sorted, non-overlapping match ranges in `hay`.
    fn matches(&self, hay: &[u8]) -> Vec<(usize, usize)> {
        let mut found: Vec<(usize, usize)> = Vec::new();
        if hay.len() < self.shortest {
            return found;
        }
        let mut from = 0;
        // Matches come in order of start; a match that starts inside the previous one (an
        // encoding inside another) extends it.
        while let Some(m) = self.searcher.find(Input::new(hay).range(from..)) {
            match found.last_mut() {
                Some(last) if m.start() < last.1 => last.1 = last.1.max(m.end()),
                _ => found.push((m.start(), m.end())),
            }
            from = m.start() + 1;
        }
        found
    }

    /// Length of the longest suffix of `tail` that is a proper prefix of some needle: bytes
    /// that must wait for the next chunk before they can be released.
    fn pending_prefix(&self, tail: &[u8]) -> usize {
        let from = tail.len() - tail.len().min(self.longest - 1);
        (from..tail.len())
            .find(|&i| {
                self.starts[usize::from(tail[i])] && {
                    let suffix = &tail[i..];
                    self.needles.iter().any(|n| n.starts_with(suffix))
                }
            })
            .map_or(0, |i| tail.len() - i)
    }

    /// Whether held bytes `window` (of which `sent` already went out) may go out at the
    /// deadline. SECURITY: only once per window and only while it is at most half of the
    /// shortest needle it begins, so an upstream that drips an echo slowly (one chunk per
    /// deadline) reveals at most half of the secret; past that the tail waits for the next
    /// chunk, as before the deadline existed.
    fn may_release(&self, window: &[u8], sent: usize) -> bool {
        sent == 0
            && self
                .needles
                .iter()
                .filter(|n| n.starts_with(window))
                .map(|n| n.len())
                .min()
                .is_some_and(|shortest| window.len() * 2 <= shortest)
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
                name.as_str().len() >= self.shortest
                    && self.name_searcher.is_match(name.as_str().as_bytes())
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

/// Every form of `secret` an echo is likely to carry, each in a zeroizing buffer (nothing when
/// the secret is shorter than [`MIN_NEEDLE`]: its encodings would match ordinary text).
///
/// Not covered: mixed-case hex or percent escapes, `\u` escapes of only some characters other
/// than the JSON forms below, base32, other base64 alphabets, and anything transformed further
/// (hashed, split, encrypted, compressed in a way `proxy::decode` does not undo).
pub fn encoded_forms(secret: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    if secret.len() < MIN_NEEDLE {
        return Vec::new();
    }
    let mut out = vec![Zeroizing::new(secret.to_vec())];
    for upper in [true, false] {
        out.push(hex_form(secret, upper));
        out.push(json_u_form(secret, upper));
        for mode in [Percent::Every, Percent::Minimal, Percent::Form] {
            out.push(percent_form(secret, upper, mode));
        }
    }
    for slash in [false, true] {
        for html in [false, true] {
            out.push(json_string_form(secret, slash, html));
        }
    }
    for engine in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        let mut whole = Zeroizing::new(String::with_capacity(secret.len() * 4 / 3 + 4));
        engine.encode_string(secret, &mut whole);
        out.push(Zeroizing::new(whole.as_bytes().to_vec()));
    }
    for url_safe in [false, true] {
        for align in 0..3 {
            out.push(base64_core(secret, align, url_safe));
        }
    }
    out
}

/// The base64 characters that depend on `secret` alone when it starts `align` bytes into a
/// 3-byte group of a longer base64 run: the characters shared with bytes before or after it
/// (2 or 3 at the start, 1 at the end) are dropped, the rest is the same in every such run.
fn base64_core(secret: &[u8], align: usize, url_safe: bool) -> Zeroizing<Vec<u8>> {
    let mut input = Zeroizing::new(vec![0u8; align]);
    input.extend_from_slice(secret);
    let engine = if url_safe {
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
    } else {
        &base64::engine::general_purpose::STANDARD_NO_PAD
    };
    let mut encoded = Zeroizing::new(String::with_capacity(input.len() * 4 / 3 + 4));
    engine.encode_string(&*input, &mut encoded);
    let lead = [0, 2, 3][align];
    let end = encoded.len() - usize::from(!input.len().is_multiple_of(3));
    Zeroizing::new(encoded.as_bytes()[lead..end].to_vec())
}

fn hex_digits(upper: bool) -> &'static [u8; 16] {
    if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    }
}

fn hex_form(secret: &[u8], upper: bool) -> Zeroizing<Vec<u8>> {
    let digits = hex_digits(upper);
    let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 2));
    for &b in secret {
        out.extend_from_slice(&[digits[usize::from(b >> 4)], digits[usize::from(b & 15)]]);
    }
    out
}

/// Every byte as `\u00XX` (JSON, JavaScript).
fn json_u_form(secret: &[u8], upper: bool) -> Zeroizing<Vec<u8>> {
    let digits = hex_digits(upper);
    let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 6));
    for &b in secret {
        out.extend_from_slice(b"\\u00");
        out.extend_from_slice(&[digits[usize::from(b >> 4)], digits[usize::from(b & 15)]]);
    }
    out
}

/// The secret inside a JSON string as encoders write it: `"` and `\` escaped, control bytes as
/// `\u00xx`, and optionally `/` as `\/` (PHP) and `<`, `>`, `&` as `\u003c`... (Go, Rails).
fn json_string_form(secret: &[u8], slash: bool, html: bool) -> Zeroizing<Vec<u8>> {
    let digits = hex_digits(false);
    let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 2));
    for &b in secret {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b'/' if slash => out.extend_from_slice(b"\\/"),
            b'<' | b'>' | b'&' if html => {
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[digits[usize::from(b >> 4)], digits[usize::from(b & 15)]]);
            }
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[digits[usize::from(b >> 4)], digits[usize::from(b & 15)]]);
            }
            _ => out.push(b),
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Percent {
    /// `%XX` for every byte.
    Every,
    /// `%XX` for all but the unreserved characters (RFC 3986).
    Minimal,
    /// As `Minimal`, with `+` for space (HTML forms, `application/x-www-form-urlencoded`).
    Form,
}

fn percent_form(secret: &[u8], upper: bool, mode: Percent) -> Zeroizing<Vec<u8>> {
    let digits = hex_digits(upper);
    let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 3));
    for &b in secret {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        match mode {
            Percent::Form if b == b' ' => out.push(b'+'),
            Percent::Minimal | Percent::Form if unreserved => out.push(b),
            _ => out.extend_from_slice(&[
                b'%',
                digits[usize::from(b >> 4)],
                digits[usize::from(b & 15)],
            ]),
        }
    }
    out
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
    /// The end of the stream so far that could begin a needle (a proper prefix of one). Its
    /// first `sent` bytes already went to the agent (released at the [`HOLD`] deadline); the
    /// rest is held. Kept after release so that a needle it begins is still cut short.
    window: BytesMut,
    sent: usize,
    /// The [`HOLD`] deadline, armed while held bytes wait for the inner body.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
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
            window: BytesMut::new(),
            sent: 0,
            timer: None,
            armed: false,
            trailers: None,
            done: false,
            on_redact: Some(on_redact),
        }
    }

    fn process(&mut self, chunk: Bytes) -> Bytes {
        let data = if self.window.is_empty() {
            chunk
        } else {
            self.window.extend_from_slice(&chunk);
            self.window.split().freeze()
        };
        let offset = std::mem::take(&mut self.sent);
        let matches = self.needles.matches(&data);
        let after_last = matches.last().map_or(0, |m| m.1);
        let hold_from = data.len() - self.needles.pending_prefix(&data[after_last..]);
        // What is held may begin inside what was already released.
        let release_end = hold_from.max(offset);
        self.window.extend_from_slice(&data[hold_from..]);
        self.sent = release_end - hold_from;
        // SECURITY: a match that began in bytes released at the deadline is replaced from
        // where the agent's copy stopped: it gets a prefix and `[REDACTED]`, never the whole.
        let matches: Vec<(usize, usize)> = matches
            .into_iter()
            .filter(|&(_, e)| e > offset)
            .map(|(s, e)| (s.max(offset) - offset, e - offset))
            .collect();
        if matches.is_empty() {
            return data.slice(offset..release_end);
        }
        if let Some(f) = self.on_redact.take() {
            f();
        }
        Bytes::from(replace(&data[offset..release_end], &matches))
    }

    /// The held bytes, now: a proper prefix of a needle is not a needle.
    fn release(&mut self) -> Bytes {
        let out = Bytes::copy_from_slice(&self.window[self.sent..]);
        self.sent = self.window.len();
        out
    }

    fn holding(&self) -> bool {
        self.sent < self.window.len()
    }

    /// Arm the deadline if it is not, and say whether it has passed.
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = Instant::now() + HOLD;
        let timer = match &mut self.timer {
            Some(t) => {
                if !self.armed {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        if timer.as_mut().poll(cx).is_ready() {
            self.armed = false;
            return true;
        }
        false
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
                if this.holding() {
                    let out = this.release();
                    this.window.clear();
                    this.sent = 0;
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                this.window.clear();
                this.sent = 0;
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    // Do not stall a stream on a tail that merely looks like a needle's start.
                    if this.holding()
                        && this.needles.may_release(&this.window, this.sent)
                        && this.deadline_passed(cx)
                    {
                        return Poll::Ready(Some(Ok(Frame::data(this.release()))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.armed = false;
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
        // Truthful before the first poll too: hyper's HTTP/2 server sends a body that says
        // it has ended as END_STREAM on the HEADERS frame; answering `false` for an empty
        // inner body turns a gRPC trailers-only answer (status in one HEADERS frame) into
        // headers plus an empty DATA frame, which gRPC clients read as a broken stream.
        let inner_done = self.done || self.inner.is_end_stream();
        inner_done && !self.holding() && self.trailers.is_none()
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
    use std::time::Duration;

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
    async fn an_empty_body_says_it_has_ended_before_its_first_poll() {
        // A gRPC trailers-only answer: hyper must see the end before polling, or the agent
        // gets HEADERS without END_STREAM and an empty DATA frame.
        let empty = RedactBody::new(
            http_body_util::Empty::<Bytes>::new(),
            needles(&["SECRETVALUE"]),
            Box::new(|| {}),
        );
        assert!(empty.is_end_stream());
        let mut full = RedactBody::new(
            http_body_util::Full::new(Bytes::from_static(b"abc")),
            needles(&["SECRETVALUE"]),
            Box::new(|| {}),
        );
        assert!(!full.is_end_stream());
        let frame = full.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(full.is_end_stream());
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

    fn redact_str(n: &Needles, s: &str) -> String {
        String::from_utf8(
            n.redact(s.as_bytes())
                .unwrap_or_else(|| s.as_bytes().to_vec()),
        )
        .unwrap()
    }

    fn forms(secret: &str) -> Arc<Needles> {
        Needles::new(encoded_forms(secret.as_bytes())).unwrap()
    }

    const SECRET: &str = "sk-live_9f8e/+=Key ok";

    #[test]
    fn hex_in_either_case_is_replaced() {
        let n = forms(SECRET);
        let lower = hex::encode(SECRET);
        let upper = lower.to_ascii_uppercase();
        assert_eq!(redact_str(&n, &format!("a={lower};")), "a=[REDACTED];");
        assert_eq!(redact_str(&n, &format!("a={upper};")), "a=[REDACTED];");
    }

    #[test]
    fn json_u_escapes_of_every_byte_in_either_case_are_replaced() {
        let n = forms(SECRET);
        let lower: String = SECRET.bytes().map(|b| format!("\\u{b:04x}")).collect();
        let upper: String = SECRET.bytes().map(|b| format!("\\u{b:04X}")).collect();
        assert_eq!(
            redact_str(&n, &format!("{{\"k\":\"{lower}\"}}")),
            "{\"k\":\"[REDACTED]\"}"
        );
        assert_eq!(
            redact_str(&n, &format!("{{\"k\":\"{upper}\"}}")),
            "{\"k\":\"[REDACTED]\"}"
        );
    }

    #[test]
    fn json_strings_as_common_encoders_write_them_are_replaced() {
        let n = forms("ab/c\"d<e>f&g");
        // serde_json / Python: quote escaped; PHP: also `\/`; Go: also `\u003c` and friends.
        let plain = serde_json::to_string("ab/c\"d<e>f&g").unwrap();
        assert_eq!(redact_str(&n, &plain), "\"[REDACTED]\"");
        assert_eq!(redact_str(&n, r#""ab\/c\"d<e>f&g""#), "\"[REDACTED]\"");
        assert_eq!(
            redact_str(&n, r#""ab/c\"d\u003ce\u003ef\u0026g""#),
            "\"[REDACTED]\""
        );
        assert_eq!(
            redact_str(&n, r#""ab\/c\"d\u003ce\u003ef\u0026g""#),
            "\"[REDACTED]\""
        );
    }

    #[test]
    fn percent_encoding_of_every_byte_in_either_case_and_plus_for_space_is_replaced() {
        let n = forms(SECRET);
        let upper: String = SECRET.bytes().map(|b| format!("%{b:02X}")).collect();
        let lower: String = SECRET.bytes().map(|b| format!("%{b:02x}")).collect();
        let form = "sk-live_9f8e%2F%2B%3DKey+ok";
        let form_lower = "sk-live_9f8e%2f%2b%3dKey+ok";
        let minimal = "sk-live_9f8e%2F%2B%3DKey%20ok";
        for enc in [upper.as_str(), &lower, form, form_lower, minimal] {
            assert_eq!(
                redact_str(&n, &format!("?q={enc}&x=1")),
                "?q=[REDACTED]&x=1",
                "{enc}"
            );
        }
    }

    /// The secret at every byte offset inside a longer base64 run, in both alphabets, with and
    /// without padding: the characters that depend on the secret alone are always replaced, so
    /// at most the 3 characters it shares with its neighbours (and padding) are left.
    #[test]
    fn base64_at_every_alignment_inside_a_longer_run_is_replaced() {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        let secret: &[u8] = b"\xfb\xff\xbesk-live_9f8e/+=Key\xff\xfe";
        let n = Needles::new(encoded_forms(secret)).unwrap();
        for before in 0..6 {
            for after in 0..4 {
                let mut raw = vec![b'x'; before];
                raw.extend_from_slice(secret);
                raw.extend(std::iter::repeat_n(b'y', after));
                for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                    let encoded = engine.encode(&raw);
                    let out = n.redact(encoded.as_bytes()).unwrap_or_default();
                    let out = String::from_utf8(out).unwrap();
                    assert_eq!(out.matches("[REDACTED]").count(), 1, "{encoded} -> {out}");
                    let (head, tail) = out.split_once("[REDACTED]").unwrap();
                    assert!(head.len() <= before * 4 / 3 + 3, "{encoded} -> {out}");
                    assert!(
                        tail.len() <= (after * 4).div_ceil(3) + 1 + 2,
                        "{encoded} -> {out}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_whole_base64_of_the_secret_is_replaced_with_its_padding() {
        let n = forms("secret-token");
        let b64 = base64::engine::general_purpose::STANDARD.encode("secret-token1");
        let n1 = forms("secret-token1");
        assert_eq!(redact_str(&n1, &format!("x {b64} y")), "x [REDACTED] y");
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("secret-token");
        assert_eq!(redact_str(&n, &format!("x {url} y")), "x [REDACTED] y");
    }

    #[test]
    fn short_secrets_get_no_encoded_forms() {
        assert!(encoded_forms(b"abc").is_empty());
        assert!(!encoded_forms(b"abcd").is_empty());
    }

    /// A body fed by the test, chunk by chunk, with real pauses in between.
    fn channel_body(
        n: Arc<Needles>,
    ) -> (
        tokio::sync::mpsc::Sender<&'static str>,
        RedactBody<impl Body<Data = Bytes, Error = Infallible> + Unpin>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel::<&'static str>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))), rx))
        });
        let body = RedactBody::new(StreamBody::new(Box::pin(stream)), n, Box::new(|| {}));
        (tx, body)
    }

    async fn next(body: &mut (impl Body<Data = Bytes, Error = Infallible> + Unpin)) -> String {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a frame within 5 s")
            .expect("a frame")
            .unwrap();
        String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_held_tail_goes_out_at_the_deadline_and_the_rest_of_the_secret_is_still_cut() {
        let (tx, mut body) = channel_body(needles(&["SECRETVALUE"]));
        tx.send("token stream SEC").await.unwrap();
        assert_eq!(next(&mut body).await, "token stream ");
        let held = std::time::Instant::now();
        assert_eq!(next(&mut body).await, "SEC");
        assert!(
            held.elapsed() < Duration::from_millis(100),
            "{:?}",
            held.elapsed()
        );
        tx.send("RETVALUE and more").await.unwrap();
        assert_eq!(next(&mut body).await, "[REDACTED] and more");
        // Not a continuation: nothing to cut.
        tx.send(" SECR").await.unwrap();
        assert_eq!(next(&mut body).await, " ");
        assert_eq!(next(&mut body).await, "SECR");
        tx.send("ET is a word").await.unwrap();
        assert_eq!(next(&mut body).await, "ET is a word");
        drop(tx);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_secret_dripped_slowly_is_released_at_most_half() {
        let (tx, mut body) = channel_body(needles(&["SECRETVALUE"]));
        tx.send("SE").await.unwrap();
        assert_eq!(next(&mut body).await, "SE");
        // The window now holds more than half of the needle: no more early release.
        tx.send("CRETVA").await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(early.is_err(), "released more than half of a needle early");
        tx.send("LUE!").await.unwrap();
        assert_eq!(next(&mut body).await, "[REDACTED]!");
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
    fn a_value_or_name_exactly_the_needle_is_caught_and_one_byte_short_is_not_scanned() {
        let n = needles(&["SECRETVALUE"]);
        assert_eq!(n.shortest, "SECRETVALUE".len());
        let mut h = HeaderMap::new();
        h.insert("x-exact", HeaderValue::from_static("SECRETVALUE"));
        h.insert("x-short", HeaderValue::from_static("SECRETVALU"));
        h.insert("secretvalue", HeaderValue::from_static("1"));
        assert!(n.redact_headers(&mut h));
        assert_eq!(h["x-exact"], "[REDACTED]");
        assert_eq!(h["x-short"], "SECRETVALU");
        assert!(!h.contains_key("secretvalue"));
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
