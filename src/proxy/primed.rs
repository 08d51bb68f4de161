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
    /// An error met reading on behind the held byte, answered by the next read.
    deferred: Option<io::Error>,
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
                deferred: None,
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
        if let Some(e) = this.deferred.take() {
            return Poll::Ready(Err(e));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let Some(byte) = this.first.take() else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        buf.put_slice(&[byte]);
        // With whatever already followed it: a reader given one byte would parse in vain and
        // read again (hyper then doubles its 8 KiB buffer to make room for the next 8 KiB).
        if buf.remaining() > 0 {
            match Pin::new(&mut this.io).poll_read(cx, buf) {
                Poll::Ready(Err(e)) => this.deferred = Some(e),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Primed<IO> {
    write_through!(io);
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
        assert_eq!(
            &buf[..n],
            b"GET / HTTP/1.1\r\n",
            "the held byte and what followed it"
        );
        got.extend_from_slice(&buf[..n]);
        agent.write_all(b"Host: a\r\n\r\n").await.unwrap();
        drop(agent);
        primed.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[tokio::test]
    async fn the_held_byte_comes_alone_when_nothing_followed_it_yet() {
        let (mut agent, ours) = tokio::io::duplex(64);
        agent.write_all(b"G").await.unwrap();
        let mut primed = Primed::first_byte(ours).await.unwrap().expect("a byte");
        let mut buf = [0u8; 64];
        assert_eq!(primed.read(&mut buf).await.unwrap(), 1);
        assert_eq!(buf[0], b'G');
        agent.write_all(b"ET").await.unwrap();
        let n = primed.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ET");
    }

    /// Fails its second read (what a TLS stream does on a bad record).
    struct FailsAfterOne(bool);

    impl AsyncRead for FailsAfterOne {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if std::mem::replace(&mut self.0, true) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad record",
                )));
            }
            buf.put_slice(b"G");
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn an_error_behind_the_held_byte_is_answered_by_the_next_read() {
        let mut primed = Primed::first_byte(FailsAfterOne(false))
            .await
            .unwrap()
            .expect("a byte");
        let mut buf = [0u8; 8];
        assert_eq!(primed.read(&mut buf).await.unwrap(), 1);
        let e = primed.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
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
