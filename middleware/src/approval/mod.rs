//! Resolves *ask* decisions by waiting for an approver.
//!
//! The [`Policy`](crate::Policy) marks an allowlist miss
//! [`AwaitingApproval`] when an approver is configured; this layer holds such
//! a request until the approver answers. Requests without the mark pass
//! straight through, without a heap allocation.
//!
//! - Concurrent requests for the same [`ApprovalKey`] (host, protocol, port)
//!   share one question: the approver is called once for the whole group. A
//!   different port or protocol is another question.
//! - [`ApprovalOutcome::AllowOnce`] lets the waiting group through and
//!   nothing later; [`ApprovalOutcome::AllowForSession`] also lets every
//!   later request for the key through without asking;
//!   [`ApprovalOutcome::AllowAlways`] and [`ApprovalOutcome::DenyAlways`]
//!   are written to the [`RuleBook`] (when one is configured) and cached;
//!   [`ApprovalOutcome::Deny`] refuses the group.
//! - A [`RuleBook`] is consulted before anyone is asked: a persisted rule for
//!   the key answers at once.
//! - No answer within the timeout, an approver error, or an approver that
//!   goes away all deny (fail closed).
//! - Bounded: at most [`max_pending`](ApprovalWaitLayer::max_pending)
//!   questions wait at once (a further one is refused at once, saying so),
//!   and at most [`max_session`](ApprovalWaitLayer::max_session) keys are
//!   remembered for the session (past that, answers apply to their group
//!   only, and a warning says so once).
//!
//! Refusals are [`Blocked`](crate::Blocked) with reason `approval_denied`,
//! `approval_timed_out` or `approval_failed`, naming who answered and why;
//! the transports answer them as the README's refusal table says.
//!
//! An approver is any `tower::Service<ApprovalRequest>` whose response is an
//! [`ApprovalOutcome`] or an [`ApprovalAnswer`] (the outcome with who gave
//! it and why); [`approver_fn`] makes one from a closure, and
//! [`DenyApprover`] denies everything.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use portcullis_middleware::{approver_fn, ApprovalOutcome, ApprovalWaitLayer, AwaitingApproval, Protocol, Target};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let approver = approver_fn(|request: portcullis_middleware::ApprovalRequest| async move {
//!     Ok(if request.key.port == 443 { ApprovalOutcome::AllowOnce } else { ApprovalOutcome::Deny })
//! });
//! let service = ServiceBuilder::new()
//!     .layer(ApprovalWaitLayer::new(approver, Duration::from_secs(30)))
//!     .service(service_fn(|_: Request<()>| async { Ok::<_, portcullis_middleware::BoxError>(Response::new(())) }));
//!
//! let mut request = Request::connect("new.example:443").body(())?;
//! request.extensions_mut().insert(Target::parse_authority("new.example:443", None)?);
//! request.extensions_mut().insert(Protocol::HttpsConnect);
//! request.extensions_mut().insert(AwaitingApproval);
//! service.oneshot(request).await?;
//! # Ok(())
//! # }
//! ```

mod approvers;
mod wait;

use std::fmt;
use std::net::SocketAddr;

use crate::error::BoxError;
use crate::request::Protocol;
use crate::target::{Host, Target};

pub use approvers::{approver_fn, ApproverFn, DenyApprover};
pub use wait::{
    ApprovalWait, ApprovalWaitLayer, ApprovedOnce, ResponseFuture, DEFAULT_APPROVAL_TIMEOUT,
    DEFAULT_MAX_PENDING, DEFAULT_MAX_SESSION,
};
/// Marks a request whose policy answer is *ask*. The connector refuses any
/// request still carrying it, so a stack without an approval layer fails
/// closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AwaitingApproval;

/// What concurrent questions are grouped by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApprovalKey {
    /// The host.
    pub host: Host,
    /// The protocol.
    pub protocol: Protocol,
    /// The port.
    pub port: u16,
}

impl fmt::Display for ApprovalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            Target::host(self.host.clone(), self.port),
            self.protocol
        )
    }
}

/// The question put to an approver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRequest {
    /// What is being asked about.
    pub key: ApprovalKey,
    /// The method of the first request of the group.
    pub method: String,
    /// The client of the first request of the group.
    pub client: Option<SocketAddr>,
    /// The profile asking ([`profiles`](crate::profiles)), when the proxy
    /// has profiles: each has its own questions and session approvals.
    pub profile: Option<std::sync::Arc<str>>,
}

/// An approver's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ApprovalOutcome {
    /// Let the requests waiting now through, and nothing later.
    AllowOnce,
    /// Let them through, and every later request for the same key while the
    /// process lives.
    AllowForSession,
    /// Let them through, and persist an allow rule for the key.
    AllowAlways,
    /// Refuse the requests waiting now.
    Deny,
    /// Refuse them, and persist a deny rule for the key.
    DenyAlways,
}

impl ApprovalOutcome {
    /// Whether the requests waiting go through.
    pub fn allows(self) -> bool {
        matches!(
            self,
            ApprovalOutcome::AllowOnce
                | ApprovalOutcome::AllowForSession
                | ApprovalOutcome::AllowAlways
        )
    }
}

/// An outcome with who gave it and why: what the refusal and the log say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalAnswer {
    /// The answer.
    pub outcome: ApprovalOutcome,
    /// Who answered (`prompt`, `reviewer ./review.sh`, …).
    pub by: String,
    /// Why, in the answerer's words, if it said.
    pub rationale: Option<String>,
}

impl From<ApprovalOutcome> for ApprovalAnswer {
    fn from(outcome: ApprovalOutcome) -> ApprovalAnswer {
        ApprovalAnswer {
            outcome,
            by: "the approver".to_owned(),
            rationale: None,
        }
    }
}

/// A persisted rule's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleDecision {
    /// Allow the key without asking.
    Allow,
    /// Refuse the key without asking.
    Deny,
}

/// Rules that outlive the process ("allow always" / "deny always"):
/// consulted before an approver is asked, written when it answers
/// *always*. The `portcullis` binary keeps them in a rules file.
pub trait RuleBook: Send + Sync + 'static {
    /// The persisted decision for `key`, and a name for it (the rule as
    /// written and where), if there is one.
    fn lookup(&self, key: &ApprovalKey) -> Option<(RuleDecision, String)>;
    /// Persists a decision for `key`, with the answer's justification.
    fn record(
        &self,
        key: &ApprovalKey,
        decision: RuleDecision,
        justification: &str,
    ) -> Result<(), BoxError>;
}

#[cfg(test)]
mod tests;
