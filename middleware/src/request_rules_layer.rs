//! The request-rules layer: decides each request by the live policy's
//! [`RequestRules`](crate::request_rules::RequestRules); see
//! [`request_rules`](crate::request_rules) for what it refuses.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::BoxError;
use crate::future::MarkedResponse;
use crate::policy::PolicyHandle;
use crate::request_rules::decide_call;

/// Configures [`EnforceRules`].
#[derive(Debug, Clone)]
pub struct EnforceRulesLayer {
    policy: PolicyHandle,
}

impl EnforceRulesLayer {
    /// Reads the rules from `policy` per request.
    pub fn new(policy: PolicyHandle) -> EnforceRulesLayer {
        EnforceRulesLayer { policy }
    }
}

impl<S> Layer<S> for EnforceRulesLayer {
    type Service = EnforceRules<S>;

    fn layer(&self, inner: S) -> EnforceRules<S> {
        EnforceRules {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Decides each request by the request rules; see [`request_rules`](crate::request_rules).
#[derive(Debug, Clone)]
pub struct EnforceRules<S> {
    inner: S,
    policy: PolicyHandle,
}

impl<S, B, R> Service<Request<B>> for EnforceRules<S>
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
        match decide_call(policy.request_rules(), &mut request) {
            Ok(pass) => {
                MarkedResponse::marked(self.inner.call(request), pass.intercept, pass.audited)
                    .frames_only(pass.frames_only)
            }
            Err(error) => MarkedResponse::refused(error),
        }
    }
}
