//! The body type that travels through the stack.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use portcullis_middleware::{BadRequest, BoxError};
use tokio::time::Instant;

/// A request or response body: a boxed stream of bytes.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A client's request body: an error reading it (a malformed chunk, a body
/// cut short) is the client's fault, so it surfaces as a [`BadRequest`] — a
/// 400, not a 502 — wherever the body is being sent.
/// A body that goes quiet for `idle` (tower-http's `TimeoutBody`) fails the
/// same way, and so does one that trickles: after the first `idle`, it must
/// keep an average of `min_rate` bytes a second ([`MinRate`]).
pub(crate) fn client_body(incoming: hyper::body::Incoming, idle: Duration, min_rate: u64) -> Body {
    let timed = tower_http::timeout::TimeoutBody::new(idle, incoming);
    MinRate::new(timed, idle, min_rate)
        .map_err(move |error| -> BoxError {
            let message = if error.is::<tower_http::timeout::TimeoutError>() {
                format!("the request body sent nothing for {idle:?}")
            } else if error.is::<TooSlow>() {
                error.to_string()
            } else {
                format!("the request body is malformed: {error}")
            };
            BadRequest::new(message).into()
        })
        .boxed_unsync()
}

/// The most of an HTTP/2 request body read after nobody wants it.
const DRAIN_LIMIT: u64 = 64 * 1024;

/// `body`, read to its end (up to 64 KiB more, on a task of its own) when it
/// is dropped unfinished. An HTTP/2 origin may answer without reading a
/// request body; the pool then drops it, and a client stream dropped while
/// its last DATA frame is in flight is reset under the response still
/// being relayed (curl: "Stream error in the HTTP/2 framing layer").
/// Reading the rest first lets the stream end as it should.
pub(crate) fn drained_when_dropped(body: Body) -> Body {
    Drained { inner: Some(body) }.boxed_unsync()
}

struct Drained {
    inner: Option<Body>,
}

impl hyper::body::Body for Drained {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.inner = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.as_ref().map_or_else(
            || hyper::body::SizeHint::with_exact(0),
            hyper::body::Body::size_hint,
        )
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        let Some(mut rest) = self.inner.take() else {
            return;
        };
        if hyper::body::Body::is_end_stream(&rest) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let mut read = 0u64;
            // Each frame waits at most the body's own idle timeout.
            while let Some(Ok(frame)) = rest.frame().await {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > DRAIN_LIMIT {
                    break;
                }
            }
        });
    }
}

/// A body arrived slower than its minimum rate.
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived at under {min_rate} bytes a second ({received} bytes in {elapsed:?}); raise [limits] body_min_rate or set it to 0")]
pub(crate) struct TooSlow {
    min_rate: u64,
    received: u64,
    elapsed: Duration,
}

pin_project_lite::pin_project! {
    /// A body that must keep a minimum average rate (Apache mod_reqtimeout's
    /// `MinRate`): its deadline starts `grace` after the first poll and
    /// moves one second later for every `min_rate` bytes received. It is
    /// checked when a frame arrives, so a body that stops altogether is
    /// ended by the idle timeout around it, and one that trickles by this.
    /// A `min_rate` of 0 turns the check off.
    pub(crate) struct MinRate<B> {
        #[pin]
        inner: B,
        grace: Duration,
        min_rate: u64,
        started: Option<Instant>,
        received: u64,
    }
}

impl<B> MinRate<B> {
    pub(crate) fn new(inner: B, grace: Duration, min_rate: u64) -> MinRate<B> {
        MinRate {
            inner,
            grace,
            min_rate,
            started: None,
            received: 0,
        }
    }
}

impl<B> hyper::body::Body for MinRate<B>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let started = *this.started.get_or_insert_with(Instant::now);
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            *this.received = this.received.saturating_add(data.len() as u64);
        }
        if *this.min_rate > 0 {
            let earned = Duration::from_secs_f64(*this.received as f64 / *this.min_rate as f64);
            let elapsed = started.elapsed();
            if elapsed > this.grace.saturating_add(earned) {
                return Poll::Ready(Some(Err(TooSlow {
                    min_rate: *this.min_rate,
                    received: *this.received,
                    elapsed,
                }
                .into())));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::future::Future;

    /// A body of `count` one-byte frames, one every `every`.
    struct Trickle {
        left: usize,
        every: Duration,
        sleep: Pin<Box<tokio::time::Sleep>>,
    }

    fn trickle(count: usize, every: Duration) -> Trickle {
        Trickle {
            left: count,
            every,
            sleep: Box::pin(tokio::time::sleep(every)),
        }
    }

    impl hyper::body::Body for Trickle {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.left -= 1;
            let next = Instant::now() + self.every;
            self.sleep.as_mut().reset(next);
            Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"x")))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_cut_after_the_grace_and_a_steady_body_is_not() {
        // 1 byte a second against 10 bytes a second after 5 s: cut at ~5 s.
        let slow = MinRate::new(
            trickle(100, Duration::from_secs(1)),
            Duration::from_secs(5),
            10,
        );
        let error = slow.collect().await.unwrap_err();
        let too_slow = error.downcast_ref::<TooSlow>().unwrap();
        assert!(too_slow.received <= 6, "{too_slow:?}");
        // 100 bytes a second keeps up with 10 bytes a second.
        let steady = MinRate::new(
            trickle(500, Duration::from_millis(10)),
            Duration::from_secs(1),
            10,
        );
        assert_eq!(steady.collect().await.unwrap().to_bytes().len(), 500);
        // 0 turns it off.
        let off = MinRate::new(
            trickle(20, Duration::from_secs(1)),
            Duration::from_secs(1),
            0,
        );
        assert_eq!(off.collect().await.unwrap().to_bytes().len(), 20);
    }
}
