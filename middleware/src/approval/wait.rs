//! The layer that holds a request marked [`AwaitingApproval`] until an
//! approver answers: one question per key, bounded, fail closed.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
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
use crate::request::RequestInfo;
use crate::target::Target;

use super::approvers::DenyApprover;
use super::{
    ApprovalAnswer, ApprovalKey, ApprovalOutcome, ApprovalRequest, AwaitingApproval, RuleBook,
    RuleDecision,
};

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
    profile: Option<Arc<str>>,
}

impl Config {
    fn with_timeout(timeout: Duration) -> Config {
        Config {
            timeout,
            max_pending: DEFAULT_MAX_PENDING,
            max_session: DEFAULT_MAX_SESSION,
            rules: None,
            profile: None,
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

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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

    /// A layer for the profile `profile` ([`profiles`](crate::profiles)):
    /// the same approver, timeout and bounds, without the persisted rules
    /// (give the profile's own with [`rules`](Self::rules)), and with
    /// questions and session approvals of its own, so an answer given to
    /// one profile is never taken for another. Its questions name the
    /// profile ([`ApprovalRequest::profile`]).
    pub fn for_profile(&self, profile: &str) -> ApprovalWaitLayer<A>
    where
        A: Clone,
    {
        let mut config = (*self.config).clone();
        config.rules = None;
        config.profile = Some(Arc::from(profile));
        ApprovalWaitLayer {
            approver: self.approver.clone(),
            config: Arc::new(config),
            questions: Arc::default(),
        }
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

/// Holds *ask* requests until an approver answers; see the [module docs](super).
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
            profile: self.config.profile.clone(),
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
