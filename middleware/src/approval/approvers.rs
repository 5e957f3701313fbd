//! Approvers of the library's own: one that denies everything, and one
//! made of a closure.

use std::fmt;
use std::future::Future;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::error::BoxError;

use super::{ApprovalOutcome, ApprovalRequest};

/// An approver that denies everything (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct DenyApprover;

impl Service<ApprovalRequest> for DenyApprover {
    type Response = ApprovalOutcome;
    type Error = BoxError;
    type Future = std::future::Ready<Result<ApprovalOutcome, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: ApprovalRequest) -> Self::Future {
        std::future::ready(Ok(ApprovalOutcome::Deny))
    }
}

/// An approver made from a closure; see [`approver_fn`].
#[derive(Clone)]
pub struct ApproverFn<F> {
    f: F,
}

impl<F> fmt::Debug for ApproverFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApproverFn").finish_non_exhaustive()
    }
}

/// Makes an approver from an async closure answering an
/// [`ApprovalOutcome`] or an [`ApprovalAnswer`](super::ApprovalAnswer).
pub fn approver_fn<F, Fut, T>(f: F) -> ApproverFn<F>
where
    F: FnMut(ApprovalRequest) -> Fut,
    Fut: Future<Output = Result<T, BoxError>>,
{
    ApproverFn { f }
}

impl<F, Fut, T> Service<ApprovalRequest> for ApproverFn<F>
where
    F: FnMut(ApprovalRequest) -> Fut,
    Fut: Future<Output = Result<T, BoxError>>,
{
    type Response = T;
    type Error = BoxError;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ApprovalRequest) -> Fut {
        (self.f)(request)
    }
}
