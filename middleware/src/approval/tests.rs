//! The approval layer's unit tests.
use super::wait::lock;
use super::*;
use crate::error::{Reason, Source};
use crate::find_blocked;
use http::Request;
use http::Response;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;
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
) -> impl Service<ApprovalRequest, Response = ApprovalOutcome, Error = BoxError, Future = impl Send>
       + Clone
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
