//! The loop guard: refuses what only a transport can see — a request that
//! has come round to this proxy, or an intercepted tunnel that is not TLS.
//!
//! A transport knows things about a request that no header parse in a
//! layer should repeat: that its `Via` names this very proxy (it went out
//! through another proxy and came back), or that the tunnel it was asked
//! to intercept did not start with a TLS ClientHello. It says so with a
//! mark in the request's extensions ([`CameRound`], [`NotTls`]), and this
//! layer refuses the request — reason `loop` or `tls_required`, source
//! `transport`, on the record like every other refusal — so no transport
//! builds a refusal of its own. (A destination that *is* one of our
//! listeners is refused by the connector, which sees the address it would
//! dial.)
//!
//! | transport | answer |
//! | --- | --- |
//! | HTTP/1 (absolute-form, `CONNECT`) | 403, `x-proxy-error: blocked-by-loop-guard` |
//! | SOCKS5 | reply 0x02 |
//! | an intercepted tunnel that is not TLS | the tunnel is closed |
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::loop_guard::{CameRound, LoopGuardLayer};
//! use portcullis_middleware::{find_blocked, Protocol, Reason, Target};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let service = ServiceBuilder::new()
//!     .layer(LoopGuardLayer::new())
//!     .service(service_fn(|_: Request<()>| async { Ok::<_, portcullis_middleware::BoxError>(Response::new(())) }));
//!
//! let mut request = Request::get("http://example.com/").body(())?;
//! request.extensions_mut().insert(Target::parse_authority("example.com:80", None)?);
//! request.extensions_mut().insert(Protocol::Http);
//! request.extensions_mut().insert(CameRound { rule: "Via names this proxy".into() });
//! let error = service.oneshot(request).await.unwrap_err();
//! assert_eq!(find_blocked(error.as_ref()).map(|b| b.reason), Some(Reason::Loop));
//! # Ok(())
//! # }
//! ```

use std::task::{Context, Poll};

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{Blocked, BoxError, Reason, Source};
use crate::future::ResponseFuture;
use crate::request::RequestInfo;

/// The transport's mark: this request has come round to this proxy, and
/// how it knows (named as the refusal's rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CameRound {
    /// How the transport knows, e.g. "Via names this proxy".
    pub rule: String,
}

/// The transport's mark on an intercepted tunnel that did not start with a
/// TLS ClientHello: its bytes are never relayed opaquely. The transport
/// sends a synthesized `CONNECT` (protocol `https_mitm`) with this mark so
/// the refusal is decided, and recorded, here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NotTls;

/// The transport's mark on a captured connection whose first bytes (a TLS
/// SNI, an HTTP `Host`) name another host than the one its address maps
/// to: the policy judged one host and the bytes ask for another. The
/// transport sends a synthesized `CONNECT` with this mark so the refusal
/// (`host_mismatch`) is decided, and recorded, here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedAnotherHost {
    /// The host the bytes name (escaped for a log line by the writer).
    pub named: String,
}

/// Configures [`LoopGuard`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopGuardLayer {
    _private: (),
}

impl LoopGuardLayer {
    /// The loop guard.
    pub fn new() -> LoopGuardLayer {
        LoopGuardLayer::default()
    }
}

impl<S> Layer<S> for LoopGuardLayer {
    type Service = LoopGuard<S>;

    fn layer(&self, inner: S) -> LoopGuard<S> {
        LoopGuard { inner }
    }
}

/// Refuses requests marked [`CameRound`], [`NotTls`] or [`NamedAnotherHost`]; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct LoopGuard<S> {
    inner: S,
}

impl<S> LoopGuard<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> LoopGuard<S> {
        LoopGuard { inner }
    }

    /// A layer.
    pub fn layer() -> LoopGuardLayer {
        LoopGuardLayer::new()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for LoopGuard<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let (reason, rule) = match (
            extensions.get::<CameRound>(),
            extensions.get::<NotTls>(),
            extensions.get::<NamedAnotherHost>(),
        ) {
            (Some(mark), _, _) => (Reason::Loop, Some(mark.rule.clone())),
            (None, Some(NotTls), _) => (Reason::TlsRequired, None),
            (None, None, Some(named)) => (
                Reason::HostMismatch,
                Some(format!("the connection names {:?}", named.named)),
            ),
            (None, None, None) => return ResponseFuture::inner(self.inner.call(request)),
        };
        match RequestInfo::from_request(&request) {
            Ok(info) => ResponseFuture::refused(
                Blocked::new(
                    reason,
                    Source::Transport,
                    info.target,
                    info.protocol,
                    &info.method,
                )
                .with_rule(rule),
            ),
            Err(bad) => ResponseFuture::refused(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{find_blocked, Protocol, Target};
    use http::Response;
    use tower_test::mock;

    fn request(came_round: bool) -> Request<()> {
        let mut request = Request::get("http://example.com/").body(()).unwrap();
        request
            .extensions_mut()
            .insert(Target::parse_authority("example.com:80", None).unwrap());
        request.extensions_mut().insert(Protocol::Http);
        if came_round {
            request.extensions_mut().insert(CameRound {
                rule: "Via names this proxy".into(),
            });
        }
        request
    }

    #[tokio::test]
    async fn an_unmarked_request_passes_and_a_marked_one_never_reaches_inner() {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(LoopGuardLayer::new());
        mock.allow(2);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request(false));
        let (_, send) = mock.next_request().await.unwrap();
        send.send_response(Response::new(()));
        response.await.unwrap();

        assert!(service.poll_ready().is_ready());
        let error = service.call(request(true)).await.unwrap_err();
        let blocked = find_blocked(error.as_ref()).unwrap();
        assert_eq!(blocked.reason, Reason::Loop);
        assert_eq!(blocked.rule.as_deref(), Some("Via names this proxy"));
        assert!(mock.poll_request().is_pending(), "never reached inner");
    }

    #[tokio::test]
    async fn a_tunnel_marked_not_tls_is_refused_as_tls_required() {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(LoopGuardLayer::new());
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let mut marked = request(false);
        marked.extensions_mut().insert(NotTls);
        let error = service.call(marked).await.unwrap_err();
        let blocked = find_blocked(error.as_ref()).unwrap();
        assert_eq!(blocked.reason, Reason::TlsRequired);
        assert_eq!(blocked.source, Source::Transport);
        assert!(mock.poll_request().is_pending(), "never reached inner");
    }

    #[tokio::test]
    async fn backpressure_and_inner_errors_pass_through() {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(LoopGuardLayer::new());
        mock.allow(0);
        assert!(service.poll_ready().is_pending());
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request(false));
        let (_, send) = mock.next_request().await.unwrap();
        send.send_error("inner failed");
        assert_eq!(response.await.unwrap_err().to_string(), "inner failed");
    }
}
