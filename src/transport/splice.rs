//! Copying bytes both ways between a client and its upstream, until both
//! sides are done or nothing has moved either way for the idle timeout.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Buffer per direction: large enough that bulk transfers move in few
/// syscalls (tokio's default is 8 KiB).
const BUFFER: usize = 64 * 1024;

/// Copies both ways until both sides are done, an error ends it (a peer
/// closing is normal), or nothing moves for `idle`.
pub(crate) async fn bidirectional<A, B>(client: &mut A, upstream: &mut B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Watched {
        inner: client,
        start,
        last: &last,
    };
    let mut upstream = Watched {
        inner: upstream,
        start,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER, BUFFER);
    tokio::pin!(copy);
    loop {
        let moved_at = start + Duration::from_millis(last.load(Ordering::Relaxed));
        tokio::select! {
            result = &mut copy => {
                if let Err(error) = result {
                    tracing::debug!(%error, "tunnel closed with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(moved_at + idle) => {
                let quiet = Instant::now() - (start + Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    tracing::debug!(idle = ?idle, "tunnel closed: nothing moved for the idle timeout");
                    return;
                }
            }
        }
    }
}

/// A stream that notes when bytes last moved through it.
struct Watched<'a, S: ?Sized> {
    inner: &'a mut S,
    start: Instant,
    last: &'a AtomicU64,
}

impl<S: ?Sized> Watched<'_, S> {
    fn moved(&self) {
        let millis = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(millis, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
