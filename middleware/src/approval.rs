//! Resolves *ask* decisions by waiting for an approver.
//!
//! The [`PolicyService`](crate::PolicyService) marks an allowlist miss
//! [`AwaitingApproval`] when an approver is configured; this layer holds such
//! a request until the approver answers. Requests without the mark pass
//! straight through.
//!
//! - Concurrent requests for the same [`ApprovalKey`] (host, protocol, port)
//!   share one question: the approver is called once for the whole group.
//! - [`ApprovalOutcome::AllowOnce`] lets the waiting group through;
//!   [`ApprovalOutcome::AllowForSession`] also lets every later request for
//!   the key through without asking; [`ApprovalOutcome::Deny`] refuses the
//!   group.
//! - No answer within the timeout, an approver error, or an approver that
//!   goes away all deny (fail closed).
//!
//! Refusals are [`Blocked`] with reason `approval_denied`,
//! `approval_timed_out` or `approval_failed`; the transports answer them as
//! the README's refusal table says.
//!
//! An approver is any `tower::Service<ApprovalRequest, Response =
//! ApprovalOutcome>`; [`approver_fn`] makes one from a closure, and
//! [`DenyApprover`] (the default) denies everything.
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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApprovalOutcome {
    /// Let the requests waiting now through.
    AllowOnce,
    /// Let them through, and every later request for the same key.
    AllowForSession,
    /// Refuse the requests waiting now.
    Deny,
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

/// Makes an approver from an async closure.
pub fn approver_fn<F, Fut>(f: F) -> ApproverFn<F>
where
    F: FnMut(ApprovalRequest) -> Fut,
    Fut: Future<Output = Result<ApprovalOutcome, BoxError>>,
{
    ApproverFn { f }
}

impl<F, Fut> Service<ApprovalRequest> for ApproverFn<F>
where
    F: FnMut(ApprovalRequest) -> Fut,
    Fut: Future<Output = Result<ApprovalOutcome, BoxError>>,
{
    type Response = ApprovalOutcome;
    type Error = BoxError;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ApprovalRequest) -> Fut {
        (self.f)(request)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Allow { once: bool },
    Refuse(Reason),
}

#[derive(Debug, Default)]
struct Questions {
    pending: Mutex<HashMap<ApprovalKey, watch::Receiver<Option<Answer>>>>,
    session: Mutex<HashSet<ApprovalKey>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The default time an approver has to answer.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(60);

/// Configures [`ApprovalWait`]. Clones share pending questions and
/// session approvals.
#[derive(Debug, Clone)]
pub struct ApprovalWaitLayer<A> {
    approver: Option<A>,
    timeout: Duration,
    questions: Arc<Questions>,
}

impl<A> ApprovalWaitLayer<A> {
    /// Waits on `approver` for at most `timeout` per question.
    pub fn new(approver: A, timeout: Duration) -> ApprovalWaitLayer<A> {
        ApprovalWaitLayer {
            approver: Some(approver),
            timeout,
            questions: Arc::default(),
        }
    }

    /// A layer with no approver: it asks nobody, and a request marked
    /// [`AwaitingApproval`] passes on still marked, so the connector below
    /// refuses it with decision *ask*. `portcullis check` decides through
    /// such a stack to tell which requests would be put to an approver.
    pub fn without_approver() -> ApprovalWaitLayer<A> {
        ApprovalWaitLayer {
            approver: None,
            timeout: DEFAULT_APPROVAL_TIMEOUT,
            questions: Arc::default(),
        }
    }

    /// Forgets every session approval.
    pub fn clear_session(&self) {
        lock(&self.questions.session).clear();
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
            timeout: self.timeout,
            questions: self.questions.clone(),
        }
    }
}

/// Holds *ask* requests until an approver answers; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ApprovalWait<S, A> {
    inner: S,
    approver: Option<A>,
    timeout: Duration,
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
    A: Service<ApprovalRequest, Response = ApprovalOutcome> + Clone + Send + 'static,
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
        let Some(approver) = &self.approver else {
            return ResponseFuture::inner(self.inner.call(request), false);
        };
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
        if lock(&self.questions.session).contains(&key) {
            request.extensions_mut().remove::<AwaitingApproval>();
            return ResponseFuture::inner(self.inner.call(request), false);
        }
        let mut receiver = self.question(approver.clone(), key, &info);
        let answer = Box::pin(async move {
            match receiver.wait_for(Option::is_some).await {
                Ok(answer) => *answer,
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
                    match answer.unwrap_or(Answer::Refuse(Reason::ApprovalFailed)) {
                        Answer::Allow { once } => {
                            request.extensions_mut().remove::<AwaitingApproval>();
                            State::Inner {
                                future: inner.call(request),
                                once,
                            }
                        }
                        Answer::Refuse(reason) => State::Refused {
                            error: Some(
                                Blocked::new(
                                    reason,
                                    Source::Approval,
                                    info.target,
                                    info.protocol,
                                    &info.method,
                                )
                                .into(),
                            ),
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
    A: Service<ApprovalRequest, Response = ApprovalOutcome> + Clone + Send + 'static,
    A::Error: Into<BoxError>,
    A::Future: Send + 'static,
{
    /// Joins the pending question for `key`, or asks a new one.
    fn question(
        &self,
        approver: A,
        key: ApprovalKey,
        info: &RequestInfo,
    ) -> watch::Receiver<Option<Answer>> {
        let mut pending = lock(&self.questions.pending);
        if let Some(receiver) = pending.get(&key) {
            return receiver.clone();
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
        let timeout = self.timeout;
        tokio::spawn(async move {
            let answer = match tokio::time::timeout(timeout, ask(approver, request)).await {
                Err(_) => Answer::Refuse(Reason::ApprovalTimedOut),
                Ok(Err(error)) => {
                    tracing::warn!(target: "portcullis::approval", error = %error, "approver failed; denying");
                    Answer::Refuse(Reason::ApprovalFailed)
                }
                Ok(Ok(ApprovalOutcome::AllowOnce)) => Answer::Allow { once: true },
                Ok(Ok(ApprovalOutcome::AllowForSession)) => {
                    lock(&questions.session).insert(key.clone());
                    Answer::Allow { once: false }
                }
                Ok(Ok(ApprovalOutcome::Deny)) => Answer::Refuse(Reason::ApprovalDenied),
            };
            lock(&questions.pending).remove(&key);
            let _ = sender.send(Some(answer));
        });
        receiver
    }
}

async fn ask<A>(mut approver: A, request: ApprovalRequest) -> Result<ApprovalOutcome, BoxError>
where
    A: Service<ApprovalRequest, Response = ApprovalOutcome>,
    A::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| approver.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    approver.call(request).await.map_err(Into::into)
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
        mock.allow(10);
        let mut waiting = Vec::new();
        for _ in 0..10 {
            let service = service.clone();
            waiting.push(tokio::spawn(service.oneshot(ask_request("new.test:443"))));
        }
        for _ in 0..10 {
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
