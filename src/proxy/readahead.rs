//! Larger socket reads under an upstream TLS connection while a body streams in.
//!
//! rustls asks its transport for 4 KiB at a time (a little more to finish a partial record), so
//! a 10 MiB download took about 2 500 `recvfrom` calls, and the sending side's kernel did the
//! TCP work of every small read. Once a read fills what the reader asked for (the socket held
//! more), the next reads take up to [`CHUNK`] from the socket at once and hand it out from
//! memory. The buffer exists only while it holds bytes: an idle or slow connection keeps none,
//! and a short read (the socket ran dry) ends the bulk mode. This module only moves bytes.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper::rt::ReadBufCursor;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// The most one socket read takes in bulk mode.
pub const CHUNK: usize = 64 * 1024;

/// Reads asking for more than this (hyper's own adaptive buffers on plain HTTP) go straight
/// to the socket; smaller ones (rustls: 4 KiB, up to one TLS record) go through a stack buffer
/// so that their size is known.
const DIRECT_ABOVE: usize = 18 * 1024;

/// Read state of one socket; see the module documentation.
#[derive(Default)]
pub struct ReadAhead {
    /// Bytes read from the socket and not handed on yet, from `pos`.
    ahead: Vec<u8>,
    pos: usize,
    /// The last read filled the reader's buffer: the next takes a chunk.
    bulk: bool,
}

impl ReadAhead {
    /// Read from `io` into `buf`, as `hyper::rt::Read::poll_read`.
    pub fn poll_read(
        &mut self,
        io: &mut TokioIo<TcpStream>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining();
        if self.pos < self.ahead.len() {
            let n = want.min(self.ahead.len() - self.pos);
            buf.put_slice(&self.ahead[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.ahead.len() {
                self.ahead = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        if want > DIRECT_ABOVE {
            self.bulk = false;
            return hyper::rt::Read::poll_read(Pin::new(io), cx, buf);
        }
        let tcp = io.inner_mut();
        if !self.bulk {
            let mut stack = [MaybeUninit::<u8>::uninit(); DIRECT_ABOVE];
            let mut read = ReadBuf::uninit(&mut stack[..want]);
            ready!(Pin::new(tcp).poll_read(cx, &mut read))?;
            self.bulk = read.remaining() == 0;
            buf.put_slice(read.filled());
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            let mut ahead = Vec::with_capacity(CHUNK);
            match tcp.try_read_buf(&mut ahead) {
                Ok(n) => {
                    // Less than the reader wanted: the sender is slower than we are.
                    self.bulk = n >= want;
                    let given = want.min(n);
                    buf.put_slice(&ahead[..given]);
                    if given < n {
                        self.ahead = ahead;
                        self.pos = given;
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    self.bulk = false;
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    /// Bytes held for the reader (tests and memory accounting).
    pub fn held(&self) -> usize {
        self.ahead.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TokioIo<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (dialed.unwrap(), TokioIo::new(accepted.unwrap().0))
    }

    /// One read of at most `len` bytes, as rustls makes them.
    async fn read(ra: &mut ReadAhead, io: &mut TokioIo<TcpStream>, len: usize) -> Vec<u8> {
        let mut storage = vec![0u8; len];
        let mut buf = hyper::rt::ReadBuf::new(&mut storage);
        poll_fn(|cx| ra.poll_read(io, cx, buf.unfilled()))
            .await
            .unwrap();
        let n = buf.filled().len();
        storage.truncate(n);
        storage
    }

    #[tokio::test]
    async fn a_stream_arrives_whole_and_in_order_through_small_reads() {
        let (mut sender, mut io) = pair().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            sender.write_all(&sent).await.unwrap();
        });
        let mut ra = ReadAhead::default();
        let mut got = Vec::new();
        let mut most_held = 0;
        loop {
            let chunk = read(&mut ra, &mut io, 4096).await;
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
        let (mut sender, mut io) = pair().await;
        let mut ra = ReadAhead::default();
        for i in 0..20u8 {
            sender.write_all(&[i; 100]).await.unwrap();
            assert_eq!(read(&mut ra, &mut io, 4096).await, vec![i; 100]);
            assert!(!ra.bulk);
            assert_eq!(ra.ahead.capacity(), 0);
        }
        drop(sender);
        assert!(
            read(&mut ra, &mut io, 4096).await.is_empty(),
            "end of stream"
        );
    }

    #[tokio::test]
    async fn bytes_held_are_handed_on_before_the_end_of_the_stream() {
        let (mut sender, mut io) = pair().await;
        sender.write_all(&[1u8; 40_000]).await.unwrap();
        drop(sender);
        let mut ra = ReadAhead::default();
        // The first read fills 1 000 bytes (bulk begins), the second takes the rest at once.
        assert_eq!(read(&mut ra, &mut io, 1000).await.len(), 1000);
        let mut total = 1000;
        loop {
            let chunk = read(&mut ra, &mut io, 1000).await;
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
        let (mut sender, mut io) = pair().await;
        sender.write_all(&[2u8; 30_000]).await.unwrap();
        let mut ra = ReadAhead::default();
        let mut got = 0;
        while got < 30_000 {
            let chunk = read(&mut ra, &mut io, 64 * 1024).await;
            got += chunk.len();
            assert_eq!(ra.held(), 0);
        }
        assert_eq!(got, 30_000);
    }
}
