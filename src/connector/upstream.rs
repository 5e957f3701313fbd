//! Chaining to an upstream proxy taken from the proxy's own environment
//! (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`), when
//! `allow_upstream_proxy = true`.
//!
//! Through an upstream proxy portcullis still decides, and by default
//! ([`UpstreamResolve::Here`]) it also resolves: every answer for the name
//! is vetted exactly as for a direct dial, and the upstream is asked for
//! the vetted address (`CONNECT 203.0.113.7:443`; a plain request's target
//! names the address and its `Host` the name; TLS inside a tunnel keeps
//! the client's SNI). A name that resolves to a private or metadata
//! address is refused here, whatever the upstream would make of it.
//! [`UpstreamResolve::Upstream`] lets the upstream resolve (for networks
//! where only it can): weaker, since the resolved-address check is then
//! the upstream's to make; IP literals are still vetted here.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::ServiceExt;

use super::{Dialer, OwnListeners, Refusing};
use portcullis_middleware::{
    BadRequest, BoxError, ProxyErrorRef, Reason, UpstreamError, UpstreamErrorKind,
};

/// Who resolves a name chained through an upstream proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamResolve {
    /// portcullis resolves and vets every answer, and asks the upstream
    /// for the vetted address (the default).
    #[default]
    Here,
    /// The upstream resolves names (IP literals are still vetted here):
    /// a name the upstream resolves to a private or metadata address is
    /// reached. An opt-in for networks where only the upstream can resolve.
    Upstream,
}

/// The upstream proxies to chain to. A reload [replaces](Self::replace)
/// what is in it, and every connector holding it sees the new proxies
/// from its next connection on.
pub struct UpstreamProxies {
    state: arc_swap::ArcSwap<State>,
    /// The state's `named`, read without loading the state: the common
    /// case (no upstream) costs one relaxed load per request.
    named: std::sync::atomic::AtomicBool,
}

struct State {
    matcher: Matcher,
    /// Whether any proxy is named at all (else nothing is intercepted).
    named: bool,
    /// Who resolves names.
    resolve: UpstreamResolve,
    /// CA certificates trusted for an `https://` upstream proxy, beside
    /// the system's.
    extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// TLS to an `https://` upstream proxy, built on first use.
    tls: std::sync::OnceLock<Result<tokio_rustls::TlsConnector, String>>,
}

impl fmt::Debug for UpstreamProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamProxies").finish_non_exhaustive()
    }
}

impl UpstreamProxies {
    fn new(matcher: Matcher, named: bool) -> UpstreamProxies {
        UpstreamProxies {
            named: std::sync::atomic::AtomicBool::new(named),
            state: arc_swap::ArcSwap::from_pointee(State {
                matcher,
                named,
                resolve: UpstreamResolve::Here,
                extra_roots: Vec::new(),
                tls: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Changes the state while it is built (it has one owner then).
    fn with(self, change: impl FnOnce(&mut State)) -> UpstreamProxies {
        let named = self.named;
        match Arc::try_unwrap(self.state.into_inner()) {
            Ok(mut state) => {
                change(&mut state);
                UpstreamProxies {
                    named,
                    state: arc_swap::ArcSwap::from_pointee(state),
                }
            }
            // Shared already (not while building): left as it is.
            Err(state) => UpstreamProxies {
                named,
                state: arc_swap::ArcSwap::new(state),
            },
        }
    }

    /// Reads the proxy variables of this process's environment.
    pub fn from_env() -> UpstreamProxies {
        // The variables `Matcher::from_env` reads for proxies.
        let named = [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()));
        UpstreamProxies::new(Matcher::from_env(), named)
    }

    /// Uses one proxy (`http://` or `https://`) for everything but
    /// `no_proxy` (comma-separated).
    pub fn fixed(proxy: &str, no_proxy: &str) -> UpstreamProxies {
        UpstreamProxies::new(
            Matcher::builder()
                .all(proxy.to_owned())
                .no(no_proxy.to_owned())
                .build(),
            !proxy.is_empty(),
        )
    }

    /// Trusts these CA certificates for an `https://` upstream proxy,
    /// beside the system's (`[upstream] ca_file`).
    pub fn trusting(
        self,
        roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> UpstreamProxies {
        self.with(|state| {
            state.extra_roots = roots;
            state.tls = std::sync::OnceLock::new();
        })
    }

    /// Who resolves names (default: [`UpstreamResolve::Here`]).
    pub fn resolving(self, resolve: UpstreamResolve) -> UpstreamProxies {
        self.with(|state| state.resolve = resolve)
    }

    /// From the next connection on, chains as `new` does (a reload):
    /// connections and tunnels already open are left as they are.
    pub fn replace(&self, new: UpstreamProxies) {
        let named = new.named.into_inner();
        self.state.store(new.state.into_inner());
        self.named
            .store(named, std::sync::atomic::Ordering::Release);
    }

    /// TLS to an `https://` upstream proxy: the system's CAs and ours.
    fn tls(&self) -> Result<tokio_rustls::TlsConnector, String> {
        let state = self.state.load();
        state
            .tls
            .get_or_init(|| {
                let (roots, ignored) = super::extra_and_system(state.extra_roots.clone());
                if ignored > 0 {
                    return Err("a certificate of [upstream] ca_file could not be used".into());
                }
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
                Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
            })
            .clone()
    }

    /// Who resolves names.
    pub fn resolve(&self) -> UpstreamResolve {
        self.state.load().resolve
    }

    /// The upstream proxy for this destination, if any.
    pub fn for_uri(&self, uri: &Uri) -> Option<Intercept> {
        if self.is_empty() {
            return None;
        }
        let state = self.state.load();
        if !state.named {
            return None;
        }
        state.matcher.intercept(uri)
    }

    /// Whether no upstream proxy is named: nothing is chained.
    pub fn is_empty(&self) -> bool {
        !self.named.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A proxy URL as it may be shown: its userinfo written `…`.
pub fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://…@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The `host:port` of a proxy URI; only `http://` proxies are supported.
/// The upstream proxy's URL without its credentials, for messages.
pub(crate) fn display(intercept: &Intercept) -> String {
    let uri = intercept.uri();
    format!(
        "{}://{}:{}",
        uri.scheme_str().unwrap_or("http"),
        uri.host().unwrap_or(""),
        uri.port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            })
    )
}

/// Where the upstream proxy is: its `host:port`, and its host name for
/// TLS when it is an `https://` proxy.
fn proxy_address(intercept: &Intercept) -> Result<(String, Option<String>), BoxError> {
    let uri = intercept.uri();
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(format!(
                "upstream proxy {}: only http:// and https:// upstream proxies are supported",
                display(intercept)
            )
            .into())
        }
    };
    let host = uri.host().ok_or("the upstream proxy URL has no host")?;
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let name = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((format!("{host}:{port}"), tls.then_some(name)))
}

/// A connection to the upstream proxy: TCP, or TLS over it for an
/// `https://` proxy.
enum ProxyStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects to the upstream proxy (and speaks TLS to an `https://` one,
/// checking its certificate against the system's CAs and `ca_file`'s).
async fn open_proxy(
    intercept: &Intercept,
    proxies: &UpstreamProxies,
    timeout: Duration,
) -> Result<ProxyStream, UpstreamError> {
    let failed = |detail: String| UpstreamError {
        kind: UpstreamErrorKind::Refused,
        target: format!("upstream proxy {}", display(intercept)),
        detail,
    };
    let (address, tls) = proxy_address(intercept).map_err(|e| failed(e.to_string()))?;
    let stream = connect_address(&address, timeout).await?;
    let Some(name) = tls else {
        return Ok(ProxyStream::Plain(stream));
    };
    let server_name = rustls::pki_types::ServerName::try_from(name.clone())
        .map_err(|e| failed(format!("{name:?} is not a TLS server name: {e}")))?;
    let connector = proxies.tls().map_err(|e| failed(e.to_string()))?;
    let handshake = connector.connect(server_name, stream);
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(tls)) => Ok(ProxyStream::Tls(Box::new(tls))),
        Ok(Err(error)) => Err(failed(format!(
            "TLS to the upstream proxy failed ({error}); if it has a CA of its own, name it in [upstream] ca_file"
        ))),
        Err(_) => Err(UpstreamError {
            kind: UpstreamErrorKind::TimedOut,
            target: format!("upstream proxy {}", display(intercept)),
            detail: "the TLS handshake with the upstream proxy timed out".into(),
        }),
    }
}

/// The stream as a `TcpStream`, which the tunnels and the pool take: a
/// plain connection as it is; TLS relayed through a loopback socket pair
/// (a task of its own copies between the two until either side ends).
async fn into_tcp(stream: ProxyStream, timeout: Duration) -> Result<TcpStream, BoxError> {
    let mut tls = match stream {
        ProxyStream::Plain(stream) => return Ok(stream),
        ProxyStream::Tls(tls) => tls,
    };
    let pair = async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let ours = TcpStream::connect(listener.local_addr()?).await?;
        let expected = ours.local_addr()?;
        // Only our own end is taken: another local program that connects
        // first is dropped.
        loop {
            let (theirs, peer) = listener.accept().await?;
            if peer == expected {
                return Ok::<_, std::io::Error>((ours, theirs));
            }
        }
    };
    let (ours, mut theirs) = match tokio::time::timeout(timeout, pair).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => {
            return Err(BoxError::from(format!(
                "could not relay the TLS connection to the upstream proxy: {error}"
            )))
        }
        Err(_) => {
            return Err(BoxError::from(
                "could not relay the TLS connection to the upstream proxy in time",
            ))
        }
    };
    let _ = ours.set_nodelay(true);
    let _ = theirs.set_nodelay(true);
    tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut theirs, &mut *tls).await;
    });
    Ok(ours)
}

/// Connects to the upstream proxy itself (absolute-form requests, when
/// the upstream resolves names).
pub(crate) async fn connect_proxy(
    intercept: &Intercept,
    proxies: &UpstreamProxies,
    dialer: &Dialer,
    request: Refusing<'_>,
) -> Result<TcpStream, BoxError> {
    let (address, _) = proxy_address(intercept)?;
    if names_us(&address, dialer.own()).await {
        return Err(chain_into_self(request, &address));
    }
    let timeout = dialer.connect_timeout();
    let stream = open_proxy(intercept, proxies, timeout).await?;
    into_tcp(stream, timeout).await
}

/// Whether the upstream proxy's address is one of our own listeners.
async fn names_us(address: &str, own: &OwnListeners) -> bool {
    match tokio::net::lookup_host(address).await {
        Ok(mut resolved) => resolved.any(|a| own.reaches(a)),
        Err(_) => false,
    }
}

/// The loop refusal for an upstream proxy that is this proxy itself.
fn chain_into_self(request: Refusing<'_>, address: &str) -> BoxError {
    request
        .refused(
            Reason::Loop,
            format!("the upstream proxy {address} (HTTP_PROXY/HTTPS_PROXY/ALL_PROXY in portcullis's own environment) is portcullis itself"),
        )
        .into()
}

async fn connect_address(address: &str, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let what = || format!("upstream proxy {address}");
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(error)) => Err(UpstreamError::from_io(what(), &error)),
        Err(_) => Err(UpstreamError {
            kind: UpstreamErrorKind::TimedOut,
            target: what(),
            detail: "connect timed out".into(),
        }),
    }
}

/// Opens a tunnel to `target` through the upstream proxy with hyper-util's
/// CONNECT client (which reads a bounded reply: 8 KiB, 100 headers).
pub(crate) async fn tunnel(
    intercept: &Intercept,
    proxies: &Arc<UpstreamProxies>,
    request: Refusing<'_>,
    dialer: &Dialer,
    came_through: &[http::HeaderValue],
) -> Result<TcpStream, BoxError> {
    let target = request.target;
    // The address the upstream is asked for: the vetted one, unless the
    // upstream resolves the name.
    let destination = match pinned(proxies.resolve(), request, dialer).await? {
        Some(address) => format!("https://{address}/"),
        None => format!("https://{target}/"),
    };
    let timeout = dialer.connect_timeout();
    let (address, _) = proxy_address(intercept)?;
    if names_us(&address, dialer.own()).await {
        return Err(chain_into_self(request, &address));
    }
    let via = dialer.own().via();
    // What the upstream answered, kept so that its loop guard's refusal is
    // passed on as a loop (hyper-util's error does not carry the answer).
    let answer = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = answer.clone();
    let proxy = intercept.clone();
    let upstream = proxies.clone();
    let connect = tower::service_fn(move |_: Uri| {
        let proxy = proxy.clone();
        let upstream = upstream.clone();
        let recorded = recorded.clone();
        async move {
            open_proxy(&proxy, &upstream, timeout)
                .await
                .map(|stream| TokioIo::new(Recording::new(stream, recorded)))
        }
    });
    // Earlier hops first, then us: a loop back through us is seen.
    let mut hops: Vec<String> = came_through
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    hops.push(via);
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_str(&hops.join(", ")) {
        headers.insert(http::header::VIA, value);
    }
    let mut connector = Tunnel::new(intercept.uri().clone(), connect).with_headers(headers);
    if let Some(auth) = intercept.basic_auth() {
        connector = connector.with_auth(auth.clone());
    }
    let destination: Uri = destination
        .parse()
        .map_err(|e| BadRequest::new(format!("cannot tunnel to {target}: {e}")))?;
    let upstream_error = |kind, detail: String| -> BoxError {
        UpstreamError {
            kind,
            target: target.to_string(),
            detail,
        }
        .into()
    };
    let error = match tokio::time::timeout(timeout, connector.oneshot(destination)).await {
        Ok(Ok(io)) => return into_tcp(io.into_inner().into_inner(), timeout).await,
        Ok(Err(error)) => error,
        Err(_) => {
            return Err(upstream_error(
                UpstreamErrorKind::TimedOut,
                "the upstream proxy did not answer CONNECT in time".into(),
            ))
        }
    };
    // hyper-util's error type is not nameable: classify by its cause.
    let error: BoxError = error.into();
    if let Some(ProxyErrorRef::Upstream(dial)) = ProxyErrorRef::find(error.as_ref()) {
        return Err(upstream_error(dial.kind, dial.detail.clone()));
    }
    let mut cause = std::error::Error::source(error.as_ref());
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return Err(UpstreamError::from_io(target, io).into());
        }
        cause = current.source();
    }
    // The upstream is a portcullis whose loop guard saw us (an A→B→A
    // chain): the request came round, and that is a loop here too.
    let came_round = answer
        .lock()
        .map(|head| loop_refusal(&head))
        .unwrap_or(false);
    if came_round {
        return Err(request
            .refused(
                Reason::Loop,
                format!(
                    "the upstream proxy {} sent the request back here",
                    display(intercept)
                ),
            )
            .into());
    }
    // The upstream wants credentials it was not given, or not these.
    let asked_credentials = answer
        .lock()
        .map(|head| answer_status(&head) == Some(407))
        .unwrap_or(false);
    if asked_credentials {
        let given = if intercept.basic_auth().is_some() {
            "refused the credentials portcullis gave"
        } else {
            "asks for credentials and was given none"
        };
        return Err(upstream_error(
            UpstreamErrorKind::Refused,
            format!(
                "the upstream proxy {} {given} (407): set them as [upstream] username and password (or the user:password of HTTP_PROXY in portcullis's own environment); that answer is the upstream's, not portcullis's policy",
                display(intercept)
            ),
        ));
    }
    // A refusal (any status but 200) or a malformed answer.
    Err(upstream_error(
        UpstreamErrorKind::Refused,
        format!(
            "the upstream proxy {} did not open the tunnel ({error}); that answer is the upstream's, not portcullis's policy (--no-upstream-proxy stops chaining)",
            display(intercept)
        ),
    ))
}

/// The vetted address to ask the upstream for: resolved and vetted here
/// (as for a direct dial), or, when the upstream resolves, `None` for a
/// name (an IP literal is still vetted). A refusal when an answer is not
/// allowed.
pub(crate) async fn pinned(
    resolve: UpstreamResolve,
    request: Refusing<'_>,
    dialer: &Dialer,
) -> Result<Option<std::net::SocketAddr>, BoxError> {
    let portcullis_middleware::Target::Host { host, port } = request.target else {
        return Err(BadRequest::new("a Unix socket is never chained").into());
    };
    if resolve == UpstreamResolve::Upstream && matches!(host, portcullis_middleware::Host::Name(_))
    {
        return Ok(None);
    }
    let vetted = dialer.resolve_vetted(host, *port, request).await?;
    Ok(vetted.first().copied())
}

/// The status of a CONNECT answer's head, when it parses.
fn answer_status(head: &[u8]) -> Option<u16> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    response.parse(head).ok()?;
    response.code
}

/// Whether a CONNECT answer's head is a loop-guard refusal
/// (`x-proxy-error: blocked-by-loop-guard`).
fn loop_refusal(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    if response.parse(head).is_err() || response.code != Some(403) {
        return false;
    }
    response.headers.iter().any(|header| {
        header.name.eq_ignore_ascii_case("x-proxy-error")
            && header.value.eq_ignore_ascii_case(b"blocked-by-loop-guard")
    })
}

/// The most of an upstream's answer kept: the head of a CONNECT answer.
const RECORDED_MAX: usize = 8 * 1024;

pin_project_lite::pin_project! {
    /// A stream that keeps a copy of the first bytes it reads.
    struct Recording {
        #[pin]
        stream: ProxyStream,
        recorded: Arc<std::sync::Mutex<Vec<u8>>>,
    }
}

impl Recording {
    fn new(stream: ProxyStream, recorded: Arc<std::sync::Mutex<Vec<u8>>>) -> Recording {
        Recording { stream, recorded }
    }

    fn into_inner(self) -> ProxyStream {
        self.stream
    }
}

impl tokio::io::AsyncRead for ProxyStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ProxyStream::Plain(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
            ProxyStream::Tls(stream) => std::pin::Pin::new(&mut **stream).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for ProxyStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ProxyStream::Plain(stream) => std::pin::Pin::new(stream).poll_write(cx, buf),
            ProxyStream::Tls(stream) => std::pin::Pin::new(&mut **stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ProxyStream::Plain(stream) => std::pin::Pin::new(stream).poll_flush(cx),
            ProxyStream::Tls(stream) => std::pin::Pin::new(&mut **stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ProxyStream::Plain(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),
            ProxyStream::Tls(stream) => std::pin::Pin::new(&mut **stream).poll_shutdown(cx),
        }
    }
}

impl tokio::io::AsyncRead for Recording {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.stream.poll_read(cx, buf);
        if let Ok(mut recorded) = this.recorded.lock() {
            let fresh = &buf.filled()[before..];
            let room = RECORDED_MAX.saturating_sub(recorded.len());
            recorded.extend_from_slice(&fresh[..fresh.len().min(room)]);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Recording {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}
