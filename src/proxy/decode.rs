//! Undo a `content-encoding` an upstream applied although latchkey asked it for `identity`:
//! redaction can only find an echoed credential in bytes it can read. Used on credentialed
//! routes only; other responses reach the agent exactly as sent. The codecs are
//! async-compression's (flate2, brotli, zstd), never ours. This module knows nothing of
//! secrets: it hands plain bytes to `redact`.

use std::io;

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder, ZstdDecoder};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{header, HeaderMap};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncBufRead, AsyncRead, BufReader};
use tokio_util::io::{ReaderStream, StreamReader};

use super::body::ProxyBody;
use super::forward::BoxError;
use crate::deny::Deny;

/// Encodings stacked deeper than this are refused: no real server does it, and each layer is
/// another decompression pass.
const MAX_LAYERS: usize = 2;

/// Size of the decoded chunks handed on. A decoder also hands on what it has whenever the
/// upstream pauses, so a compressed stream is not held back to fill this.
const CHUNK: usize = 16 * 1024;

#[derive(Clone, Copy)]
enum Coding {
    Gzip,
    /// HTTP's `deflate` is zlib-wrapped DEFLATE (RFC 9110 8.4.1.2).
    Zlib,
    Brotli,
    Zstd,
}

/// `body` with its content-encoding undone, and `Content-Encoding`/`Content-Length` dropped
/// from `headers` when it had one. An encoding latchkey cannot decode is the upstream's broken
/// answer (502): passing it on unscanned would pass on the credential with it.
pub fn decoded<B>(headers: &mut HeaderMap, body: B) -> Result<ProxyBody, Deny>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let mut codings = Vec::new();
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let value = value.to_str().map_err(|_| unsupported())?;
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name.to_ascii_lowercase().as_str() {
                "identity" => {}
                "gzip" | "x-gzip" => codings.push(Coding::Gzip),
                "deflate" => codings.push(Coding::Zlib),
                "br" => codings.push(Coding::Brotli),
                "zstd" => codings.push(Coding::Zstd),
                _ => return Err(unsupported()),
            }
        }
    }
    // An empty body (HEAD, 204, 304) has nothing to hide; its headers describe another one.
    if codings.is_empty() || body.is_end_stream() {
        return Ok(body.map_err(Into::into).boxed_unsync());
    }
    if codings.len() > MAX_LAYERS {
        return Err(unsupported());
    }
    headers.remove(header::CONTENT_ENCODING);
    headers.remove(header::CONTENT_LENGTH);
    // Trailers of a compressed body are dropped: a data stream carries none.
    let bytes = body
        .into_data_stream()
        .map_err(|e| io::Error::other(e.into()));
    let mut reader: Box<dyn AsyncBufRead + Send + Unpin> = Box::new(StreamReader::new(bytes));
    // The last coding listed was applied last: undo it first.
    let (outermost, inner) = codings.split_last().expect("checked non-empty above");
    let mut plain = decoder(*outermost, reader);
    for &coding in inner.iter().rev() {
        reader = Box::new(BufReader::new(plain));
        plain = decoder(coding, reader);
    }
    let frames = ReaderStream::with_capacity(plain, CHUNK)
        .map_ok(Frame::data)
        .map_err(BoxError::from);
    Ok(StreamBody::new(frames).boxed_unsync())
}

fn decoder(
    coding: Coding,
    input: Box<dyn AsyncBufRead + Send + Unpin>,
) -> Box<dyn AsyncRead + Send + Unpin> {
    match coding {
        Coding::Gzip => {
            let mut d = GzipDecoder::new(input);
            d.multiple_members(true);
            Box::new(d)
        }
        Coding::Zlib => Box::new(ZlibDecoder::new(input)),
        Coding::Brotli => Box::new(BrotliDecoder::new(input)),
        Coding::Zstd => Box::new(ZstdDecoder::new(input)),
    }
}

fn unsupported() -> Deny {
    Deny::UpstreamProtocol(
        "the upstream compressed a credentialed response in an encoding latchkey cannot scan"
            .into(),
    )
}
