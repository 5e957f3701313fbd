//! Records every refusal that passes through it.
//!
//! Outermost in the default stack, so it sees the refusals of every layer
//! below and of the connector's address check. Each [`Blocked`] error is:
//!
//! - kept in a bounded in-memory [`ViolationRing`] (default 200 entries,
//!   newest kept) with a running total;
//! - emitted as a `tracing` event at target [`VIOLATION_TARGET`] with the
//!   fixed fields `client.addr`, `dst.host`, `dst.port`, `protocol`,
//!   `method`, `reason`, `decision`, `source` (network-supplied text is
//!   escaped);
//! - handed to each configured [`ViolationSink`], such as
//!   [`JsonLinesSink`], which appends one JSON object a line to a file.
//!
//! It refuses nothing and passes every error on unchanged. What it records
//! is a [`Violation`]: the refusal as data, plus the message worded for
//! whoever reads the log — the refusal's own, unless a
//! [`wording`](ViolationLogLayer::wording) hook words it (the binary names
//! the fix as a flag under `run`, a key and its file under `--config`).
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::{Blocked, Protocol, Reason, Source, Target, ViolationLogLayer, ViolationRing};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let ring = ViolationRing::new(200);
//! let service = ServiceBuilder::new()
//!     .layer(ViolationLogLayer::new(ring.clone()))
//!     .service(service_fn(|request: Request<()>| async move {
//!         let target = Target::parse_authority("evil.test:443", None)?;
//!         Err::<Response<()>, portcullis_middleware::BoxError>(Blocked::new(Reason::Denied, Source::Policy, target, Protocol::HttpsConnect, request.method()).into())
//!     }));
//! let _ = service.oneshot(Request::connect("evil.test:443").body(())?).await;
//! assert_eq!(ring.total(), 1);
//! assert_eq!(ring.snapshot()[0].blocked.reason, Reason::Denied);
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use http::Request;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{find_blocked, Blocked, BoxError};
use crate::request::{ClientAddr, ProfileName, ProxyUser};

/// Who a refused request came from: its proxy user and its profile.
type Who<'a> = (Option<&'a ProxyUser>, Option<&'a ProfileName>);

/// The tracing target of violation events.
pub const VIOLATION_TARGET: &str = "portcullis::violation";

/// The default number of violations kept in memory.
pub const DEFAULT_RING_CAPACITY: usize = 200;

/// One recorded refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// When, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The client, when known.
    pub client: Option<SocketAddr>,
    /// The refusal.
    pub blocked: Blocked,
    /// Its message, as worded for the log's reader (see
    /// [`ViolationLogLayer::wording`]).
    pub message: String,
    /// The request's path and query, query values redacted (see
    /// [`loggable_path`]), when the request was seen as HTTP; `None` for a
    /// tunnel (`CONNECT`, SOCKS5).
    pub path: Option<String>,
    /// The proxy user the client authenticated as, if it did.
    pub user: Option<String>,
    /// The profile the request was given ([`profiles`](crate::profiles)),
    /// if the proxy has profiles.
    pub profile: Option<Arc<str>>,
}

/// The longest path a record keeps, in bytes; longer ones are cut (at a
/// character boundary) and end in `...`.
pub const MAX_LOGGED_PATH: usize = 2048;

/// What a record says of a request's target: its path and query with every
/// query value replaced by `REDACTED` (a token in a query string stays out
/// of the logs; the keys stay, to tell requests apart), cut to
/// [`MAX_LOGGED_PATH`]. `None` for `CONNECT` and for a target without a
/// path (authority form).
///
/// ```
/// use portcullis_middleware::loggable_path;
/// let uri: http::Uri = "https://api.test/repos?token=s3cret&page=2&flag".parse().unwrap();
/// assert_eq!(loggable_path(&http::Method::GET, &uri).as_deref(),
///            Some("/repos?token=REDACTED&page=REDACTED&flag"));
/// ```
pub fn loggable_path(method: &http::Method, uri: &http::Uri) -> Option<String> {
    if method == http::Method::CONNECT {
        return None;
    }
    let path_and_query = uri.path_and_query()?;
    let mut text = path_and_query.path().to_owned();
    if let Some(query) = path_and_query.query() {
        text.push('?');
        for (index, pair) in query.split('&').enumerate() {
            if index > 0 {
                text.push('&');
            }
            match pair.split_once('=') {
                Some((key, _)) => {
                    text.push_str(key);
                    text.push_str("=REDACTED");
                }
                None => text.push_str(pair),
            }
        }
    }
    if text.len() > MAX_LOGGED_PATH {
        let mut end = MAX_LOGGED_PATH;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    Some(text)
}

impl Violation {
    /// The record [`JsonLinesSink`] writes, as its own type.
    pub fn record(&self) -> ViolationRecord<'_> {
        let blocked = &self.blocked;
        ViolationRecord {
            time_unix_ms: self.unix_ms,
            client: self.client.map(|c| c.to_string()),
            status: "blocked",
            host: blocked.target.host_string(),
            port: blocked.target.port(),
            protocol: blocked.protocol.as_str(),
            reason: blocked.reason.as_str(),
            decision: blocked.decision.as_str(),
            source: blocked.source.as_str(),
            method: &blocked.method,
            rule: blocked.rule.as_deref(),
            message: &self.message,
            address: blocked.address,
            path: self.path.as_deref(),
            user: self.user.as_deref(),
            profile: self.profile.as_deref(),
        }
    }

    /// The JSON object written by [`JsonLinesSink`]: see [`ViolationRecord`].
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.record()).unwrap_or_default()
    }
}

/// One line of the violations file: `time_unix_ms`, `client`, `status`
/// (`"blocked"`), `host`, `port`, `protocol`, `reason`, `decision`,
/// `source`, `method`, `rule`, `message` (as worded for the log's reader),
/// `address` when a name's resolved address was refused, and `path` (query
/// values redacted) when the request was seen as HTTP; `user` and
/// `profile` when the caller had them. Its own type:
/// the HTTP answer's body may change without changing the file's format.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ViolationRecord<'a> {
    /// When, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// The client, when known.
    pub client: Option<String>,
    /// Always `"blocked"`.
    pub status: &'static str,
    /// The destination's host (or socket path).
    pub host: String,
    /// The destination's port (none for a socket).
    pub port: Option<u16>,
    /// How the request came in.
    pub protocol: &'a str,
    /// Why.
    pub reason: &'a str,
    /// `deny` or `ask`.
    pub decision: &'a str,
    /// Which part of the proxy refused.
    pub source: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The rule that decided, if one did.
    pub rule: Option<&'a str>,
    /// What was refused, why, and what to change.
    pub message: &'a str,
    /// The refused address a name resolved to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
    /// The request's path and query, query values redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    /// The proxy user the client authenticated as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    /// The profile the request was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<&'a str>,
}

/// Receives every violation; implemented for closures.
pub trait ViolationSink: Send + Sync + 'static {
    /// Records one violation. Must not block for long: it runs on the
    /// request path.
    fn record(&self, violation: &Violation);

    /// Waits until every violation recorded so far is stored (a file
    /// written, a queue drained). Called when a proxy shuts down; the
    /// default does nothing.
    fn flush(&self) {}
}

impl<F> ViolationSink for F
where
    F: Fn(&Violation) + Send + Sync + 'static,
{
    fn record(&self, violation: &Violation) {
        self(violation)
    }
}

/// A file that lines are appended to from a thread of its own, so a slow
/// disk never stalls the request path. Lines are written in the order they
/// were given, each with one `write` to a file opened for appending.
/// [`flush`](LineFile::flush) waits until every line given so far is
/// written; when the last clone is dropped, the thread writes what is
/// queued and ends, and the drop waits for it. Nothing given is lost,
/// however the runtime shuts down. [`JsonLinesSink`] writes violations
/// with one; the binary's access file is another.
#[derive(Debug, Clone)]
pub struct LineFile {
    writer: Arc<Writer>,
}

/// Renders one violation as the JSON object of its line; see
/// [`JsonLinesSink::open_with`].
pub type Render = Arc<dyn Fn(&Violation) -> serde_json::Value + Send + Sync>;

/// Appends each violation as one JSON line to a [`LineFile`]: by default
/// its [`ViolationRecord`]; [`open_with`](JsonLinesSink::open_with) takes
/// another rendering (the binary's OCSF records).
#[derive(Clone)]
pub struct JsonLinesSink {
    file: LineFile,
    render: Render,
}

impl fmt::Debug for JsonLinesSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonLinesSink")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

enum Line {
    Write(String),
    /// Answered once every line before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

#[derive(Debug)]
struct Writer {
    queue: Mutex<Option<std::sync::mpsc::Sender<Line>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl fmt::Debug for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Line")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written the rest.
        drop(lock(&self.queue).take());
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LineFile {
    /// Opens (creating, appending to) `path`, and starts its writer.
    pub fn open(path: &Path) -> std::io::Result<LineFile> {
        let mut file: File = OpenOptions::new().create(true).append(true).open(path)?;
        let (queue, lines) = std::sync::mpsc::channel::<Line>();
        let thread = std::thread::Builder::new()
            .name("portcullis-violations".into())
            .spawn(move || {
                for line in lines {
                    match line {
                        Line::Write(text) => {
                            if let Err(error) = file.write_all(text.as_bytes()) {
                                tracing::warn!(target: VIOLATION_TARGET, %error, "could not append to a log file");
                            }
                        }
                        Line::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(LineFile {
            writer: Arc::new(Writer {
                queue: Mutex::new(Some(queue)),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Queues `value` as one line (its JSON text and a newline).
    pub fn write_json(&self, value: &serde_json::Value) {
        let mut line = value.to_string();
        line.push('\n');
        if let Some(queue) = lock(&self.writer.queue).as_ref() {
            let _ = queue.send(Line::Write(line));
        }
    }

    /// Waits until every line given so far is written.
    pub fn flush(&self) {
        let (done, wait) = std::sync::mpsc::channel();
        let sent = lock(&self.writer.queue)
            .as_ref()
            .is_some_and(|queue| queue.send(Line::Flush(done)).is_ok());
        if sent {
            let _ = wait.recv();
        }
    }
}

impl JsonLinesSink {
    /// Opens (creating, appending to) `path`, writing each violation's
    /// [`ViolationRecord`].
    pub fn open(path: &Path) -> std::io::Result<JsonLinesSink> {
        JsonLinesSink::open_with(path, Arc::new(Violation::to_json))
    }

    /// Opens `path`, writing what `render` makes of each violation.
    pub fn open_with(path: &Path, render: Render) -> std::io::Result<JsonLinesSink> {
        Ok(JsonLinesSink {
            file: LineFile::open(path)?,
            render,
        })
    }

    /// Waits until every line recorded so far is written.
    pub fn flush(&self) {
        self.file.flush();
    }
}

impl ViolationSink for JsonLinesSink {
    fn flush(&self) {
        JsonLinesSink::flush(self);
    }

    fn record(&self, violation: &Violation) {
        self.file.write_json(&(self.render)(violation));
    }
}

#[derive(Debug)]
struct RingInner {
    capacity: usize,
    entries: Mutex<VecDeque<Violation>>,
    total: AtomicU64,
}

/// The most recent violations, bounded, newest kept; clones share it.
#[derive(Debug, Clone)]
pub struct ViolationRing {
    inner: Arc<RingInner>,
}

impl ViolationRing {
    /// A ring keeping at most `capacity` entries.
    pub fn new(capacity: usize) -> ViolationRing {
        ViolationRing {
            inner: Arc::new(RingInner {
                capacity,
                entries: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
                total: AtomicU64::new(0),
            }),
        }
    }

    fn push(&self, violation: Violation) {
        self.inner.total.fetch_add(1, Ordering::Relaxed);
        if self.inner.capacity == 0 {
            return;
        }
        let mut entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while entries.len() >= self.inner.capacity {
            entries.pop_front();
        }
        entries.push_back(violation);
    }

    /// The kept violations, oldest first.
    pub fn snapshot(&self) -> Vec<Violation> {
        let entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.iter().cloned().collect()
    }

    /// How many violations were ever recorded.
    pub fn total(&self) -> u64 {
        self.inner.total.load(Ordering::Relaxed)
    }
}

impl Default for ViolationRing {
    fn default() -> ViolationRing {
        ViolationRing::new(DEFAULT_RING_CAPACITY)
    }
}

struct Recorder {
    ring: ViolationRing,
    sinks: Vec<Arc<dyn ViolationSink>>,
    throttle: Throttle,
    wording: Option<Wording>,
    /// Text never recorded, and what stands in its place.
    masks: Arc<[(String, String)]>,
}

/// `text` with each masked string replaced by its stand-in.
pub fn masked(text: &str, masks: &[(String, String)]) -> String {
    let mut text = text.to_owned();
    for (secret, stand_in) in masks {
        if !secret.is_empty() && text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), stand_in);
        }
    }
    text
}

/// Words a refusal for the log's reader (`None` keeps its own message);
/// see [`ViolationLogLayer::wording`].
pub type Wording = Arc<dyn Fn(&Blocked) -> Option<String> + Send + Sync>;

/// The default time between two log lines about one destination and
/// reason; the refusals between are counted, not logged.
pub const DEFAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Destinations whose last log line is remembered; past this the memory is
/// cleared (and each logs once more).
const THROTTLE_ENTRIES: usize = 4096;

/// A destination and reason: (host, port, reason).
type LineKey = (String, u16, &'static str);

/// One log line per destination and reason per interval.
#[derive(Debug)]
struct Throttle {
    interval: Duration,
    /// What was logged → (last line at, refusals since).
    seen: Mutex<HashMap<LineKey, (Instant, u64)>>,
}

impl Throttle {
    fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            seen: Mutex::default(),
        }
    }

    /// `Some(refusals not logged since the last line)` when this one should
    /// be logged; `None` when it is only counted.
    fn admit(&self, host: &str, port: u16, reason: &'static str) -> Option<u64> {
        if self.interval.is_zero() {
            return Some(0);
        }
        let now = Instant::now();
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.len() >= THROTTLE_ENTRIES {
            seen.clear();
        }
        match seen.get_mut(&(host.to_owned(), port, reason)) {
            Some((last, since)) if now.duration_since(*last) < self.interval => {
                *since += 1;
                None
            }
            Some((last, since)) => {
                let repeated = *since;
                *last = now;
                *since = 0;
                Some(repeated)
            }
            None => {
                seen.insert((host.to_owned(), port, reason), (now, 0));
                Some(0)
            }
        }
    }
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("ring", &self.ring)
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

impl Recorder {
    fn record(
        &self,
        client: Option<SocketAddr>,
        path: Option<&String>,
        who: Who<'_>,
        blocked: &Blocked,
    ) {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let message = self
            .wording
            .as_ref()
            .and_then(|wording| wording(blocked))
            .unwrap_or_else(|| blocked.message.clone());
        let violation = Violation {
            unix_ms,
            client,
            blocked: blocked.clone(),
            message,
            // A request refused (or audited) for a secret may carry it in
            // its path: never recorded.
            path: path
                .filter(|_| blocked.reason != crate::error::Reason::SecretDetected)
                .map(|path| masked(path, &self.masks)),
            user: who.0.map(|user| user.0.clone()),
            profile: who.1.map(|profile| profile.0.clone()),
        };
        let client_addr = client.map(|c| c.to_string()).unwrap_or_default();
        let host = blocked.target.host_string().escape_debug().to_string();
        let port = blocked.target.port().unwrap_or(0);
        let method = blocked.method.escape_debug().to_string();
        let message = violation.message.escape_debug().to_string();
        // Every refusal reaches the ring and the sinks; the log says each
        // destination once per interval, with how many it did not repeat.
        if let Some(repeated) = self.throttle.admit(&host, port, blocked.reason.as_str()) {
            // A root event: the line carries its own fields, whatever span
            // (an access log's, an integrator's) the refusal happened in.
            tracing::event!(
                target: VIOLATION_TARGET,
                parent: None,
                tracing::Level::WARN,
                client.addr = client_addr.as_str(),
                dst.host = host.as_str(),
                dst.port = port,
                protocol = blocked.protocol.as_str(),
                method = method.as_str(),
                reason = blocked.reason.as_str(),
                decision = blocked.decision.as_str(),
                source = blocked.source.as_str(),
                repeated,
                "{message}"
            );
        }
        for sink in &self.sinks {
            sink.record(&violation);
        }
        self.ring.push(violation);
    }
}

/// Configures [`ViolationLog`].
#[derive(Debug, Clone)]
pub struct ViolationLogLayer {
    recorder: Arc<Recorder>,
}

impl ViolationLogLayer {
    /// Records into `ring` (and the tracing target).
    pub fn new(ring: ViolationRing) -> ViolationLogLayer {
        ViolationLogLayer {
            recorder: Arc::new(Recorder {
                ring,
                sinks: Vec::new(),
                throttle: Throttle::new(DEFAULT_LOG_INTERVAL),
                wording: None,
                masks: Arc::from(Vec::new()),
            }),
        }
    }

    /// Also hands every violation to `sink`.
    pub fn with_sink(self, sink: impl ViolationSink) -> ViolationLogLayer {
        let mut sinks = self.recorder.sinks.clone();
        sinks.push(Arc::new(sink));
        ViolationLogLayer {
            recorder: Arc::new(Recorder {
                ring: self.recorder.ring.clone(),
                sinks,
                throttle: Throttle::new(self.recorder.throttle.interval),
                wording: self.recorder.wording.clone(),
                masks: self.recorder.masks.clone(),
            }),
        }
    }

    /// Logs a destination and reason at most once per `interval` (default
    /// 10 s), with a `repeated` field counting the refusals in between; zero
    /// logs every refusal. The ring and the sinks get every refusal either
    /// way.
    pub fn log_interval(self, interval: Duration) -> ViolationLogLayer {
        ViolationLogLayer {
            recorder: Arc::new(Recorder {
                ring: self.recorder.ring.clone(),
                sinks: self.recorder.sinks.clone(),
                throttle: Throttle::new(interval),
                wording: self.recorder.wording.clone(),
                masks: self.recorder.masks.clone(),
            }),
        }
    }

    /// Words each record's message for the log's reader: `wording` gets
    /// the refusal and returns the message to record, or `None` to keep
    /// its own. The error passed on is never changed. The bundled binary
    /// gives its one renderer here (a command-line flag under `run`, the
    /// key and its file under `serve --config`), and the same renderer to
    /// its transports for the answers they send.
    pub fn wording(
        self,
        wording: impl Fn(&Blocked) -> Option<String> + Send + Sync + 'static,
    ) -> ViolationLogLayer {
        ViolationLogLayer {
            recorder: Arc::new(Recorder {
                ring: self.recorder.ring.clone(),
                sinks: self.recorder.sinks.clone(),
                throttle: Throttle::new(self.recorder.throttle.interval),
                wording: Some(Arc::new(wording)),
                masks: self.recorder.masks.clone(),
            }),
        }
    }

    /// Never records these strings in a request's path: each is written as
    /// its stand-in (the binary masks credentials' placeholders as
    /// `{credential:NAME}`).
    pub fn masking(self, masks: Vec<(String, String)>) -> ViolationLogLayer {
        ViolationLogLayer {
            recorder: Arc::new(Recorder {
                ring: self.recorder.ring.clone(),
                sinks: self.recorder.sinks.clone(),
                throttle: Throttle::new(self.recorder.throttle.interval),
                wording: self.recorder.wording.clone(),
                masks: masks.into(),
            }),
        }
    }

    /// Waits until every sink has stored what it was given
    /// ([`ViolationSink::flush`]); blocks the calling thread.
    pub fn flush(&self) {
        for sink in &self.recorder.sinks {
            sink.flush();
        }
    }

    /// The ring this layer records into.
    pub fn ring(&self) -> &ViolationRing {
        &self.recorder.ring
    }
    /// A handle that records into this layer's ring and sinks a refusal
    /// decided after the response went out (a WebSocket message refused
    /// mid-connection). Take it from the layer as it is finally
    /// configured: [`with_sink`](Self::with_sink) and the others return a
    /// new recorder.
    pub fn late(&self) -> RecordLater {
        RecordLater {
            recorder: self.recorder.clone(),
        }
    }
}

/// Records refusals decided after their request's response
/// ([`ViolationLogLayer::late`]), as the layer records the others.
#[derive(Debug, Clone)]
pub struct RecordLater {
    recorder: Arc<Recorder>,
}

impl RecordLater {
    /// Records `blocked` (a refusal, or an audit), from `client`.
    pub fn record(&self, client: Option<SocketAddr>, blocked: &Blocked) {
        self.recorder.record(client, None, (None, None), blocked);
    }

    /// Records `blocked` from `client`, naming the proxy user and the
    /// profile of the request it refused.
    pub fn record_as(
        &self,
        client: Option<SocketAddr>,
        user: Option<&ProxyUser>,
        profile: Option<&ProfileName>,
        blocked: &Blocked,
    ) {
        self.recorder.record(client, None, (user, profile), blocked);
    }
}

impl Default for ViolationLogLayer {
    fn default() -> ViolationLogLayer {
        ViolationLogLayer::new(ViolationRing::default())
    }
}

impl<S> Layer<S> for ViolationLogLayer {
    type Service = ViolationLog<S>;

    fn layer(&self, inner: S) -> ViolationLog<S> {
        ViolationLog {
            inner,
            recorder: self.recorder.clone(),
        }
    }
}

/// Records refusals; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ViolationLog<S> {
    inner: S,
    recorder: Arc<Recorder>,
}

impl<S> ViolationLog<S> {
    /// Wraps `inner`, recording into `ring`.
    pub fn new(inner: S, ring: ViolationRing) -> ViolationLog<S> {
        ViolationLogLayer::new(ring).layer(inner)
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

/// A would-be refusal a layer let through (audit mode), in the extensions
/// of the response: the violation log records it (decision `audit`) and
/// takes it out.
#[derive(Debug, Clone)]
pub struct Audited(pub Blocked);

impl<S, B, R> Service<Request<B>> for ViolationLog<S>
where
    S: Service<Request<B>, Response = http::Response<R>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let client = request.extensions().get::<ClientAddr>().map(|c| c.0);
        let path = loggable_path(request.method(), request.uri());
        let user = request.extensions().get::<ProxyUser>().cloned();
        let profile = request.extensions().get::<ProfileName>().cloned();
        ResponseFuture {
            future: self.inner.call(request),
            client,
            path,
            user,
            profile,
            recorder: self.recorder.clone(),
        }
    }
}

pin_project! {
    /// Records a refusal when the inner future fails with one.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        client: Option<SocketAddr>,
        path: Option<String>,
        user: Option<ProxyUser>,
        profile: Option<ProfileName>,
        recorder: Arc<Recorder>,
    }
}

impl<F, R, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.future.poll(cx).map(|result| {
            let result = result.inspect(|response| {
                // Left on the response: the access log reads it too.
                if let Some(Audited(blocked)) = response.extensions().get::<Audited>() {
                    let who = (this.user.as_ref(), this.profile.as_ref());
                    this.recorder
                        .record(*this.client, this.path.as_ref(), who, blocked);
                }
            });
            result.map_err(|error| {
                let error: BoxError = error.into();
                if let Some(blocked) = find_blocked(error.as_ref()) {
                    let who = (this.user.as_ref(), this.profile.as_ref());
                    this.recorder
                        .record(*this.client, this.path.as_ref(), who, blocked);
                }
                error
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Protocol, Reason, Source, Target};
    use http::Response;
    use tower_test::mock;

    fn blocked(host: &str) -> Blocked {
        let target = Target::parse_authority(host, None).unwrap();
        Blocked::new(
            Reason::NotAllowed,
            Source::Policy,
            target,
            Protocol::Http,
            &http::Method::GET,
        )
    }

    #[tokio::test]
    async fn wording_words_the_record_and_leaves_the_error_as_refused() {
        let ring = ViolationRing::new(4);
        let layer = ViolationLogLayer::new(ring.clone()).wording(|blocked: &Blocked| {
            (blocked.target.to_string() == "a.test:80").then(|| "worded".to_owned())
        });
        let (mut service, mut mock) = mock::spawn_layer::<Request<()>, Response<()>, _>(layer);
        for host in ["a.test:80", "b.test:80"] {
            mock.allow(1);
            assert!(service.poll_ready().is_ready());
            let response = service.call(Request::new(()));
            let (_, send) = mock.next_request().await.unwrap();
            send.send_error(blocked(host));
            let error = response.await.unwrap_err();
            let returned = find_blocked(error.as_ref()).unwrap();
            assert_eq!(returned, &blocked(host), "the error passes unchanged");
        }
        let records = ring.snapshot();
        assert_eq!(records[0].message, "worded");
        assert_eq!(records[0].blocked, blocked("a.test:80"));
        assert_eq!(records[1].message, blocked("b.test:80").message);
        assert_eq!(records[0].to_json()["message"], "worded");
    }

    #[tokio::test]
    async fn records_refusals_into_ring_sink_and_passes_them_on() {
        let ring = ViolationRing::new(2);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_seen = seen.clone();
        let layer = ViolationLogLayer::new(ring.clone())
            .with_sink(move |v: &Violation| sink_seen.lock().unwrap().push(v.clone()));
        let (mut service, mut mock) = mock::spawn_layer::<Request<()>, Response<()>, _>(layer);
        for host in ["a.test:80", "b.test:80", "c.test:80"] {
            mock.allow(1);
            assert!(service.poll_ready().is_ready());
            let mut request = Request::new(());
            request
                .extensions_mut()
                .insert(ClientAddr("127.0.0.1:5000".parse().unwrap()));
            let response = service.call(request);
            let (_, send) = mock.next_request().await.unwrap();
            send.send_error(blocked(host));
            let error = response.await.unwrap_err();
            assert!(
                find_blocked(error.as_ref()).is_some(),
                "passed on unchanged"
            );
        }
        assert_eq!(ring.total(), 3);
        let kept: Vec<String> = ring
            .snapshot()
            .iter()
            .map(|v| v.blocked.target.to_string())
            .collect();
        assert_eq!(kept, ["b.test:80", "c.test:80"], "bounded, newest kept");
        assert_eq!(seen.lock().unwrap().len(), 3);
        let json = ring.snapshot()[0].to_json();
        assert_eq!(json["client"], "127.0.0.1:5000");
        assert_eq!(json["reason"], "not_allowed");
    }

    #[test]
    fn loggable_paths_redact_query_values_and_stay_bounded() {
        let get = http::Method::GET;
        let uri = |text: &str| text.parse::<http::Uri>().unwrap();
        assert_eq!(
            loggable_path(&http::Method::CONNECT, &uri("a.test:443")),
            None
        );
        assert_eq!(
            loggable_path(&get, &uri("a.test:443")),
            None,
            "authority form"
        );
        assert_eq!(
            loggable_path(&get, &uri("http://a.test/p?a=1&&b&c==2")).as_deref(),
            Some("/p?a=REDACTED&&b&c=REDACTED")
        );
        let long = uri(&format!(
            "http://a.test/{}",
            "%C3%A9".repeat(MAX_LOGGED_PATH)
        ));
        let cut = loggable_path(&get, &long).unwrap();
        assert_eq!(cut.len(), MAX_LOGGED_PATH + 3, "{cut}");
        assert!(cut.ends_with("..."), "{cut}");
    }

    #[tokio::test]
    async fn other_errors_and_successes_are_not_recorded() {
        let ring = ViolationRing::default();
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(ViolationLogLayer::new(ring.clone()));
        mock.allow(0);
        assert!(
            service.poll_ready().is_pending(),
            "back-pressure passes through"
        );
        mock.allow(2);
        assert!(service.poll_ready().is_ready());
        let response = service.call(Request::new(()));
        let (_, send) = mock.next_request().await.unwrap();
        send.send_error("boom");
        assert_eq!(response.await.unwrap_err().to_string(), "boom");
        assert!(service.poll_ready().is_ready());
        let response = service.call(Request::new(()));
        let (_, send) = mock.next_request().await.unwrap();
        send.send_response(Response::new(()));
        response.await.unwrap();
        assert_eq!(ring.total(), 0);
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn emits_the_fixed_fields_escaped() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let recorder = Recorder {
                ring: ViolationRing::default(),
                sinks: Vec::new(),
                throttle: Throttle::new(DEFAULT_LOG_INTERVAL),
                wording: None,
                masks: Arc::from(Vec::new()),
            };
            let mut refusal = blocked("evil.test:443");
            refusal.method = "GE\u{1b}T".to_owned();
            for _ in 0..5 {
                recorder.record(
                    Some("127.0.0.1:4000".parse().unwrap()),
                    None,
                    (None, None),
                    &refusal,
                );
            }
            recorder.record(None, None, (None, None), &blocked("other.test:443"));
            assert_eq!(recorder.ring.total(), 6, "every refusal is kept");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        for field in [
            "portcullis::violation",
            "client.addr=\"127.0.0.1:4000\"",
            "dst.host=\"evil.test\"",
            "dst.port=443",
            "protocol=\"http\"",
            "reason=\"not_allowed\"",
            "decision=\"deny\"",
            "source=\"policy\"",
        ] {
            assert!(text.contains(field), "{field} missing in {text}");
        }
        assert!(
            !text.contains('\u{1b}'),
            "control bytes from the network are escaped: {text}"
        );
        assert_eq!(
            text.matches("dst.host=\"evil.test\"").count(),
            1,
            "one line per destination per interval: {text}"
        );
        assert!(text.contains("dst.host=\"other.test\""), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_counts_what_it_does_not_log() {
        let throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.admit("a.test", 80, "denied"), Some(0));
        assert_eq!(throttle.admit("a.test", 80, "denied"), None);
        assert_eq!(throttle.admit("a.test", 80, "denied"), None);
        assert_eq!(
            throttle.admit("a.test", 443, "denied"),
            Some(0),
            "another port"
        );
        assert_eq!(
            throttle.admit("a.test", 80, "not_allowed"),
            Some(0),
            "another reason"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(
            throttle.admit("a.test", 80, "denied"),
            Some(2),
            "the two not logged"
        );
        let every = Throttle::new(Duration::ZERO);
        assert_eq!(every.admit("a.test", 80, "denied"), Some(0));
        assert_eq!(every.admit("a.test", 80, "denied"), Some(0));
    }

    #[test]
    fn json_lines_sink_writes_off_the_runtime_and_loses_nothing_at_shutdown() {
        let dir = std::env::temp_dir().join(format!("portcullis-sink-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("violations.jsonl");
        let _ = std::fs::remove_file(&path);
        let sink = JsonLinesSink::open(&path).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let recording = sink.clone();
        runtime.block_on(async move {
            for i in 0..2000 {
                let violation = Violation {
                    unix_ms: i,
                    client: None,
                    blocked: blocked("a.test:80"),
                    message: "m".into(),
                    path: None,
                    user: None,
                    profile: None,
                };
                recording.record(&violation);
            }
        });
        // The runtime going away loses nothing: the sink's own thread
        // writes, and dropping the last sink waits for it.
        drop(runtime);
        drop(sink);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2000);
        for (index, line) in text.lines().enumerate() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["time_unix_ms"], index, "in order");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_lines_sink_appends() {
        let dir = std::env::temp_dir().join(format!("portcullis-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("violations.jsonl");
        let _ = std::fs::remove_file(&path);
        let sink = JsonLinesSink::open(&path).unwrap();
        let violation = Violation {
            unix_ms: 1,
            client: None,
            blocked: blocked("a.test:80"),
            message: "m".into(),
            path: Some("/x?k=REDACTED".into()),
            user: Some("ci".into()),
            profile: Some("builds".into()),
        };
        sink.record(&violation);
        sink.record(&violation);
        sink.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["host"], "a.test");
        assert_eq!(lines[1]["path"], "/x?k=REDACTED");
        assert_eq!(lines[1]["user"], "ci");
        assert_eq!(lines[1]["profile"], "builds");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
