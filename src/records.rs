//! Record files for security tooling: the violations file and the opt-in
//! access file, as plain JSON lines (the default) or as OCSF events.
//!
//! `[log] format = "ocsf"` writes both files as [OCSF] 1.8.0 JSON lines:
//!
//! | what | class | `activity_id` |
//! | --- | --- | --- |
//! | a request seen as HTTP (plain, intercepted, Unix socket) | HTTP Activity, 4002 | its method: 1 Connect … 9 Patch, 99 other |
//! | a tunnel (`CONNECT` passed through, SOCKS5 TCP/UDP, a connection captured under `run --isolate`) | Network Activity, 4001 | 1 Open (allowed, audited), 5 Refuse |
//! | a DNS question under `run --isolate` (protocol `dns`) | DNS Activity, 4003 | 1 Query, with `query.hostname` and `rcode_id` 0 NoError or 5 Refused |
//!
//! Every event carries the base event's required fields (`activity_id`,
//! `category_uid` 4, `class_uid`, `type_uid` = class × 100 + activity,
//! `severity_id`, `time` in ms, `metadata.version` "1.8.0" and
//! `metadata.product`), the `security_control` profile's `action_id`
//! (1 Allowed, 2 Denied) and `disposition_id` (1 Allowed, 2 Blocked,
//! 15 Detected for an audit), `status_id`, `status_detail` (our
//! [`Reason`](portcullis_middleware::Reason), e.g. `rule_denied`),
//! `message`, `src_endpoint` (the client), `dst_endpoint` (the host or
//! address and port, or the socket path as `name`), `firewall_rule` (the
//! rule that decided, else the reason, with the deciding part as `type`),
//! `http_request` (method and URL, query values redacted) for HTTP
//! Activity, `http_response.code` for an allowed request, `actor` (the
//! proxy user as `user.name`, the profile as an `authorizations` policy)
//! when the caller had them, and our own
//! fields under `unmapped` (`protocol`, `decision`, `source`, `profile`, and for a
//! secret the scan found, `finding`: `detector` and `location`, never the
//! value). Severity is
//! 1 Informational for what went through (allowed, audited) and 3 Medium
//! for a refusal.
//!
//! [OCSF]: https://schema.ocsf.io/1.8.0/
//!
//! ```
//! use portcullis::records::{ocsf_violation, OCSF_VERSION};
//! use portcullis::middleware::{Blocked, Protocol, Reason, Source, Target, Violation};
//!
//! let target = Target::parse_authority("api.test:443", None).unwrap();
//! let blocked = Blocked::new(Reason::RuleDenied, Source::RequestRules, target,
//!                            Protocol::HttpsMitm, &http::Method::POST);
//! let violation = Violation { unix_ms: 1_764_000_000_000, client: None,
//!     message: blocked.message.clone(), blocked, path: Some("/user/keys".into()),
//!     user: Some("ci".into()), profile: Some("builds".into()) };
//! let event = ocsf_violation(&violation);
//! assert_eq!(event["class_uid"], 4002);
//! assert_eq!(event["type_uid"], 400206);
//! assert_eq!(event["action_id"], 2);
//! assert_eq!(event["metadata"]["version"], OCSF_VERSION);
//! assert_eq!(event["http_request"]["url"]["url_string"], "https://api.test/user/keys");
//! assert_eq!(event["actor"]["user"]["name"], "ci");
//! assert_eq!(event["unmapped"]["profile"], "builds");
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use std::time::Instant;

use portcullis_middleware::{
    loggable_path, BlockDecision, Blocked, BoxError, ClientAddr, JsonLinesSink, LineFile, Protocol,
    Target, Violation,
};

use crate::body::Body;
use crate::connector::Tunnel;

/// The OCSF schema version the records follow.
pub const OCSF_VERSION: &str = "1.8.0";

/// How the violations and access files are written (`[log] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// One JSON object a line in portcullis's own fields (the default).
    #[default]
    Json,
    /// One OCSF 1.8.0 event a line: see the [module docs](self).
    Ocsf,
}

/// Opens the violations file at `path` in `format`.
pub fn violations_sink(path: &Path, format: RecordFormat) -> std::io::Result<JsonLinesSink> {
    match format {
        RecordFormat::Json => JsonLinesSink::open(path),
        RecordFormat::Ocsf => JsonLinesSink::open_with(path, Arc::new(ocsf_violation)),
    }
}

/// One allowed request or opened tunnel, as the access file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// When the request came in, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The client, when known.
    pub client: Option<SocketAddr>,
    /// How the request came in.
    pub protocol: Protocol,
    /// The request method.
    pub method: String,
    /// Where it went.
    pub target: Target,
    /// Its path and query, query values redacted (none for a tunnel).
    pub path: Option<String>,
    /// The status answered (a tunnel's `200`).
    pub status: u16,
    /// The response body's bytes sent to the client (none for a tunnel).
    pub bytes: Option<u64>,
    /// From the request to the last byte of the answer (a tunnel: to its
    /// opening), in milliseconds.
    pub duration_ms: u64,
    /// The credentials the proxy added, as (name, place), never a value.
    pub credentials: Vec<(String, String)>,
    /// The proxy user the client authenticated as, if it did.
    pub user: Option<String>,
    /// The profile the request was given, if the proxy has profiles.
    pub profile: Option<Arc<str>>,
}

impl Access {
    /// Its line in the JSON-lines format: `time_unix_ms`, `client`,
    /// `status` (`"allowed"`), `host`, `port`, `protocol`, `method`,
    /// `path`, `code`, `bytes`, `duration_ms`, `credentials` (`[{name,
    /// place}]`) when the proxy added any, and `user` and `profile` when
    /// the caller had them.
    pub fn to_json(&self) -> Value {
        let mut line = json!({
            "time_unix_ms": self.unix_ms,
            "client": self.client.map(|c| c.to_string()),
            "status": "allowed",
            "host": self.target.host_string(),
            "port": self.target.port(),
            "protocol": self.protocol.as_str(),
            "method": self.method,
            "code": self.status,
            "duration_ms": self.duration_ms,
        });
        if let Some(path) = &self.path {
            line["path"] = json!(path);
        }
        if let Some(bytes) = self.bytes {
            line["bytes"] = json!(bytes);
        }
        if !self.credentials.is_empty() {
            line["credentials"] = credentials_json(&self.credentials);
        }
        if let Some(user) = &self.user {
            line["user"] = json!(user);
        }
        if let Some(profile) = &self.profile {
            line["profile"] = json!(&**profile);
        }
        line
    }
}

fn credentials_json(credentials: &[(String, String)]) -> Value {
    credentials
        .iter()
        .map(|(name, place)| json!({ "name": name, "place": place }))
        .collect()
}

/// The access file: one line per allowed request and per tunnel opened;
/// and, when [exporting](AccessFile::exporting), the same records sent
/// over OTLP.
#[derive(Debug, Clone)]
pub struct AccessFile {
    file: Option<LineFile>,
    format: RecordFormat,
    /// Strings never written (credentials' placeholders), and their stand-ins.
    masks: Arc<[(String, String)]>,
    telemetry: Option<crate::telemetry::Telemetry>,
}

impl AccessFile {
    /// Opens (creating, appending to) `path`, writing in `format`.
    pub fn open(path: &Path, format: RecordFormat) -> std::io::Result<AccessFile> {
        Ok(AccessFile {
            file: Some(LineFile::open(path)?),
            format,
            masks: Arc::from(Vec::new()),
            telemetry: None,
        })
    }

    /// No file: the records go only where [`exporting`](Self::exporting)
    /// sends them.
    pub fn none() -> AccessFile {
        AccessFile {
            file: None,
            format: RecordFormat::Ocsf,
            masks: Arc::from(Vec::new()),
            telemetry: None,
        }
    }

    /// Also sends each record, as an OCSF event, over OTLP.
    pub fn exporting(mut self, telemetry: crate::telemetry::Telemetry) -> AccessFile {
        self.telemetry = Some(telemetry);
        self
    }

    /// Never writes these strings in a path: each is written as its
    /// stand-in (see `Credentials::masks`).
    pub fn masking(mut self, masks: Vec<(String, String)>) -> AccessFile {
        self.masks = masks.into();
        self
    }

    /// Queues one record.
    pub fn record(&self, access: &Access) {
        let masked;
        let access = match &access.path {
            Some(path) if !self.masks.is_empty() => {
                masked = Access {
                    path: Some(portcullis_middleware::masked(path, &self.masks)),
                    ..access.clone()
                };
                &masked
            }
            _ => access,
        };
        // The OCSF event, built once for the file and the export alike.
        let event = (self.format == RecordFormat::Ocsf || self.telemetry.is_some())
            .then(|| ocsf_access(access));
        if let Some(file) = &self.file {
            match &event {
                Some(event) if self.format == RecordFormat::Ocsf => file.write_json(event),
                _ => file.write_json(&access.to_json()),
            }
        }
        if let (Some(telemetry), Some(event)) = (&self.telemetry, &event) {
            telemetry.emit_ocsf(event);
        }
    }

    /// Waits until every record so far is written.
    pub fn flush(&self) {
        if let Some(file) = &self.file {
            file.flush();
        }
    }
}

/// Sends every violation (refusal or audit) as an OCSF event over OTLP:
/// a [`ViolationSink`](portcullis_middleware::ViolationSink).
#[derive(Debug, Clone)]
pub struct OcsfExport {
    telemetry: crate::telemetry::Telemetry,
}

impl OcsfExport {
    /// Exports through `telemetry`.
    pub fn new(telemetry: crate::telemetry::Telemetry) -> OcsfExport {
        OcsfExport { telemetry }
    }
}

impl portcullis_middleware::ViolationSink for OcsfExport {
    fn record(&self, violation: &Violation) {
        self.telemetry.emit_ocsf(&ocsf_violation(violation));
    }
}

/// What happened, for one event.
enum Outcome<'a> {
    Refused(&'a Blocked, &'a str),
    Allowed(&'a Access),
}

struct Event<'a> {
    unix_ms: u64,
    client: Option<SocketAddr>,
    protocol: Protocol,
    method: &'a str,
    target: &'a Target,
    address: Option<IpAddr>,
    path: Option<&'a str>,
    user: Option<&'a str>,
    profile: Option<&'a str>,
    outcome: Outcome<'a>,
}

/// A violation (a refusal or, decision `audit`, a would-be refusal) as one
/// OCSF event; see the [module docs](self).
pub fn ocsf_violation(violation: &Violation) -> Value {
    let blocked = &violation.blocked;
    event(&Event {
        unix_ms: violation.unix_ms,
        client: violation.client,
        protocol: blocked.protocol,
        method: &blocked.method,
        target: &blocked.target,
        address: blocked.address,
        path: violation.path.as_deref(),
        user: violation.user.as_deref(),
        profile: violation.profile.as_deref(),
        outcome: Outcome::Refused(blocked, &violation.message),
    })
}

/// An allowed request or tunnel as one OCSF event; see the
/// [module docs](self).
pub fn ocsf_access(access: &Access) -> Value {
    event(&Event {
        unix_ms: access.unix_ms,
        client: access.client,
        protocol: access.protocol,
        method: &access.method,
        target: &access.target,
        address: None,
        path: access.path.as_deref(),
        user: access.user.as_deref(),
        profile: access.profile.as_deref(),
        outcome: Outcome::Allowed(access),
    })
}

const HTTP_ACTIVITY: u32 = 4002;
const NETWORK_ACTIVITY: u32 = 4001;
const DNS_ACTIVITY: u32 = 4003;

/// HTTP Activity's `activity_id` for a method, and its name.
fn http_activity(method: &str) -> (u32, &'static str) {
    match method {
        "CONNECT" => (1, "Connect"),
        "DELETE" => (2, "Delete"),
        "GET" => (3, "Get"),
        "HEAD" => (4, "Head"),
        "OPTIONS" => (5, "Options"),
        "POST" => (6, "Post"),
        "PUT" => (7, "Put"),
        "TRACE" => (8, "Trace"),
        "PATCH" => (9, "Patch"),
        _ => (99, "Other"),
    }
}

fn event(event: &Event<'_>) -> Value {
    let dns = event.protocol.is_lookup();
    let http = !dns && !event.protocol.is_tunnel();
    let (refused, audit) = match &event.outcome {
        Outcome::Refused(blocked, _) => (
            blocked.decision != BlockDecision::Audit,
            blocked.decision == BlockDecision::Audit,
        ),
        Outcome::Allowed(_) => (false, false),
    };
    let (class_uid, class_name) = if dns {
        (DNS_ACTIVITY, "DNS Activity")
    } else if http {
        (HTTP_ACTIVITY, "HTTP Activity")
    } else {
        (NETWORK_ACTIVITY, "Network Activity")
    };
    let (activity_id, activity_name) = match (http, refused) {
        _ if dns => (1, "Query"),
        (true, _) => http_activity(event.method),
        (false, true) => (5, "Refuse"),
        (false, false) => (1, "Open"),
    };
    let (action_id, action, disposition_id, disposition) = match (refused, audit) {
        (true, _) => (2, "Denied", 2, "Blocked"),
        (false, true) => (1, "Allowed", 15, "Detected"),
        (false, false) => (1, "Allowed", 1, "Allowed"),
    };
    let (severity_id, severity) = if refused {
        (3, "Medium")
    } else {
        (1, "Informational")
    };
    let log_name = match event.outcome {
        Outcome::Refused(..) => "violations",
        Outcome::Allowed(_) => "access",
    };
    let mut record = json!({
        "activity_id": activity_id,
        "activity_name": activity_name,
        "category_uid": 4,
        "category_name": "Network Activity",
        "class_uid": class_uid,
        "class_name": class_name,
        "type_uid": u64::from(class_uid) * 100 + u64::from(activity_id),
        "type_name": format!("{class_name}: {activity_name}"),
        "severity_id": severity_id,
        "severity": severity,
        "time": event.unix_ms,
        "action_id": action_id,
        "action": action,
        "disposition_id": disposition_id,
        "disposition": disposition,
        "status_id": if refused { 2 } else { 1 },
        "status": if refused { "Failure" } else { "Success" },
        "metadata": {
            "version": OCSF_VERSION,
            "profiles": ["security_control"],
            "log_name": log_name,
            "product": {
                "name": "portcullis",
                "vendor_name": "portcullis",
                "version": env!("CARGO_PKG_VERSION"),
            },
        },
        "dst_endpoint": destination(event.target, event.address),
    });
    let Some(fields) = record.as_object_mut() else {
        return record;
    };
    if let Some(client) = event.client {
        fields.insert(
            "src_endpoint".into(),
            json!({ "ip": client.ip().to_string(), "port": client.port() }),
        );
    }
    let mut unmapped = Map::new();
    unmapped.insert("protocol".into(), json!(event.protocol.as_str()));
    // The caller: its proxy user as the OCSF actor, its profile beside it.
    if event.user.is_some() || event.profile.is_some() {
        let mut actor = Map::new();
        if let Some(user) = event.user {
            actor.insert("user".into(), json!({ "name": user }));
        }
        if let Some(profile) = event.profile {
            actor.insert(
                "authorizations".into(),
                json!([{ "policy": { "name": profile } }]),
            );
            unmapped.insert("profile".into(), json!(profile));
        }
        fields.insert("actor".into(), Value::Object(actor));
    }
    match &event.outcome {
        Outcome::Refused(blocked, message) => {
            fields.insert("status_detail".into(), json!(blocked.reason.as_str()));
            fields.insert("message".into(), json!(message));
            fields.insert(
                "firewall_rule".into(),
                json!({
                    "name": blocked.rule.as_deref().unwrap_or(blocked.reason.as_str()),
                    "type": blocked.source.as_str(),
                }),
            );
            unmapped.insert("decision".into(), json!(blocked.decision.as_str()));
            unmapped.insert("source".into(), json!(blocked.source.as_str()));
            if blocked.reason == portcullis_middleware::Reason::SecretDetected {
                let (detector, location) = portcullis_middleware::scan::finding_parts(
                    blocked.rule.as_deref().unwrap_or_default(),
                );
                unmapped.insert(
                    "finding".into(),
                    json!({ "detector": detector, "location": location }),
                );
            }
        }
        Outcome::Allowed(access) => {
            fields.insert("duration".into(), json!(access.duration_ms));
            if !access.credentials.is_empty() {
                unmapped.insert("credentials".into(), credentials_json(&access.credentials));
            }
            if http {
                let mut response = json!({ "code": access.status });
                if let Some(bytes) = access.bytes {
                    response["length"] = json!(bytes);
                }
                fields.insert("http_response".into(), response);
            }
        }
    }
    if dns {
        // The question names no port: the destination is the name alone.
        fields.insert(
            "dst_endpoint".into(),
            json!({ "hostname": event.target.host_string() }),
        );
        fields.insert(
            "query".into(),
            json!({ "hostname": event.target.host_string() }),
        );
        let (rcode_id, rcode) = if refused {
            (5, "Refused")
        } else {
            (0, "NoError")
        };
        fields.insert("rcode_id".into(), json!(rcode_id));
        fields.insert("rcode".into(), json!(rcode));
    } else if http {
        fields.insert("http_request".into(), http_request(event));
    } else {
        let transport = if event.protocol == Protocol::Socks5Udp {
            "udp"
        } else {
            "tcp"
        };
        fields.insert(
            "connection_info".into(),
            json!({ "protocol_name": transport }),
        );
    }
    fields.insert("unmapped".into(), Value::Object(unmapped));
    record
}

/// `dst_endpoint`: a name as `hostname`, an address as `ip` (and the
/// refused address a name resolved to), a socket as `name`.
fn destination(target: &Target, address: Option<IpAddr>) -> Value {
    if let Some(path) = target.unix_path() {
        return json!({ "name": path.display().to_string() });
    }
    let mut endpoint = Map::new();
    match target.host_ref().and_then(|host| host.ip()) {
        Some(ip) => {
            endpoint.insert("ip".into(), json!(ip.to_string()));
        }
        None => {
            endpoint.insert("hostname".into(), json!(target.host_string()));
            if let Some(ip) = address {
                endpoint.insert("ip".into(), json!(ip.to_string()));
            }
        }
    }
    if let Some(port) = target.port() {
        endpoint.insert("port".into(), json!(port));
    }
    Value::Object(endpoint)
}

/// `http_request`: the method and the URL (query values already redacted).
fn http_request(event: &Event<'_>) -> Value {
    let mut request = json!({ "http_method": event.method });
    let Some(path_and_query) = event.path else {
        return request;
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let mut url = Map::new();
    match event.target.unix_path() {
        Some(_) => {
            url.insert("url_string".into(), json!(path_and_query));
        }
        None => {
            let scheme = if event.protocol.is_intercepted() {
                "https"
            } else {
                "http"
            };
            let host = event.target.host_string();
            let default_port = if scheme == "https" { 443 } else { 80 };
            let authority = match event.target.port() {
                Some(port) if port != default_port => format!("{}:{port}", bracketed(&host)),
                _ => bracketed(&host),
            };
            url.insert(
                "url_string".into(),
                json!(format!("{scheme}://{authority}{path_and_query}")),
            );
            url.insert("scheme".into(), json!(scheme));
            url.insert("hostname".into(), json!(host));
            if let Some(port) = event.target.port() {
                url.insert("port".into(), json!(port));
            }
        }
    }
    url.insert("path".into(), json!(path));
    if let Some(query) = query {
        url.insert("query_string".into(), json!(query));
    }
    request["url"] = Value::Object(url);
    request
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Writes an [`Access`] record for every answered request to an
/// [`AccessFile`]; refusals are the violations file's. A tunnel is
/// recorded when it opens; an HTTP response when its body has been sent
/// (or the client went away), with the bytes sent. Configured by `[log]
/// access_file` or [`ProxyBuilder::access_file`](crate::ProxyBuilder::access_file).
#[derive(Debug, Clone)]
pub struct AccessFileLayer {
    file: AccessFile,
}

impl AccessFileLayer {
    /// Records into `file`.
    pub fn new(file: AccessFile) -> AccessFileLayer {
        AccessFileLayer { file }
    }
}

impl<S> tower::Layer<S> for AccessFileLayer {
    type Service = AccessFileService<S>;

    fn layer(&self, inner: S) -> AccessFileService<S> {
        AccessFileService {
            inner,
            file: self.file.clone(),
        }
    }
}

/// The service [`AccessFileLayer`] makes.
#[derive(Debug, Clone)]
pub struct AccessFileService<S> {
    inner: S,
    file: AccessFile,
}

impl<S> tower::Service<http::Request<Body>> for AccessFileService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = AccessFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let started = Instant::now();
        let extensions = request.extensions();
        let facts = extensions.get::<Target>().cloned().map(|target| Access {
            unix_ms: unix_ms(),
            client: extensions.get::<ClientAddr>().map(|c| c.0),
            protocol: extensions
                .get::<Protocol>()
                .copied()
                .unwrap_or(Protocol::Http),
            method: request.method().as_str().to_owned(),
            target,
            path: loggable_path(request.method(), request.uri()),
            status: 0,
            bytes: None,
            duration_ms: 0,
            credentials: Vec::new(),
            user: extensions
                .get::<portcullis_middleware::ProxyUser>()
                .map(|user| user.0.clone()),
            profile: extensions
                .get::<portcullis_middleware::profiles::ProfileName>()
                .map(|profile| profile.0.clone()),
        });
        AccessFuture {
            future: self.inner.call(request),
            pending: facts.map(|access| (access, self.file.clone(), started)),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`AccessFileService`].
    pub struct AccessFuture<F> {
        #[pin]
        future: F,
        pending: Option<(Access, AccessFile, Instant)>,
    }
}

impl<F> std::future::Future for AccessFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<Body>, BoxError>>,
{
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.future.poll(cx))?;
        let Some((mut access, file, started)) = this.pending.take() else {
            return std::task::Poll::Ready(Ok(response));
        };
        access.status = response.status().as_u16();
        // Let through in audit mode though it carries a secret: its path
        // may hold it, and is not recorded.
        if response
            .extensions()
            .get::<portcullis_middleware::Audited>()
            .is_some_and(|audited| {
                audited.0.reason == portcullis_middleware::Reason::SecretDetected
            })
        {
            access.path = None;
        }
        if let Some(injected) = response
            .extensions()
            .get::<portcullis_middleware::credentials::Injected>()
        {
            access.credentials.clone_from(&injected.0);
        }
        let tunnel = access.method == http::Method::CONNECT.as_str()
            || response.extensions().get::<Tunnel>().is_some();
        if tunnel || hyper::body::Body::is_end_stream(response.body()) {
            access.bytes = (!tunnel).then_some(0);
            access.duration_ms = millis(started.elapsed());
            file.record(&access);
            return std::task::Poll::Ready(Ok(response));
        }
        std::task::Poll::Ready(Ok(response.map(|body| {
            crate::body::boxed(Counted {
                inner: body,
                sent: 0,
                pending: Some((access, file, started)),
            })
        })))
    }
}

/// A response body that records its [`Access`] when it ends or is
/// dropped, with the bytes that went through.
struct Counted {
    inner: Body,
    sent: u64,
    pending: Option<(Access, AccessFile, Instant)>,
}

impl Counted {
    fn finish(&mut self) {
        if let Some((mut access, file, started)) = self.pending.take() {
            access.bytes = Some(self.sent);
            access.duration_ms = millis(started.elapsed());
            file.record(&access);
        }
    }
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_middleware::{Reason, Source};

    fn violation(target: Target, protocol: Protocol, path: Option<&str>) -> Violation {
        let blocked = Blocked::new(
            Reason::NotAllowed,
            Source::Policy,
            target,
            protocol,
            &http::Method::GET,
        );
        Violation {
            unix_ms: 1_700_000_000_000,
            client: Some("[::1]:5000".parse().unwrap()),
            message: blocked.message.clone(),
            blocked,
            path: path.map(str::to_owned),
            user: None,
            profile: None,
        }
    }

    #[test]
    fn a_scan_finding_is_named_by_detector_and_place_only() {
        let target = Target::parse_authority("a.test:80", None).unwrap();
        let mut event = violation(target, Protocol::Http, Some("/"));
        event.blocked.reason = Reason::SecretDetected;
        event.blocked.rule = Some("github_token in the query string (base64)".into());
        let event = ocsf_violation(&event);
        assert_eq!(event["unmapped"]["finding"]["detector"], "github_token");
        assert_eq!(
            event["unmapped"]["finding"]["location"],
            "the query string (base64)"
        );
    }

    #[test]
    fn urls_name_the_scheme_the_port_and_bracket_ipv6() {
        let target = Target::parse_authority("[::1]:8443", None).unwrap();
        let event = ocsf_violation(&violation(
            target,
            Protocol::HttpsMitm,
            Some("/a?b=REDACTED"),
        ));
        let url = &event["http_request"]["url"];
        assert_eq!(url["url_string"], "https://[::1]:8443/a?b=REDACTED");
        assert_eq!(url["path"], "/a");
        assert_eq!(url["query_string"], "b=REDACTED");
        assert_eq!(event["dst_endpoint"]["ip"], "::1");
        assert_eq!(event["src_endpoint"]["ip"], "::1");
        let target = Target::parse_authority("a.test:80", None).unwrap();
        let event = ocsf_violation(&violation(target, Protocol::Http, Some("/")));
        assert_eq!(event["http_request"]["url"]["url_string"], "http://a.test/");
    }

    #[test]
    fn sockets_are_named_and_udp_is_said() {
        let target = Target::unix("/run/app.sock").unwrap();
        let event = ocsf_violation(&violation(target, Protocol::UnixSocket, Some("/v1/x")));
        assert_eq!(event["class_uid"], 4002);
        assert_eq!(event["dst_endpoint"]["name"], "/run/app.sock");
        assert_eq!(event["http_request"]["url"]["url_string"], "/v1/x");
        let target = Target::parse_authority("8.8.8.8:53", None).unwrap();
        let event = ocsf_violation(&violation(target, Protocol::Socks5Udp, None));
        assert_eq!(event["class_uid"], 4001);
        assert_eq!(event["type_uid"], 400105);
        assert_eq!(event["connection_info"]["protocol_name"], "udp");
        assert_eq!(event["firewall_rule"]["name"], "not_allowed");
    }

    #[test]
    fn a_refused_dns_question_is_dns_activity() {
        let host = portcullis_middleware::target::Host::parse("exfil.refused.test").unwrap();
        let event = ocsf_violation(&violation(Target::host(host, 0), Protocol::Dns, None));
        assert_eq!(event["class_uid"], 4003);
        assert_eq!(event["type_uid"], 400301);
        assert_eq!(event["query"]["hostname"], "exfil.refused.test");
        assert_eq!(event["rcode_id"], 5);
        assert_eq!(
            event["dst_endpoint"],
            serde_json::json!({ "hostname": "exfil.refused.test" })
        );
        assert!(event.get("http_request").is_none());
        assert_eq!(event["unmapped"]["protocol"], "dns");
    }
}
