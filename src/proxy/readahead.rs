//! Larger socket reads under TLS while a body streams in.
//!
//! rustls asks its transport for 4 KiB at a time (a little more to finish a partial record), so
//! a 10 MiB download over an upstream TLS connection took about 2 500 `recvfrom` calls, and an
//! upload through a tunnel as many; the sending side's kernel did the TCP work of every small
//! read. Once a read fills what the reader asked for (the socket held more), the next reads
//! take up to [`CHUNK`] from the socket at once and hand it out from memory. The buffer exists
//! only while it holds bytes: an idle or slow connection keeps none, and a short read (the
//! socket ran dry) ends the bulk mode. This module only moves bytes.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// The most one socket read takes in bulk mode.
pub const CHUNK: usize = 64 * 1024;

/// Reads asking for more than this (hyper's own adaptive buffers on plain HTTP) always go
/// straight to the socket; smaller ones (rustls: 4 KiB, up to one TLS record) may be served
/// from a chunk.
const DIRECT_ABOVE: usize = 18 * 1024;

/// A TCP stream read as described in the module documentation; writes pass through.
pub struct ReadAheadStream {
    tcp: TcpStream,
    /// Bytes read from the socket and not handed on yet, from `pos`.
    ahead: Vec<u8>,
    pos: usize,
    /// The last read filled the reader's buffer: the next takes a chunk.
    bulk: bool,
}

impl ReadAheadStream {
    pub fn new(tcp: TcpStream) -> Self {
        Self::with_pending(tcp, Bytes::new())
    }

    /// `tcp` with `pending` (bytes already read from it) handed out first. They are copied:
    /// taking over the buffer they sit in (hyper's 8 KiB read buffer) would keep it for the
    /// life of the tunnel.
    pub fn with_pending(tcp: TcpStream, pending: Bytes) -> Self {
        ReadAheadStream {
            tcp,
            ahead: pending.to_vec(),
            pos: 0,
            bulk: false,
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Bytes held for the reader.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.ahead.len() - self.pos
    }
}

impl AsyncRead for ReadAheadStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = buf.remaining();
        if this.pos < this.ahead.len() {
            let n = want.min(this.ahead.len() - this.pos);
            buf.put_slice(&this.ahead[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.ahead.len() {
                this.ahead = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        if !this.bulk || want > DIRECT_ABOVE {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.tcp).poll_read(cx, buf))?;
            this.bulk = want <= DIRECT_ABOVE && buf.filled().len() - before == want;
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            let mut ahead = Vec::with_capacity(CHUNK);
            match this.tcp.try_read_buf(&mut ahead) {
                Ok(n) => {
                    // Less than the reader wanted: the sender is slower than we are.
                    this.bulk = n >= want;
                    let given = want.min(n);
                    buf.put_slice(&ahead[..given]);
                    if given < n {
                        this.ahead = ahead;
                        this.pos = given;
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    this.bulk = false;
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl AsyncWrite for ReadAheadStream {
    write_through!(tcp);
}

/// The agent's side of a CONNECT tunnel: its TCP stream read ahead when the tunnel came from
/// the plain listener (hyper hands back the stream and what it had read past the CONNECT head),
/// otherwise hyper's upgraded stream as it is (the TLS listener).
pub type TunnelStream = Either<ReadAheadStream, TokioIo<hyper::upgrade::Upgraded>>;

/// The [`TunnelStream`] of an upgraded CONNECT.
pub fn tunnel_stream(upgraded: hyper::upgrade::Upgraded) -> TunnelStream {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Either::Left(ReadAheadStream::with_pending(
            parts.io.into_inner(),
            parts.read_buf,
        )),
        Err(upgraded) => Either::Right(TokioIo::new(upgraded)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (dialed.unwrap(), accepted.unwrap().0)
    }

    /// One read of at most `len` bytes, as rustls makes them.
    async fn read(ra: &mut ReadAheadStream, len: usize) -> Vec<u8> {
        let mut storage = vec![0u8; len];
        let n = ra.read(&mut storage).await.unwrap();
        storage.truncate(n);
        storage
    }

    #[tokio::test]
    async fn a_stream_arrives_whole_and_in_order_through_small_reads() {
        let (mut sender, tcp) = pair().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            sender.write_all(&sent).await.unwrap();
        });
        let mut ra = ReadAheadStream::new(tcp);
        let mut got = Vec::new();
        let mut most_held = 0;
        loop {
            let chunk = read(&mut ra, 4096).await;
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 4096);
            most_held = most_held.max(ra.held());
            got.extend_from_slice(&chunk);
        }
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "every byte, in order");
        assert!(
            most_held > 4096,
            "bulk reads took more than the reader asked for"
        );
        assert!(most_held < CHUNK);
        assert_eq!(ra.held(), 0);
        assert!(ra.ahead.capacity() == 0, "nothing kept once drained");
    }

    #[tokio::test]
    async fn a_trickle_is_read_directly_and_holds_no_buffer() {
        let (mut sender, tcp) = pair().await;
        let mut ra = ReadAheadStream::new(tcp);
        for i in 0..20u8 {
            sender.write_all(&[i; 100]).await.unwrap();
            assert_eq!(read(&mut ra, 4096).await, vec![i; 100]);
            assert!(!ra.bulk);
            assert_eq!(ra.ahead.capacity(), 0);
        }
        drop(sender);
        assert!(read(&mut ra, 4096).await.is_empty(), "end of stream");
    }

    #[tokio::test]
    async fn bytes_held_are_handed_on_before_the_end_of_the_stream() {
        let (mut sender, tcp) = pair().await;
        sender.write_all(&[1u8; 40_000]).await.unwrap();
        drop(sender);
        let mut ra = ReadAheadStream::new(tcp);
        // The first read fills 1 000 bytes (bulk begins), the second takes the rest at once.
        assert_eq!(read(&mut ra, 1000).await.len(), 1000);
        let mut total = 1000;
        loop {
            let chunk = read(&mut ra, 1000).await;
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.iter().all(|&b| b == 1));
            total += chunk.len();
        }
        assert_eq!(total, 40_000);
    }

    #[tokio::test]
    async fn a_large_read_goes_straight_to_the_socket() {
        let (mut sender, tcp) = pair().await;
        sender.write_all(&[2u8; 30_000]).await.unwrap();
        let mut ra = ReadAheadStream::new(tcp);
        let mut got = 0;
        while got < 30_000 {
            let chunk = read(&mut ra, 64 * 1024).await;
            got += chunk.len();
            assert_eq!(ra.held(), 0);
        }
        assert_eq!(got, 30_000);
    }

    #[tokio::test]
    async fn bytes_read_before_come_first_and_writes_pass_through() {
        let (mut agent, tcp) = pair().await;
        // As hyper hands them over: the rest of its read buffer.
        let mut read_buf = bytes::BytesMut::with_capacity(8192);
        read_buf.extend_from_slice(b"CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01");
        let pending = read_buf.freeze().slice(26..);
        let mut ra = ReadAheadStream::with_pending(tcp, pending);
        assert_eq!(
            ra.ahead.capacity(),
            3,
            "only the bytes are kept, not hyper's buffer"
        );
        let (_, empty) = pair().await;
        let none = ReadAheadStream::with_pending(empty, bytes::Bytes::new());
        assert_eq!(none.ahead.capacity(), 0);
        agent.write_all(b"rest").await.unwrap();
        assert_eq!(read(&mut ra, 2).await, b"\x16\x03");
        assert_eq!(read(&mut ra, 4096).await, b"\x01");
        assert_eq!(ra.ahead.capacity(), 0);
        assert_eq!(read(&mut ra, 4096).await, b"rest");
        ra.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let mut got = [0u8; 19];
        agent.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 200 OK\r\n\r\n");
    }
}
