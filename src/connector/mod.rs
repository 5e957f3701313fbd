//! The innermost service: resolves names once, refuses any address the
//! policy forbids, dials exactly the vetted address, and forwards.
//!
//! - `CONNECT`-shaped requests (HTTP CONNECT, SOCKS5 CONNECT) get a `200`
//!   response carrying the dialled stream in an [`Tunnel`]
//!   extension; the transport splices it to the client.
//! - A SOCKS5 UDP destination is resolved and vetted, not dialled: the
//!   response carries the [`VettedAddresses`] the relay may send to.
//! - Requests from an HTTP/1 client connection (the HTTP/1 listener's, an
//!   intercepted tunnel whose client speaks HTTP/1.1) go over the origin
//!   connection that client connection keeps ([`KeptUpstream`], in
//!   `kept`; over TLS for `https`, by the same vetting connector and
//!   certificate checks as the pool): dialled by the same vetted dialer,
//!   reused for that client's next requests, and left for the next client
//!   when it goes. The rest (HTTP/2 clients' streams, requests chained
//!   through an upstream proxy, upgrades) goes through a pooled HTTP/1
//!   and HTTP/2 client whose connector is the same vetted dialer, so
//!   every new connection is vetted either way.
//! - `x-unix-socket` requests are forwarded over the socket (origin-form,
//!   HTTP/1), in [`unix`].
//!
//! [`Connector::vet_only`] is the same decision without the network: what
//! `check` puts at the bottom of the same stack. A request still marked
//! [`AwaitingApproval`] is refused either way (decision *ask*): a stack
//! whose approval stage asked nobody fails closed.

mod dial;
mod eof;
mod judge;
mod kept;
pub mod resolve;
mod roots;
mod unix;
pub mod upstream;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tower::Service;

use portcullis_middleware::target::default_port_for_scheme;
use portcullis_middleware::{
    AwaitingApproval, BadRequest, BlockDecision, Blocked, BoxError, Host, Protocol, Reason,
    RequestInfo, Source, Target, TargetError,
};

use crate::body::{self, Body};
use upstream::UpstreamProxies;

pub(crate) use dial::{Dialer, OwnListeners, Refusing};
use judge::checked_body;
use kept::IdleOrigins;
pub(crate) use kept::KeptUpstream;
pub(crate) use roots::{extra_and_system, SystemRoots};

/// The dialled upstream of a `CONNECT`-shaped request: the connector
/// answers such a request `200` with this in the response's extensions, and
/// the transport [`take`](Tunnel::take)s the stream and relays the client
/// to it. The origin is dialled once, by the connector, to exactly the
/// address the policy vetted. Cloning shares the one stream.
#[derive(Clone)]
pub struct Tunnel(Arc<Mutex<Option<TcpStream>>>);

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tunnel")
    }
}

impl Tunnel {
    /// Wraps a dialled stream. The connector makes these; a stand-in
    /// stack in a test of your own way in
    /// ([`Ingress::standalone`](crate::kit::Ingress::standalone)) answers a
    /// `CONNECT`-shaped request `200` with one in the response's
    /// extensions, as the connector does.
    pub fn new(stream: TcpStream) -> Tunnel {
        Tunnel(Arc::new(Mutex::new(Some(stream))))
    }

    /// Takes the stream (once; `None` after).
    pub fn take(&self) -> Option<TcpStream> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// The vetted addresses of a `socks5_udp` destination, handed from the
/// connector to the UDP relay (which sends datagrams only there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VettedAddresses(pub(crate) Vec<SocketAddr>);

/// A pooled connection: a TCP stream, marked when it leads to an upstream
/// HTTP proxy (so requests on it keep their absolute form).
#[derive(Debug)]
pub(crate) struct PooledStream {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for PooledStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for PooledStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PooledStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The connector of the pooled HTTP client: every new connection is dialled
/// through the [`Dialer`] (or the upstream proxy).
#[derive(Clone, Debug)]
pub(crate) struct VettedConnector {
    dialer: Arc<Dialer>,
    upstream: Option<Arc<UpstreamProxies>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl Service<Uri> for VettedConnector {
    type Response = PooledStream;
    type Error = BoxError;
    type Future = BoxFuture<PooledStream>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        let upstream = self.upstream.clone();
        Box::pin(async move {
            // The pooled client only sees the URI `forward` built from the
            // canonical target, so this parse cannot disagree with the decision.
            let invalid =
                |e: TargetError| BadRequest::new(format!("invalid destination {uri}: {e}"));
            let host = Host::parse(uri.host().unwrap_or_default()).map_err(invalid)?;
            let port = match uri.port_u16() {
                Some(port) => port,
                None => default_port_for_scheme(uri.scheme_str().unwrap_or_default())
                    .map_err(invalid)?,
            };
            let target = Target::host(host.clone(), port);
            // The pool sees only a URI: `relabel` gives a refusal made here
            // the request's own protocol and method.
            let refusing = Refusing {
                target: &target,
                protocol: Protocol::Http,
                method: &Method::GET,
            };
            let chained = upstream.as_ref().and_then(|u| Some((u, u.for_uri(&uri)?)));
            let (io, proxied) = match chained {
                // TLS, and (names resolved here) plain HTTP too, go through
                // a tunnel to the vetted address: a plain request sent to
                // the upstream in absolute form would have its `Host`
                // rewritten to the address by it (RFC 9112 3.2.2).
                Some((proxies, intercept))
                    if uri.scheme_str() == Some("https")
                        || proxies.resolve() == upstream::UpstreamResolve::Here =>
                {
                    (
                        upstream::tunnel(&intercept, proxies, refusing, &dialer, &[]).await?,
                        false,
                    )
                }
                Some((proxies, intercept)) => (
                    upstream::connect_proxy(&intercept, proxies, &dialer, refusing).await?,
                    true,
                ),
                None => (dialer.connect(&host, port, refusing).await?, false),
            };
            Ok(PooledStream {
                io: TokioIo::new(io),
                proxied,
            })
        })
    }
}

type HttpClient = Client<eof::EofTolerant<hyper_rustls::HttpsConnector<VettedConnector>>, Body>;

/// The innermost service of the stack: resolves once, vets every answer,
/// dials exactly the vetted address, pools upstream HTTP/1 connections, and
/// hands tunnels to the transport. The runner builds it; an inner layer of
/// yours wraps it (its type shows in the runner's bounds, nothing more).
#[derive(Clone)]
pub struct Connector {
    /// Shared: the connector is cloned for every request.
    dialer: Arc<Dialer>,
    /// `None`: vet only, dial nothing. (Behind an `Arc`: the connector is
    /// cloned for every request, a hyper client is several `Arc`s.)
    client: Option<Arc<HttpClient>>,
    /// HTTP/1.1 only, for upgrades (a WebSocket): an `Upgrade` header has
    /// no meaning on an HTTP/2 connection.
    upgrades: Option<Arc<HttpClient>>,
    upstream: Option<Arc<UpstreamProxies>>,
    /// The HTTP/1.1-only client's TLS connector, for kept connections to
    /// `https` origins.
    tls_http1: Option<kept::TlsHttp1>,
    /// Origin connections the ended client connections kept
    /// ([`KeptUpstream`]).
    idle: Arc<IdleOrigins>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("dialer", &self.dialer)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector dialling through `dialer`, speaking TLS to `https://`
    /// upstreams with `tls` (built with an explicit crypto provider), and
    /// chaining through `upstream` proxies when given.
    pub(crate) fn new(
        dialer: Dialer,
        tls: rustls::ClientConfig,
        upstream: Option<Arc<UpstreamProxies>>,
    ) -> Connector {
        let dialer = Arc::new(dialer);
        let vetted = VettedConnector {
            dialer: dialer.clone(),
            upstream: upstream.clone(),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(vetted.clone());
        let https = eof::EofTolerant(https);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .build(https);
        let http1 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(vetted);
        let http1 = eof::EofTolerant(http1);
        let upgrades = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(http1.clone());
        Connector {
            dialer,
            client: Some(Arc::new(client)),
            upgrades: Some(Arc::new(upgrades)),
            upstream,
            tls_http1: Some(http1),
            idle: Arc::default(),
        }
    }

    /// The same decision without the network: every destination is resolved
    /// and vetted (so a name answering with a private address is refused
    /// exactly as a live request would be), nothing is dialled, and the
    /// answer is a `200` carrying the [`VettedAddresses`].
    pub(crate) fn vet_only(dialer: Dialer) -> Connector {
        Connector {
            dialer: Arc::new(dialer),
            client: None,
            upgrades: None,
            upstream: None,
            tls_http1: None,
            idle: Arc::default(),
        }
    }

    async fn tunnel(
        self,
        info: RequestInfo,
        host: Host,
        port: u16,
        via: Vec<http::HeaderValue>,
    ) -> Result<Response<Body>, BoxError> {
        let intercept = match (
            &self.upstream,
            format!("https://{}/", info.target).parse::<Uri>(),
        ) {
            (Some(upstream), Ok(uri)) => upstream.for_uri(&uri),
            _ => None,
        };
        let stream = match (intercept, &self.upstream) {
            (Some(intercept), Some(upstream)) => {
                upstream::tunnel(
                    &intercept,
                    upstream,
                    Refusing::from(&info),
                    &self.dialer,
                    &via,
                )
                .await?
            }
            _ => {
                self.dialer
                    .connect(&host, port, Refusing::from(&info))
                    .await?
            }
        };
        let mut response = Response::new(body::empty());
        response.extensions_mut().insert(Tunnel::new(stream));
        Ok(response)
    }

    async fn forward(
        self,
        client: Arc<HttpClient>,
        mut request: Request<Body>,
        info: RequestInfo,
    ) -> Result<Response<Body>, BoxError> {
        let (checked, audited) = checked_body(request, &info).await?;
        request = checked;
        // From a client connection that keeps its own origin connection
        // (the HTTP/1 listener's, an intercepted HTTP/1.1 tunnel's), when
        // nothing is chained.
        if let (Some(kept), Some(tls)) = (
            request.extensions().get::<KeptUpstream>().cloned(),
            &self.tls_http1,
        ) {
            let chained = self.upstream.as_ref().is_some_and(|u| !u.is_empty());
            let scheme = request.uri().scheme();
            if !chained
                && (scheme == Some(&http::uri::Scheme::HTTP)
                    || scheme == Some(&http::uri::Scheme::HTTPS))
                && !portcullis_middleware::strip_headers::is_upgrade(request.headers())
            {
                return kept
                    .forward(&self.dialer, tls, &self.idle, request, &info)
                    .await
                    .map(|response| with_audited(response, audited));
            }
        }
        // Forward to the canonical authority: the host we checked is the host we dial.
        let uri = canonical_uri(request.uri(), &info.target)?;
        let plain_http = uri.scheme() == Some(&http::uri::Scheme::HTTP);
        let through = self.upstream.as_ref().and_then(|u| u.for_uri(&uri));
        // Sent to the upstream proxy itself in absolute form only when it
        // resolves names; otherwise through a tunnel to the vetted address
        // (the connector's), where nothing meant for a proxy may go.
        let absolute = plain_http
            && self
                .upstream
                .as_ref()
                .is_some_and(|u| u.resolve() == upstream::UpstreamResolve::Upstream);
        if let Some(intercept) = &through {
            if absolute {
                // To an upstream proxy (never to an origin): who we are, so a
                // loop back to us ends on the first round.
                if let Ok(via) = http::HeaderValue::from_str(&self.dialer.own().via()) {
                    request.headers_mut().append(http::header::VIA, via);
                }
                if let Some(auth) = intercept.basic_auth() {
                    request
                        .headers_mut()
                        .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
                }
            }
        }
        *request.uri_mut() = uri;
        // Whatever the client spoke (HTTP/2 inside an intercepted tunnel),
        // the pool speaks what the origin offers: h2 by ALPN, else 1.1.
        *request.version_mut() = http::Version::HTTP_11;
        // The host is the URI's authority (the vetted target): the pool
        // writes it as `Host` on HTTP/1.1 and as `:authority` on HTTP/2,
        // where a `Host` beside it is a duplicate (nginx answers 400).
        request.headers_mut().remove(http::header::HOST);
        match client.request(request).await {
            Ok(mut response) => {
                // A refusal that came from the upstream proxy says so: its
                // 403 or 407 is not ours, and --allow will not change it.
                if let (Some(intercept), 403 | 407) = (&through, response.status().as_u16()) {
                    if absolute {
                        let upstream = upstream::display(intercept);
                        tracing::warn!(
                            target = %info.target,
                            status = response.status().as_u16(),
                            "the upstream proxy {upstream} refused the request (not portcullis: its own policy applies; --no-upstream-proxy stops chaining)"
                        );
                        if let Ok(value) = http::HeaderValue::from_str(&upstream) {
                            response.headers_mut().insert("x-proxy-upstream", value);
                        }
                    }
                }
                Ok(with_audited(response.map(body::boxed), audited))
            }
            Err(error) => Err(relabel(origin_failure(error.into(), &info), &info)),
        }
    }
}

/// What a client's upgrade asked for: the protocol, and a WebSocket's key.
#[derive(Debug)]
struct AskedUpgrade {
    token: Option<String>,
    key: Option<http::HeaderValue>,
}

impl AskedUpgrade {
    fn of(headers: &http::HeaderMap) -> AskedUpgrade {
        AskedUpgrade {
            token: portcullis_middleware::strip_headers::upgrade_token(headers).map(str::to_owned),
            key: headers.get(http::header::SEC_WEBSOCKET_KEY).cloned(),
        }
    }
}

/// An origin's `101 Switching Protocols` goes back to the client only when
/// it switches to what the client asked for: the same `Upgrade` token and,
/// for a WebSocket, the `Sec-WebSocket-Accept` its key calls for. Anything
/// else is the origin's failure (502), and dropping the response closes
/// the origin's connection.
fn switched_as_asked(
    asked: Option<AskedUpgrade>,
    response: Response<Body>,
    target: &Target,
) -> Result<Response<Body>, BoxError> {
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        return Ok(response);
    }
    let failed = |detail: String| -> BoxError {
        Box::new(portcullis_middleware::UpstreamError {
            kind: portcullis_middleware::UpstreamErrorKind::Refused,
            target: target.to_string(),
            detail,
        })
    };
    let Some(asked) = asked else {
        return Err(failed(
            "the origin answered 101 Switching Protocols to a request that asked for no upgrade"
                .to_owned(),
        ));
    };
    let answered = portcullis_middleware::strip_headers::upgrade_token(response.headers());
    let same = match (&asked.token, answered) {
        (Some(asked), Some(answered)) => asked.eq_ignore_ascii_case(answered),
        _ => false,
    };
    if !same {
        return Err(failed(format!(
            "the origin switched protocols to {:?}, not to the {:?} the client asked for",
            answered.unwrap_or("(no single Upgrade token)"),
            asked
                .token
                .as_deref()
                .unwrap_or("(no single Upgrade token)"),
        )));
    }
    if asked
        .token
        .as_deref()
        .is_some_and(|token| token.eq_ignore_ascii_case("websocket"))
    {
        let expected = asked
            .key
            .as_ref()
            .map(|key| tungstenite::handshake::derive_accept_key(key.as_bytes()));
        let accept = response
            .headers()
            .get(http::header::SEC_WEBSOCKET_ACCEPT)
            .and_then(|value| value.to_str().ok());
        if expected.is_none() || expected.as_deref() != accept {
            return Err(failed(
                "the origin's Sec-WebSocket-Accept does not answer the client's Sec-WebSocket-Key"
                    .to_owned(),
            ));
        }
    }
    Ok(response)
}

/// The response, carrying a would-be refusal the connector found in audit
/// mode (for the violation log), unless a layer above already put one there.
fn with_audited(mut response: Response<Body>, audited: Option<Blocked>) -> Response<Body> {
    if let Some(blocked) = audited {
        if response
            .extensions()
            .get::<portcullis_middleware::Audited>()
            .is_none()
        {
            response
                .extensions_mut()
                .insert(portcullis_middleware::Audited(blocked));
        }
    }
    response
}

/// The URI a forwarded request goes out with: its scheme, path and query,
/// and the canonical authority of `target` (one allocation, no re-parse of
/// the path).
fn canonical_uri(uri: &Uri, target: &Target) -> Result<Uri, BadRequest> {
    let refused =
        |e: &dyn std::fmt::Display| BadRequest::new(format!("cannot forward to {target}: {e}"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP));
    // The authority as it came when it is already the target's own
    // spelling (an intercepted request's always is).
    parts.authority = Some(
        match uri
            .authority()
            .filter(|a| target.is_written_as(a.as_str(), None))
        {
            Some(same) => same.clone(),
            None => http::uri::Authority::try_from(target.to_string()).map_err(|e| refused(&e))?,
        },
    );
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).map_err(|e| refused(&e))
}

impl<'a> From<&'a RequestInfo> for Refusing<'a> {
    fn from(info: &'a RequestInfo) -> Refusing<'a> {
        Refusing {
            target: &info.target,
            protocol: info.protocol,
            method: &info.method,
        }
    }
}

/// A failure of the pooled client that is none of ours (the origin reset
/// the connection, closed it before answering, or answered something that
/// is not HTTP) is the origin's: `upstream-unreachable`, saying what
/// happened. Our own errors inside it (a refusal, the client's bad body, a
/// dial failure) pass unchanged.
fn origin_failure(error: BoxError, info: &RequestInfo) -> BoxError {
    if portcullis_middleware::ProxyErrorRef::find(error.as_ref()).is_some() {
        return error;
    }
    let io = first_cause::<std::io::Error>(error.as_ref());
    let hyper_error = first_cause::<hyper::Error>(error.as_ref());
    let hint = "(is it speaking HTTP on that port? plain HTTP sent to a TLS port ends like this)";
    let upstream = match (io, hyper_error) {
        (Some(io), _) => {
            use std::io::ErrorKind as K;
            let mut upstream = portcullis_middleware::UpstreamError::from_io(&info.target, io);
            if matches!(
                io.kind(),
                K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe
            ) {
                upstream.detail =
                    format!("the origin ended the connection before answering: {io} {hint}");
            }
            if untrusted_certificate(error.as_ref()) {
                upstream.detail.push_str(
                    " (the origin's certificate is not one the system's CAs vouch for: if it is signed by a CA of yours, add that CA's PEM file to [mitm] upstream_ca_files, or to ProxyBuilder::upstream_roots in Rust)",
                );
            }
            upstream
        }
        (None, Some(hyper_error)) if hyper_error.is_parse() => {
            portcullis_middleware::UpstreamError {
                kind: portcullis_middleware::UpstreamErrorKind::Refused,
                target: info.target.to_string(),
                detail: format!("the origin's answer is not HTTP/1: {hyper_error} {hint}"),
            }
        }
        (None, _) => portcullis_middleware::UpstreamError {
            kind: portcullis_middleware::UpstreamErrorKind::Refused,
            target: info.target.to_string(),
            detail: format!("the origin closed the connection before answering {hint}"),
        },
    };
    upstream.into()
}

/// Whether a TLS handshake in `error`'s chain refused the server's
/// certificate (rustls's error travels inside `io::Error`s, whose
/// `source` skips it).
fn untrusted_certificate(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return matches!(tls, rustls::Error::InvalidCertificate(_));
        }
        cause = match current.downcast_ref::<std::io::Error>() {
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => current.source(),
            },
            None => current.source(),
        };
    }
    false
}

/// The first error of type `T` in `error`'s chain of sources (itself
/// included).
fn first_cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(found) = current.downcast_ref::<T>() {
            return Some(found);
        }
        cause = current.source();
    }
    None
}

/// Gives a refusal made inside the pooled client the request's protocol and
/// method (the client's connector only sees a URI).
fn relabel(error: BoxError, info: &RequestInfo) -> BoxError {
    match portcullis_middleware::find_blocked(error.as_ref()) {
        Some(blocked) => {
            let mut blocked = blocked.clone();
            blocked.protocol = info.protocol;
            blocked.method = info.method.as_str().to_owned();
            blocked.into()
        }
        None => error,
    }
}

/// The request model of a request the connector may act on: refused when it
/// is still waiting for an approval no layer gave.
fn admitted(request: &Request<Body>) -> Result<RequestInfo, BoxError> {
    let info = RequestInfo::from_request(request)?;
    if request.extensions().get::<AwaitingApproval>().is_some() {
        return Err(Blocked::new(
            Reason::NotAllowed,
            Source::Connector,
            info.target,
            info.protocol,
            &info.method,
        )
        .with_decision(BlockDecision::Ask)
        .into());
    }
    Ok(info)
}

/// Resolves and vets a destination without dialling it: a `200` carrying
/// the [`VettedAddresses`].
async fn vet(dialer: Arc<Dialer>, info: RequestInfo) -> Result<Response<Body>, BoxError> {
    let addresses = match &info.target {
        Target::Host { host, port } => {
            dialer
                .resolve_vetted(host, *port, Refusing::from(&info))
                .await?
        }
        Target::Unix(_) => Vec::new(),
    };
    let mut response = Response::new(body::empty());
    response.extensions_mut().insert(VettedAddresses(addresses));
    Ok(response)
}

impl Service<Request<Body>> for Connector {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Response<Body>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let info = match admitted(&request) {
            Ok(info) => info,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        if request
            .extensions()
            .get::<portcullis_middleware::UdpAssociation>()
            .is_some()
        {
            // An association names no destination; nothing to dial.
            return Box::pin(async { Ok(Response::new(body::empty())) });
        }
        if info.protocol.is_lookup() {
            // A DNS question the stack let through: the transport answers
            // it; nothing is resolved or dialled until a connection comes.
            return Box::pin(async { Ok(Response::new(body::empty())) });
        }
        let this = self.clone();
        let upgrading = portcullis_middleware::strip_headers::is_upgrade(request.headers());
        let client = if upgrading {
            this.upgrades.clone()
        } else {
            this.client.clone()
        };
        let Some(client) = client else {
            // Without the network (`check`): the body is judged as it
            // would be before sending, then the destination vetted.
            return Box::pin(async move {
                let (_, audited) = checked_body(request, &info).await?;
                let response = vet(this.dialer, info).await?;
                Ok(with_audited(response, audited))
            });
        };
        let asked = upgrading.then(|| AskedUpgrade::of(request.headers()));
        match info.target.clone() {
            Target::Unix(path) => Box::pin(async move {
                // A git fetch to a socket is checked like one to a host.
                let (request, audited) = checked_body(request, &info).await?;
                let response = unix::forward(request, path).await?;
                switched_as_asked(asked, with_audited(response, audited), &info.target)
            }),
            Target::Host { .. } if info.protocol == Protocol::Socks5Udp => {
                // An HTTP upstream carries TCP only: a datagram for a
                // destination that is chained is never sent around it.
                let chained = format!("https://{}/", info.target)
                    .parse::<Uri>()
                    .ok()
                    .and_then(|uri| this.upstream.as_ref()?.for_uri(&uri));
                if let Some(intercept) = chained {
                    let upstream = upstream::display(&intercept);
                    let refused = Refusing::from(&info).refused(
                        Reason::Custom("udp_through_upstream"),
                        format!("UDP while chaining through {upstream}"),
                    );
                    let message = format!(
                        "portcullis refused UDP to {}: it chains through the upstream proxy {upstream}, which carries TCP only, and a datagram is never sent around it; add the destination to [upstream] no_proxy (or NO_PROXY) to let it go direct",
                        info.target
                    );
                    return Box::pin(async move { Err(refused.with_message(message).into()) });
                }
                Box::pin(vet(this.dialer, info))
            }
            Target::Host { host, port }
                if info.method == Method::CONNECT || info.protocol.is_tunnel() =>
            {
                // The hops this CONNECT came through travel on with it.
                let via = request
                    .headers()
                    .get_all(http::header::VIA)
                    .iter()
                    .cloned()
                    .collect();
                Box::pin(this.tunnel(info, host, port, via))
            }
            Target::Host { .. } => Box::pin(async move {
                let target = info.target.clone();
                let response = this.forward(client, request, info).await?;
                switched_as_asked(asked, response, &target)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The authority a request is forwarded with is the vetted target's
    /// canonical text, whether it came that way (and is kept) or not.
    #[test]
    fn the_forwarded_authority_is_always_the_target_s_own() {
        let kept = [
            "127.0.0.1:28080",
            "example.com:80",
            "a.example.com:65535",
            "x.test:1",
        ];
        let rewritten = [
            "Example.com:80",
            "example.com:080",
            "example.com.:80",
            "user@example.com:80",
            "u:p@127.0.0.1:80",
            "0x7f.0.0.1:80",
            "127.1:80",
            "[::1]:80",
            "[0:0::1]:80",
            "[::ffff:127.0.0.1]:80",
            "example.com",
        ];
        for (input, kept_as_is) in kept
            .iter()
            .map(|input| (input, true))
            .chain(rewritten.iter().map(|input| (input, false)))
        {
            let uri: Uri = format!("http://{input}/p?q=1").parse().unwrap();
            let Ok(target) = Target::parse_authority(uri.authority().unwrap().as_str(), Some(80))
            else {
                // A user part is refused before the connector.
                assert!(input.contains('@'), "{input}");
                continue;
            };
            assert_eq!(
                target.is_written_as(uri.authority().unwrap().as_str(), None),
                kept_as_is,
                "{input}"
            );
            let forwarded = canonical_uri(&uri, &target).unwrap();
            assert_eq!(
                forwarded.authority().unwrap().as_str(),
                target.to_string(),
                "{input}"
            );
            assert_eq!(forwarded.path_and_query().unwrap().as_str(), "/p?q=1");
        }
        // And against another target than the URI's, never the URI's.
        let uri: Uri = "http://example.com:80/".parse().unwrap();
        let other = Target::parse_authority("example.org:80", None).unwrap();
        assert_eq!(
            canonical_uri(&uri, &other)
                .unwrap()
                .authority()
                .unwrap()
                .as_str(),
            "example.org:80"
        );
    }
}
