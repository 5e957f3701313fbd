//! Decides every request against the live domain/IP policy.
//!
//! Reads a snapshot of the [`PolicyHandle`] per request (so a reload or an
//! approval applies to the next request) and refuses with [`Blocked`]:
//! `denied` (denylist), `not_allowed_local` (local/private address), or
//! `not_allowed` (allowlist miss). With an approver configured
//! ([`PolicyLayer::ask_on_miss`]), an allowlist miss is not refused here:
//! the request is marked [`AwaitingApproval`] and passed on, and the
//! [`ApprovalWait`](crate::ApprovalWait) layer below resolves it. Denials and
//! local-address refusals are final and never reach an approver. A request
//! without a [`Target`] is a [`BadRequest`]
//! (fail closed). A SOCKS5 association ([`UdpAssociation`]) names no
//! destination and passes: each of its datagrams is decided on its own.
//! A DNS question (protocol [`Dns`](Protocol::Dns)) is decided by name on
//! any port ([`NetworkPolicy::decide_lookup`](crate::NetworkPolicy::decide_lookup)); with an approver, a
//! question for a name the allowlist misses is answered, and the connection
//! that follows is what asks.
//!
//! The transports answer these refusals as the README's refusal table says
//! (a 403 with a JSON body on HTTP, reply 0x02 on SOCKS5).
//!
//! # Example
//!
//! ```
//! use http::{Method, Request, Response};
//! use portcullis_middleware::{find_blocked, NetworkPolicy, PolicyHandle, PolicyLayer, Protocol, Reason, Target};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let policy = PolicyHandle::new(NetworkPolicy::builder().allow("*.example.com")?.build());
//! let service = ServiceBuilder::new()
//!     .layer(PolicyLayer::new(policy))
//!     .service(service_fn(|_: Request<()>| async { Ok::<_, portcullis_middleware::BoxError>(Response::new(())) }));
//!
//! let mut request = Request::connect("evil.test:443").body(())?;
//! request.extensions_mut().insert(Target::parse_authority("evil.test:443", None)?);
//! request.extensions_mut().insert(Protocol::HttpsConnect);
//! let error = service.oneshot(request).await.unwrap_err();
//! assert_eq!(find_blocked(error.as_ref()).map(|b| b.reason), Some(Reason::NotAllowed));
//! # Ok(())
//! # }
//! ```

use std::task::{Context, Poll};

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::approval::AwaitingApproval;
use crate::error::{BadRequest, Reason};
use crate::error::{BlockDecision, Blocked, BoxError, Source};
use crate::future::ResponseFuture;
use crate::policy::{Decision, PolicyHandle};
use crate::request::{Protocol, UdpAssociation};
use crate::target::Target;

/// Configures [`Policy`].
#[derive(Debug, Clone)]
pub struct PolicyLayer {
    policy: PolicyHandle,
    ask_on_miss: bool,
}

impl PolicyLayer {
    /// Enforces `policy`; allowlist misses are refused.
    pub fn new(policy: PolicyHandle) -> PolicyLayer {
        PolicyLayer {
            policy,
            ask_on_miss: false,
        }
    }

    /// Whether an allowlist miss becomes *ask* (set when an approver is
    /// configured below this layer).
    pub fn ask_on_miss(mut self, ask: bool) -> PolicyLayer {
        self.ask_on_miss = ask;
        self
    }
}

impl<S> Layer<S> for PolicyLayer {
    type Service = Policy<S>;

    fn layer(&self, inner: S) -> Policy<S> {
        Policy {
            inner,
            layer: self.clone(),
        }
    }
}

/// Enforces the domain/IP policy; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Policy<S> {
    inner: S,
    layer: PolicyLayer,
}

impl<S> Policy<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, policy: PolicyHandle) -> Policy<S> {
        PolicyLayer::new(policy).layer(inner)
    }

    /// A layer.
    pub fn layer(policy: PolicyHandle) -> PolicyLayer {
        PolicyLayer::new(policy)
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

impl<S, B> Service<Request<B>> for Policy<S>
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

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // Decide on the borrowed target; the request model is copied only
        // when a refusal has to carry it.
        let extensions = request.extensions();
        let Some(target) = extensions.get::<Target>() else {
            return ResponseFuture::refused(BadRequest::new(
                "the request carries no parsed destination (no Target extension)",
            ));
        };
        let Some(&protocol) = extensions.get::<Protocol>() else {
            return ResponseFuture::refused(BadRequest::new(
                "the request carries no Protocol extension",
            ));
        };
        if extensions.get::<UdpAssociation>().is_some() {
            // No destination yet: each datagram is decided on its own.
            return ResponseFuture::inner(self.inner.call(request));
        }
        let policy = self.layer.policy.load();
        let decision = match (protocol.is_lookup(), target) {
            (true, Target::Host { host, .. }) => policy.decide_lookup(host),
            _ => policy.decide(target),
        };
        let (reason, rule) = match decision {
            Decision::Allow { .. } => return ResponseFuture::inner(self.inner.call(request)),
            // A question for a name an approver may allow is answered; the
            // connection that follows asks (one question per destination).
            Decision::Miss if self.layer.ask_on_miss && protocol.is_lookup() => {
                return ResponseFuture::inner(self.inner.call(request))
            }
            Decision::Miss if self.layer.ask_on_miss && target.host_ref().is_some() => {
                request.extensions_mut().insert(AwaitingApproval);
                return ResponseFuture::inner(self.inner.call(request));
            }
            Decision::Deny { reason, rule } => (reason, Some(rule)),
            Decision::Miss => (Reason::NotAllowed, None),
        };
        ResponseFuture::refused(
            Blocked::new(
                reason,
                Source::Policy,
                target.clone(),
                protocol,
                request.method(),
            )
            .with_rule(rule)
            .with_decision(BlockDecision::Deny),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{find_blocked, NetworkPolicy, Protocol, Target};
    use http::Response;
    use tower_test::mock;

    fn request(authority: &str) -> Request<&'static str> {
        let mut request = Request::connect(authority).body("body").unwrap();
        request
            .extensions_mut()
            .insert(Target::parse_authority(authority, None).unwrap());
        request.extensions_mut().insert(Protocol::HttpsConnect);
        request
    }

    fn handle() -> PolicyHandle {
        PolicyHandle::new(
            NetworkPolicy::builder()
                .allow("*.example.com")
                .unwrap()
                .deny("bad.example.com")
                .unwrap()
                .build(),
        )
    }

    #[tokio::test]
    async fn allowed_reaches_inner_unchanged() {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<&str>, Response<()>, _>(PolicyLayer::new(handle()));
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request("api.example.com:443"));
        let (seen, send) = mock.next_request().await.unwrap();
        assert_eq!(seen.uri(), "api.example.com:443");
        assert_eq!(*seen.body(), "body");
        assert!(seen.extensions().get::<AwaitingApproval>().is_none());
        send.send_response(Response::new(()));
        response.await.unwrap();
    }

    #[tokio::test]
    async fn refusals_never_reach_inner() {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<&str>, Response<()>, _>(PolicyLayer::new(handle()));
        for (authority, reason) in [
            ("bad.example.com:443", Reason::Denied),
            ("other.test:443", Reason::NotAllowed),
            ("127.0.0.1:443", Reason::NotAllowedLocal),
        ] {
            mock.allow(1);
            assert!(service.poll_ready().is_ready());
            let error = service.call(request(authority)).await.unwrap_err();
            let blocked = find_blocked(error.as_ref()).expect("a Blocked");
            assert_eq!(blocked.reason, reason, "{authority}");
            assert_eq!(blocked.source, Source::Policy);
        }
        let mut no_target = Request::new("x");
        no_target.extensions_mut().insert(Protocol::Http);
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let error = service.call(no_target).await.unwrap_err();
        assert!(error.downcast_ref::<crate::BadRequest>().is_some());
        assert!(
            !matches!(mock.poll_request(), std::task::Poll::Ready(Some(_))),
            "no refused request reached inner"
        );
    }

    #[tokio::test]
    async fn a_dns_question_is_decided_by_name_on_any_port() {
        let policy = PolicyHandle::new(
            NetworkPolicy::builder()
                .allow("api.example.com:8443")
                .unwrap()
                .allow("ssh.example.com")
                .unwrap()
                .deny("ssh.example.com:22")
                .unwrap()
                .deny("*.bad.example.com")
                .unwrap()
                .build(),
        );
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<&str>, Response<()>, _>(PolicyLayer::new(policy));
        let question = |name: &str| {
            let mut request = Request::connect(format!("{name}:0")).body("").unwrap();
            let host = crate::target::Host::parse(name).unwrap();
            request.extensions_mut().insert(Target::host(host, 0));
            request.extensions_mut().insert(Protocol::Dns);
            request
        };
        // Allowed on one port: answered. Denied on one port only: answered.
        for name in ["api.example.com", "ssh.example.com"] {
            mock.allow(1);
            assert!(service.poll_ready().is_ready());
            let response = service.call(question(name));
            let (seen, send) = mock.next_request().await.unwrap();
            assert_eq!(seen.extensions().get::<Protocol>(), Some(&Protocol::Dns));
            send.send_response(Response::new(()));
            response.await.unwrap();
        }
        for (name, reason) in [
            ("x.bad.example.com", Reason::Denied),
            ("other.test", Reason::NotAllowed),
            ("localhost", Reason::NotAllowedLocal),
            ("127.0.0.1", Reason::NotAllowed),
        ] {
            mock.allow(1);
            assert!(service.poll_ready().is_ready());
            let error = service.call(question(name)).await.unwrap_err();
            let blocked = find_blocked(error.as_ref()).expect("a Blocked");
            assert_eq!(blocked.reason, reason, "{name}");
            assert_eq!(blocked.protocol, Protocol::Dns);
        }
        // With an approver, a missed name is answered without asking: the
        // connection that follows asks. A denied one is still refused.
        let policy = PolicyHandle::new(
            NetworkPolicy::builder()
                .deny("bad.example.com")
                .unwrap()
                .build(),
        );
        let (mut service, mut mock) = mock::spawn_layer::<Request<&str>, Response<()>, _>(
            PolicyLayer::new(policy).ask_on_miss(true),
        );
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(question("other.test"));
        let (seen, send) = mock.next_request().await.unwrap();
        assert!(seen.extensions().get::<AwaitingApproval>().is_none());
        send.send_response(Response::new(()));
        response.await.unwrap();
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let error = service.call(question("bad.example.com")).await.unwrap_err();
        assert_eq!(find_blocked(error.as_ref()).unwrap().reason, Reason::Denied);
    }

    #[tokio::test]
    async fn an_association_names_no_destination_and_passes() {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<&str>, Response<()>, _>(PolicyLayer::new(handle()));
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let mut association = request("127.0.0.1:443");
        association.extensions_mut().insert(UdpAssociation);
        let response = service.call(association);
        let (_, send) = mock.next_request().await.unwrap();
        send.send_response(Response::new(()));
        response.await.unwrap();
    }

    #[tokio::test]
    async fn a_miss_with_an_approver_is_marked_and_passed_on() {
        let layer = PolicyLayer::new(handle()).ask_on_miss(true);
        let (mut service, mut mock) = mock::spawn_layer::<Request<&str>, Response<()>, _>(layer);
        mock.allow(2);
        assert!(service.poll_ready().is_ready());
        let _pending = service.call(request("other.test:443"));
        let (seen, _send) = mock.next_request().await.unwrap();
        assert!(seen.extensions().get::<AwaitingApproval>().is_some());
        // Denials stay final even with an approver.
        assert!(service.poll_ready().is_ready());
        let error = service
            .call(request("bad.example.com:443"))
            .await
            .unwrap_err();
        assert_eq!(find_blocked(error.as_ref()).unwrap().reason, Reason::Denied);
    }

    #[tokio::test]
    async fn reads_the_policy_live() {
        let policy = handle();
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<&str>, Response<()>, _>(PolicyLayer::new(policy.clone()));
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        assert!(service.call(request("new.test:443")).await.is_err());
        policy.store(NetworkPolicy::builder().allow("new.test").unwrap().build());
        assert!(service.poll_ready().is_ready());
        let response = service.call(request("new.test:443"));
        let (_, send) = mock.next_request().await.unwrap();
        send.send_response(Response::new(()));
        response.await.unwrap();
    }

    #[tokio::test]
    async fn backpressure_and_inner_errors_pass_through() {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<&str>, Response<()>, _>(PolicyLayer::new(handle()));
        mock.allow(0);
        assert!(service.poll_ready().is_pending());
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request("a.example.com:443"));
        let (_, send) = mock.next_request().await.unwrap();
        send.send_error("dial failed");
        assert_eq!(response.await.unwrap_err().to_string(), "dial failed");
    }
}
