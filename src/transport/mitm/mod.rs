//! HTTPS interception, when the stack asks for it (limited mode does, to see
//! methods): a `CONNECT` the policy allows is
//! answered `200` (after the upstream was dialled), then the client's TLS is
//! terminated here with a leaf certificate for the CONNECT target, signed by
//! the local [`CertificateAuthority`], and every request inside goes through
//! the same stack as protocol `https_mitm`, with its authority forced to the
//! CONNECT target. The connector speaks TLS to the origin itself, verified
//! against the system roots plus `[mitm] upstream_ca_files`, over pooled
//! connections like plain HTTP.
//!
//! Inside the tunnel:
//!
//! | what the client sends | answer |
//! | --- | --- |
//! | plain HTTP/1 (a method, a space: `ws://` clients that always `CONNECT`) | every request goes through the stack as protocol `http`, as a captured plain connection does |
//! | bytes that are neither a TLS ClientHello nor HTTP/1 | the connection is closed; the stack's loop guard refuses a synthesized request marked [`NotTls`], so a `tls_required` violation is logged |
//! | a nested `CONNECT` | 405 |
//! | a `Host` or absolute-form authority other than the CONNECT target | 400 |
//! | anything else | whatever the stack answers (a refusal is the usual 403 JSON) |
//!
//! Leaves are cached per host in a bounded least-recently-used cache, and
//! made on a blocking thread, so one slow generation does not hold up
//! other handshakes.

mod ca;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_rustls::LazyConfigAcceptor;

use portcullis_middleware::{BoxError, NotTls, Protocol, Target};

pub(crate) use ca::write_atomically;
pub use ca::{CaError, CertificateAuthority, CA_CERT_FILE, CA_KEY_FILE};

/// The bundle file's name in the CA directory: the system's roots and ours.
pub const BUNDLE_FILE: &str = "bundle.pem";

use crate::body::{self, Body};
use crate::env::CaFiles;
use crate::transport::http1::rescue;
use crate::transport::model::RequestModel;
use crate::transport::replay::Replay;
use crate::transport::Peer;
use crate::transport::{call_stack, Limits, ProxyService};

/// The default number of hosts whose leaf certificates are kept.
pub const DEFAULT_LEAF_CACHE_SIZE: usize = 1024;
/// How long a client has to send its ClientHello and finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Interception: the CA, the crypto provider, and the leaf cache.
pub(crate) struct Interceptor {
    ca: Arc<CertificateAuthority>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    leaves: Mutex<LeafCache>,
    /// Clients already told they do not trust the CA (bounded).
    distrusting: Mutex<std::collections::HashSet<std::net::IpAddr>>,
}

/// How many distrusting clients are remembered; past it the set starts
/// over (a flood of clients is worth a line each).
const DISTRUSTING_REMEMBERED: usize = 1024;

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

struct LeafCache {
    capacity: usize,
    clock: u64,
    entries: HashMap<Target, Leaf>,
}

struct Leaf {
    config: Arc<rustls::ServerConfig>,
    made: Instant,
    used: u64,
}

impl Interceptor {
    /// Intercepts with leaves signed by `ca`, keeping at most `cache_size`
    /// hosts' leaves, with TLS from `provider` (nothing process-wide).
    pub(crate) fn new(
        ca: Arc<CertificateAuthority>,
        provider: Arc<rustls::crypto::CryptoProvider>,
        cache_size: usize,
    ) -> Interceptor {
        Interceptor {
            ca,
            provider,
            leaves: Mutex::new(LeafCache {
                capacity: cache_size.max(1),
                clock: 0,
                entries: HashMap::new(),
            }),
            distrusting: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Says once per client address that a client rejected our leaf
    /// because it does not trust the CA, and how to make it trust it;
    /// other handshake failures stay debug lines.
    fn handshake_failed(
        &self,
        client: std::net::SocketAddr,
        target: &Target,
        error: &std::io::Error,
    ) {
        use rustls::AlertDescription as Alert;
        let alert = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .and_then(|rustls_error| match rustls_error {
                rustls::Error::AlertReceived(
                    alert @ (Alert::UnknownCA
                    | Alert::BadCertificate
                    | Alert::CertificateUnknown
                    | Alert::UnsupportedCertificate
                    | Alert::AccessDenied),
                ) => Some(*alert),
                _ => None,
            });
        let Some(alert) = alert else {
            tracing::debug!(%error, %client, "intercepted TLS handshake failed");
            return;
        };
        let first = {
            let mut told = lock(&self.distrusting);
            if told.len() >= DISTRUSTING_REMEMBERED {
                told.clear();
            }
            told.insert(client.ip())
        };
        if first {
            tracing::warn!(
                %client,
                %target,
                ?alert,
                "a client rejected portcullis's interception certificate for {target} ({alert:?}): it does not trust the portcullis CA. Give it {} (or the bundle with the system's roots that `portcullis ca` names: SSL_CERT_FILE, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS); under `portcullis run --mitm` the command gets them",
                self.ca.cert_path().display()
            );
        }
    }

    fn cached(&self, target: &Target) -> Option<Arc<rustls::ServerConfig>> {
        let mut cache = lock(&self.leaves);
        cache.clock += 1;
        let clock = cache.clock;
        let leaf = cache.entries.get_mut(target)?;
        // Renewed at half its validity, well before a client would refuse it.
        if leaf.made.elapsed() > ca::LEAF_VALIDITY / 2 {
            return None;
        }
        leaf.used = clock;
        Some(leaf.config.clone())
    }

    fn remember(&self, target: Target, config: Arc<rustls::ServerConfig>) {
        let mut cache = lock(&self.leaves);
        cache.clock += 1;
        let used = cache.clock;
        if cache.entries.len() >= cache.capacity && !cache.entries.contains_key(&target) {
            let oldest = cache
                .entries
                .iter()
                .min_by_key(|(_, leaf)| leaf.used)
                .map(|(target, _)| target.clone());
            if let Some(oldest) = oldest {
                cache.entries.remove(&oldest);
            }
        }
        cache.entries.insert(
            target,
            Leaf {
                config,
                made: Instant::now(),
                used,
            },
        );
    }

    /// The server configuration presenting a leaf for `target`: from the
    /// cache, or made on a blocking thread.
    pub(crate) async fn server_config(
        self: &Arc<Self>,
        target: &Target,
    ) -> Result<Arc<rustls::ServerConfig>, BoxError> {
        if let Some(config) = self.cached(target) {
            return Ok(config);
        }
        let this = self.clone();
        let for_target = target.clone();
        let config = tokio::task::spawn_blocking(move || -> Result<_, BoxError> {
            let started = Instant::now();
            let (chain, key) = this.ca.issue(&for_target)?;
            let mut config = rustls::ServerConfig::builder_with_provider(this.provider.clone())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            tracing::debug!(target = %for_target, elapsed = ?started.elapsed(), "made an interception leaf");
            Ok(Arc::new(config))
        })
        .await??;
        self.remember(target.clone(), config.clone());
        Ok(config)
    }
}

/// Writes the bundle a child process trusts (the system's roots, then our
/// CA) beside the CA, and names both files.
pub(crate) fn trust_files(ca: &CertificateAuthority) -> Result<CaFiles, CaError> {
    let mut bundle = String::new();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        bundle.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec())));
    }
    bundle.push_str(ca.cert_pem());
    let path = ca.directory().join(BUNDLE_FILE);
    ca::write_atomically(&path, bundle.as_bytes(), 0o644)?;
    Ok(CaFiles {
        ca_cert: ca.cert_path(),
        bundle: path,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What an intercepted tunnel answers by: the head and body limits, and
/// how refusals are worded.
#[derive(Debug, Clone)]
pub(crate) struct Answers {
    pub(crate) limits: Limits,
    pub(crate) fixes: crate::hints::Fixes,
    /// Counts the bytes of an upgraded connection (a WebSocket).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Held by an upgraded connection (a WebSocket), which outlives the
    /// tunnel's HTTP connection, so shutdown waits for it too.
    pub(crate) drain: Option<crate::transport::DrainGuard>,
}

/// Serves one intercepted tunnel: terminates the client's TLS and sends
/// every request inside through `stack`.
pub(crate) async fn serve<I>(
    io: I,
    target: Target,
    peer: Peer,
    interceptor: Arc<Interceptor>,
    stack: ProxyService,
    answers: Answers,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client = peer.addr;
    let mut io = io;
    let head = match tokio::time::timeout(HANDSHAKE_TIMEOUT, first_bytes(&mut io)).await {
        Ok(Ok(head)) => head,
        Ok(Err(error)) => {
            tracing::debug!(%error, %client, "intercepted tunnel: reading its first bytes failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%client, "intercepted tunnel: nothing sent in time");
            return;
        }
    };
    if head.is_empty() {
        return;
    }
    let plain_http = starts_like_http1(&head);
    let io = Replay::new(head, io);
    if plain_http {
        // Plain HTTP inside the tunnel (a `ws://` client that always
        // CONNECTs): every request goes through the stack as protocol
        // `http`, so nothing in it passes unread.
        serve_requests(io, target, peer, stack, answers, Protocol::Http).await;
        return;
    }
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(error)) => {
            // Not TLS: never passed on opaquely. The stack refuses it, on
            // the record like any refusal; the tunnel closes either way.
            tracing::debug!(%error, "intercepted tunnel did not start with a TLS ClientHello");
            let Ok(request) = RequestModel::new(target.clone(), Protocol::HttpsMitm, client)
                .user(peer.user)
                .mark(NotTls)
                .connect()
            else {
                return;
            };
            if call_stack(stack, request).await.is_ok() {
                tracing::warn!(%client, %target, "the stack let a tunnel that is not TLS through; closed anyway");
            }
            return;
        }
        Err(_) => {
            tracing::debug!(%client, "intercepted tunnel: no ClientHello in time");
            return;
        }
    };
    let config = match interceptor.server_config(&target).await {
        Ok(config) => config,
        Err(error) => {
            tracing::warn!(%error, target = %target, "cannot make an interception certificate; closing the tunnel");
            return;
        }
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            interceptor.handshake_failed(client, &target, &error);
            return;
        }
        Err(_) => return,
    };
    serve_requests(tls, target, peer, stack, answers, Protocol::HttpsMitm).await;
}

/// The longest request method looked for before a tunnel's bytes are
/// taken for something other than HTTP/1.
const LONGEST_METHOD: usize = 16;

/// Reads the first bytes of a tunnel: enough to tell a TLS record (its
/// first byte) from an HTTP/1 request line (a method and a space). Empty
/// if the client closed without sending anything.
async fn first_bytes<I: AsyncRead + Unpin>(io: &mut I) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(LONGEST_METHOD + 1);
    let mut byte = [0u8; LONGEST_METHOD + 1];
    loop {
        let want = LONGEST_METHOD + 1 - head.len();
        let n = io.read(&mut byte[..want]).await?;
        if n == 0 {
            return Ok(head);
        }
        head.extend_from_slice(&byte[..n]);
        let decided = head[0] == TLS_HANDSHAKE_RECORD
            || head.len() > LONGEST_METHOD
            || head.contains(&b' ')
            || !head.iter().all(u8::is_ascii_uppercase);
        if decided {
            return Ok(head);
        }
    }
}

/// The content type of a TLS handshake record: a ClientHello starts with it.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Whether a tunnel's first bytes are an HTTP/1 request line's start: a
/// method of uppercase letters, then a space.
fn starts_like_http1(head: &[u8]) -> bool {
    let Some(space) = head.iter().position(|&b| b == b' ') else {
        return false;
    };
    (1..=LONGEST_METHOD).contains(&space) && head[..space].iter().all(u8::is_ascii_uppercase)
}

/// Serves a captured plain-HTTP connection request by request (protocol
/// `http`), for a destination whose requests a layer must see (request
/// rules, credentials): each goes through the stack with its authority
/// forced to `target`, as inside an intercepted tunnel.
pub(crate) async fn serve_plain<I>(
    io: I,
    target: Target,
    peer: Peer,
    stack: ProxyService,
    answers: Answers,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_requests(io, target, peer, stack, answers, Protocol::Http).await;
}

async fn serve_requests<I>(
    io: I,
    target: Target,
    peer: Peer,
    stack: ProxyService,
    answers: Answers,
    protocol: Protocol,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client = peer.addr;
    let server = crate::transport::intercepted_server(&answers.limits);
    let answers = Arc::new(answers);
    // An HTTP/1 client's requests come one after another: they share one
    // origin connection, kept by this connection (an HTTP/2 client's
    // streams go through the pool, which multiplexes).
    let kept = crate::connector::KeptUpstream::default();
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        if request.version() < http::Version::HTTP_2 {
            request.extensions_mut().insert(kept.clone());
        }
        let target = target.clone();
        let stack = stack.clone();
        let peer = peer.clone();
        let answers = answers.clone();
        async move {
            Ok::<_, Infallible>(
                inner_request(request, target, peer, stack, &answers, protocol).await,
            )
        }
    });
    if let Err(error) = server
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(%error, %client, "intercepted connection ended with an error");
    }
}

/// One request inside the tunnel; never fails (errors become responses).
/// An upgrade (a WebSocket, over HTTP/1.1) goes through the stack like any
/// request; answered `101`, the two connections become one byte stream,
/// closed after the tunnel idle timeout, its bytes counted and logged.
async fn inner_request(
    mut request: Request<Incoming>,
    target: Target,
    peer: Peer,
    stack: ProxyService,
    answers: &Answers,
    protocol: Protocol,
) -> Response<Body> {
    let limits = &answers.limits;
    if crate::transport::head_over_limits(&request, limits) {
        return rescue::head_too_large(limits);
    }
    if request.method() == Method::CONNECT {
        return rescue::status(
            StatusCode::METHOD_NOT_ALLOWED,
            "bad-request",
            "a CONNECT inside an intercepted tunnel is not allowed",
        );
    }
    let (scheme, default_port) = if protocol.is_intercepted() {
        ("https", 443)
    } else {
        ("http", 80)
    };
    if let Err(message) = same_authority(&request, &target, default_port) {
        return rescue::bad_request(&message);
    }
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let uri: Uri = match format!("{scheme}://{target}{path}").parse() {
        Ok(uri) => uri,
        Err(error) => return rescue::bad_request(&format!("invalid request target: {error}")),
    };
    let client_upgrade = portcullis_middleware::strip_headers::is_upgrade(request.headers())
        .then(|| hyper::upgrade::on(&mut request));
    // A gRPC client reads a refusal from grpc-status, not from a 403 body.
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
    let (mut parts, incoming) = request.into_parts();
    parts.uri = uri;
    let has_body = !hyper::body::Body::is_end_stream(&incoming);
    let mut body = body::client_body(incoming, limits.body_idle_timeout, limits.body_min_rate);
    if parts.version == http::Version::HTTP_2 {
        body = body::drained_when_dropped(body);
    }
    let mut request = Request::from_parts(parts, body);
    RequestModel::new(target.clone(), protocol, peer.addr)
        .user(peer.user)
        .has_body(has_body)
        .apply(&mut request);
    let asked_upgrade = client_upgrade.is_some();
    let mut response = match call_stack(stack, request).await {
        Ok(response) => response,
        Err(error) if grpc => return rescue::grpc_response(&error, &answers.fixes),
        Err(error) if asked_upgrade => {
            // An upgrade that failed leaves nothing to keep the connection for.
            return crate::transport::closing(rescue::http_response(&error, &answers.fixes));
        }
        Err(error) => return rescue::http_response(&error, &answers.fixes),
    };
    if let (StatusCode::SWITCHING_PROTOCOLS, Some(client_upgrade)) =
        (response.status(), client_upgrade)
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let relay = crate::transport::websocket::Relay::of(&response);
        let idle = limits.tunnel_idle_timeout;
        let metrics = answers.metrics.clone();
        let client = peer.addr;
        let held = answers
            .drain
            .as_ref()
            .map(|drain| drain.open(format!("upgraded connection from {client} to {target}")));
        // A place under a concurrency cap: kept while the connection is open.
        let place = response
            .extensions_mut()
            .remove::<portcullis_middleware::HeldWhileOpen>();
        tokio::spawn(async move {
            let moved = crate::transport::splice::upgraded(
                client_upgrade,
                upstream_upgrade,
                relay,
                idle,
                &metrics,
            )
            .await;
            if let Some(moved) = moved {
                moved.log(client, &target);
            }
            drop((held, place));
        });
    }
    response
}

/// The request's `Host` and authority, when present, must name the CONNECT
/// target: the host we checked is the host we dial.
fn same_authority<B>(
    request: &Request<B>,
    target: &Target,
    default_port: u16,
) -> Result<(), String> {
    if let Some(authority) = request.uri().authority() {
        let named = Target::parse_authority(authority.as_str(), Some(default_port))
            .map_err(|e| format!("invalid request target: {e}"))?;
        if &named != target {
            return Err(format!(
                "the request names {named}, but the tunnel was opened to {target}"
            ));
        }
    }
    if let Some(named) = crate::transport::host_header(request, default_port)? {
        if &named != target {
            return Err(format!(
                "the Host header ({named}) does not match the tunnel's target ({target})"
            ));
        }
    }
    Ok(())
}
