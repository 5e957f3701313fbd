//! The policy layers of [portcullis](https://docs.rs/portcullis): the
//! request model, the domain/IP policy, and the tower middleware that
//! enforces it.
//!
//! Every way into the proxy becomes an `http::Request` carrying a [`Target`],
//! a [`Protocol`] and a [`ClientAddr`] in its extensions, and travels through
//! one stack of tower services. A layer refuses by returning an error whose
//! cause is a [`Blocked`]; each transport maps it to the wire once (a 403 with
//! a JSON body on HTTP, reply 0x02 on SOCKS5).
//!
//! | layer | module | refuses with |
//! | --- | --- | --- |
//! | [`ViolationLog`] | [`violation_log`] | nothing; records every refusal |
//! | [`StripHeaders`] | [`strip_headers`] | nothing; removes hop-by-hop headers |
//! | [`PolicyService`] | [`policy_layer`] | `denied`, `not_allowed_local`, `not_allowed` |
//! | [`LimitedMode`] | [`limited_mode`] | `method_not_allowed`, `mitm_required` |
//! | [`ApprovalWait`] | [`approval`] | `approval_denied`, `approval_timed_out`, `approval_failed` |
//!
//! # A proxy's decision stack in ten lines
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

pub mod approval;
pub mod error;
mod future;
pub mod limited_mode;
pub mod policy;
pub mod policy_layer;
pub mod request;
pub mod stack;
pub mod strip_headers;
pub mod target;
pub mod violation_log;

pub use approval::{
    approver_fn, ApprovalKey, ApprovalOutcome, ApprovalRequest, ApprovalWait, ApprovalWaitLayer,
    ApprovedOnce, ApproverFn, AwaitingApproval, DenyApprover,
};
pub use error::{
    find_blocked, BadRequest, BlockDecision, Blocked, BoxError, ProxyErrorRef, Reason, Source,
    UpstreamError, UpstreamErrorKind,
};
pub use future::ResponseFuture;
pub use limited_mode::{LimitedMode, LimitedModeLayer};
pub use policy::{
    Decision, Mode, NetworkPolicy, NetworkPolicyBuilder, Pattern, PatternSet, PolicyError,
    PolicyHandle,
};
pub use policy_layer::{PolicyLayer, PolicyService};
pub use request::{ClientAddr, Intercepted, Protocol, RequestInfo};
pub use stack::{DefaultStack, ServiceBuilderExt};
pub use strip_headers::{StripHeaders, StripHeadersLayer};
pub use target::{Host, Target, TargetError};
pub use violation_log::{
    JsonLinesSink, Violation, ViolationLog, ViolationLogLayer, ViolationRing, ViolationSink,
};
