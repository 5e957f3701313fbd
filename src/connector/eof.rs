//! An origin that ends its TLS stream without `close_notify`.
//!
//! rustls reports such an end as an error (`UnexpectedEof`), so a response
//! whose body runs to the end of the connection (no `Content-Length`, not
//! chunked: `Connection: close`) failed through the pool — an HTTP/2 client
//! of an intercepted tunnel saw `INTERNAL_ERROR` — where curl and browsers
//! take the end as the body's end. [`EofTolerant`] reads that error as the
//! end of the stream, and hyper's own framing decides: a body whose
//! `Content-Length` or chunking says more was due is still an incomplete
//! body (refused as the origin's failure); one that ends with the
//! connection is complete, as it is in plain HTTP.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use tower::Service;

/// Wraps a connector so its streams read a missing `close_notify` as the
/// end of the stream; see the [module docs](self).
#[derive(Debug, Clone)]
pub(crate) struct EofTolerant<C>(pub(crate) C);

impl<C> Service<Uri> for EofTolerant<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
{
    type Response = TolerantStream<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(TolerantStream) })
    }
}

/// A stream whose `UnexpectedEof` reads as the end of the stream.
#[derive(Debug)]
pub(crate) struct TolerantStream<T>(T);

impl<T: Connection> Connection for TolerantStream<T> {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for TolerantStream<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            // Nothing was read: an end of stream, for hyper's framing to judge.
            Poll::Ready(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for TolerantStream<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}
