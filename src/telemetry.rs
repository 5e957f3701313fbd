//! Records and metrics sent to an OpenTelemetry collector over OTLP
//! (`[telemetry] otlp_endpoint`), with the OpenTelemetry crates: gRPC or
//! HTTP/protobuf, TLS with the system's CAs and an extra CA file, headers
//! for the collector's authentication.
//!
//! Every record the proxy writes — a refusal, an audit (a would-be
//! refusal), an allowed request or tunnel (unless `export_access = false`),
//! a DNS question under `run --isolate` — becomes one OTLP log record:
//!
//! - its attributes are the OCSF event's top-level fields, exactly as
//!   `[log] format = "ocsf"` writes them (see [`crate::records`]):
//!   `class_uid`, `activity_id`, `action_id`, `disposition_id`,
//!   `status_detail`, `dst_endpoint` (a map), `http_request`, `actor`,
//!   `unmapped` (with `profile`) and the rest, nested objects as maps;
//! - its body is the OCSF `message`; its time the record's; its severity
//!   `INFO` for what went through and `WARN` for a refusal; its event name
//!   `ocsf.http_activity`, `ocsf.network_activity` or `ocsf.dns_activity`.
//!
//! The metrics of `GET /metrics` are exported as OTLP metrics under the
//! same names without `_total` (cumulative sums and gauges, every
//! `metrics_interval`). The resource names the service: `service.name`
//! (`portcullis` unless set), `service.version`, `service.instance.id`
//! (`HOST/PID` unless set), and whatever `OTEL_RESOURCE_ATTRIBUTES` adds.
//!
//! Nothing here is on the request path but a bounded queue: a record is
//! handed to the SDK's batching processor (its own thread) only while
//! fewer than `queue_size` records wait or are being sent; past that it
//! is dropped. A slow, dead or refusing collector therefore never slows a
//! request. Drops (queue full, or a batch the collector did not take) are
//! counted in `portcullis_telemetry_dropped_total{signal, reason}` and
//! warned about at most once a minute. At shutdown what is queued is sent
//! within what is left of the shutdown deadline (at least one second).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::{Key, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{BatchConfigBuilder, BatchLogProcessor, LogBatch, LogExporter};
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::Resource;
use serde_json::Value;

use crate::metrics::Metrics;

/// How records and metrics reach the collector (`[telemetry]
/// otlp_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (`grpc`, a collector's port 4317), the default.
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (`http/protobuf`, port 4318):
    /// logs to `ENDPOINT/v1/logs`, metrics to `ENDPOINT/v1/metrics`.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocol {
    /// Its name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// What the exporter needs, read from `[telemetry]` (secrets already read).
#[derive(Clone)]
pub struct TelemetrySettings {
    /// The collector: `http://host:4317`, `https://…` (TLS).
    pub endpoint: String,
    /// gRPC or HTTP/protobuf.
    pub protocol: OtlpProtocol,
    /// Headers every export sends (`authorization`, `x-api-key`…).
    pub headers: http::HeaderMap,
    /// Extra CA certificates (PEM, DER-decoded) for an `https://` collector,
    /// beside the system's.
    pub ca_certificates: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// `service.name`.
    pub service_name: String,
    /// `service.instance.id`.
    pub service_instance_id: String,
    /// Whether allowed requests are exported too (refusals always are).
    pub export_access: bool,
    /// At most this many records wait or are being sent; more are dropped.
    pub queue_size: usize,
    /// How often the metrics are sent.
    pub metrics_interval: Duration,
    /// How long one export may take before it counts as failed.
    pub export_timeout: Duration,
}

impl std::fmt::Debug for TelemetrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values are credentials: their names only.
        let headers: Vec<&str> = self.headers.keys().map(|name| name.as_str()).collect();
        f.debug_struct("TelemetrySettings")
            .field("endpoint", &self.endpoint)
            .field("protocol", &self.protocol)
            .field("headers", &headers)
            .field("ca_certificates", &self.ca_certificates.len())
            .field("service_name", &self.service_name)
            .field("service_instance_id", &self.service_instance_id)
            .field("export_access", &self.export_access)
            .field("queue_size", &self.queue_size)
            .field("metrics_interval", &self.metrics_interval)
            .field("export_timeout", &self.export_timeout)
            .finish()
    }
}

impl TelemetrySettings {
    /// Settings for `endpoint` with the defaults of `[telemetry]`.
    pub fn new(endpoint: impl Into<String>) -> TelemetrySettings {
        TelemetrySettings {
            endpoint: endpoint.into(),
            protocol: OtlpProtocol::Grpc,
            headers: http::HeaderMap::new(),
            ca_certificates: Vec::new(),
            service_name: DEFAULT_SERVICE_NAME.into(),
            service_instance_id: default_instance_id(),
            export_access: true,
            queue_size: DEFAULT_QUEUE_SIZE,
            metrics_interval: DEFAULT_METRICS_INTERVAL,
            export_timeout: DEFAULT_EXPORT_TIMEOUT,
        }
    }
}

/// `service.name` unless set.
pub const DEFAULT_SERVICE_NAME: &str = "portcullis";
/// Records waiting or being sent, at most, unless set.
pub const DEFAULT_QUEUE_SIZE: usize = 2048;
/// How often the metrics are sent, unless set.
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(30);
/// How long one export may take, unless set.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// `HOST/PID`: which process of which machine sent a record.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}/{}", std::process::id())
}

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("[telemetry] otlp_endpoint {endpoint:?}: {message}")]
pub struct TelemetryError {
    endpoint: String,
    message: String,
}

/// The exporter of one proxy: cheap to clone, shared by its layers.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    /// `Some` until dropped.
    pipeline: Option<Pipeline>,
    gate: Arc<Gate>,
    export_access: bool,
}

struct Pipeline {
    logger: SdkLogger,
    logs: SdkLoggerProvider,
    meters: SdkMeterProvider,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The SDK shuts a provider down when it is dropped, blocking until
        // its exports end, which a runtime thread must not wait for (its
        // exports run on that runtime). `shutdown` has usually done it.
        if let Some(pipeline) = self.pipeline.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("portcullis-otlp-stop".into())
                    .spawn(move || drop(pipeline));
            }
        }
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("endpoint", &self.inner.gate.endpoint)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Sets up the exporters (from within the Tokio runtime that will
    /// drive their connections) and mirrors `metrics` into OTLP metrics,
    /// `pending` read as the approvals waiting.
    pub(crate) fn start(
        settings: &TelemetrySettings,
        metrics: Arc<Metrics>,
        pending: Arc<dyn Fn() -> usize + Send + Sync>,
    ) -> Result<Telemetry, TelemetryError> {
        let failed = |message: String| TelemetryError {
            endpoint: settings.endpoint.clone(),
            message,
        };
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| failed("the exporter needs a Tokio runtime".into()))?;
        let gate = Arc::new(Gate {
            capacity: settings.queue_size.max(1),
            in_flight: AtomicUsize::new(0),
            endpoint: settings.endpoint.clone(),
            metrics: metrics.clone(),
            warned: Mutex::new(None),
            unwarned: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", settings.service_instance_id.clone()),
            ])
            .build();
        let (log_exporter, metric_exporter) =
            exporters(settings).map_err(|e| failed(e.to_string()))?;
        let log_exporter = OnRuntime {
            inner: log_exporter,
            handle: handle.clone(),
            gate: gate.clone(),
            timeout: settings.export_timeout,
        };
        let processor = BatchLogProcessor::builder(log_exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(gate.capacity)
                    .with_max_export_batch_size(gate.capacity.min(512))
                    .with_scheduled_delay(Duration::from_secs(1))
                    .build(),
            )
            .build();
        let logs = SdkLoggerProvider::builder()
            .with_resource(resource.clone())
            .with_log_processor(processor)
            .build();
        let logger = logs.logger("portcullis");
        let metric_exporter = OnRuntime {
            inner: metric_exporter,
            handle,
            gate: gate.clone(),
            timeout: settings.export_timeout,
        };
        let reader = PeriodicReader::builder(metric_exporter)
            .with_interval(settings.metrics_interval)
            .build();
        let meters = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader)
            .build();
        metrics.mirror_into(
            &opentelemetry::metrics::MeterProvider::meter(&meters, "portcullis"),
            pending,
        );
        Ok(Telemetry {
            inner: Arc::new(Inner {
                pipeline: Some(Pipeline {
                    logger,
                    logs,
                    meters,
                }),
                gate,
                export_access: settings.export_access,
            }),
        })
    }

    /// Whether allowed requests are exported (`export_access`).
    pub fn exports_access(&self) -> bool {
        self.inner.export_access
    }

    /// Sends one OCSF event (as [`crate::records`] renders it) as a log
    /// record, or drops it when the queue is full. Never blocks.
    pub fn emit_ocsf(&self, event: &Value) {
        let gate = &self.inner.gate;
        let Some(pipeline) = &self.inner.pipeline else {
            return;
        };
        if !gate.admit() {
            gate.dropped("logs", "queue_full", 1);
            return;
        }
        let mut record = pipeline.logger.create_log_record();
        if let Some(ms) = event.get("time").and_then(Value::as_u64) {
            record.set_timestamp(UNIX_EPOCH + Duration::from_millis(ms));
        }
        record.set_observed_timestamp(SystemTime::now());
        let (number, text) = match event.get("severity_id").and_then(Value::as_u64) {
            Some(1) => (Severity::Info, "INFO"),
            Some(2) => (Severity::Info2, "INFO"),
            Some(3) => (Severity::Warn, "WARN"),
            Some(4) => (Severity::Error, "ERROR"),
            _ => (Severity::Warn, "WARN"),
        };
        record.set_severity_number(number);
        record.set_severity_text(text);
        record.set_event_name(match event.get("class_uid").and_then(Value::as_u64) {
            Some(4001) => "ocsf.network_activity",
            Some(4003) => "ocsf.dns_activity",
            _ => "ocsf.http_activity",
        });
        if let Some(message) = event.get("message").and_then(Value::as_str) {
            record.set_body(AnyValue::from(message.to_owned()));
        }
        if let Value::Object(fields) = event {
            for (key, value) in fields {
                if let Some(value) = any_value(value) {
                    record.add_attribute(Key::new(key.clone()), value);
                }
            }
        }
        pipeline.logger.emit(record);
    }

    /// Sends what is queued and stops, taking at most `timeout`; blocks
    /// the calling thread.
    pub fn shutdown(&self, timeout: Duration) {
        let Some(pipeline) = &self.inner.pipeline else {
            return;
        };
        let started = Instant::now();
        if let Err(error) = pipeline.logs.shutdown_with_timeout(timeout) {
            tracing::warn!(%error, endpoint = %self.inner.gate.endpoint, "OTLP export: the last records were not all sent at shutdown");
        }
        let left = timeout.saturating_sub(started.elapsed());
        if let Err(error) = pipeline.meters.shutdown_with_timeout(left) {
            tracing::debug!(%error, "OTLP export: the last metrics were not sent at shutdown");
        }
        self.inner.gate.warn_now();
    }
}

/// An OCSF JSON value as an OTLP attribute value (`null`: none).
fn any_value(value: &Value) -> Option<AnyValue> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => AnyValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AnyValue::Int(i),
            None => AnyValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AnyValue::from(s.clone()),
        Value::Array(items) => {
            AnyValue::ListAny(Box::new(items.iter().filter_map(any_value).collect()))
        }
        Value::Object(fields) => AnyValue::Map(Box::new(
            fields
                .iter()
                .filter_map(|(k, v)| Some((Key::new(k.clone()), any_value(v)?)))
                .collect(),
        )),
    })
}

type Exporters = (
    opentelemetry_otlp::LogExporter,
    opentelemetry_otlp::MetricExporter,
);

/// The OTLP exporters for `settings`' protocol.
fn exporters(
    settings: &TelemetrySettings,
) -> Result<Exporters, opentelemetry_otlp::ExporterBuildError> {
    let endpoint = settings.endpoint.trim_end_matches('/');
    match settings.protocol {
        OtlpProtocol::Grpc => {
            let metadata = opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(
                settings.headers.clone(),
            );
            let tls = endpoint.starts_with("https://").then(|| {
                let mut tls = opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                    .with_native_roots();
                for certificate in &settings.ca_certificates {
                    let pem = pem::encode(&pem::Pem::new("CERTIFICATE", certificate.to_vec()));
                    tls = tls.ca_certificate(
                        opentelemetry_otlp::tonic_types::transport::Certificate::from_pem(pem),
                    );
                }
                tls
            });
            let logs = opentelemetry_otlp::LogExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(settings.export_timeout)
                .with_metadata(metadata.clone());
            let logs = match &tls {
                Some(tls) => logs.with_tls_config(tls.clone()),
                None => logs,
            };
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(settings.export_timeout)
                .with_temporality(Temporality::Cumulative)
                .with_metadata(metadata);
            let metrics = match tls {
                Some(tls) => metrics.with_tls_config(tls),
                None => metrics,
            };
            Ok((logs.build()?, metrics.build()?))
        }
        OtlpProtocol::HttpProtobuf => {
            let client = http_client(settings)?;
            // Checked as header values when read: visible ASCII.
            let headers: std::collections::HashMap<String, String> = settings
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.to_string(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let logs = opentelemetry_otlp::LogExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_http_client(client.clone())
                .with_endpoint(format!("{endpoint}/v1/logs"))
                .with_timeout(settings.export_timeout)
                .with_headers(headers.clone())
                .build()?;
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_http_client(client)
                .with_endpoint(format!("{endpoint}/v1/metrics"))
                .with_timeout(settings.export_timeout)
                .with_temporality(Temporality::Cumulative)
                .with_headers(headers)
                .build()?;
            Ok((logs, metrics))
        }
    }
}

fn invalid(key: &str, message: String) -> opentelemetry_otlp::ExporterBuildError {
    opentelemetry_otlp::ExporterBuildError::InvalidConfiguration(format!("{key}: {message}"))
}

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// hyper with rustls (ring), trusting the system's CAs and the extra ones.
fn http_client(
    settings: &TelemetrySettings,
) -> Result<opentelemetry_http::hyper::HyperClient<Https>, opentelemetry_otlp::ExporterBuildError> {
    let (roots, ignored) = crate::connector::extra_and_system(settings.ca_certificates.clone());
    if ignored > 0 {
        return Err(invalid(
            "otlp_ca_file",
            "a certificate in it could not be used".into(),
        ));
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid("otlp_endpoint", e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(opentelemetry_http::hyper::HyperClient::new(
        connector,
        settings.export_timeout,
        None,
    ))
}

/// The bounded queue in front of the SDK's: how many records wait or are
/// being sent, and the drops.
struct Gate {
    capacity: usize,
    in_flight: AtomicUsize,
    endpoint: String,
    metrics: Arc<Metrics>,
    /// When the last warning was given.
    warned: Mutex<Option<Instant>>,
    /// Drops since the last warning.
    unwarned: AtomicU64,
    /// The last export's error, for the warning.
    last_error: Mutex<Option<String>>,
}

impl Gate {
    /// Takes a place in the queue, if there is one.
    fn admit(&self) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    /// `n` records left the queue (sent or not).
    fn done(&self, n: usize) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                Some(m.saturating_sub(n))
            });
    }

    /// `n` records (or metric exports) of `signal` were lost; warns at most
    /// once a minute.
    fn dropped(&self, signal: &'static str, reason: &'static str, n: u64) {
        self.metrics.telemetry_dropped(signal, reason, n);
        self.unwarned.fetch_add(n, Ordering::Relaxed);
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if warned.is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
            return;
        }
        *warned = Some(Instant::now());
        drop(warned);
        self.warn_now();
    }

    /// Keeps an export's error for the next warning.
    fn failed(&self, error: &opentelemetry_sdk::error::OTelSdkError) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error.to_string());
    }

    /// Says how many were lost since the last warning, if any.
    fn warn_now(&self) {
        let lost = self.unwarned.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let error = self
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
                .unwrap_or_else(|| "the queue was full".into());
            tracing::warn!(
                endpoint = %self.endpoint,
                lost,
                %error,
                "OTLP export: {lost} record(s) or metric export(s) lost (the collector is slow, down or refusing them; the queue holds {}); the record files, if any, have them all. Counted in portcullis_telemetry_dropped_total",
                self.capacity
            );
        }
    }
}

/// An exporter driven on the proxy's Tokio runtime (the SDK calls it from
/// threads of its own), bounded in time, its outcome counted.
struct OnRuntime<E> {
    inner: E,
    handle: tokio::runtime::Handle,
    gate: Arc<Gate>,
    timeout: Duration,
}

impl<E> std::fmt::Debug for OnRuntime<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnRuntime")
            .field("endpoint", &self.gate.endpoint)
            .finish_non_exhaustive()
    }
}

impl<E> OnRuntime<E> {
    /// Runs `export` to its end or the timeout: on the runtime when called
    /// from a thread outside it (the SDK's), else where it is.
    fn drive<F>(&self, export: F) -> OTelSdkResult
    where
        F: std::future::Future<Output = OTelSdkResult>,
    {
        let bounded = async {
            match tokio::time::timeout(self.timeout, export).await {
                Ok(result) => result,
                Err(_) => Err(opentelemetry_sdk::error::OTelSdkError::Timeout(
                    self.timeout,
                )),
            }
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Already on a runtime thread: nothing may block it.
            return Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                "export called from the runtime".into(),
            ));
        }
        self.handle.block_on(bounded)
    }
}

/// Frees the queue's places when an export ends, however it ends.
struct Leaving<'a> {
    gate: &'a Gate,
    n: usize,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        self.gate.done(self.n);
    }
}

impl<E: LogExporter> LogExporter for OnRuntime<E> {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        let n = batch.iter().count();
        let _leaving = Leaving {
            gate: &self.gate,
            n,
        };
        let result = self.drive(self.inner.export(batch));
        if let Err(error) = &result {
            self.gate.failed(error);
            self.gate.dropped(
                "logs",
                "export_failed",
                u64::try_from(n).unwrap_or(u64::MAX),
            );
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: PushMetricExporter> PushMetricExporter for OnRuntime<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.drive(self.inner.export(metrics));
        if let Err(error) = &result {
            self.gate.failed(error);
            self.gate.dropped("metrics", "export_failed", 1);
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}
