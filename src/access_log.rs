//! The access log: one line per allowed request (and per tunnel opened), at
//! info under the tracing target `portcullis::access`, built on tower-http's
//! [`TraceLayer`] with our own span and event makers. Refusals are not here
//! (the violation log has them); upstream failures are, at warn, with the
//! cause.
//!
//! Fields, fixed like the violation events': `client.addr`, `protocol`,
//! `method`, `dst.host`, `dst.port` (on the `access` span), `status`,
//! `bytes` (the response body, as sent), `ttfb_ms` and `stream_ms` (to the
//! response head, then to its last byte; for a tunnel or an empty body,
//! `duration_ms` to the answer). A tunnel's own bytes are logged when
//! it closes (`tunnel closed`, `bytes.up`, `bytes.down`).
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

use std::time::Duration;

use http::{Method, Request, Response};
use tower::Layer;
use tower_http::classify::{ClassifiedResponse, ClassifyEos, ClassifyResponse, MakeClassifier};
use tower_http::trace::{MakeSpan, OnBodyChunk, OnEos, OnFailure, OnResponse, Trace, TraceLayer};
use tracing::Span;

use portcullis_middleware::{find_blocked, BoxError, ClientAddr, Protocol, Target};

use crate::body::Body;
use crate::connector::Tunnel;
use crate::metrics::Metrics;
use std::sync::Arc;

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

/// The service [`AccessLogLayer`] makes: tower-http's [`Trace`] with our
/// makers.
pub type AccessLog<S> =
    Trace<S, Classify, AccessSpan, (), AccessResponse, AccessBytes, AccessEos, AccessFailure>;

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        TraceLayer::new(Classify {
            metrics: self.metrics.clone(),
        })
        .make_span_with(AccessSpan)
        .on_request(())
        .on_response(AccessResponse)
        .on_body_chunk(AccessBytes {
            total: 0,
            metrics: self.metrics.clone(),
        })
        .on_eos(AccessEos)
        .on_failure(AccessFailure)
        .layer(inner)
    }
}

/// The `access` span: who asked for what.
#[derive(Debug, Clone, Copy)]
pub struct AccessSpan;

impl<B> MakeSpan<B> for AccessSpan {
    fn make_span(&mut self, request: &Request<B>) -> Span {
        // Off, the access log costs one cached interest check: nothing below
        // (two strings a request) is built.
        if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            return Span::none();
        }
        let extensions = request.extensions();
        let client = extensions
            .get::<ClientAddr>()
            .map(|c| c.0.to_string())
            .unwrap_or_default();
        let protocol = extensions.get::<Protocol>().map_or("", |p| p.as_str());
        let (host, port) = match extensions.get::<Target>() {
            Some(target) => (
                target.host_string(),
                target.port().map(u32::from).unwrap_or(0),
            ),
            None => (String::new(), 0),
        };
        tracing::info_span!(
            target: ACCESS_TARGET,
            "access",
            client.addr = client.as_str(),
            protocol,
            method = request.method().as_str(),
            dst.host = host.as_str(),
            dst.port = port,
            status = tracing::field::Empty,
            bytes = tracing::field::Empty,
            ttfb_ms = tracing::field::Empty,
        )
    }
}

/// Logs a response whose body is already complete (a tunnel's `200`, a
/// `HEAD`, a `204`); others are logged at their end of stream.
#[derive(Debug, Clone, Copy)]
pub struct AccessResponse;

impl OnResponse<Body> for AccessResponse {
    fn on_response(self, response: &Response<Body>, latency: Duration, span: &Span) {
        let tunnel = response.extensions().get::<Tunnel>().is_some();
        if tunnel || hyper::body::Body::is_end_stream(response.body()) {
            tracing::info!(
                target: ACCESS_TARGET,
                parent: span,
                status = response.status().as_u16(),
                bytes = 0u64,
                duration_ms = millis(latency),
                "{}",
                if tunnel { "tunnel opened" } else { "allowed" }
            );
        } else {
            span.record("status", response.status().as_u16());
            span.record("ttfb_ms", millis(latency));
        }
    }
}

/// Counts the response body's bytes for the end-of-stream line.
#[derive(Debug, Clone)]
pub struct AccessBytes {
    total: u64,
    metrics: Arc<Metrics>,
}

impl OnBodyChunk<bytes::Bytes> for AccessBytes {
    fn on_body_chunk(&mut self, chunk: &bytes::Bytes, _: Duration, span: &Span) {
        self.total += chunk.len() as u64;
        self.metrics.bytes(0, chunk.len() as u64);
        span.record("bytes", self.total);
    }
}

/// The line for a streamed response, when its body ends.
#[derive(Debug, Clone, Copy)]
pub struct AccessEos;

impl OnEos for AccessEos {
    fn on_eos(self, _: Option<&http::HeaderMap>, stream_duration: Duration, span: &Span) {
        tracing::info!(
            target: ACCESS_TARGET,
            parent: span,
            stream_ms = millis(stream_duration),
            "allowed"
        );
    }
}

/// Logs upstream failures with their cause; refusals are the violation
/// log's.
#[derive(Debug, Clone, Copy)]
pub struct AccessFailure;

impl OnFailure<Failure> for AccessFailure {
    fn on_failure(&mut self, failure: Failure, latency: Duration, span: &Span) {
        match failure {
            Failure::Refused => {}
            Failure::Error(cause) => tracing::warn!(
                target: ACCESS_TARGET,
                parent: span,
                duration_ms = millis(latency),
                cause = cause.as_str(),
                "failed"
            ),
        }
    }
}

/// What went wrong with a request, for [`AccessFailure`].
#[derive(Debug, Clone)]
pub enum Failure {
    /// A refusal (logged by the violation log).
    Refused,
    /// Anything else, with its message.
    Error(String),
}

/// Classifies each request: bodies are watched to their end, except
/// `CONNECT` (its body is the tunnel, outside the stack).
#[derive(Debug, Clone)]
pub struct Classify {
    metrics: Arc<Metrics>,
}

impl MakeClassifier for Classify {
    type Classifier = ClassifyOne;
    type FailureClass = Failure;
    type ClassifyEos = EndOfStream;

    fn make_classifier<B>(&self, request: &Request<B>) -> ClassifyOne {
        ClassifyOne {
            metrics: self.metrics.clone(),
            profile: request
                .extensions()
                .get::<portcullis_middleware::profiles::ProfileName>()
                .map(|profile| profile.0.clone()),
            connect: request.method() == Method::CONNECT,
            protocol: request
                .extensions()
                .get::<Protocol>()
                .map_or("unknown", |p| p.as_str()),
        }
    }
}

/// The classifier of one request.
#[derive(Debug, Clone)]
pub struct ClassifyOne {
    metrics: Arc<Metrics>,
    profile: Option<Arc<str>>,
    connect: bool,
    protocol: &'static str,
}

impl ClassifyResponse for ClassifyOne {
    type FailureClass = Failure;
    type ClassifyEos = EndOfStream;

    fn classify_response<B>(self, _: &Response<B>) -> ClassifiedResponse<Failure, EndOfStream> {
        // A response is an allowed request (a refusal is an error).
        self.metrics.allowed(self.protocol, self.profile.as_ref());
        if self.connect {
            ClassifiedResponse::Ready(Ok(()))
        } else {
            ClassifiedResponse::RequiresEos(EndOfStream)
        }
    }

    fn classify_error<E>(self, error: &E) -> Failure
    where
        E: std::fmt::Display + 'static,
    {
        classify(error)
    }
}

/// The end-of-stream classifier: a body that ends is a success.
#[derive(Debug, Clone, Copy)]
pub struct EndOfStream;

impl ClassifyEos for EndOfStream {
    type FailureClass = Failure;

    fn classify_eos(self, _: Option<&http::HeaderMap>) -> Result<(), Failure> {
        Ok(())
    }

    fn classify_error<E>(self, error: &E) -> Failure
    where
        E: std::fmt::Display + 'static,
    {
        classify(error)
    }
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
