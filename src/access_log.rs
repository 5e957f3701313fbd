//! The access log: one line per allowed request (and per tunnel opened), at
//! info under the tracing target `portcullis::access`: one event, written
//! when the response body ends, with every field (no span: a span's fields
//! are formatted when it opens and again on each record, which cost a
//! logged request half as much again as an unlogged one). Refusals are not
//! here (the violation log has them); upstream failures are, at warn, with
//! the cause.
//!
//! Fields, fixed like the violation events': `client.addr`, `protocol`,
//! `method`, `dst.host`, `dst.port`, `status`, `bytes` (the response body,
//! as sent), `ttfb_ms` and `stream_ms` (to the response head, then to its
//! last byte; for a tunnel or an empty body, `duration_ms` to the answer).
//! A tunnel's own bytes are logged when it closes (`tunnel closed`,
//! `bytes.up`, `bytes.down`).
//!
//! `serve` logs at info, so the access log is on; `run` logs at warn, so it
//! is off unless asked (`PORTCULLIS_LOG=info` or
//! `PORTCULLIS_LOG=warn,portcullis::access=info`).
//!
//! ```
//! use portcullis::access_log::AccessLogLayer;
//! use portcullis::body::Body;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # fn wrap(inner: portcullis::ProxyService) {
//! let logged = ServiceBuilder::new().layer(AccessLogLayer::new()).service(inner);
//! # let _ = logged.boxed_clone();
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use hyper::body::Frame;
use tokio::time::Instant;
use tower::{Layer, Service};

use portcullis_middleware::{find_blocked, BoxError, ClientAddr, Protocol, Target};

use crate::connector::Tunnel;
use crate::metrics::Metrics;

/// The tracing target of the access log.
pub const ACCESS_TARGET: &str = "portcullis::access";

/// The access log layer; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct AccessLogLayer {
    /// Where allowed requests and bytes down are counted: the proxy's own
    /// counters, or (alone) counters of this layer's.
    metrics: Arc<Metrics>,
}

impl AccessLogLayer {
    /// The access log.
    pub fn new() -> AccessLogLayer {
        AccessLogLayer::default()
    }

    /// Counts into these metrics (a proxy's).
    pub(crate) fn counting(metrics: Arc<Metrics>) -> AccessLogLayer {
        AccessLogLayer { metrics }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`AccessLogLayer`] makes: `S`, with every allowed request
/// counted and (at info) logged; its response body is an [`AccessBody`].
#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AccessLog<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: std::fmt::Display + 'static,
    ResBody: hyper::body::Body<Data = Bytes>,
    ResBody::Error: std::fmt::Display + 'static,
{
    type Response = Response<AccessBody<ResBody>>;
    type Error = S::Error;
    type Future = AccessFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let extensions = request.extensions();
        let protocol = extensions
            .get::<Protocol>()
            .map_or("unknown", |p| p.as_str());
        let profile = extensions
            .get::<portcullis_middleware::profiles::ProfileName>()
            .map(|profile| profile.0.clone());
        // Off, the access log costs one cached interest check: nothing
        // below (a string a request) is built.
        let line = tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO).then(|| {
            let (host, port) = match extensions.get::<Target>() {
                Some(target) => (
                    target.host_string(),
                    target.port().map(u32::from).unwrap_or(0),
                ),
                None => (String::new(), 0),
            };
            Box::new(Line {
                client: extensions.get::<ClientAddr>().map(|c| c.0),
                protocol,
                method: request.method().clone(),
                host,
                port,
                status: 0,
                ttfb_ms: 0,
            })
        });
        // Failures are logged at warn, which may be on when info is not
        // (under `run`): then without the request's fields.
        let failures =
            line.is_some() || tracing::enabled!(target: ACCESS_TARGET, tracing::Level::WARN);
        let connect = request.method() == Method::CONNECT;
        AccessFuture {
            inner: self.inner.call(request),
            metrics: self.metrics.clone(),
            seen: Some(Seen {
                profile,
                protocol,
                connect,
                line,
                failures,
                start: Instant::now(),
            }),
        }
    }
}

/// What the log knows of a request before its answer.
struct Seen {
    profile: Option<Arc<str>>,
    protocol: &'static str,
    connect: bool,
    /// The line's fields, when the access log is on.
    line: Option<Box<Line>>,
    /// Whether failures are logged (without `line`: with no fields).
    failures: bool,
    start: Instant,
}

/// One access line's fields.
struct Line {
    client: Option<SocketAddr>,
    protocol: &'static str,
    method: Method,
    host: String,
    port: u32,
    status: u16,
    ttfb_ms: u64,
}

/// An access event: the line's request fields, then `$rest` (more fields
/// and the message).
macro_rules! access_event {
    ($level:expr, $line:expr, $($rest:tt)*) => {{
        let line: &Line = $line;
        let client = line.client.map(tracing::field::display);
        tracing::event!(
            target: ACCESS_TARGET,
            $level,
            client.addr = client,
            protocol = line.protocol,
            method = line.method.as_str(),
            dst.host = line.host.as_str(),
            dst.port = line.port,
            $($rest)*
        )
    }};
}

impl Line {
    /// The line for an answer whose body is already complete.
    fn answered(&self, message: &str, duration: Duration) {
        access_event!(
            tracing::Level::INFO,
            self,
            status = self.status,
            bytes = 0u64,
            duration_ms = millis(duration),
            "{message}"
        );
    }

    /// The line for a streamed body at its end, or dropped before it.
    fn ended(&self, message: &str, bytes: u64, stream: Duration) {
        access_event!(
            tracing::Level::INFO,
            self,
            status = self.status,
            bytes,
            ttfb_ms = self.ttfb_ms,
            stream_ms = millis(stream),
            "{message}"
        );
    }

    /// The line for an upstream failure (a refusal is the violation log's).
    fn failed(&self, cause: &str, duration: Duration) {
        access_event!(
            tracing::Level::WARN,
            self,
            duration_ms = millis(duration),
            cause,
            "failed"
        );
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`AccessLog`].
    pub struct AccessFuture<F> {
        #[pin]
        inner: F,
        metrics: Arc<Metrics>,
        // Taken when the answer comes.
        seen: Option<Seen>,
    }
}

impl<F, ResBody, E> Future for AccessFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: std::fmt::Display + 'static,
    ResBody: hyper::body::Body<Data = Bytes>,
{
    type Output = Result<Response<AccessBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let metrics = this.metrics.clone();
        let Some(seen) = this.seen.take() else {
            // Polled after it completed: the inner future says what that is.
            return Poll::Ready(
                result.map(|response| response.map(|b| AccessBody::new(b, metrics, None, false))),
            );
        };
        let latency = seen.start.elapsed();
        match result {
            Ok(response) => {
                // A response is an allowed request (a refusal is an error).
                metrics.allowed(seen.protocol, seen.profile.as_ref());
                let tunnel = response.extensions().get::<Tunnel>().is_some();
                let mut line = seen.line;
                if let Some(line) = line.as_deref_mut() {
                    line.status = response.status().as_u16();
                    line.ttfb_ms = millis(latency);
                }
                let complete = tunnel || seen.connect || response.body().is_end_stream();
                if complete {
                    if let Some(line) = line.take() {
                        line.answered(if tunnel { "tunnel opened" } else { "allowed" }, latency);
                    }
                }
                let failures = seen.failures;
                Poll::Ready(Ok(
                    response.map(|body| AccessBody::new(body, metrics, line, failures))
                ))
            }
            Err(error) => {
                if seen.failures {
                    failed(seen.line.as_deref(), &error, latency);
                }
                Poll::Ready(Err(error))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The response body of [`AccessLog`]: its bytes counted, and its
    /// access line written when it ends.
    pub struct AccessBody<B> {
        #[pin]
        inner: B,
        metrics: Arc<Metrics>,
        total: u64,
        // Taken when written: one line a request.
        line: Option<Box<Line>>,
        failures: bool,
        stream_start: Instant,
    }

    impl<B> PinnedDrop for AccessBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its end: the client went away (or the
            // connection failed) mid-body. Still one line, saying so.
            let this = this.project();
            if let Some(line) = this.line.take() {
                line.ended(
                    "allowed, body cut short",
                    *this.total,
                    this.stream_start.elapsed(),
                );
            }
        }
    }
}

impl<B> AccessBody<B> {
    fn new(inner: B, metrics: Arc<Metrics>, line: Option<Box<Line>>, failures: bool) -> Self {
        AccessBody {
            inner,
            metrics,
            total: 0,
            line,
            failures,
            stream_start: Instant::now(),
        }
    }
}

impl<B> hyper::body::Body for AccessBody<B>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    *this.total += len;
                    this.metrics.bytes(0, len);
                }
                if this.inner.is_end_stream() {
                    if let Some(line) = this.line.take() {
                        line.ended("allowed", *this.total, this.stream_start.elapsed());
                    }
                }
            }
            None => {
                if let Some(line) = this.line.take() {
                    line.ended("allowed", *this.total, this.stream_start.elapsed());
                }
            }
            Some(Err(error)) => {
                if std::mem::take(this.failures) {
                    failed(
                        this.line.take().as_deref(),
                        error,
                        this.stream_start.elapsed(),
                    );
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Logs a failure with its cause (with the request's fields when the
/// access log is on); a refusal is the violation log's.
fn failed<E: std::fmt::Display + 'static>(line: Option<&Line>, error: &E, duration: Duration) {
    let Failure::Error(cause) = classify(error) else {
        return;
    };
    match line {
        Some(line) => line.failed(&cause, duration),
        None => tracing::event!(
            target: ACCESS_TARGET,
            tracing::Level::WARN,
            duration_ms = millis(duration),
            cause = cause.as_str(),
            "failed"
        ),
    }
}

/// What went wrong with a request.
enum Failure {
    /// A refusal (logged by the violation log).
    Refused,
    /// Anything else, with its message.
    Error(String),
}

fn classify<E: std::fmt::Display + 'static>(error: &E) -> Failure {
    let any: &dyn std::any::Any = error;
    let refused = any
        .downcast_ref::<BoxError>()
        .is_some_and(|error| find_blocked(error.as_ref()).is_some());
    if refused {
        return Failure::Refused;
    }
    // The whole chain: hyper-util's "client error (Connect)" says little
    // without its sources.
    let mut cause = error.to_string();
    if let Some(boxed) = any.downcast_ref::<BoxError>() {
        let mut source = boxed.source();
        while let Some(next) = source {
            cause.push_str(": ");
            cause.push_str(&next.to_string());
            source = next.source();
        }
    }
    Failure::Error(cause)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logfmt::Sink;
    use portcullis_middleware::target::Host;
    use portcullis_middleware::{Blocked, Reason, Source};
    use std::sync::Mutex;
    use tower::ServiceExt;

    /// A body that sends `abc` and then nothing, ever.
    struct ThreeThenWait(bool);

    impl hyper::body::Body for ThreeThenWait {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"abc")))))
            }
        }
    }

    fn request(method: Method) -> Request<()> {
        let mut request = Request::builder().method(method).body(()).unwrap();
        let extensions = request.extensions_mut();
        extensions.insert(ClientAddr("127.0.0.1:4711".parse().unwrap()));
        extensions.insert(Protocol::Http);
        extensions.insert(Target::host(Host::Name("example.com".into()), 443));
        request
    }

    /// The access lines `exchange` writes, at info, as text.
    fn lines<F>(exchange: F) -> Vec<String>
    where
        F: std::future::Future<Output = ()>,
    {
        lines_at(tracing::Level::INFO, exchange)
    }

    /// The access lines `exchange` writes at `level` and above.
    fn lines_at<F>(level: tracing::Level, exchange: F) -> Vec<String>
    where
        F: std::future::Future<Output = ()>,
    {
        use tracing_subscriber::layer::SubscriberExt;
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::from_level(level))
            .with(
                tracing_subscriber::fmt::layer()
                    .without_time()
                    .with_ansi(false)
                    .with_writer(move || Sink(sink.clone())),
            );
        let _default = tracing::subscriber::set_default(subscriber);
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(exchange);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines()
            .filter(|line| line.contains(ACCESS_TARGET))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_streamed_body_is_one_line_with_every_field_at_its_end() {
        let lines = lines(async {
            let service = AccessLogLayer::new().layer(tower::service_fn(|_: Request<()>| async {
                Ok::<_, BoxError>(Response::new(crate::body::full("hello")))
            }));
            let response = service.oneshot(request(Method::GET)).await.unwrap();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap();
            assert_eq!(body.to_bytes(), "hello");
        });
        assert_eq!(lines.len(), 1, "{lines:#?}");
        for field in [
            "INFO portcullis::access: allowed client.addr=127.0.0.1:4711",
            "protocol=\"http\"",
            "method=\"GET\"",
            "dst.host=\"example.com\"",
            "dst.port=443",
            "status=200",
            "bytes=5",
            "ttfb_ms=",
            "stream_ms=",
        ] {
            assert!(lines[0].contains(field), "{field} in {}", lines[0]);
        }
    }

    #[test]
    fn a_body_dropped_before_its_end_is_logged_once_with_what_was_sent() {
        let lines = lines(async {
            let service = AccessLogLayer::new().layer(tower::service_fn(|_: Request<()>| async {
                Ok::<_, BoxError>(Response::new(ThreeThenWait(false)))
            }));
            let response = service.oneshot(request(Method::GET)).await.unwrap();
            let mut body = response.into_body();
            let frame = http_body_util::BodyExt::frame(&mut body).await;
            assert!(frame.is_some_and(|frame| frame.is_ok()));
            drop(body);
        });
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("allowed, body cut short") && lines[0].contains("bytes=3"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn an_empty_answer_is_logged_at_the_answer_and_not_again() {
        let lines = lines(async {
            let service = AccessLogLayer::new().layer(tower::service_fn(|_: Request<()>| async {
                Ok::<_, BoxError>(Response::new(crate::body::empty()))
            }));
            let response = service.oneshot(request(Method::HEAD)).await.unwrap();
            drop(response);
        });
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("allowed") && lines[0].contains("method=\"HEAD\""),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn failures_are_logged_with_their_cause_and_refusals_are_not() {
        let exchange = || async {
            let failing = AccessLogLayer::new().layer(tower::service_fn(|_: Request<()>| async {
                Err::<Response<crate::body::Body>, BoxError>(
                    std::io::Error::other("connection refused").into(),
                )
            }));
            assert!(failing.oneshot(request(Method::GET)).await.is_err());
            let refusing = AccessLogLayer::new().layer(tower::service_fn(|_: Request<()>| async {
                Err::<Response<crate::body::Body>, BoxError>(
                    Blocked::new(
                        Reason::NotAllowed,
                        Source::Policy,
                        Target::host(Host::Name("example.com".into()), 443),
                        Protocol::Http,
                        &Method::GET,
                    )
                    .into(),
                )
            }));
            assert!(refusing.oneshot(request(Method::GET)).await.is_err());
        };
        let lines = lines(exchange());
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("WARN portcullis::access: failed")
                && lines[0].contains("cause=\"connection refused\"")
                && lines[0].contains("dst.host=\"example.com\""),
            "{}",
            lines[0]
        );
        // With the access log off but warnings on (`run`), a failure is
        // still said, without the request's fields.
        let lines = lines_at(tracing::Level::WARN, exchange());
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("WARN portcullis::access: failed")
                && lines[0].contains("cause=\"connection refused\"")
                && !lines[0].contains("dst.host"),
            "{}",
            lines[0]
        );
    }
}
