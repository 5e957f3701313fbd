//! The ways into the proxy. Each transport owns its wire: it parses the
//! destination once into the request model, drives the one stack, and turns
//! the stack's errors into its own answers through its `rescue` module.
//!
//! | module | ingress | protocol |
//! | --- | --- | --- |
//! | `http1` | absolute-form requests, `CONNECT`, upgrades | `http`, `https_connect` |
//! | `unix` | `x-unix-socket: /path` on an HTTP/1 request | `unix_socket` |
//! | `socks5` | SOCKS5 `CONNECT` | `socks5_tcp` |
//! | `socks5::udp` | each new destination of a `UDP ASSOCIATE` | `socks5_udp` |
//! | `mitm` | each request inside an intercepted `CONNECT` (limited mode) | `https_mitm` |
//!
//! `mitm` intercepts HTTPS inside a `CONNECT` in limited mode (protocol
//! `https_mitm`), under `http1`. What is shared lives
//! here: the accept loop, shutdown and drain, the one function that puts the
//! request model into a request, and the bidirectional copy. The runner
//! depends on the transports; nothing here depends on the runner.

pub(crate) mod http1;
pub(crate) mod mitm;
pub(crate) mod model;
pub(crate) mod replay;
pub(crate) mod socks5;
pub(crate) mod splice;
mod unix;
pub(crate) mod websocket;
pub(crate) mod websocket_scan;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tower::util::BoxCloneService;

use portcullis_middleware::BoxError;

use crate::body::Body;

/// The bounds every transport keeps. Defaults are generous for people and
/// tight for abuse. This is the config's `[limits]` table itself: it is
/// deserialized straight from the file (seconds as durations, each checked
/// as it is read), and its defaults are written here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Limits {
    /// How long a client may take to send a request head (HTTP/1).
    #[serde(with = "crate::units::positive_seconds")]
    pub header_read_timeout: Duration,
    /// The largest request head read (HTTP/1; at least 8 KiB).
    #[serde(with = "crate::units::head_bytes")]
    pub max_header_bytes: usize,
    /// The most headers a request may have (HTTP/1).
    pub max_headers: usize,
    /// How long a request body may go without a byte before the request is
    /// refused (400).
    #[serde(with = "crate::units::positive_seconds")]
    pub body_idle_timeout: Duration,
    /// The slowest average a request body may keep, in bytes a second,
    /// after its first `body_idle_timeout` (mod_reqtimeout's `MinRate`);
    /// slower is refused (400). 0 turns the check off.
    pub body_min_rate: u64,
    /// How long a tunnel (CONNECT, SOCKS5) may go with no byte either way
    /// before it is closed.
    #[serde(with = "crate::units::positive_seconds")]
    pub tunnel_idle_timeout: Duration,
    /// How long a connection to an origin or an upstream proxy may take.
    #[serde(with = "crate::units::positive_seconds")]
    pub connect_timeout: Duration,
    /// The most client connections served at once, per listener; past it a
    /// new client is refused at once (HTTP 503, SOCKS5 0x01) and the log
    /// says so, well before the process runs out of file descriptors.
    pub max_connections: usize,
    /// The most SOCKS5 UDP associations open at once, in all; past it an
    /// `UDP ASSOCIATE` is refused with reply 0x01.
    pub max_udp_associations: usize,
    /// The most SOCKS5 UDP associations one client address may hold at
    /// once; past it, reply 0x01.
    pub max_udp_associations_per_client: usize,
    /// How long `serve` waits, on SIGTERM or SIGINT, for open connections
    /// and tunnels before cutting them (0: at once). A library user passes
    /// its own deadline to `ProxyHandle::shutdown`.
    #[serde(with = "crate::units::seconds_or_zero")]
    pub shutdown_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            body_idle_timeout: Duration::from_secs(60),
            body_min_rate: 512,
            tunnel_idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_udp_associations: 1024,
            max_udp_associations_per_client: 64,
            shutdown_deadline: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// Sets how long a client may take to send a request head.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Limits {
        self.header_read_timeout = timeout;
        self
    }

    /// Sets the largest request head (raised to 8 KiB if smaller).
    pub fn max_header_bytes(mut self, bytes: usize) -> Limits {
        self.max_header_bytes = bytes.max(crate::units::head_bytes::LEAST);
        self
    }

    /// Sets how long a connection to an origin or upstream may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Limits {
        self.connect_timeout = timeout;
        self
    }

    /// Sets how long `serve` waits for open connections at shutdown.
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Limits {
        self.shutdown_deadline = deadline;
        self
    }

    /// Sets the most headers a request may have.
    pub fn max_headers(mut self, count: usize) -> Limits {
        self.max_headers = count;
        self
    }

    /// Sets how long a request body may stall.
    pub fn body_idle_timeout(mut self, timeout: Duration) -> Limits {
        self.body_idle_timeout = timeout;
        self
    }

    /// Sets the slowest average a request body may keep (bytes a second;
    /// 0: no minimum).
    pub fn body_min_rate(mut self, bytes_per_second: u64) -> Limits {
        self.body_min_rate = bytes_per_second;
        self
    }

    /// Sets the most client connections served at once, per listener.
    pub fn max_connections(mut self, max: usize) -> Limits {
        self.max_connections = max.max(1);
        self
    }

    /// Sets the most SOCKS5 UDP associations open at once, in all.
    pub fn max_udp_associations(mut self, max: usize) -> Limits {
        self.max_udp_associations = max;
        self
    }

    /// Sets the most SOCKS5 UDP associations one client address may hold.
    pub fn max_udp_associations_per_client(mut self, max: usize) -> Limits {
        self.max_udp_associations_per_client = max;
        self
    }

    /// Sets how long a tunnel may stay quiet.
    pub fn tunnel_idle_timeout(mut self, timeout: Duration) -> Limits {
        self.tunnel_idle_timeout = timeout;
        self
    }
}

/// The whole stack, type-erased once, as every transport drives it.
pub type ProxyService = BoxCloneService<Request<Body>, Response<Body>, BoxError>;

/// A username and password clients must present (HTTP `Proxy-Authorization:
/// Basic`, SOCKS5 RFC 1929).
#[derive(Clone)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// Who may use the proxy: the one credential every client must present
/// (`[auth]`, `run`'s own), and the proxy users (`[[auth.users]]`), whose
/// credential a client may present to be known (and given its profile).
#[derive(Clone, Debug, Default)]
pub(crate) struct Accounts {
    /// Required of every client when set.
    pub(crate) main: Option<Credentials>,
    /// More users, by name: their passwords.
    pub(crate) users: Arc<std::collections::HashMap<String, Secret>>,
}

/// A password, never printed.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Accounts {
    /// Whether a client without a credential is refused.
    pub(crate) fn required(&self) -> bool {
        self.main.is_some()
    }

    /// Whether `username` and `password` are a known user's, compared
    /// without an early exit.
    pub(crate) fn accept(&self, username: &str, password: &str) -> bool {
        let main = self
            .main
            .as_ref()
            .is_some_and(|main| main.accept(username, password));
        let user = match self.users.get(username) {
            Some(expected) => same_secret(password, &expected.0),
            None => !same_secret(password, password),
        };
        main | user
    }
}

/// The accounts in force, read per connection (SOCKS5) or per request
/// (HTTP/1), so a reload of `[auth]` changes the next one.
#[derive(Clone, Debug, Default)]
pub(crate) struct LiveCredentials(Arc<arc_swap::ArcSwapOption<Accounts>>);

impl LiveCredentials {
    /// The accounts in force now; `None` when there are none (anyone may
    /// use the proxy, unnamed).
    pub(crate) fn current(&self) -> Option<Arc<Accounts>> {
        self.0.load_full()
    }

    /// Replaces the credential every client must present, keeping the users.
    pub(crate) fn store(&self, credentials: Option<Credentials>) {
        let users = self
            .current()
            .map(|accounts| accounts.users.clone())
            .unwrap_or_default();
        self.store_all(credentials, users);
    }

    /// Replaces both, at once.
    pub(crate) fn store_all(
        &self,
        main: Option<Credentials>,
        users: Arc<std::collections::HashMap<String, Secret>>,
    ) {
        let accounts =
            (main.is_some() || !users.is_empty()).then(|| Arc::new(Accounts { main, users }));
        self.0.store(accounts);
    }
}

impl Credentials {
    /// Whether `username` and `password` are these, compared without an
    /// early exit.
    pub(crate) fn accept(&self, username: &str, password: &str) -> bool {
        same_secret(username, &self.username) & same_secret(password, &self.password)
    }
}

/// The size of a request head as the client sent it: the request line
/// (`METHOD SP target SP HTTP/1.1 CRLF`), each header as `name: value
/// CRLF`, and the blank line. [`Limits::max_header_bytes`] is checked
/// against this, exactly.
pub(crate) fn head_size<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let target = match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => {
            scheme.len()
                + "://".len()
                + authority.as_str().len()
                + uri.path_and_query().map_or(0, |p| p.as_str().len())
        }
        (None, Some(authority)) if uri.path_and_query().is_none() => authority.as_str().len(),
        _ => uri.path_and_query().map_or(1, |p| p.as_str().len()),
    };
    let line = request.method().as_str().len() + 1 + target + 1 + "HTTP/1.1\r\n".len();
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    line + headers + 2
}

/// The read buffer hyper may fill while looking for the end of a head:
/// twice our limit, so every head up to twice the limit reaches our exact
/// check (a JSON 431), and a longer one is cut by hyper's own bare 431.
pub(crate) fn read_buffer_cap(limits: &Limits) -> usize {
    limits.max_header_bytes.max(8 * 1024).saturating_mul(2)
}

/// The most headers hyper parses: twice our limit, for the same reason.
pub(crate) fn header_count_cap(limits: &Limits) -> usize {
    limits.max_headers.saturating_mul(2)
}

/// Whether a parsed head is over the limits: the exact checks that a 431
/// with a JSON body answers.
pub(crate) fn head_over_limits<B>(request: &Request<B>, limits: &Limits) -> bool {
    request.headers().len() > limits.max_headers || head_size(request) > limits.max_header_bytes
}

/// Compares without an early exit (see
/// [`portcullis_middleware::credentials::same_secret`]).
pub(crate) use portcullis_middleware::credentials::same_secret;

/// Who is asking: the client's address and, when it authenticated, the
/// proxy user it gave.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    pub(crate) user: Option<portcullis_middleware::ProxyUser>,
}

/// The hyper HTTP/1 server every HTTP ingress serves with (the listener
/// and each intercepted tunnel): one place for the header timeout and the
/// head caps of `[limits]`.
pub(crate) fn http1_server(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(read_buffer_cap(limits))
        .max_headers(header_count_cap(limits));
    builder
}

/// The most HTTP/2 streams a client may have open at once on one
/// intercepted connection (each is a request through the stack); past it
/// the client waits, as RFC 9113 has it.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 100;

/// The server inside an intercepted tunnel: HTTP/1.1 with the same bounds
/// as [`http1_server`], or HTTP/2 when the client negotiated `h2` (at most
/// [`MAX_CONCURRENT_STREAMS`] streams, head lists capped by
/// `[limits] max_header_bytes`, flow control keeping buffers bounded).
pub(crate) fn intercepted_server(
    limits: &Limits,
) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(read_buffer_cap(limits))
        .max_headers(header_count_cap(limits));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// The destination a request's `Host` header names, if it has one: at most
/// one, ASCII, a valid authority (with `default_port` when it names none).
/// Each HTTP ingress compares it with the target it dials.
pub(crate) fn host_header<B>(
    request: &Request<B>,
    default_port: u16,
) -> Result<Option<portcullis_middleware::Target>, String> {
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    let Some(host) = hosts.next() else {
        return Ok(None);
    };
    if hosts.next().is_some() {
        return Err("more than one Host header".to_owned());
    }
    let host = host
        .to_str()
        .map_err(|_| "the Host header is not valid ASCII".to_owned())?;
    portcullis_middleware::Target::parse_authority(host, Some(default_port))
        .map(Some)
        .map_err(|e| format!("invalid Host header: {e}"))
}

/// Drives the stack with one request. The future is boxed here, with its
/// `Send` bound spelled out, so every transport can spawn it.
pub(crate) fn call_stack(
    stack: ProxyService,
    request: Request<Body>,
) -> Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>> {
    Box::pin(tower::ServiceExt::oneshot(stack, request))
}

/// Tells the listeners to stop, and waits until every connection and
/// tunnel they handed out is gone.
#[derive(Debug)]
pub(crate) struct Shutdown {
    stop: watch::Sender<bool>,
    drain: Option<DrainGuard>,
    drained: mpsc::Receiver<()>,
}

impl Shutdown {
    pub(crate) fn new() -> Shutdown {
        let (stop, _) = watch::channel(false);
        let (sender, drained) = mpsc::channel(1);
        Shutdown {
            stop,
            drain: Some(DrainGuard {
                sender,
                open: Arc::new(OpenList::default()),
                entry: None,
            }),
            drained,
        }
    }

    /// What a listener waits on.
    pub(crate) fn signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.stop.subscribe())
    }

    /// What a listener holds until it is done; its connections and tunnels
    /// each hold one of their own, made by [`DrainGuard::open`].
    pub(crate) fn guard(&self) -> DrainGuard {
        match &self.drain {
            Some(drain) => drain.clone(),
            None => DrainGuard {
                sender: mpsc::channel(1).0,
                open: Arc::new(OpenList::default()),
                entry: None,
            },
        }
    }

    /// Stops accepting at once (also done on drop).
    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops accepting and waits up to `deadline` for open connections and
    /// tunnels; returns the ones still open at the deadline (they are cut
    /// when the handle goes), oldest first.
    pub(crate) async fn drain(mut self, deadline: Duration) -> Vec<String> {
        self.stop();
        let open = self.drain.take().map(|drain| drain.open.clone());
        match tokio::time::timeout(deadline, self.drained.recv()).await {
            Ok(_) => Vec::new(),
            Err(_) => open.map(|open| open.names()).unwrap_or_default(),
        }
    }
}

impl Drop for Shutdown {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Resolves when shutdown starts.
#[derive(Clone, Debug)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// Waits until the proxy starts shutting down (at once if it has).
    pub async fn wait(&mut self) {
        while !*self.0.borrow_and_update() {
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}

/// An answer that closes the HTTP/1 connection after it (`Connection:
/// close`): what a failed upgrade gets, since the client's next bytes were
/// meant for another protocol.
pub(crate) fn closing(
    mut response: http::Response<crate::body::Body>,
) -> http::Response<crate::body::Body> {
    if response.version() < http::Version::HTTP_2 {
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// What is open, by a name for the log should shutdown have to cut it.
#[derive(Debug, Default)]
struct OpenList {
    next: AtomicU64,
    names: Mutex<BTreeMap<u64, String>>,
}

impl OpenList {
    fn insert(&self, name: String) -> u64 {
        crate::memory::opened();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut names) = self.names.lock() {
            names.insert(id, name);
        }
        id
    }

    fn remove(&self, id: u64) {
        if let Ok(mut names) = self.names.lock() {
            names.remove(&id);
        }
        crate::memory::closed();
    }

    fn names(&self) -> Vec<String> {
        self.names
            .lock()
            .map(|names| names.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Held by every connection and tunnel; shutdown waits until all are gone.
/// A guard made by [`DrainGuard::open`] also names what it keeps open, so
/// a connection cut at the deadline is named in the log; a plain clone
/// (handed to each request on a connection) names nothing more.
#[derive(Debug)]
pub struct DrainGuard {
    sender: mpsc::Sender<()>,
    open: Arc<OpenList>,
    entry: Option<u64>,
}

impl DrainGuard {
    /// A guard for something new that is open, by `name` (its peer and what
    /// it carries, e.g. `HTTP client 127.0.0.1:5000`).
    pub fn open(&self, name: String) -> DrainGuard {
        DrainGuard {
            sender: self.sender.clone(),
            open: self.open.clone(),
            entry: Some(self.open.insert(name)),
        }
    }
}

impl Clone for DrainGuard {
    fn clone(&self) -> DrainGuard {
        DrainGuard {
            sender: self.sender.clone(),
            open: self.open.clone(),
            entry: None,
        }
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if let Some(id) = self.entry {
            self.open.remove(id);
        }
    }
}

/// What an accept loop serves: its name for logs, its connection limit,
/// and the proxy's counters.
#[derive(Debug)]
pub(crate) struct Listening {
    /// `HTTP`, `SOCKS5`, …
    pub(crate) what: &'static str,
    pub(crate) max_connections: usize,
    pub(crate) metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// Accepts on `listener` until shutdown starts, handing each connection
/// (with a drain guard) to `serve_one` on its own task. At most
/// `max_connections` are served at once; a client past that is handed to
/// `refuse` (which answers it briefly on the transport's own wire) and the
/// log says so at most once a second.
pub(crate) async fn accept_loop<F, Fut, R, RFut>(
    listener: TcpListener,
    mut shutdown: ShutdownSignal,
    drain: DrainGuard,
    listening: Listening,
    serve_one: F,
    refuse: R,
) where
    F: Fn(TcpStream, SocketAddr, DrainGuard) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    R: Fn(TcpStream) -> RFut,
    RFut: Future<Output = ()> + Send + 'static,
{
    let Listening {
        what,
        max_connections,
        metrics,
    } = listening;
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut last_said: Option<tokio::time::Instant> = None;
    let mut last_failure_said: Option<tokio::time::Instant> = None;
    let mut failed: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.wait() => break,
        };
        match accepted {
            Ok((stream, client)) => {
                let _ = stream.set_nodelay(true);
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let guard = drain.open(format!("{what} client {client}"));
                        let serving = serve_one(stream, client, guard);
                        let counted = metrics.connection();
                        tokio::spawn(async move {
                            serving.await;
                            drop(permit);
                            drop(counted);
                        });
                    }
                    Err(_) => {
                        if last_said.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                            last_said = Some(tokio::time::Instant::now());
                            tracing::warn!(%client, max = max_connections, "the {what} listener is at its connection limit ([limits] max_connections); refusing new clients");
                        }
                        // Bounded: the refusal answers briefly and closes.
                        tokio::spawn(tokio::time::timeout(Duration::from_secs(2), refuse(stream)));
                    }
                }
            }
            Err(error) => {
                // Out of file descriptors and the like: back off, keep
                // serving, and say so once a second, not once a try.
                failed += 1;
                if last_failure_said.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    last_failure_said = Some(tokio::time::Instant::now());
                    tracing::warn!(%error, failures = failed, "accept failed on the {what} listener (is the open-file limit reached?)");
                    failed = 0;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
