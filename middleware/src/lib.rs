//! The policy layers of [portcullis](https://docs.rs/portcullis): the
//! request model, the domain/IP policy, and the tower middleware that
//! enforces it.
//!
//! Every way into the proxy becomes an `http::Request` carrying a [`Target`],
//! a [`Protocol`] and a [`ClientAddr`] in its extensions, and travels through
//! one stack of tower services. A layer refuses by returning an error whose
//! cause is a [`Blocked`]: it says *what* was refused and why; each transport
//! of the `portcullis` crate says how that looks on its wire (a 403 with a
//! JSON body on HTTP, reply 0x02 on SOCKS5).
//!
//! | layer | module | refuses with |
//! | --- | --- | --- |
//! | [`ViolationLog`] | [`violation_log`] | nothing; records every refusal |
//! | [`StripHeaders`] | [`strip_headers`] | nothing; removes hop-by-hop headers |
//! | [`Policy`] | [`policy_layer`] | `denied`, `not_allowed_local`, `not_allowed` |
//! | [`LimitedMode`] | [`limited_mode`] | `method_not_allowed`, `mitm_required` |
//! | [`ApprovalWait`] | [`approval`] | `approval_denied`, `approval_timed_out`, `approval_failed` |
//!
//! # Compose a proxy's decision stack
//!
//! [`DefaultStack`] is a [`Layer`](tower::Layer) that wraps the innermost
//! service (the one that dials; here a stand-in) in the five layers, in the
//! order [`stack`] explains:
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::{find_blocked, DefaultStack, NetworkPolicy, PolicyHandle, Protocol, Target};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let policy = PolicyHandle::new(NetworkPolicy::builder().allow("**.example.com")?.deny("ads.example.com")?.build());
//! let network = service_fn(|_: Request<()>| async { Ok::<_, portcullis_middleware::BoxError>(Response::new(())) });
//! let proxy = DefaultStack::new(policy).layer(network);
//!
//! let mut request = Request::get("http://ads.example.com/").body(())?;
//! request.extensions_mut().insert(Target::parse_authority("ads.example.com:80", None)?);
//! request.extensions_mut().insert(Protocol::Http);
//! let refusal = proxy.oneshot(request).await.unwrap_err();
//! println!("{}", find_blocked(refusal.as_ref()).unwrap()); // "... is in denied_domains ..."
//! # Ok(())
//! # }
//! ```
//!
//! The same pieces are [`ServiceBuilder`](tower::ServiceBuilder) methods
//! ([`ServiceBuilderExt`]) for another order.
//!
//! # Insert a layer of your own
//!
//! Any tower layer fits, in one of two places:
//!
//! - [`DefaultStack::outer`]: just inside the violation log. It sees
//!   **every** request, refused or not, before the policy; its refusals are
//!   logged like the built-in ones. The place for authentication, tagging,
//!   or a rule of your own.
//! - [`DefaultStack::inner`]: just outside the connector. It sees **only**
//!   the requests the policy, limited mode and the approver let through. The
//!   place for concurrency limits, timeouts, metrics of real traffic.
//!
//! The `portcullis` runner takes the same two with
//! `Proxy::builder().outer_layer(..)` and `.inner_layer(..)`.
//!
//! # Refuse with a reason of your own
//!
//! Return a [`Blocked`] with [`Reason::Custom`] (and [`Source::Layer`] to
//! name your layer). The transports answer it like any refusal: a 403 with
//! `x-proxy-error: blocked-by-<name>` and the usual JSON body on HTTP, reply
//! 0x02 on SOCKS5; the violation log records it.
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::{find_blocked, Blocked, BoxError, DefaultStack, NetworkPolicy, PolicyHandle, Protocol, Reason, RequestInfo, Source, Target};
//! use tower::filter::FilterLayer;
//! use tower::limit::ConcurrencyLimitLayer;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! // Only requests that say which team sent them.
//! let require_team = FilterLayer::new(|request: Request<()>| {
//!     if request.headers().contains_key("x-team") {
//!         return Ok(request);
//!     }
//!     let info = RequestInfo::from_request(&request)?;
//!     Err::<_, BoxError>(
//!         Blocked::new(Reason::Custom("team_header"), Source::Layer("require_team"), info.target, info.protocol, &info.method)
//!             .with_message("portcullis refused the request: it has no x-team header; add one")
//!             .into(),
//!     )
//! });
//! let policy = PolicyHandle::new(NetworkPolicy::builder().allow("example.com")?.build());
//! let network = service_fn(|_: Request<()>| async { Ok::<_, BoxError>(Response::new(())) });
//! let proxy = DefaultStack::new(policy)
//!     .outer(require_team)
//!     .inner(ConcurrencyLimitLayer::new(64))
//!     .layer(network);
//!
//! let mut request = Request::get("http://example.com/").body(())?;
//! request.extensions_mut().insert(Target::parse_authority("example.com:80", None)?);
//! request.extensions_mut().insert(Protocol::Http);
//! let refusal = proxy.oneshot(request).await.unwrap_err();
//! assert_eq!(find_blocked(refusal.as_ref()).unwrap().reason.as_str(), "team_header");
//! # Ok(())
//! # }
//! ```
//!
//! # Test a layer with `tower-test`
//!
//! Each layer is generic over its inner service, so it can be tested alone
//! against a [`tower_test::mock`](https://docs.rs/tower-test) service: send a
//! request, see whether it reached the mock, answer for the mock.
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::{find_blocked, NetworkPolicy, PolicyHandle, PolicyLayer, Protocol, Reason, Target};
//! use tower_test::mock;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let policy = PolicyHandle::new(NetworkPolicy::builder().allow("ok.test")?.build());
//! let (mut service, mut handle) = mock::spawn_layer::<Request<()>, Response<()>, _>(PolicyLayer::new(policy));
//! let request = |authority: &str| -> Result<Request<()>, portcullis_middleware::BoxError> {
//!     let mut request = Request::connect(authority).body(())?;
//!     request.extensions_mut().insert(Target::parse_authority(authority, None)?);
//!     request.extensions_mut().insert(Protocol::HttpsConnect);
//!     Ok(request)
//! };
//!
//! // Allowed: it reaches the inner service, which answers.
//! handle.allow(1);
//! assert!(service.poll_ready().is_ready());
//! let response = service.call(request("ok.test:443")?);
//! let (seen, send) = handle.next_request().await.expect("reached inner");
//! assert_eq!(seen.uri(), "ok.test:443");
//! send.send_response(Response::new(()));
//! response.await?;
//!
//! // Refused: it never reaches the inner service.
//! handle.allow(1);
//! assert!(service.poll_ready().is_ready());
//! let refusal = service.call(request("other.test:443")?).await.unwrap_err();
//! assert_eq!(find_blocked(refusal.as_ref()).map(|b| b.reason), Some(Reason::NotAllowed));
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod address;
pub mod approval;
pub mod credentials;
pub mod error;
mod future;
pub mod git;
pub mod inspect;
pub mod limited_mode;
pub mod limits;
pub mod limits_layer;
pub mod loop_guard;
pub mod pattern;
pub mod policy;
pub mod policy_layer;
pub mod profiles;
pub mod protocol;
pub mod request;
pub mod request_rules;
pub mod request_rules_layer;
pub mod scan;
pub mod scan_layer;
pub mod stack;
pub mod strip_headers;
pub mod target;
pub mod violation_log;

pub use approval::{
    approver_fn, ApprovalAnswer, ApprovalKey, ApprovalOutcome, ApprovalRequest, ApprovalWait,
    ApprovalWaitLayer, ApprovedOnce, ApproverFn, AwaitingApproval, DenyApprover, RuleBook,
    RuleDecision,
};
pub use error::{
    find_blocked, BadRequest, BlockDecision, Blocked, BoxError, LocalKind, ProxyErrorRef, Reason,
    Source, UpstreamError, UpstreamErrorKind,
};
pub use future::{MarkedResponse, ResponseFuture};
pub use limited_mode::{LimitedMode, LimitedModeLayer, VerifyGitFetchBody};
pub use limits_layer::{HeldWhileOpen, RateLimit, RateLimitLayer};
pub use loop_guard::{CameRound, LoopGuard, LoopGuardLayer, NamedAnotherHost, NotTls};
pub use policy::{
    Decision, Mode, NetworkPolicy, NetworkPolicyBuilder, Pattern, PatternSet, PolicyError,
    PolicyGeneration, PolicyHandle,
};
pub use policy_layer::{Policy, PolicyLayer};
pub use request::{
    ClientAddr, HasBody, Intercept, Interceptable, Protocol, ProxyUser, RequestInfo,
    UdpAssociation, WebSocketFramesOnly,
};
pub use request_rules_layer::{EnforceRules, EnforceRulesLayer};
pub use scan_layer::{ScanBody, ScanFrames, ScanSecrets, ScanSecretsLayer};

/// The names before the layers were paired as tower pairs them (`Foo<S>`
/// and `FooLayer`); each says what it was renamed.
mod renamed {
    /// Renamed [`Policy`](crate::Policy).
    #[deprecated(note = "renamed Policy: services are Foo<S> beside FooLayer, as in tower")]
    pub type PolicyService<S> = crate::Policy<S>;
    /// Renamed [`EnforceRules`](crate::EnforceRules).
    #[deprecated(note = "renamed EnforceRules (with EnforceRulesLayer)")]
    pub type RequestRulesService<S> = crate::EnforceRules<S>;
    /// Renamed [`EnforceRulesLayer`](crate::EnforceRulesLayer).
    #[deprecated(note = "renamed EnforceRulesLayer (with EnforceRules)")]
    pub type RequestRulesLayer = crate::EnforceRulesLayer;
    /// Renamed [`InjectCredentials`](crate::credentials::InjectCredentials).
    #[deprecated(note = "renamed InjectCredentials (with InjectCredentialsLayer)")]
    pub type CredentialService<S> = crate::credentials::InjectCredentials<S>;
    /// Renamed [`InjectCredentialsLayer`](crate::credentials::InjectCredentialsLayer).
    #[deprecated(note = "renamed InjectCredentialsLayer (with InjectCredentials)")]
    pub type CredentialLayer = crate::credentials::InjectCredentialsLayer;
}
#[allow(deprecated)]
pub use renamed::{
    CredentialLayer, CredentialService, PolicyService, RequestRulesLayer, RequestRulesService,
};
pub use stack::{DefaultStack, ServiceBuilderExt};
pub use strip_headers::{StripHeaders, StripHeadersLayer};
pub use target::{Host, Target, TargetError};
pub use violation_log::{
    loggable_path, masked, Audited, JsonLinesSink, LineFile, RecordLater, Render, Violation,
    ViolationLog, ViolationLogLayer, ViolationRecord, ViolationRing, ViolationSink, Wording,
    MAX_LOGGED_PATH,
};
