//! Limited (read-only) mode: only `GET`, `HEAD` and `OPTIONS` get through.
//!
//! Reads the mode from the live policy per request. In `full` mode it
//! refuses nothing. In `limited` mode it decides each request by a preset
//! of the request rules, [`RequestRules::limited`](crate::request_rules::RequestRules::limited),
//! through the same engine as the
//! [`EnforceRulesLayer`](crate::request_rules_layer::EnforceRulesLayer): one block
//! for every destination, which refuses, with [`Blocked`](crate::Blocked):
//!
//! - any method but `GET`, `HEAD`, `OPTIONS` (compared exactly and case
//!   sensitively: `get` is not `GET`) — `method_not_allowed`; git's
//!   smart-HTTP fetch (`POST <repository>/git-upload-pack` with git's
//!   content type, no query, and a body the connector checks is an
//!   upload-pack request: [`VerifyGitFetchBody`]) is a read and passes
//!   unless the policy turns that off
//!   ([`limited_allow_git_fetch`](crate::NetworkPolicyBuilder::limited_allow_git_fetch));
//!   `git-receive-pack` (push) never does;
//! - method-override headers (`x-http-method-override`, `x-http-method`,
//!   `x-method-override`, `x-original-method`, `x-method`,
//!   `x-forwarded-method`), a `_method` query parameter, the start of a
//!   push (`GET …/info/refs?service=git-receive-pack`) and protocol
//!   upgrades — `method_not_allowed`;
//! - a `GET`, `HEAD` or `OPTIONS` that carries a body ([`HasBody`](crate::HasBody), or a
//!   non-zero `Content-Length`) — `method_not_allowed`: bodies are how
//!   writes hide in reads;
//! - every request over a tunnel that cannot be intercepted (SOCKS5, a
//!   [`Protocol::Custom`](crate::Protocol::Custom) way in), whose methods
//!   cannot be seen — `method_not_allowed`;
//! - a `CONNECT` the transport cannot intercept (no [`Interceptable`](crate::Interceptable)
//!   offer) — `mitm_required`. One it can intercept passes, and the
//!   response carries this layer's [`Intercept`](crate::Intercept) answer: the transport
//!   terminates the tunnel's TLS and sends each request inside back through
//!   the stack as `https_mitm`, checked one by one;
//! - a SOCKS5 `UDP ASSOCIATE` ([`UdpAssociation`](crate::UdpAssociation))
//!   — `method_not_allowed`, as every tunnel whose methods cannot be seen.
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

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::BoxError;
use crate::future::MarkedResponse;
use crate::policy::{Mode, PolicyHandle};

pub use crate::inspect::{
    is_git_fetch, is_method_override_name, is_read_only, METHOD_OVERRIDE_HEADERS,
};
pub use crate::request::VerifyGitFetchBody;

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

impl<S, B, R> Service<Request<B>> for LimitedMode<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = MarkedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let policy = self.policy.load();
        if policy.mode() == Mode::Full {
            return MarkedResponse::inner(self.inner.call(request));
        }
        // Limited mode is a preset of the request rules, decided by the
        // same engine: see `RequestRules::limited`.
        let preset = crate::request_rules::limited_preset(policy.limited_allows_git_fetch());
        match crate::request_rules::decide_call(preset, &mut request) {
            Ok(pass) => {
                MarkedResponse::marked(self.inner.call(request), pass.intercept, pass.audited)
            }
            Err(error) => MarkedResponse::refused(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::HasBody;
    use crate::{find_blocked, Intercept, Interceptable, NetworkPolicy, Protocol, Reason, Target};
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

    /// Whether the response to `request` carries the [`Intercept`] answer.
    async fn asks_to_intercept(policy: PolicyHandle, request: Request<()>) -> bool {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(LimitedModeLayer::new(policy));
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request);
        let (_, send) = mock.next_request().await.unwrap();
        send.send_response(Response::new(()));
        response
            .await
            .unwrap()
            .extensions()
            .get::<Intercept>()
            .is_some()
    }

    #[tokio::test]
    async fn limited_mode_asks_to_intercept_an_interceptable_connect_and_nothing_else() {
        let interceptable = || {
            let mut connect = request("CONNECT", Protocol::HttpsConnect, &[]);
            connect.extensions_mut().insert(Interceptable);
            connect
        };
        assert!(asks_to_intercept(limited(), interceptable()).await);
        let full = PolicyHandle::new(NetworkPolicy::builder().build());
        assert!(!asks_to_intercept(full, interceptable()).await);
        assert!(!asks_to_intercept(limited(), request("GET", Protocol::Http, &[])).await);
        let mut association = request("CONNECT", Protocol::Socks5Udp, &[]);
        association.extensions_mut().insert(crate::UdpAssociation);
        assert_eq!(
            outcome(limited(), association).await,
            Some(Reason::MethodNotAllowed)
        );
    }

    #[tokio::test]
    async fn table() {
        use Protocol::*;
        let mut intercepted = request("CONNECT", HttpsConnect, &[]);
        intercepted.extensions_mut().insert(Interceptable);
        let mut captured = request("CONNECT", Transparent, &[]);
        captured.extensions_mut().insert(Interceptable);
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
            // A DNS question opens nothing; the connection after it is
            // judged. A captured connection is intercepted like a CONNECT.
            (request("CONNECT", Dns, &[]), None),
            (captured, None),
            (
                request("CONNECT", Transparent, &[]),
                Some(Reason::MitmRequired),
            ),
            (
                request("CONNECT", Socks5Udp, &[]),
                Some(Reason::MethodNotAllowed),
            ),
            // A way in of an integrator's: its methods are not seen.
            (
                request("CONNECT", Custom("line"), &[]),
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
            git("/api/paste;/git-upload-pack", fetch),
            git("/upload;/git-upload-pack", fetch),
            git("/repo.git/git-upload-pack?next=/upload", fetch),
            git("/git-upload-pack", fetch),
            git("/a/../git-upload-pack", fetch),
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
    async fn a_fetch_let_through_is_marked_for_its_body_check() {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(LimitedModeLayer::new(limited()));
        mock.allow(2);
        let fetch = git(
            "/repo.git/git-upload-pack",
            "application/x-git-upload-pack-request",
        );
        assert!(service.poll_ready().is_ready());
        let response = service.call(fetch);
        let (seen, send) = mock.next_request().await.unwrap();
        assert_eq!(
            seen.extensions().get::<VerifyGitFetchBody>(),
            Some(&VerifyGitFetchBody)
        );
        send.send_response(Response::new(()));
        response.await.unwrap();
        assert!(service.poll_ready().is_ready());
        let response = service.call(request("GET", Protocol::Http, &[]));
        let (seen, send) = mock.next_request().await.unwrap();
        assert_eq!(
            seen.extensions().get::<VerifyGitFetchBody>(),
            None,
            "a GET has no body"
        );
        send.send_response(Response::new(()));
        response.await.unwrap();
    }

    #[tokio::test]
    async fn override_channels_and_the_start_of_a_push_are_refused() {
        for (uri, headers) in [
            ("https://example.com/", vec![("x-method", "DELETE")]),
            ("https://example.com/", vec![("x-forwarded-method", "PUT")]),
            ("https://example.com/items/1?_method=DELETE", vec![]),
            ("https://example.com/items/1?a=1&%5Fmethod=delete", vec![]),
            ("https://example.com/items/1?_METHOD=PUT", vec![]),
            (
                "https://example.com/repo.git/info/refs?service=git-receive-pack",
                vec![],
            ),
            (
                "https://example.com/repo.git/info/refs?service=git%2Dreceive%2Dpack",
                vec![],
            ),
        ] {
            let mut get = request("GET", Protocol::HttpsMitm, &headers);
            *get.uri_mut() = uri.parse().unwrap();
            assert_eq!(
                outcome(limited(), get).await,
                Some(Reason::MethodNotAllowed),
                "{uri} {headers:?}"
            );
        }
        let mut clone_start = request("GET", Protocol::HttpsMitm, &[]);
        *clone_start.uri_mut() = "https://example.com/repo.git/info/refs?service=git-upload-pack"
            .parse()
            .unwrap();
        assert_eq!(
            outcome(limited(), clone_start).await,
            None,
            "the start of a fetch"
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
