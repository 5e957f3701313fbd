//! The secret-scanning layer: refuses (or records, in audit mode) a request
//! that carries a secret, by the live policy's [`ScanPolicy`](crate::scan::ScanPolicy).
//! It sits before the credentials are added, so a secret the proxy injects
//! never trips it.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{BlockDecision, Blocked, BoxError, Reason, Source};
use crate::future::MarkedResponse;
use crate::policy::PolicyHandle;
use crate::request::RequestInfo;
use crate::scan::ScanAction;

/// Adds [`ScanSecrets`].
#[derive(Debug, Clone)]
pub struct ScanSecretsLayer {
    policy: PolicyHandle,
    placeholders: Arc<[String]>,
}

impl ScanSecretsLayer {
    /// Reads the scanning settings from `policy` per request.
    pub fn new(policy: PolicyHandle) -> ScanSecretsLayer {
        ScanSecretsLayer {
            policy,
            placeholders: Arc::from(Vec::new()),
        }
    }

    /// Tokens that are not secrets though shaped like them: the
    /// placeholders of the credentials the stack adds further in
    /// ([`InjectCredentialsLayer::placeholders`](crate::credentials::InjectCredentialsLayer::placeholders)).
    pub fn placeholders(mut self, placeholders: Vec<String>) -> ScanSecretsLayer {
        self.placeholders = Arc::from(placeholders);
        self
    }
}

impl<S> Layer<S> for ScanSecretsLayer {
    type Service = ScanSecrets<S>;

    fn layer(&self, inner: S) -> ScanSecrets<S> {
        ScanSecrets {
            inner,
            policy: self.policy.clone(),
            placeholders: self.placeholders.clone(),
        }
    }
}

/// Scans each request for secrets; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ScanSecrets<S> {
    inner: S,
    policy: PolicyHandle,
    placeholders: Arc<[String]>,
}

impl<S, B, R> Service<Request<B>> for ScanSecrets<S>
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

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let policy = self.policy.load();
        let scan = policy.scan();
        if scan.action == ScanAction::Off {
            return MarkedResponse::inner(self.inner.call(request));
        }
        let info = match RequestInfo::from_request(&request) {
            Ok(info) => info,
            Err(error) => return MarkedResponse::refused(error),
        };
        let Some(finding) = scan.finding(&info.target, &request, &self.placeholders) else {
            return MarkedResponse::inner(self.inner.call(request));
        };
        let method = info.method.as_str().escape_debug().to_string();
        let blocked = Blocked::new(
            Reason::SecretDetected,
            Source::Layer("secret_scan"),
            info.target.clone(),
            info.protocol,
            &info.method,
        )
        .with_rule(Some(finding.to_string()));
        match scan.action {
            ScanAction::Audit => {
                let message = format!(
                    "portcullis let {method} {} through in audit mode; it carries a secret: {finding}, which [scan] action = \"deny\" refuses",
                    info.target
                );
                let audited = blocked
                    .with_decision(BlockDecision::Audit)
                    .with_message(message);
                MarkedResponse::marked(self.inner.call(request), false, Some(audited))
            }
            _ => {
                let message = format!(
                    "portcullis refused {method} {}: it carries a secret: {finding} (the value is not recorded); remove it from the request, or, if it is not a secret, set [scan] action = \"audit\" or add the host to [scan] skip_hosts",
                    info.target
                );
                MarkedResponse::refused(
                    blocked
                        .with_decision(BlockDecision::Deny)
                        .with_message(message),
                )
            }
        }
    }
}
