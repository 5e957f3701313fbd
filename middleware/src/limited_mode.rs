//! Limited (read-only) mode: only `GET`, `HEAD` and `OPTIONS` get through.
//!
//! Reads the mode from the live policy per request. In `full` mode it
//! refuses nothing. In `limited` mode it refuses, with [`Blocked`]:
//!
//! - any method but `GET`, `HEAD`, `OPTIONS` (compared exactly and case
//!   sensitively: `get` is not `GET`) — `method_not_allowed`; git's
//!   smart-HTTP fetch (`POST …/git-upload-pack` with git's content type) is
//!   a read and passes unless the policy turns that off
//!   ([`limited_allow_git_fetch`](crate::NetworkPolicyBuilder::limited_allow_git_fetch));
//!   `git-receive-pack` (push) never does;
//! - method-override headers (`x-http-method-override`, `x-http-method`,
//!   `x-method-override`, `x-original-method`) and protocol upgrades —
//!   `method_not_allowed`;
//! - a `GET`, `HEAD` or `OPTIONS` that carries a body ([`HasBody`], or a
//!   non-zero `Content-Length`) — `method_not_allowed`: bodies are how
//!   writes hide in reads;
//! - every SOCKS5 request, whose methods cannot be seen — `method_not_allowed`;
//! - a `CONNECT` the transport will not intercept (no [`Intercepted`]
//!   marker) — `mitm_required`. An intercepted tunnel's inner requests come
//!   back through the stack as `https_mitm` and are checked one by one.
//!
//! The transports answer these refusals as the README's refusal table says
//! (a 403 with a JSON body on HTTP, reply 0x02 on SOCKS5).
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::{find_blocked, LimitedModeLayer, Mode, NetworkPolicy, PolicyHandle, Protocol, Reason, Target};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let policy = PolicyHandle::new(NetworkPolicy::builder().mode(Mode::Limited).build());
//! let service = ServiceBuilder::new()
//!     .layer(LimitedModeLayer::new(policy))
//!     .service(service_fn(|_: Request<()>| async { Ok::<_, portcullis_middleware::BoxError>(Response::new(())) }));
//!
//! let mut request = Request::post("http://example.com/upload").body(())?;
//! request.extensions_mut().insert(Target::parse_authority("example.com:80", None)?);
//! request.extensions_mut().insert(Protocol::Http);
//! let error = service.oneshot(request).await.unwrap_err();
//! assert_eq!(find_blocked(error.as_ref()).map(|b| b.reason), Some(Reason::MethodNotAllowed));
//! # Ok(())
//! # }
//! ```

use std::task::{Context, Poll};

use http::{header, HeaderName, Method, Request};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{Blocked, BoxError, Reason, Source};
use crate::future::ResponseFuture;
use crate::policy::{Mode, PolicyHandle};
use crate::request::{HasBody, Intercepted, RequestInfo};

/// Headers that smuggle a different method past a method check.
pub const METHOD_OVERRIDE_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-original-method"),
];

/// Whether a request carries a body: a [`HasBody`] mark from the
/// transport, or a non-zero `Content-Length`.
fn carries_body<B>(request: &Request<B>) -> bool {
    request.extensions().get::<HasBody>().is_some()
        || request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// Configures [`LimitedMode`].
#[derive(Debug, Clone)]
pub struct LimitedModeLayer {
    policy: PolicyHandle,
}

impl LimitedModeLayer {
    /// Reads the mode from `policy` per request.
    pub fn new(policy: PolicyHandle) -> LimitedModeLayer {
        LimitedModeLayer { policy }
    }
}

impl<S> Layer<S> for LimitedModeLayer {
    type Service = LimitedMode<S>;

    fn layer(&self, inner: S) -> LimitedMode<S> {
        LimitedMode {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Restricts methods in limited mode; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct LimitedMode<S> {
    inner: S,
    policy: PolicyHandle,
}

impl<S> LimitedMode<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, policy: PolicyHandle) -> LimitedMode<S> {
        LimitedModeLayer::new(policy).layer(inner)
    }

    /// A layer.
    pub fn layer(policy: PolicyHandle) -> LimitedModeLayer {
        LimitedModeLayer::new(policy)
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

/// Whether limited mode lets this method through.
pub fn is_read_only(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD || *method == Method::OPTIONS
}

/// The content type git sends with a smart-HTTP fetch.
const GIT_UPLOAD_PACK_REQUEST: &str = "application/x-git-upload-pack-request";

/// Whether this is git's smart-HTTP fetch: `POST <repo>/git-upload-pack`
/// with git's content type. It asks for objects; it changes nothing.
/// (`git-receive-pack`, a push, is not this.)
pub fn is_git_fetch<B>(request: &Request<B>) -> bool {
    request.method() == Method::POST
        && request.uri().path().ends_with("/git-upload-pack")
        && request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value == GIT_UPLOAD_PACK_REQUEST)
}

/// The refusal limited mode makes of this request, if any.
fn refusal<B>(
    request: &Request<B>,
    allow_git_fetch: bool,
) -> Result<Option<Blocked>, crate::BadRequest> {
    let info = RequestInfo::from_request(request)?;
    let headers = request.headers();
    let reason = if info.protocol.is_socks() {
        Some(Reason::MethodNotAllowed)
    } else if info.method == Method::CONNECT {
        match request.extensions().get::<Intercepted>() {
            Some(_) => None,
            None => Some(Reason::MitmRequired),
        }
    } else if (is_read_only(&info.method) && carries_body(request))
        || !(is_read_only(&info.method) || allow_git_fetch && is_git_fetch(request))
        || METHOD_OVERRIDE_HEADERS
            .iter()
            .any(|name| headers.contains_key(name))
        || headers.contains_key(header::UPGRADE)
    {
        Some(Reason::MethodNotAllowed)
    } else {
        None
    };
    Ok(reason.map(|reason| {
        Blocked::new(
            reason,
            Source::LimitedMode,
            info.target,
            info.protocol,
            &info.method,
        )
    }))
}

impl<S, B> Service<Request<B>> for LimitedMode<S>
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
        let policy = self.policy.load();
        if policy.mode() == Mode::Full {
            return ResponseFuture::inner(self.inner.call(request));
        }
        match refusal(&request, policy.limited_allows_git_fetch()) {
            Ok(None) => ResponseFuture::inner(self.inner.call(request)),
            Ok(Some(blocked)) => ResponseFuture::refused(blocked),
            Err(bad) => ResponseFuture::refused(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{find_blocked, NetworkPolicy, Protocol, Target};
    use http::Response;
    use tower_test::mock;

    fn limited() -> PolicyHandle {
        PolicyHandle::new(NetworkPolicy::builder().mode(Mode::Limited).build())
    }

    fn request(method: &str, protocol: Protocol, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri("http://example.com/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut request = builder.body(()).unwrap();
        request
            .extensions_mut()
            .insert(Target::parse_authority("example.com:80", None).unwrap());
        request.extensions_mut().insert(protocol);
        request
    }

    fn with_body(mut request: Request<()>) -> Request<()> {
        request.extensions_mut().insert(HasBody);
        request
    }

    async fn outcome(policy: PolicyHandle, request: Request<()>) -> Option<Reason> {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(LimitedModeLayer::new(policy));
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request);
        match mock.poll_request() {
            std::task::Poll::Ready(Some((_, send))) => {
                send.send_response(Response::new(()));
                response.await.unwrap();
                None
            }
            _ => Some(
                find_blocked(response.await.unwrap_err().as_ref())
                    .unwrap()
                    .reason,
            ),
        }
    }

    #[tokio::test]
    async fn table() {
        use Protocol::*;
        let mut intercepted = request("CONNECT", HttpsConnect, &[]);
        intercepted.extensions_mut().insert(Intercepted);
        let cases: Vec<(Request<()>, Option<Reason>)> = vec![
            (request("GET", Http, &[]), None),
            (request("HEAD", Http, &[]), None),
            (request("OPTIONS", HttpsMitm, &[]), None),
            (request("GET", UnixSocket, &[]), None),
            (request("POST", Http, &[]), Some(Reason::MethodNotAllowed)),
            (request("get", Http, &[]), Some(Reason::MethodNotAllowed)),
            (
                request("DELETE", HttpsMitm, &[]),
                Some(Reason::MethodNotAllowed),
            ),
            (
                request("PUT", UnixSocket, &[]),
                Some(Reason::MethodNotAllowed),
            ),
            (
                request("GET", Http, &[("x-http-method-override", "DELETE")]),
                Some(Reason::MethodNotAllowed),
            ),
            (
                request("GET", Http, &[("upgrade", "websocket")]),
                Some(Reason::MethodNotAllowed),
            ),
            (
                request("GET", Http, &[("x-original-method", "POST")]),
                Some(Reason::MethodNotAllowed),
            ),
            (
                request("GET", HttpsMitm, &[("content-length", "12")]),
                Some(Reason::MethodNotAllowed),
            ),
            (request("GET", Http, &[("content-length", "0")]), None),
            (
                with_body(request("OPTIONS", Http, &[])),
                Some(Reason::MethodNotAllowed),
            ),
            (
                request("CONNECT", HttpsConnect, &[]),
                Some(Reason::MitmRequired),
            ),
            (intercepted, None),
            (
                request("CONNECT", Socks5Tcp, &[]),
                Some(Reason::MethodNotAllowed),
            ),
            (
                request("CONNECT", Socks5Udp, &[]),
                Some(Reason::MethodNotAllowed),
            ),
        ];
        for (request, expected) in cases {
            let label = format!(
                "{} {:?}",
                request.method(),
                request.extensions().get::<Protocol>()
            );
            assert_eq!(outcome(limited(), request).await, expected, "{label}");
        }
    }

    fn git(path: &str, content_type: &str) -> Request<()> {
        let mut request = request(
            "POST",
            Protocol::HttpsMitm,
            &[("content-type", content_type)],
        );
        *request.uri_mut() = format!("https://example.com{path}").parse().unwrap();
        request
    }

    #[tokio::test]
    async fn git_fetch_is_a_read_and_push_is_not() {
        let fetch = "application/x-git-upload-pack-request";
        let push = "application/x-git-receive-pack-request";
        assert_eq!(
            outcome(limited(), git("/repo.git/git-upload-pack", fetch)).await,
            None
        );
        for request in [
            git("/repo.git/git-receive-pack", push),
            git("/repo.git/git-upload-pack", "application/json"),
            git("/repo.git/git-upload-pack/extra", fetch),
            git("/repo.git/git-receive-pack", fetch),
        ] {
            let label = format!(
                "{} {:?}",
                request.uri(),
                request.headers().get("content-type")
            );
            assert_eq!(
                outcome(limited(), request).await,
                Some(Reason::MethodNotAllowed),
                "{label}"
            );
        }
        let strict = PolicyHandle::new(
            NetworkPolicy::builder()
                .mode(Mode::Limited)
                .limited_allow_git_fetch(false)
                .build(),
        );
        assert_eq!(
            outcome(strict, git("/repo.git/git-upload-pack", fetch)).await,
            Some(Reason::MethodNotAllowed)
        );
    }

    #[tokio::test]
    async fn backpressure_and_inner_errors_pass_through() {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(LimitedModeLayer::new(limited()));
        mock.allow(0);
        assert!(service.poll_ready().is_pending());
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request("GET", Protocol::Http, &[]));
        let (_, send) = mock.next_request().await.unwrap();
        send.send_error("upstream failed");
        assert_eq!(response.await.unwrap_err().to_string(), "upstream failed");
    }

    #[tokio::test]
    async fn full_mode_refuses_nothing() {
        let full = PolicyHandle::new(NetworkPolicy::default());
        assert_eq!(
            outcome(full, request("DELETE", Protocol::Socks5Tcp, &[])).await,
            None
        );
    }
}
