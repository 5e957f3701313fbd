//! The default stack, in one place, and the pieces to build another.
//!
//! [`DefaultStack`] is a [`Layer`] that wraps a connector (the innermost
//! service, which dials) in the six layers, outermost first:
//!
//! 1. [`ViolationLog`] — outermost, so it sees every refusal: from each
//!    layer below, from your own layers, and from the connector's check of
//!    resolved addresses. Just inside it, [`LoopGuard`] refuses a request
//!    its transport marked as having come round to this proxy, and
//!    [`RateLimit`] counts each request against its destination's rate
//!    ([`limits`](crate::limits); nothing to do when none is set).
//! 2. [`StripHeaders`] — hop-by-hop and control headers never reach the
//!    origin; everything the policy needs is already in extensions.
//! 3. [`Policy`] — the domain/IP decision. Denials are final; an
//!    allowlist miss becomes *ask* when an approver is configured.
//! 4. [`LimitedMode`] — method restriction, after the host is known to be
//!    allowed, so a denied host is reported as denied, not as a bad method;
//!    then the per-host [request rules](crate::request_rules) (methods and
//!    paths), which narrow the same way.
//! 5. [`ApprovalWait`] — resolves *ask* last, so no human is asked about a
//!    request that limited mode would refuse anyway.
//! 6. [`InjectCredentials`] — on a request every layer above allowed,
//!    adds a credential's secret for its hosts, and refuses a placeholder
//!    headed anywhere else ([`credentials`](crate::credentials)).
//!
//! Your own layers go in with [`DefaultStack::outer`] (between the violation
//! log and the header stripping: they see every request, and their refusals
//! are logged) or [`DefaultStack::inner`] (between the approval wait and the
//! connector: they see only requests the policy let through).
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::{DefaultStack, NetworkPolicy, PolicyHandle, Protocol, Target};
//! use tower::limit::ConcurrencyLimitLayer;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let policy = PolicyHandle::new(NetworkPolicy::builder().allow("example.com")?.build());
//! let connector = service_fn(|_: Request<()>| async { Ok::<_, portcullis_middleware::BoxError>(Response::new(())) });
//! let stack = DefaultStack::new(policy).inner(ConcurrencyLimitLayer::new(64)).layer(connector);
//!
//! let mut request = Request::get("http://example.com/").body(())?;
//! request.extensions_mut().insert(Target::parse_authority("example.com:80", None)?);
//! request.extensions_mut().insert(Protocol::Http);
//! stack.oneshot(request).await?;
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use tower::ServiceBuilder;
use tower_layer::{Identity, Layer, Stack};

use crate::approval::{ApprovalWait, ApprovalWaitLayer, DenyApprover};
use crate::credentials::{InjectCredentials, InjectCredentialsLayer};
use crate::limited_mode::{LimitedMode, LimitedModeLayer};
use crate::limits_layer::{RateLimit, RateLimitLayer};
use crate::loop_guard::{LoopGuard, LoopGuardLayer};
use crate::policy::PolicyHandle;
use crate::policy_layer::{Policy, PolicyLayer};
use crate::request_rules_layer::{EnforceRules, EnforceRulesLayer};
use crate::scan_layer::{ScanSecrets, ScanSecretsLayer};
use crate::strip_headers::{StripHeaders, StripHeadersLayer};
use crate::violation_log::{ViolationLog, ViolationLogLayer};

/// The default stack as a [`Layer`]; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct DefaultStack<A = DenyApprover, O = Identity, I = Identity> {
    policy: PolicyHandle,
    violations: ViolationLogLayer,
    rate_limit: RateLimitLayer,
    strip_headers: StripHeadersLayer,
    approval: ApprovalWaitLayer<A>,
    ask_on_miss: bool,
    credentials: InjectCredentialsLayer,
    outer: O,
    inner: I,
}

impl DefaultStack {
    /// The default stack over `policy`: no approver (allowlist misses are
    /// refused), violations kept in a 200-entry ring.
    pub fn new(policy: PolicyHandle) -> DefaultStack {
        DefaultStack {
            rate_limit: RateLimitLayer::new(policy.clone()),
            policy,
            violations: ViolationLogLayer::default(),
            strip_headers: StripHeadersLayer::new(),
            approval: ApprovalWaitLayer::without_approver(),
            ask_on_miss: false,
            credentials: InjectCredentialsLayer::default(),
            outer: Identity::new(),
            inner: Identity::new(),
        }
    }
}

impl<A, O, I> DefaultStack<A, O, I> {
    /// Asks `approver` about allowlist misses, waiting at most `timeout`.
    pub fn approver<A2>(self, approver: A2, timeout: Duration) -> DefaultStack<A2, O, I> {
        self.approval_layer(ApprovalWaitLayer::new(approver, timeout))
    }

    /// Uses this approval layer (clones of one layer share session approvals).
    pub fn approval_layer<A2>(self, approval: ApprovalWaitLayer<A2>) -> DefaultStack<A2, O, I> {
        DefaultStack {
            policy: self.policy,
            violations: self.violations,
            rate_limit: self.rate_limit,
            strip_headers: self.strip_headers,
            approval,
            ask_on_miss: true,
            credentials: self.credentials,
            outer: self.outer,
            inner: self.inner,
        }
    }

    /// Whether an allowlist miss becomes *ask* or is refused at once
    /// (`not_allowed`). [`approver`](DefaultStack::approver) and
    /// [`approval_layer`](DefaultStack::approval_layer) turn it on. With it
    /// on and no approver (an [`ApprovalWaitLayer::without_approver`]), a
    /// miss travels on marked and the connector refuses it with decision
    /// *ask*: how `check` tells what would be asked without asking.
    pub fn ask_on_miss(mut self, ask: bool) -> DefaultStack<A, O, I> {
        self.ask_on_miss = ask;
        self
    }

    /// Records violations with this layer (its ring and sinks).
    pub fn violations(mut self, violations: ViolationLogLayer) -> DefaultStack<A, O, I> {
        self.violations = violations;
        self
    }

    /// Injects and guards these credentials (none by default); see
    /// [`credentials`](crate::credentials).
    pub fn credentials(mut self, credentials: InjectCredentialsLayer) -> DefaultStack<A, O, I> {
        self.credentials = credentials;
        self
    }

    /// Strips headers with this configuration.
    pub fn strip_headers(mut self, strip_headers: StripHeadersLayer) -> DefaultStack<A, O, I> {
        self.strip_headers = strip_headers;
        self
    }

    /// Adds a layer of your own just inside the violation log: it sees
    /// every request, and its [`Blocked`](crate::Blocked) refusals are
    /// logged. Layers added later sit further in.
    pub fn outer<L>(self, layer: L) -> DefaultStack<A, Stack<L, O>, I> {
        self.map_layers(|outer, inner| (Stack::new(layer, outer), inner))
    }

    /// Adds a layer of your own just outside the connector: it sees only
    /// requests the policy (and approver) let through. Layers added later
    /// sit further in.
    pub fn inner<L>(self, layer: L) -> DefaultStack<A, O, Stack<L, I>> {
        self.map_layers(|outer, inner| (outer, Stack::new(layer, inner)))
    }

    /// Replaces your own layers, outer and inner at once, with whole layer
    /// stacks (a [`Stack`] chain, as [`ServiceBuilder::into_inner`] returns
    /// one); [`Identity`] for none. This is how the `portcullis` runner
    /// passes the layers given to its builder.
    pub fn layers<O2, I2>(self, outer: O2, inner: I2) -> DefaultStack<A, O2, I2> {
        self.map_layers(|_, _| (outer, inner))
    }

    fn map_layers<O2, I2>(self, f: impl FnOnce(O, I) -> (O2, I2)) -> DefaultStack<A, O2, I2> {
        let (outer, inner) = f(self.outer, self.inner);
        DefaultStack {
            policy: self.policy,
            violations: self.violations,
            rate_limit: self.rate_limit,
            strip_headers: self.strip_headers,
            approval: self.approval,
            ask_on_miss: self.ask_on_miss,
            credentials: self.credentials,
            outer,
            inner,
        }
    }

    /// The live policy the stack reads.
    pub fn policy(&self) -> &PolicyHandle {
        &self.policy
    }
}

impl<S, A, O, I> Layer<S> for DefaultStack<A, O, I>
where
    A: Clone,
    I: Layer<S>,
    O: Layer<
        StripHeaders<
            Policy<
                LimitedMode<
                    EnforceRules<ScanSecrets<ApprovalWait<InjectCredentials<I::Service>, A>>>,
                >,
            >,
        >,
    >,
{
    type Service = ViolationLog<LoopGuard<RateLimit<O::Service>>>;

    fn layer(&self, connector: S) -> Self::Service {
        ServiceBuilder::new()
            // 1. Outermost: every refusal below, the connector's included, passes here.
            .layer(self.violations.clone())
            // A request the transport saw come round to us: refused, on the record.
            .layer(LoopGuardLayer::new())
            // Rate limits per destination: counted before anything else is
            // done for the request; a refusal is logged like any other.
            .layer(self.rate_limit.clone())
            // Integrator layers that should see (and may refuse) every request.
            .layer(&self.outer)
            // 2. Hop-by-hop and control headers never reach the origin.
            .layer(self.strip_headers.clone())
            // 3. Domain/IP policy: deny wins; a miss is refused or marked *ask*.
            .layer(PolicyLayer::new(self.policy.clone()).ask_on_miss(self.ask_on_miss))
            // 4. Method restriction, once the host is known to be allowed.
            .layer(LimitedModeLayer::new(self.policy.clone()))
            // 4b. Request rules (methods and paths per host): they narrow too.
            .layer(EnforceRulesLayer::new(self.policy.clone()))
            // 4c. Secrets in the request as the program sent it: before
            //     anyone is asked, and before credentials are added.
            .layer(
                ScanSecretsLayer::new(self.policy.clone())
                    .credentials(&self.credentials)
                    .recording(self.violations.late()),
            )
            // 5. Resolve *ask* last: no one is asked about what would be refused anyway.
            .layer(self.approval.clone())
            // 6. Credentials: only on a fully allowed request; a placeholder
            //    headed anywhere but its hosts is refused.
            .layer(self.credentials.clone())
            // Integrator layers that should see only allowed requests.
            .layer(&self.inner)
            .service(connector)
    }
}

/// The layers as [`ServiceBuilder`] methods, to build another order.
///
/// ```
/// use std::time::Duration;
/// use http::{Request, Response};
/// use portcullis_middleware::{DenyApprover, PolicyHandle, ServiceBuilderExt, ViolationLogLayer};
/// use tower::{service_fn, ServiceBuilder};
///
/// let policy = PolicyHandle::default();
/// let _service = ServiceBuilder::new()
///     .violation_log(ViolationLogLayer::default())
///     .policy(policy.clone(), true)
///     .approval_wait(DenyApprover, Duration::from_secs(10))
///     .strip_headers()
///     .limited_mode(policy)
///     .service(service_fn(|_: Request<()>| async { Ok::<_, portcullis_middleware::BoxError>(Response::new(())) }));
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Adds [`ViolationLog`].
    fn violation_log(self, layer: ViolationLogLayer)
        -> ServiceBuilder<Stack<ViolationLogLayer, L>>;
    /// Adds [`StripHeaders`] with the default configuration.
    fn strip_headers(self) -> ServiceBuilder<Stack<StripHeadersLayer, L>>;
    /// Adds [`Policy`]; `ask_on_miss` when an approval layer follows.
    fn policy(
        self,
        policy: PolicyHandle,
        ask_on_miss: bool,
    ) -> ServiceBuilder<Stack<PolicyLayer, L>>;
    /// Adds [`LimitedMode`].
    fn limited_mode(self, policy: PolicyHandle) -> ServiceBuilder<Stack<LimitedModeLayer, L>>;
    /// Adds [`ApprovalWait`].
    fn approval_wait<A>(
        self,
        approver: A,
        timeout: Duration,
    ) -> ServiceBuilder<Stack<ApprovalWaitLayer<A>, L>>;
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn violation_log(
        self,
        layer: ViolationLogLayer,
    ) -> ServiceBuilder<Stack<ViolationLogLayer, L>> {
        self.layer(layer)
    }

    fn strip_headers(self) -> ServiceBuilder<Stack<StripHeadersLayer, L>> {
        self.layer(StripHeadersLayer::new())
    }

    fn policy(
        self,
        policy: PolicyHandle,
        ask_on_miss: bool,
    ) -> ServiceBuilder<Stack<PolicyLayer, L>> {
        self.layer(PolicyLayer::new(policy).ask_on_miss(ask_on_miss))
    }

    fn limited_mode(self, policy: PolicyHandle) -> ServiceBuilder<Stack<LimitedModeLayer, L>> {
        self.layer(LimitedModeLayer::new(policy))
    }

    fn approval_wait<A>(
        self,
        approver: A,
        timeout: Duration,
    ) -> ServiceBuilder<Stack<ApprovalWaitLayer<A>, L>> {
        self.layer(ApprovalWaitLayer::new(approver, timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        approver_fn, find_blocked, ApprovalOutcome, Mode, NetworkPolicy, Protocol, Reason, Source,
        Target, ViolationRing,
    };
    use http::{Request, Response};
    use tower::ServiceExt;
    use tower_test::mock;

    fn request(method: &str, authority: &str, protocol: Protocol) -> Request<()> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{authority}/"))
            .header("proxy-authorization", "secret")
            .body(())
            .unwrap();
        request
            .extensions_mut()
            .insert(Target::parse_authority(authority, None).unwrap());
        request.extensions_mut().insert(protocol);
        request
    }

    #[tokio::test]
    async fn order_deny_before_method_and_everything_logged() {
        let policy = PolicyHandle::new(
            NetworkPolicy::builder()
                .allow("ok.test")
                .unwrap()
                .deny("bad.test")
                .unwrap()
                .mode(Mode::Limited)
                .build(),
        );
        let ring = ViolationRing::default();
        let (connector, mut mock) = mock::pair::<Request<()>, Response<()>>();
        let stack = DefaultStack::new(policy)
            .violations(ViolationLogLayer::new(ring.clone()))
            .layer(connector);
        mock.allow(1);
        let error = stack
            .clone()
            .oneshot(request("POST", "bad.test:80", Protocol::Http))
            .await
            .unwrap_err();
        assert_eq!(find_blocked(error.as_ref()).unwrap().reason, Reason::Denied);
        let error = stack
            .clone()
            .oneshot(request("POST", "ok.test:80", Protocol::Http))
            .await
            .unwrap_err();
        assert_eq!(
            find_blocked(error.as_ref()).unwrap().reason,
            Reason::MethodNotAllowed
        );
        let allowed = tokio::spawn(stack.clone().oneshot(request(
            "GET",
            "ok.test:80",
            Protocol::Http,
        )));
        let (seen, send) = mock.next_request().await.unwrap();
        assert!(seen.headers().get("proxy-authorization").is_none());
        send.send_response(Response::new(()));
        allowed.await.unwrap().unwrap();
        assert_eq!(ring.total(), 2);
    }

    #[tokio::test]
    async fn approver_is_asked_only_about_misses_and_custom_layers_slot_in() {
        let policy = PolicyHandle::new(NetworkPolicy::builder().deny("bad.test").unwrap().build());
        let approver = approver_fn(|request: crate::ApprovalRequest| async move {
            assert_ne!(request.key.host.to_string(), "bad.test");
            Ok(ApprovalOutcome::AllowOnce)
        });
        let ring = ViolationRing::default();
        let outer_refusal = tower::filter::FilterLayer::new(|request: Request<()>| {
            if request.headers().contains_key("x-refuse") {
                let target = Target::parse_authority("refused.test:1", None)?;
                return Err(crate::Blocked::new(
                    Reason::Denied,
                    Source::Policy,
                    target,
                    Protocol::Http,
                    request.method(),
                )
                .into());
            }
            Ok::<_, crate::BoxError>(request)
        });
        let (connector, mut mock) = mock::pair::<Request<()>, Response<()>>();
        let stack = DefaultStack::new(policy)
            .approver(approver, Duration::from_secs(5))
            .violations(ViolationLogLayer::new(ring.clone()))
            .outer(outer_refusal)
            .inner(tower::limit::ConcurrencyLimitLayer::new(4))
            .layer(connector);
        mock.allow(3);
        let allowed = tokio::spawn(stack.clone().oneshot(request(
            "GET",
            "new.test:80",
            Protocol::Http,
        )));
        let (_, send) = mock.next_request().await.unwrap();
        send.send_response(Response::new(()));
        allowed.await.unwrap().unwrap();
        let error = stack
            .clone()
            .oneshot(request("GET", "bad.test:80", Protocol::Http))
            .await
            .unwrap_err();
        assert_eq!(find_blocked(error.as_ref()).unwrap().reason, Reason::Denied);
        let mut refused = request("GET", "new.test:80", Protocol::Http);
        refused
            .headers_mut()
            .insert("x-refuse", "1".parse().unwrap());
        assert!(stack.clone().oneshot(refused).await.is_err());
        assert_eq!(ring.total(), 2, "the outer layer's refusal is logged too");
    }
}
