//! The body type that travels through the stack.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use portcullis_middleware::{BadRequest, BoxError};

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
/// same way.
pub(crate) fn client_body(incoming: hyper::body::Incoming, idle: std::time::Duration) -> Body {
    tower_http::timeout::TimeoutBody::new(idle, incoming)
        .map_err(move |error| -> BoxError {
            let message = if error.is::<tower_http::timeout::TimeoutError>() {
                format!("the request body sent nothing for {idle:?}")
            } else {
                format!("the request body is malformed: {error}")
            };
            BadRequest::new(message).into()
        })
        .boxed_unsync()
}
