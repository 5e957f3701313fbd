//! The counters an operator expects, in the Prometheus text format
//! (prometheus-client), served on an opt-in loopback listener
//! (`[metrics] listen = "127.0.0.1:9464"`, `ProxyBuilder::metrics_addr`) at
//! `GET /metrics`.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `portcullis_requests_allowed_total` | counter | `protocol` |
//! | `portcullis_requests_refused_total` | counter | `reason` |
//! | `portcullis_profile_requests_allowed_total` | counter | `profile`, `protocol` (requests given a profile) |
//! | `portcullis_profile_requests_refused_total` | counter | `profile`, `reason` (refusals of requests given a profile) |
//! | `portcullis_connections_open` | gauge | |
//! | `portcullis_tunnels_open` | gauge | |
//! | `portcullis_approvals_pending` | gauge | |
//! | `portcullis_bytes_total` | counter | `direction` (`up`: to origins, through tunnels; `down`: to clients) |
//! | `portcullis_secrets_found_total` | counter | `detector` (`github_token`, `known:NAME`, `encoded_hostname`, …), `decision` (`deny`, `audit`) |
//! | `portcullis_telemetry_dropped_total` | counter | `signal` (`logs`, `metrics`), `reason` (`queue_full`, `export_failed`): records (or metric exports) the OTLP exporter lost |
//!
//! With `[telemetry] otlp_endpoint` the same counters are also sent as
//! OTLP metrics, named without `_total` ([`crate::telemetry`]).
//!
//! The counters belong to one proxy: two proxies started in one process
//! count apart, each on its own listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use opentelemetry::KeyValue;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::body::{self, Body};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

/// A profile's name as a label value, shared rather than copied per
/// request.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ProfileLabel(Arc<str>);

impl prometheus_client::encoding::EncodeLabelValue for ProfileLabel {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        prometheus_client::encoding::EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileProtocolLabel {
    profile: ProfileLabel,
    protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileReasonLabel {
    profile: ProfileLabel,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SecretLabel {
    detector: String,
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedLabel {
    signal: &'static str,
    reason: &'static str,
}

/// The OpenTelemetry counters the Prometheus ones are mirrored into, once
/// an OTLP exporter is set up.
#[derive(Debug)]
struct Mirror {
    allowed: opentelemetry::metrics::Counter<u64>,
    refused: opentelemetry::metrics::Counter<u64>,
    profile_allowed: opentelemetry::metrics::Counter<u64>,
    profile_refused: opentelemetry::metrics::Counter<u64>,
    bytes: opentelemetry::metrics::Counter<u64>,
    secrets: opentelemetry::metrics::Counter<u64>,
    dropped: opentelemetry::metrics::Counter<u64>,
    /// The observable gauges live as long as these handles.
    _gauges: Vec<opentelemetry::metrics::ObservableGauge<i64>>,
}

/// A metric's name (without the `portcullis_` prefix) and its help, the
/// same on `/metrics` and over OTLP.
#[derive(Debug, Clone, Copy)]
struct Named {
    name: &'static str,
    help: &'static str,
}

impl Named {
    /// Its OTLP instrument name: `portcullis_NAME`.
    fn otlp(self) -> String {
        format!("portcullis_{}", self.name)
    }
}

const REQUESTS_ALLOWED: Named = Named {
    name: "requests_allowed",
    help: "Requests and connections let through, by protocol",
};

const REQUESTS_REFUSED: Named = Named {
    name: "requests_refused",
    help: "Refusals, by reason (the violation log's)",
};

const PROFILE_REQUESTS_ALLOWED: Named = Named {
    name: "profile_requests_allowed",
    help: "Requests and connections let through, by profile and protocol",
};

const PROFILE_REQUESTS_REFUSED: Named = Named {
    name: "profile_requests_refused",
    help: "Refusals of requests given a profile, by profile and reason",
};

const CONNECTIONS_OPEN: Named = Named {
    name: "connections_open",
    help: "Client connections being served",
};

const TUNNELS_OPEN: Named = Named {
    name: "tunnels_open",
    help: "CONNECT and SOCKS5 tunnels open",
};

const APPROVALS_PENDING: Named = Named {
    name: "approvals_pending",
    help: "Questions waiting for an approver",
};

const BYTES: Named = Named {
    name: "bytes",
    help: "Bytes relayed: up (client to origin, through tunnels) and down (to clients)",
};

const SECRETS_FOUND: Named = Named {
    name: "secrets_found",
    help: "Secrets the scan found, by detector and decision (deny: refused, audit: let through); never the value",
};

const TELEMETRY_DROPPED: Named = Named {
    name: "telemetry_dropped",
    help: "Records (signal logs) or metric exports (signal metrics) the OTLP exporter lost: queue_full, export_failed",
};

/// One proxy's counters.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    allowed: Family<ProtocolLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    profile_allowed: Family<ProfileProtocolLabel, Counter>,
    profile_refused: Family<ProfileReasonLabel, Counter>,
    connections_open: Gauge,
    tunnels_open: Gauge,
    approvals_pending: Gauge,
    bytes: Family<DirectionLabel, Counter>,
    secrets: Family<SecretLabel, Counter>,
    dropped: Family<DroppedLabel, Counter>,
    /// Set once by [`Metrics::mirror_into`].
    mirror: std::sync::OnceLock<Mirror>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portcullis");
        let allowed = Family::<ProtocolLabel, Counter>::default();
        registry.register(
            REQUESTS_ALLOWED.name,
            REQUESTS_ALLOWED.help,
            allowed.clone(),
        );
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            REQUESTS_REFUSED.name,
            REQUESTS_REFUSED.help,
            refused.clone(),
        );
        let profile_allowed = Family::<ProfileProtocolLabel, Counter>::default();
        registry.register(
            PROFILE_REQUESTS_ALLOWED.name,
            PROFILE_REQUESTS_ALLOWED.help,
            profile_allowed.clone(),
        );
        let profile_refused = Family::<ProfileReasonLabel, Counter>::default();
        registry.register(
            PROFILE_REQUESTS_REFUSED.name,
            PROFILE_REQUESTS_REFUSED.help,
            profile_refused.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            CONNECTIONS_OPEN.name,
            CONNECTIONS_OPEN.help,
            connections_open.clone(),
        );
        let tunnels_open = Gauge::default();
        registry.register(TUNNELS_OPEN.name, TUNNELS_OPEN.help, tunnels_open.clone());
        let approvals_pending = Gauge::default();
        registry.register(
            APPROVALS_PENDING.name,
            APPROVALS_PENDING.help,
            approvals_pending.clone(),
        );
        let bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(BYTES.name, BYTES.help, bytes.clone());
        let secrets = Family::<SecretLabel, Counter>::default();
        registry.register(SECRETS_FOUND.name, SECRETS_FOUND.help, secrets.clone());
        let dropped = Family::<DroppedLabel, Counter>::default();
        registry.register(
            TELEMETRY_DROPPED.name,
            TELEMETRY_DROPPED.help,
            dropped.clone(),
        );
        Metrics {
            secrets,
            dropped,
            mirror: std::sync::OnceLock::new(),
            registry,
            allowed,
            refused,
            profile_allowed,
            profile_refused,
            connections_open,
            tunnels_open,
            approvals_pending,
            bytes,
        }
    }

    pub(crate) fn allowed(&self, protocol: &'static str, profile: Option<&Arc<str>>) {
        self.allowed
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
        if let Some(profile) = profile {
            self.profile_allowed
                .get_or_create(&ProfileProtocolLabel {
                    profile: ProfileLabel(profile.clone()),
                    protocol,
                })
                .inc();
        }
        if let Some(mirror) = self.mirror.get() {
            mirror
                .allowed
                .add(1, &[KeyValue::new("protocol", protocol)]);
            if let Some(profile) = profile {
                mirror.profile_allowed.add(
                    1,
                    &[
                        KeyValue::new("profile", profile.to_string()),
                        KeyValue::new("protocol", protocol),
                    ],
                );
            }
        }
    }

    pub(crate) fn refused(&self, reason: &'static str, profile: Option<&Arc<str>>) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
        if let Some(profile) = profile {
            self.profile_refused
                .get_or_create(&ProfileReasonLabel {
                    profile: ProfileLabel(profile.clone()),
                    reason,
                })
                .inc();
        }
        if let Some(mirror) = self.mirror.get() {
            mirror.refused.add(1, &[KeyValue::new("reason", reason)]);
            if let Some(profile) = profile {
                mirror.profile_refused.add(
                    1,
                    &[
                        KeyValue::new("profile", profile.to_string()),
                        KeyValue::new("reason", reason),
                    ],
                );
            }
        }
    }

    /// `n` records (or metric exports) of `signal` lost by the OTLP
    /// exporter, for `reason`.
    pub(crate) fn telemetry_dropped(&self, signal: &'static str, reason: &'static str, n: u64) {
        self.dropped
            .get_or_create(&DroppedLabel { signal, reason })
            .inc_by(n);
        if let Some(mirror) = self.mirror.get() {
            mirror.dropped.add(
                n,
                &[
                    KeyValue::new("signal", signal),
                    KeyValue::new("reason", reason),
                ],
            );
        }
    }

    /// From now on, counts into `meter`'s instruments too (same names,
    /// without `_total`); the gauges are read when the meter collects,
    /// `pending` giving the approvals waiting. Only the first call counts.
    pub(crate) fn mirror_into(
        &self,
        meter: &opentelemetry::metrics::Meter,
        pending: Arc<dyn Fn() -> usize + Send + Sync>,
    ) {
        let counter = |named: Named| {
            meter
                .u64_counter(named.otlp())
                .with_description(named.help)
                .build()
        };
        let gauge = |named: Named, read: Box<dyn Fn() -> i64 + Send + Sync>| {
            meter
                .i64_observable_gauge(named.otlp())
                .with_description(named.help)
                .with_callback(move |observer| observer.observe(read(), &[]))
                .build()
        };
        let connections = self.connections_open.clone();
        let tunnels = self.tunnels_open.clone();
        let mirror = Mirror {
            allowed: counter(REQUESTS_ALLOWED),
            refused: counter(REQUESTS_REFUSED),
            profile_allowed: counter(PROFILE_REQUESTS_ALLOWED),
            profile_refused: counter(PROFILE_REQUESTS_REFUSED),
            bytes: counter(BYTES),
            secrets: counter(SECRETS_FOUND),
            dropped: counter(TELEMETRY_DROPPED),
            _gauges: vec![
                gauge(CONNECTIONS_OPEN, Box::new(move || connections.get())),
                gauge(TUNNELS_OPEN, Box::new(move || tunnels.get())),
                gauge(
                    APPROVALS_PENDING,
                    Box::new(move || i64::try_from(pending()).unwrap_or(i64::MAX)),
                ),
            ],
        };
        let _ = self.mirror.set(mirror);
    }

    /// A secret found by `detector`, refused (`deny`) or let through
    /// (`audit`).
    pub(crate) fn secret(&self, detector: &str, decision: &'static str) {
        self.secrets
            .get_or_create(&SecretLabel {
                detector: detector.to_owned(),
                decision,
            })
            .inc();
        if let Some(mirror) = self.mirror.get() {
            mirror.secrets.add(
                1,
                &[
                    KeyValue::new("detector", detector.to_owned()),
                    KeyValue::new("decision", decision),
                ],
            );
        }
    }

    pub(crate) fn bytes(&self, up: u64, down: u64) {
        if up > 0 {
            self.bytes
                .get_or_create(&DirectionLabel { direction: "up" })
                .inc_by(up);
        }
        if down > 0 {
            self.bytes
                .get_or_create(&DirectionLabel { direction: "down" })
                .inc_by(down);
        }
        if let Some(mirror) = self.mirror.get() {
            if up > 0 {
                mirror.bytes.add(up, &[KeyValue::new("direction", "up")]);
            }
            if down > 0 {
                mirror
                    .bytes
                    .add(down, &[KeyValue::new("direction", "down")]);
            }
        }
    }

    /// Counts a connection open until the guard is dropped.
    pub(crate) fn connection(&self) -> Open {
        self.connections_open.inc();
        Open(self.connections_open.clone())
    }

    /// Counts a tunnel open until the guard is dropped.
    pub(crate) fn tunnel(&self) -> Open {
        self.tunnels_open.inc();
        Open(self.tunnels_open.clone())
    }

    /// The text exposition, with `pending` approvals read now.
    fn render(&self, pending: usize) -> String {
        self.approvals_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Decrements its gauge when dropped.
#[derive(Debug)]
pub(crate) struct Open(Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves;
/// `pending` reads the approvals waiting at each scrape.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    pending: Arc<dyn Fn() -> usize + Send + Sync>,
    token: Option<Arc<str>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "metrics listener");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let pending = pending.clone();
        let metrics = metrics.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let pending = pending.clone();
                    let metrics = metrics.clone();
                    let allowed = token.as_deref().is_none_or(|token| bearer(&request, token));
                    async move {
                        Ok::<_, Infallible>(if allowed {
                            answer(&request, &metrics, pending())
                        } else {
                            unauthorized()
                        })
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Whether the request carries `Authorization: Bearer <token>`, compared
/// without an early exit.
fn bearer<B>(request: &Request<B>, token: &str) -> bool {
    request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|given| portcullis_middleware::credentials::same_secret(given.trim(), token))
}

/// A 401 asking for the bearer token.
fn unauthorized() -> Response<Body> {
    let mut response = Response::new(body::full(
        "portcullis's metrics need the bearer token ([metrics] bearer_token): Authorization: Bearer …\n".to_owned(),
    ));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"portcullis metrics\""),
    );
    response
}

fn answer<B>(request: &Request<B>, metrics: &Metrics, pending: usize) -> Response<Body> {
    let (status, content_type, text) =
        if request.method() == Method::GET && request.uri().path() == "/metrics" {
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.render(pending),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "portcullis serves its metrics at GET /metrics\n".to_owned(),
            )
        };
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// Where the metrics listener is: loopback, or beyond it only when
/// allowed and a token guards it.
pub(crate) fn check_address(
    address: SocketAddr,
    beyond_loopback: bool,
    token: bool,
) -> Result<SocketAddr, String> {
    match (address.ip().is_loopback(), beyond_loopback, token) {
        (true, _, _) | (false, true, true) => Ok(address),
        (false, false, _) => Err(format!(
            "{address} is not a loopback address: the metrics listener serves loopback only, unless [metrics] dangerously_allow_non_loopback = true (with a bearer_token)"
        )),
        (false, true, false) => Err(format!(
            "{address} is beyond loopback: a scraper there must send a token; set [metrics] bearer_token = {{ file = \"…\" }}"
        )),
    }
}
