//! A stream whose first byte has been read ahead and is handed back before anything else.
//!
//! A tunnel waits for that byte before it builds its HTTP/1 connection: hyper allocates two
//! 8 KiB buffers for every connection it serves, so a tunnel the agent has opened but not used
//! yet (connection pools and pre-connects open them ahead of need) would hold them for nothing.
//! This module only moves bytes: it never looks at them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// `io` with one byte already read from it.
pub struct Primed<IO> {
    first: Option<u8>,
    io: IO,
}

impl<IO: AsyncRead + Unpin> Primed<IO> {
    /// Wait for the first byte of `io`. `Ok(None)` when the stream ended before sending one.
    pub async fn first_byte(mut io: IO) -> io::Result<Option<Primed<IO>>> {
        let mut byte = [0u8; 1];
        Ok(match io.read(&mut byte).await? {
            0 => None,
            _ => Some(Primed {
                first: Some(byte[0]),
                io,
            }),
        })
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Primed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() > 0 {
            if let Some(byte) = this.first.take() {
                // Alone: what follows it is read by the next call (from the TLS session's
                // buffer when it has arrived), so an error there is never lost.
                buf.put_slice(&[byte]);
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Primed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_first_byte_comes_back_first_then_the_rest_in_order() {
        let (mut agent, ours) = tokio::io::duplex(64);
        agent.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut primed = Primed::first_byte(ours).await.unwrap().expect("a byte");
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let n = primed.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"G", "the read-ahead byte alone");
        got.extend_from_slice(&buf[..n]);
        agent.write_all(b"Host: a\r\n\r\n").await.unwrap();
        drop(agent);
        primed.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[tokio::test]
    async fn a_stream_closed_before_any_byte_is_none_and_writes_pass_through() {
        let (agent, ours) = tokio::io::duplex(64);
        drop(agent);
        assert!(Primed::first_byte(ours).await.unwrap().is_none());

        let (mut agent, ours) = tokio::io::duplex(64);
        agent.write_all(b"x").await.unwrap();
        let mut primed = Primed::first_byte(ours).await.unwrap().expect("a byte");
        primed.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        primed.flush().await.unwrap();
        let mut back = [0u8; 17];
        agent.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"HTTP/1.1 200 OK\r\n");
        // An empty read buffer never swallows the held byte.
        let mut empty = [0u8; 0];
        assert_eq!(primed.read(&mut empty).await.unwrap(), 0);
        let mut one = [0u8; 1];
        assert_eq!(primed.read(&mut one).await.unwrap(), 1);
        assert_eq!(&one, b"x");
    }
}
