//! Resolves *ask* decisions by waiting for an approver.
//!
//! The [`PolicyService`](crate::PolicyService) marks an allowlist miss
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
//! Refusals are [`Blocked`] with reason `approval_denied`,
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

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::watch;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{Blocked, BoxError, Reason, Source};
use crate::request::{Protocol, RequestInfo};
use crate::target::{Host, Target};

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
/// [`ApprovalOutcome`] or an [`ApprovalAnswer`].
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

/// What the waiting group learns.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Allow { once: bool },
    Refuse { reason: Reason, detail: String },
}

/// The default time an approver has to answer.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(60);
/// The default number of questions that may wait at once.
pub const DEFAULT_MAX_PENDING: usize = 64;
/// The default number of keys remembered for the session.
pub const DEFAULT_MAX_SESSION: usize = 4096;

#[derive(Clone)]
struct Config {
    timeout: Duration,
    max_pending: usize,
    max_session: usize,
    rules: Option<Arc<dyn RuleBook>>,
}

impl Config {
    fn with_timeout(timeout: Duration) -> Config {
        Config {
            timeout,
            max_pending: DEFAULT_MAX_PENDING,
            max_session: DEFAULT_MAX_SESSION,
            rules: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("timeout", &self.timeout)
            .field("max_pending", &self.max_pending)
            .field("max_session", &self.max_session)
            .field("rules", &self.rules.is_some())
            .finish()
    }
}

#[derive(Debug, Default)]
struct Questions {
    pending: Mutex<HashMap<ApprovalKey, watch::Receiver<Option<Answer>>>>,
    /// Session answers: `true` allow, `false` deny (from *deny always*).
    session: Mutex<HashMap<ApprovalKey, bool>>,
    session_full_said: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Configures [`ApprovalWait`]. Clones share pending questions and
/// session approvals.
#[derive(Debug, Clone)]
pub struct ApprovalWaitLayer<A> {
    approver: Option<A>,
    config: Arc<Config>,
    questions: Arc<Questions>,
}

impl<A> ApprovalWaitLayer<A> {
    /// Waits on `approver` for at most `timeout` per question.
    pub fn new(approver: A, timeout: Duration) -> ApprovalWaitLayer<A> {
        ApprovalWaitLayer {
            approver: Some(approver),
            config: Arc::new(Config::with_timeout(timeout)),
            questions: Arc::default(),
        }
    }

    /// A layer with no approver: it asks nobody (it still reads its
    /// [`RuleBook`], if given one), and a request marked [`AwaitingApproval`]
    /// passes on still marked, so the connector below refuses it with
    /// decision *ask*. `portcullis check` decides through such a stack to
    /// tell which requests would be put to an approver.
    pub fn without_approver() -> ApprovalWaitLayer<A> {
        ApprovalWaitLayer {
            approver: None,
            config: Arc::new(Config::with_timeout(DEFAULT_APPROVAL_TIMEOUT)),
            questions: Arc::default(),
        }
    }

    /// At most `max` questions wait at once; a further one is refused at
    /// once (`approval_failed`, saying so). Default 64.
    pub fn max_pending(mut self, max: usize) -> ApprovalWaitLayer<A> {
        Arc::make_mut(&mut self.config).max_pending = max;
        self
    }

    /// At most `max` keys are remembered for the session; past that an
    /// answer applies to its waiting group only. Default 4096.
    pub fn max_session(mut self, max: usize) -> ApprovalWaitLayer<A> {
        Arc::make_mut(&mut self.config).max_session = max;
        self
    }

    /// Consults and writes these persisted rules.
    pub fn rules(mut self, rules: Arc<dyn RuleBook>) -> ApprovalWaitLayer<A> {
        Arc::make_mut(&mut self.config).rules = Some(rules);
        self
    }

    /// How many questions are waiting for an answer now.
    pub fn pending(&self) -> usize {
        lock(&self.questions.pending).len()
    }
}

impl Default for ApprovalWaitLayer<DenyApprover> {
    fn default() -> ApprovalWaitLayer<DenyApprover> {
        ApprovalWaitLayer::new(DenyApprover, DEFAULT_APPROVAL_TIMEOUT)
    }
}

impl<S, A: Clone> Layer<S> for ApprovalWaitLayer<A> {
    type Service = ApprovalWait<S, A>;

    fn layer(&self, inner: S) -> ApprovalWait<S, A> {
        ApprovalWait {
            inner,
            approver: self.approver.clone(),
            config: self.config.clone(),
            questions: self.questions.clone(),
        }
    }
}

/// Holds *ask* requests until an approver answers; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ApprovalWait<S, A> {
    inner: S,
    approver: Option<A>,
    config: Arc<Config>,
    questions: Arc<Questions>,
}

impl<S, A> ApprovalWait<S, A> {
    /// Wraps `inner`.
    pub fn new(inner: S, approver: A, timeout: Duration) -> ApprovalWait<S, A>
    where
        A: Clone,
    {
        ApprovalWaitLayer::new(approver, timeout).layer(inner)
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

impl<S, A, B, RB> Service<Request<B>> for ApprovalWait<S, A>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    A: Service<ApprovalRequest> + Clone + Send + 'static,
    A::Response: Into<ApprovalAnswer>,
    A::Error: Into<BoxError>,
    A::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S, Request<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if request.extensions().get::<AwaitingApproval>().is_none() {
            return ResponseFuture::inner(self.inner.call(request), false);
        }
        let info = match RequestInfo::from_request(&request) {
            Ok(info) => info,
            Err(bad) => return ResponseFuture::refused(bad),
        };
        let Target::Host { host, port } = &info.target else {
            // Only host names and addresses are ever approvable.
            return ResponseFuture::refused(Blocked::new(
                Reason::NotAllowed,
                Source::Approval,
                info.target,
                info.protocol,
                &info.method,
            ));
        };
        let key = ApprovalKey {
            host: host.clone(),
            protocol: info.protocol,
            port: *port,
        };
        let known = lock(&self.questions.session).get(&key).copied();
        let persisted = || {
            self.config
                .rules
                .as_ref()
                .and_then(|rules| rules.lookup(&key))
        };
        let settled = match known {
            Some(true) => Some(Answer::Allow { once: false }),
            Some(false) => Some(Answer::Refuse {
                reason: Reason::ApprovalDenied,
                detail: "denied always earlier in this session".into(),
            }),
            None => match persisted() {
                Some((RuleDecision::Allow, _)) => Some(Answer::Allow { once: false }),
                Some((RuleDecision::Deny, rule)) => Some(Answer::Refuse {
                    reason: Reason::ApprovalDenied,
                    detail: format!("denied by {rule}"),
                }),
                None => None,
            },
        };
        match settled {
            Some(Answer::Allow { .. }) => {
                request.extensions_mut().remove::<AwaitingApproval>();
                return ResponseFuture::inner(self.inner.call(request), false);
            }
            Some(Answer::Refuse { reason, detail }) => {
                return ResponseFuture::refused(refusal(reason, &detail, info));
            }
            None => {}
        }
        let Some(approver) = &self.approver else {
            // Nobody to ask: the request goes on still marked, and the
            // connector refuses it with decision *ask*.
            return ResponseFuture::inner(self.inner.call(request), false);
        };
        let mut receiver = match self.question(approver.clone(), key, &info) {
            Ok(receiver) => receiver,
            Err(detail) => {
                return ResponseFuture::refused(refusal(Reason::ApprovalFailed, &detail, info))
            }
        };
        let answer = Box::pin(async move {
            match receiver.wait_for(Option::is_some).await {
                Ok(answer) => answer.clone(),
                Err(_) => None,
            }
        });
        // Keep the service that was polled ready for this request; leave a
        // fresh clone behind for the next one.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        ResponseFuture {
            state: State::Waiting {
                answer,
                pending: Some((inner, request, info)),
            },
        }
    }
}

/// The refusal of a request the approval stage turned down: what decided
/// (`denied by …`, `no answer within …`, the approver's failure) is its
/// rule, and the message stays the built-in one, so each edge words the
/// fix for where its reader is (`--allow` under `run`, the key in a file).
fn refusal(reason: Reason, detail: &str, info: RequestInfo) -> Blocked {
    Blocked::new(
        reason,
        Source::Approval,
        info.target,
        info.protocol,
        &info.method,
    )
    .with_rule(Some(detail.to_owned()))
}

/// Marks a response to a request that an approver let through with *allow
/// once*: the approval covers the requests that were waiting for it and
/// nothing later, so whoever caches decisions (the SOCKS5 UDP relay) must
/// not keep this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApprovedOnce;

type AnswerFuture = Pin<Box<dyn Future<Output = Option<Answer>> + Send>>;

pin_project! {
    /// The response future of [`ApprovalWait`]: the inner service's future
    /// for a request that needs no approval (no allocation), or a wait for
    /// the approver's answer followed by the inner call.
    pub struct ResponseFuture<F, S, R> {
        #[pin]
        state: State<F, S, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, R> {
        Inner { #[pin] future: F, once: bool },
        Waiting { answer: AnswerFuture, pending: Option<(S, R, RequestInfo)> },
        Refused { error: Option<BoxError> },
    }
}

impl<F, S, R> fmt::Debug for ResponseFuture<F, S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Inner { .. } => "inner",
            State::Waiting { .. } => "waiting for the approver",
            State::Refused { .. } => "refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, S, R> ResponseFuture<F, S, R> {
    fn inner(future: F, once: bool) -> ResponseFuture<F, S, R> {
        ResponseFuture {
            state: State::Inner { future, once },
        }
    }

    fn refused(error: impl Into<BoxError>) -> ResponseFuture<F, S, R> {
        ResponseFuture {
            state: State::Refused {
                error: Some(error.into()),
            },
        }
    }
}

impl<F, S, B, RB> Future for ResponseFuture<F, S, Request<B>>
where
    S: Service<Request<B>, Response = Response<RB>, Future = F>,
    S::Error: Into<BoxError>,
    F: Future<Output = Result<Response<RB>, S::Error>>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Inner { future, once } => {
                    let mut result = ready!(future.poll(cx)).map_err(Into::into);
                    if let (Ok(response), true) = (&mut result, *once) {
                        response.extensions_mut().insert(ApprovedOnce);
                    }
                    return Poll::Ready(result);
                }
                StateProj::Refused { error } => {
                    return Poll::Ready(Err(error.take().unwrap_or_else(|| {
                        "portcullis: response future polled after completion".into()
                    })))
                }
                StateProj::Waiting { answer, pending } => {
                    let answer = ready!(answer.as_mut().poll(cx));
                    let Some((mut inner, mut request, info)) = pending.take() else {
                        return Poll::Ready(Err(
                            "portcullis: response future polled after completion".into(),
                        ));
                    };
                    match answer.unwrap_or(Answer::Refuse {
                        reason: Reason::ApprovalFailed,
                        detail: "the approver went away".into(),
                    }) {
                        Answer::Allow { once } => {
                            request.extensions_mut().remove::<AwaitingApproval>();
                            State::Inner {
                                future: inner.call(request),
                                once,
                            }
                        }
                        Answer::Refuse { reason, detail } => State::Refused {
                            error: Some(refusal(reason, &detail, info).into()),
                        },
                    }
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

impl<S, A> ApprovalWait<S, A>
where
    A: Service<ApprovalRequest> + Clone + Send + 'static,
    A::Response: Into<ApprovalAnswer>,
    A::Error: Into<BoxError>,
    A::Future: Send + 'static,
{
    /// Joins the pending question for `key`, or asks a new one; refuses when
    /// too many are pending.
    fn question(
        &self,
        approver: A,
        key: ApprovalKey,
        info: &RequestInfo,
    ) -> Result<watch::Receiver<Option<Answer>>, String> {
        let mut pending = lock(&self.questions.pending);
        if let Some(receiver) = pending.get(&key) {
            return Ok(receiver.clone());
        }
        if pending.len() >= self.config.max_pending {
            return Err(format!(
                "{} questions are already waiting for the approver, the most allowed; try again once they are answered",
                pending.len()
            ));
        }
        let (sender, receiver) = watch::channel(None);
        pending.insert(key.clone(), receiver.clone());
        drop(pending);
        let request = ApprovalRequest {
            key: key.clone(),
            method: info.method.as_str().to_owned(),
            client: info.client,
        };
        let questions = self.questions.clone();
        let config = self.config.clone();
        tokio::spawn(async move {
            let answer = match tokio::time::timeout(config.timeout, ask(approver, request)).await {
                Err(_) => Answer::Refuse {
                    reason: Reason::ApprovalTimedOut,
                    detail: format!("no answer within {:?}", config.timeout),
                },
                Ok(Err(error)) => {
                    tracing::warn!(target: "portcullis::approval", key = %key, error = %error, "approver failed; denying");
                    Answer::Refuse {
                        reason: Reason::ApprovalFailed,
                        detail: format!("the approver failed: {error}"),
                    }
                }
                Ok(Ok(answer)) => settle(&config, &questions, &key, answer),
            };
            lock(&questions.pending).remove(&key);
            let _ = sender.send(Some(answer));
        });
        Ok(receiver)
    }
}

/// Applies an approver's answer: caches and persists what it says to.
fn settle(
    config: &Config,
    questions: &Questions,
    key: &ApprovalKey,
    answer: ApprovalAnswer,
) -> Answer {
    let said = match &answer.rationale {
        Some(rationale) => format!("{}: {}", answer.by, rationale),
        None => answer.by.clone(),
    };
    tracing::info!(target: "portcullis::approval", key = %key, outcome = ?answer.outcome, by = %answer.by, rationale = answer.rationale.as_deref().unwrap_or(""), "approval answered");
    let persist = |decision| {
        if let Some(rules) = &config.rules {
            if let Err(error) = rules.record(key, decision, &said) {
                tracing::warn!(target: "portcullis::approval", key = %key, %error, "could not persist the rule; it holds for this session only");
            }
        }
    };
    let remember = |allow| {
        let mut session = lock(&questions.session);
        if session.len() < config.max_session || session.contains_key(key) {
            session.insert(key.clone(), allow);
        } else if !questions.session_full_said.swap(true, Ordering::Relaxed) {
            tracing::warn!(target: "portcullis::approval", max = config.max_session, "the session's approval cache is full; further answers apply to their waiting requests only");
        }
    };
    match answer.outcome {
        ApprovalOutcome::AllowOnce => Answer::Allow { once: true },
        ApprovalOutcome::AllowForSession => {
            remember(true);
            Answer::Allow { once: false }
        }
        ApprovalOutcome::AllowAlways => {
            persist(RuleDecision::Allow);
            remember(true);
            Answer::Allow { once: false }
        }
        ApprovalOutcome::DenyAlways => {
            persist(RuleDecision::Deny);
            remember(false);
            Answer::Refuse {
                reason: Reason::ApprovalDenied,
                detail: format!("denied always by {said}"),
            }
        }
        ApprovalOutcome::Deny => Answer::Refuse {
            reason: Reason::ApprovalDenied,
            detail: format!("denied by {said}"),
        },
    }
}

async fn ask<A>(mut approver: A, request: ApprovalRequest) -> Result<ApprovalAnswer, BoxError>
where
    A: Service<ApprovalRequest>,
    A::Response: Into<ApprovalAnswer>,
    A::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| approver.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    approver
        .call(request)
        .await
        .map(Into::into)
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::find_blocked;
    use http::Response;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;
    use tower_test::mock;

    fn ask_request(authority: &str) -> Request<()> {
        let mut request = Request::connect(authority).body(()).unwrap();
        request
            .extensions_mut()
            .insert(Target::parse_authority(authority, None).unwrap());
        request.extensions_mut().insert(Protocol::HttpsConnect);
        request.extensions_mut().insert(AwaitingApproval);
        request
    }

    fn counting(
        outcome: ApprovalOutcome,
        calls: Arc<AtomicUsize>,
        delay: Duration,
    ) -> impl Service<
        ApprovalRequest,
        Response = ApprovalOutcome,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        approver_fn(move |_| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                Ok(outcome)
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_asks_share_one_question() {
        let calls = Arc::new(AtomicUsize::new(0));
        let approver = counting(
            ApprovalOutcome::AllowOnce,
            calls.clone(),
            Duration::from_secs(5),
        );
        let (service, mut mock) = mock::pair::<Request<()>, Response<()>>();
        let service = ApprovalWaitLayer::new(approver, Duration::from_secs(30)).layer(service);
        mock.allow(50);
        let mut waiting = Vec::new();
        for _ in 0..50 {
            let service = service.clone();
            waiting.push(tokio::spawn(service.oneshot(ask_request("new.test:443"))));
        }
        for _ in 0..50 {
            let (seen, send) = mock.next_request().await.unwrap();
            assert!(
                seen.extensions().get::<AwaitingApproval>().is_none(),
                "the mark is removed once approved"
            );
            send.send_response(Response::new(()));
        }
        for task in waiting {
            let response = task.await.unwrap().unwrap();
            assert!(
                response.extensions().get::<ApprovedOnce>().is_some(),
                "an allow-once answer is marked so that nobody caches it"
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Allow once does not outlive its group: a later request asks again.
        mock.allow(1);
        let later = tokio::spawn(service.clone().oneshot(ask_request("new.test:443")));
        let (_, send) = mock.next_request().await.unwrap();
        send.send_response(Response::new(()));
        later.await.unwrap().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn session_approval_is_remembered_per_key() {
        let calls = Arc::new(AtomicUsize::new(0));
        let approver = counting(
            ApprovalOutcome::AllowForSession,
            calls.clone(),
            Duration::ZERO,
        );
        let (service, mut mock) = mock::pair::<Request<()>, Response<()>>();
        let service = ApprovalWaitLayer::new(approver, Duration::from_secs(30)).layer(service);
        mock.allow(3);
        for authority in ["a.test:443", "a.test:443", "a.test:8443"] {
            let pending = tokio::spawn(service.clone().oneshot(ask_request(authority)));
            let (_, send) = mock.next_request().await.unwrap();
            send.send_response(Response::new(()));
            let response = pending.await.unwrap().unwrap();
            assert!(response.extensions().get::<ApprovedOnce>().is_none());
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the second port is another key"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deny_timeout_and_failure_refuse_without_reaching_inner() {
        let slow = counting(
            ApprovalOutcome::AllowOnce,
            Arc::default(),
            Duration::from_secs(3600),
        );
        let failing =
            approver_fn(|_| async { Err::<ApprovalOutcome, BoxError>("reviewer crashed".into()) });
        type MakeService = Box<dyn Fn(mock::Mock<Request<()>, Response<()>>) -> BoxService + Send>;
        let cases: Vec<(Reason, MakeService)> = vec![
            (
                Reason::ApprovalDenied,
                Box::new(|m| boxed(ApprovalWaitLayer::default().layer(m))),
            ),
            (
                Reason::ApprovalTimedOut,
                Box::new(move |m| {
                    boxed(ApprovalWaitLayer::new(slow.clone(), Duration::from_secs(60)).layer(m))
                }),
            ),
            (
                Reason::ApprovalFailed,
                Box::new(move |m| {
                    boxed(ApprovalWaitLayer::new(failing.clone(), Duration::from_secs(60)).layer(m))
                }),
            ),
        ];
        for (reason, make) in cases {
            let (service, mut mock) = mock::pair::<Request<()>, Response<()>>();
            mock.allow(1);
            let error = make(service)
                .oneshot(ask_request("x.test:443"))
                .await
                .unwrap_err();
            let blocked = find_blocked(error.as_ref()).unwrap();
            assert_eq!(blocked.reason, reason);
            assert_eq!(blocked.source, Source::Approval);
            assert!(
                !matches!(mock.poll_request(), std::task::Poll::Ready(Some(_))),
                "never reached inner"
            );
        }
    }

    type BoxService = tower::util::BoxService<Request<()>, Response<()>, BoxError>;
    fn boxed<S>(service: S) -> BoxService
    where
        S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Send + 'static,
        S::Future: Send + 'static,
    {
        BoxService::new(service)
    }

    fn request_for(authority: &str, protocol: Protocol) -> Request<()> {
        let mut request = ask_request(authority);
        request.extensions_mut().insert(protocol);
        request
    }

    #[derive(Default)]
    struct MemoryRules {
        rules: Mutex<HashMap<ApprovalKey, RuleDecision>>,
        written: Mutex<Vec<(ApprovalKey, RuleDecision, String)>>,
    }

    impl RuleBook for MemoryRules {
        fn lookup(&self, key: &ApprovalKey) -> Option<(RuleDecision, String)> {
            lock(&self.rules)
                .get(key)
                .map(|decision| (*decision, "rules.toml: a test rule".to_owned()))
        }
        fn record(
            &self,
            key: &ApprovalKey,
            decision: RuleDecision,
            justification: &str,
        ) -> Result<(), BoxError> {
            lock(&self.written).push((key.clone(), decision, justification.to_owned()));
            Ok(())
        }
    }

    /// Sends one ask through `service`; answers for the mock if it is
    /// reached; returns the refusal reason, if refused.
    async fn one(
        service: &tower::util::BoxCloneService<Request<()>, Response<()>, BoxError>,
        mock: &mut mock::Handle<Request<()>, Response<()>>,
        request: Request<()>,
    ) -> Option<Reason> {
        mock.allow(1);
        let pending = tokio::spawn(service.clone().oneshot(request));
        loop {
            if pending.is_finished() {
                break;
            }
            if let std::task::Poll::Ready(Some((_, send))) = mock.poll_request() {
                send.send_response(Response::new(()));
            }
            tokio::task::yield_now().await;
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        match pending.await.unwrap() {
            Ok(_) => None,
            Err(error) => Some(find_blocked(error.as_ref()).unwrap().reason),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_outcome_is_cached_and_persisted_as_it_says() {
        use ApprovalOutcome::*;
        for (outcome, asked_again, refused, persisted) in [
            (AllowOnce, true, None, None),
            (AllowForSession, false, None, None),
            (AllowAlways, false, None, Some(RuleDecision::Allow)),
            (Deny, true, Some(Reason::ApprovalDenied), None),
            (
                DenyAlways,
                false,
                Some(Reason::ApprovalDenied),
                Some(RuleDecision::Deny),
            ),
        ] {
            let calls = Arc::new(AtomicUsize::new(0));
            let rules = Arc::new(MemoryRules::default());
            let layer = ApprovalWaitLayer::new(
                counting(outcome, calls.clone(), Duration::ZERO),
                Duration::from_secs(30),
            )
            .rules(rules.clone());
            let (service, mut mock) = mock::pair::<Request<()>, Response<()>>();
            let service = tower::util::BoxCloneService::new(layer.layer(service));
            for _ in 0..2 {
                let got = one(&service, &mut mock, ask_request("k.test:443")).await;
                assert_eq!(got, refused, "{outcome:?}");
            }
            let expected_calls = if asked_again { 2 } else { 1 };
            assert_eq!(calls.load(Ordering::SeqCst), expected_calls, "{outcome:?}");
            let written = lock(&rules.written).clone();
            assert_eq!(written.first().map(|w| w.1), persisted, "{outcome:?}");
            assert!(written.len() <= 1, "persisted once: {outcome:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ports_and_protocols_are_separate_questions_and_rules_answer_first() {
        let calls = Arc::new(AtomicUsize::new(0));
        let rules = Arc::new(MemoryRules::default());
        let denied_key = ApprovalKey {
            host: Host::Name("ruled.test".into()),
            protocol: Protocol::HttpsConnect,
            port: 443,
        };
        lock(&rules.rules).insert(denied_key, RuleDecision::Deny);
        let layer = ApprovalWaitLayer::new(
            counting(
                ApprovalOutcome::AllowForSession,
                calls.clone(),
                Duration::ZERO,
            ),
            Duration::from_secs(30),
        )
        .rules(rules);
        let (service, mut mock) = mock::pair::<Request<()>, Response<()>>();
        let service = tower::util::BoxCloneService::new(layer.layer(service));
        for (authority, protocol) in [
            ("a.test:443", Protocol::HttpsConnect),
            ("a.test:443", Protocol::HttpsConnect),
            ("a.test:8443", Protocol::HttpsConnect),
            ("a.test:443", Protocol::Socks5Tcp),
        ] {
            assert_eq!(
                one(&service, &mut mock, request_for(authority, protocol)).await,
                None
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "one question per (host, protocol, port)"
        );
        mock.allow(1);
        let error = service
            .clone()
            .oneshot(ask_request("ruled.test:443"))
            .await
            .unwrap_err();
        let blocked = find_blocked(error.as_ref()).unwrap();
        assert_eq!(blocked.reason, Reason::ApprovalDenied);
        assert!(
            blocked.message.contains("rules.toml"),
            "{}",
            blocked.message
        );
        // The rule is for port 443 only.
        assert_eq!(
            one(&service, &mut mock, ask_request("ruled.test:8443")).await,
            None
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "a rule never asked; another port is"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pending_questions_and_the_session_cache_are_bounded() {
        let slow = counting(
            ApprovalOutcome::AllowOnce,
            Arc::default(),
            Duration::from_secs(20),
        );
        let layer = ApprovalWaitLayer::new(slow, Duration::from_secs(30)).max_pending(2);
        let (service, mut handle) = mock::pair::<Request<()>, Response<()>>();
        handle.allow(3);
        let service = layer.layer(service);
        let _first = tokio::spawn(service.clone().oneshot(ask_request("p1.test:443")));
        let _second = tokio::spawn(service.clone().oneshot(ask_request("p2.test:443")));
        tokio::task::yield_now().await;
        let third = service.clone().oneshot(ask_request("p3.test:443"));
        let error = tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("refused at once, not queued")
            .unwrap_err();
        let blocked = find_blocked(error.as_ref()).unwrap();
        assert_eq!(blocked.reason, Reason::ApprovalFailed);
        assert!(
            blocked.message.contains("already waiting"),
            "{}",
            blocked.message
        );

        let calls = Arc::new(AtomicUsize::new(0));
        let layer = ApprovalWaitLayer::new(
            counting(
                ApprovalOutcome::AllowForSession,
                calls.clone(),
                Duration::ZERO,
            ),
            Duration::from_secs(30),
        )
        .max_session(1);
        let (service, mut mock) = mock::pair::<Request<()>, Response<()>>();
        let service = tower::util::BoxCloneService::new(layer.layer(service));
        for authority in ["s1.test:443", "s2.test:443", "s1.test:443", "s2.test:443"] {
            assert_eq!(one(&service, &mut mock, ask_request(authority)).await, None);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "only the first key was remembered"
        );
    }

    #[tokio::test]
    async fn without_an_approver_marked_requests_pass_on_still_marked() {
        let layer = ApprovalWaitLayer::<DenyApprover>::without_approver();
        let (mut service, mut mock) = mock::spawn_layer::<Request<()>, Response<()>, _>(layer);
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(ask_request("z.test:443"));
        let (seen, send) = mock.next_request().await.unwrap();
        assert!(
            seen.extensions().get::<AwaitingApproval>().is_some(),
            "the mark stays for the connector to refuse"
        );
        send.send_response(Response::new(()));
        response.await.unwrap();
    }

    #[tokio::test]
    async fn unmarked_requests_and_backpressure_pass_through() {
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(ApprovalWaitLayer::default());
        mock.allow(0);
        assert!(service.poll_ready().is_pending());
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let mut request = ask_request("y.test:443");
        request.extensions_mut().remove::<AwaitingApproval>();
        let response = service.call(request);
        let (_, send) = mock.next_request().await.unwrap();
        send.send_error("inner failed");
        assert_eq!(response.await.unwrap_err().to_string(), "inner failed");
    }
}
