//! Request bodies of the `aws_sigv4` kind that are checked or re-signed as they stream.
//!
//! - [`ChunkSigner`]: an `aws-chunked` body (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`) whose
//!   chunk signatures are recomputed with the real key, each chained from the previous one and
//!   the first from the seed signature of the request head. Every chunk is held whole before
//!   its header goes out (its signature covers its bytes), so a chunk may be at most
//!   [`MAX_CHUNK`]; memory is bounded by that, not by the upload.
//! - [`HashCheck`]: a body whose SHA-256 the agent declared in `x-amz-content-sha256`; the
//!   hash is computed as the body streams and the body fails before its last byte goes out
//!   if it does not match.
//!
//! A body that breaks its framing ends with an error: the upstream sees a cut-off request,
//! never a complete one signed over bytes latchkey did not check. Signatures are 64 hex
//! digits whoever computes them, so the re-signed body has exactly the agent's length and its
//! `Content-Length` stays true.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::super::{Body, BoxError};
use crate::deny::Deny;

/// The largest chunk latchkey holds to sign (AWS SDKs send 64-128 KiB chunks).
pub const MAX_CHUNK: usize = 1 << 20;
/// The longest chunk header line (`hex-size;chunk-signature=<64 hex>`) accepted.
const MAX_HEADER_LINE: usize = 128;
/// SHA-256 of the empty string, part of every chunk's string to sign.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const SIGNATURE_PREFIX: &[u8] = b";chunk-signature=";

/// What chunk signatures are computed from: the signing key of the request's scope, its
/// date-time and scope string.
pub struct ChunkKey {
    /// The derived SigV4 signing key (not the secret access key).
    pub key: Zeroizing<Vec<u8>>,
    /// `YYYYMMDDTHHMMSSZ` of the seed signature.
    pub date_time: String,
    /// `DATE/REGION/SERVICE/aws4_request`.
    pub scope: String,
}

impl ChunkKey {
    /// The signature of one chunk whose data hashes to `data_hash`, chained from `previous`.
    pub fn sign(&self, previous: &str, data: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(b"AWS4-HMAC-SHA256-PAYLOAD\n");
        mac.update(self.date_time.as_bytes());
        mac.update(b"\n");
        mac.update(self.scope.as_bytes());
        mac.update(b"\n");
        mac.update(previous.as_bytes());
        mac.update(b"\n");
        mac.update(EMPTY_SHA256.as_bytes());
        mac.update(b"\n");
        mac.update(hex::encode(Sha256::digest(data)).as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk header line.
    Header,
    /// Reading `left` more data bytes of a chunk whose header text was kept.
    Data { left: usize },
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the final (zero) chunk's header: expecting the closing CRLF.
    FinalEnd,
    /// Everything went out.
    Done,
}

/// An `aws-chunked` body re-signed chunk by chunk.
pub struct ChunkSigner {
    inner: Body,
    key: ChunkKey,
    previous: String,
    state: State,
    /// Bytes read and not yet parsed.
    pending: BytesMut,
    /// The current chunk's size text (as the agent wrote it, so lengths stay equal).
    size_text: Vec<u8>,
    /// The current chunk's data.
    data: BytesMut,
    /// Decoded bytes so far, and what `x-amz-decoded-content-length` announced.
    decoded: u64,
    announced: u64,
    inner_done: bool,
    trailers: Option<HeaderMap>,
}

/// Why a chunked body was cut off (the error the upstream exchange ends with).
#[derive(Debug, thiserror::Error)]
#[error("the aws-chunked request body cannot be re-signed: {0}")]
pub struct Broken(&'static str);

impl ChunkSigner {
    /// Re-sign `inner` with `key`, chaining from the request's `seed` signature;
    /// `announced` is the agent's `x-amz-decoded-content-length`.
    pub fn new(inner: Body, key: ChunkKey, seed: String, announced: u64) -> ChunkSigner {
        ChunkSigner {
            inner,
            key,
            previous: seed,
            state: State::Header,
            pending: BytesMut::new(),
            size_text: Vec::new(),
            data: BytesMut::new(),
            decoded: 0,
            announced,
            inner_done: false,
            trailers: None,
        }
    }

    /// Parse what is pending; returns re-signed output when a chunk completes.
    fn step(&mut self) -> Result<Option<Bytes>, Broken> {
        loop {
            match self.state {
                State::Header => {
                    let Some(end) = self.pending.windows(2).position(|w| w == b"\r\n") else {
                        if self.pending.len() > MAX_HEADER_LINE {
                            return Err(Broken("a chunk header line is too long"));
                        }
                        return Ok(None);
                    };
                    if end > MAX_HEADER_LINE {
                        return Err(Broken("a chunk header line is too long"));
                    }
                    let line = self.pending.split_to(end + 2);
                    let line = &line[..end];
                    let semi = line
                        .iter()
                        .position(|&b| b == b';')
                        .ok_or(Broken("a chunk header has no chunk-signature"))?;
                    let (size, rest) = line.split_at(semi);
                    if size.is_empty() || size.len() > 8 || !size.iter().all(u8::is_ascii_hexdigit)
                    {
                        return Err(Broken("a chunk size is not hexadecimal"));
                    }
                    let sig = rest
                        .strip_prefix(SIGNATURE_PREFIX)
                        .ok_or(Broken("a chunk header has no chunk-signature"))?;
                    if sig.len() != 64 || !sig.iter().all(u8::is_ascii_hexdigit) {
                        return Err(Broken("a chunk signature is not 64 hex digits"));
                    }
                    let n = usize::from_str_radix(
                        std::str::from_utf8(size).map_err(|_| Broken("bad chunk size"))?,
                        16,
                    )
                    .map_err(|_| Broken("bad chunk size"))?;
                    if n > MAX_CHUNK {
                        return Err(Broken("a chunk is larger than latchkey signs (1 MiB)"));
                    }
                    self.size_text.clear();
                    self.size_text.extend_from_slice(size);
                    if n == 0 {
                        if self.decoded != self.announced {
                            return Err(Broken(
                                "the chunks do not add up to x-amz-decoded-content-length",
                            ));
                        }
                        let sig = self.key.sign(&self.previous, b"");
                        let mut out = BytesMut::with_capacity(self.size_text.len() + 83);
                        out.extend_from_slice(&self.size_text);
                        out.extend_from_slice(SIGNATURE_PREFIX);
                        out.extend_from_slice(sig.as_bytes());
                        out.extend_from_slice(b"\r\n");
                        self.previous = sig;
                        self.state = State::FinalEnd;
                        return Ok(Some(out.freeze()));
                    }
                    self.data.clear();
                    self.data.reserve(n);
                    self.state = State::Data { left: n };
                }
                State::Data { left } => {
                    if self.pending.is_empty() {
                        return Ok(None);
                    }
                    let take = left.min(self.pending.len());
                    self.data.extend_from_slice(&self.pending.split_to(take));
                    self.state = if take == left {
                        State::DataEnd
                    } else {
                        State::Data { left: left - take }
                    };
                }
                State::DataEnd => {
                    if self.pending.len() < 2 {
                        return Ok(None);
                    }
                    if &self.pending[..2] != b"\r\n" {
                        return Err(Broken("a chunk's data is not followed by CRLF"));
                    }
                    self.pending.advance(2);
                    self.decoded += self.data.len() as u64;
                    if self.decoded > self.announced {
                        return Err(Broken("the chunks exceed x-amz-decoded-content-length"));
                    }
                    let sig = self.key.sign(&self.previous, &self.data);
                    let mut out =
                        BytesMut::with_capacity(self.size_text.len() + 83 + self.data.len() + 2);
                    out.extend_from_slice(&self.size_text);
                    out.extend_from_slice(SIGNATURE_PREFIX);
                    out.extend_from_slice(sig.as_bytes());
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(&self.data);
                    out.extend_from_slice(b"\r\n");
                    self.previous = sig;
                    self.data.clear();
                    self.state = State::Header;
                    return Ok(Some(out.freeze()));
                }
                State::FinalEnd => {
                    if self.pending.len() < 2 {
                        return Ok(None);
                    }
                    if &self.pending[..2] != b"\r\n" {
                        return Err(Broken(
                            "the final chunk is not followed by CRLF (signed trailers are not \
                             supported)",
                        ));
                    }
                    self.pending.advance(2);
                    if !self.pending.is_empty() {
                        return Err(Broken("bytes follow the final chunk"));
                    }
                    self.state = State::Done;
                    return Ok(Some(Bytes::from_static(b"\r\n")));
                }
                State::Done => {
                    if !self.pending.is_empty() {
                        return Err(Broken("bytes follow the final chunk"));
                    }
                    return Ok(None);
                }
            }
        }
    }
}

impl HttpBody for ChunkSigner {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.step() {
                Err(e) => {
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Ok(Some(out)) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                Ok(None) => {}
            }
            if this.inner_done {
                if this.state != State::Done {
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(Box::new(Broken(
                        "the body ended before its final chunk",
                    )))));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => this.inner_done = true,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.pending.extend_from_slice(&data),
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                        }
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done && self.inner_done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Same length as the agent's body: signatures are all 64 hex digits.
        self.inner.size_hint()
    }
}

/// A body checked against the SHA-256 the agent declared for it.
pub struct HashCheck {
    inner: Body,
    hasher: Sha256,
    expected: [u8; 32],
    /// `Content-Length`, when known: the check runs before the last byte goes out.
    left: Option<u64>,
    failed: bool,
}

/// The declared hash does not match the body.
#[derive(Debug, thiserror::Error)]
#[error("the request body does not match its declared x-amz-content-sha256")]
pub struct Mismatch;

impl HashCheck {
    /// Check `inner` against `hash` (64 hex digits); `length` is its `Content-Length`.
    pub fn new(inner: Body, hash: &str, length: Option<u64>) -> Result<HashCheck, Deny> {
        let mut expected = [0u8; 32];
        hex::decode_to_slice(hash, &mut expected)
            .map_err(|_| Deny::CannotSign("x-amz-content-sha256 is not hex".to_owned()))?;
        Ok(HashCheck {
            inner,
            hasher: Sha256::new(),
            expected,
            left: length,
            failed: false,
        })
    }

    fn verdict(&mut self) -> Result<(), Mismatch> {
        let got = std::mem::take(&mut self.hasher).finalize();
        if got.as_slice() == self.expected {
            Ok(())
        } else {
            self.failed = true;
            Err(Mismatch)
        }
    }
}

impl HttpBody for HashCheck {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            None => {
                // Without a length, the check runs at the end: an error here means the
                // upstream never sees the end of the body.
                if this.left.is_none() {
                    this.verdict().map_err(|e| Box::new(e) as BoxError)?;
                }
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.hasher.update(data);
                    if let Some(left) = this.left.as_mut() {
                        *left = left.saturating_sub(data.len() as u64);
                        if *left == 0 {
                            // SECURITY: checked before the last byte is handed on.
                            if let Err(e) = this.verdict() {
                                return Poll::Ready(Some(Err(Box::new(e))));
                            }
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Without a length the check runs when the inner body says it has ended: the
        // framing layer must poll until then, not stop at a hint.
        self.left == Some(0) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Build an `aws-chunked` body of `data` in chunks of `chunk` bytes, signed with `key` from
/// `seed` (tests and the benchmark; latchkey itself only re-signs).
pub fn encode(data: &[u8], chunk: usize, key: &ChunkKey, seed: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + (data.len() / chunk + 2) * 90);
    let mut previous = seed.to_owned();
    for part in data.chunks(chunk).chain(std::iter::once(&[][..])) {
        let sig = key.sign(&previous, part);
        out.extend_from_slice(format!("{:x}", part.len()).as_bytes());
        out.extend_from_slice(SIGNATURE_PREFIX);
        out.extend_from_slice(sig.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
        previous = sig;
    }
    out
}
