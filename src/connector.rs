//! The innermost service: resolves names once, refuses any address the
//! policy forbids, dials exactly the vetted address, and forwards.
//!
//! - `CONNECT`-shaped requests (HTTP CONNECT, SOCKS5 CONNECT) get a `200`
//!   response carrying the dialled stream in an [`UpstreamConnection`]
//!   extension; the transport splices it to the client.
//! - Plain HTTP requests go through a pooled HTTP/1 client whose connector is
//!   the same vetted dialer, so keep-alive connections are reused across
//!   client requests and every new connection is vetted.
//! - `x-unix-socket` requests are forwarded over the socket (origin-form,
//!   HTTP/1).
//!
//! Names are resolved once, with a timeout; a lookup failure fails closed;
//! every answer is checked with
//! [`NetworkPolicy::check_resolved`](portcullis_middleware::NetworkPolicy::check_resolved)
//! (denylist IP rules, local/private ranges) and a single refused answer
//! refuses the whole name, so there is no DNS-rebinding window. A request
//! still marked [`AwaitingApproval`] is refused: a stack without an approval
//! layer fails closed.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tower::Service;

use portcullis_middleware::policy::Decision;
use portcullis_middleware::target::canonical_ip;
use portcullis_middleware::{
    AwaitingApproval, BadRequest, BlockDecision, Blocked, BoxError, Host, PolicyHandle, Protocol,
    Reason, RequestInfo, Source, Target, UpstreamError, UpstreamErrorKind,
};

use crate::body::{self, Body};
use crate::resolve::Resolve;
use crate::upstream::{self, UpstreamProxies};

/// A dialled upstream stream handed from the connector to the transport.
/// Cloning shares the one stream; [`UpstreamConnection::take`] moves it out.
#[derive(Clone)]
pub struct UpstreamConnection(Arc<Mutex<Option<TcpStream>>>);

impl fmt::Debug for UpstreamConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UpstreamConnection")
    }
}

impl UpstreamConnection {
    /// Wraps a stream.
    pub fn new(stream: TcpStream) -> UpstreamConnection {
        UpstreamConnection(Arc::new(Mutex::new(Some(stream))))
    }

    /// Takes the stream (once).
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
pub struct VettedAddresses(pub Vec<SocketAddr>);

/// Resolves, vets and dials.
#[derive(Clone)]
pub struct Dialer {
    policy: PolicyHandle,
    resolver: Arc<dyn Resolve>,
    resolve_timeout: Duration,
    connect_timeout: Duration,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialer")
            .field("resolve_timeout", &self.resolve_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// A dialer checking answers against `policy`.
    pub fn new(
        policy: PolicyHandle,
        resolver: Arc<dyn Resolve>,
        resolve_timeout: Duration,
        connect_timeout: Duration,
    ) -> Dialer {
        Dialer {
            policy,
            resolver,
            resolve_timeout,
            connect_timeout,
        }
    }

    /// Resolves `target` once and returns the vetted socket addresses; any
    /// answer the policy forbids refuses the whole target.
    pub async fn resolve_vetted(
        &self,
        target: &Target,
        protocol: Protocol,
        method: &Method,
    ) -> Result<Vec<SocketAddr>, BoxError> {
        let Target::Host { host, port } = target else {
            return Err(BadRequest::new("a unix socket target cannot be dialled over TCP").into());
        };
        let addresses = match host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => {
                match tokio::time::timeout(self.resolve_timeout, self.resolver.resolve(name)).await
                {
                    Err(_) => {
                        return Err(upstream_error(
                            UpstreamErrorKind::TimedOut,
                            target,
                            "the name lookup timed out",
                        ))
                    }
                    Ok(Err(error)) => {
                        return Err(upstream_error(
                            UpstreamErrorKind::Unresolved,
                            target,
                            &format!("the name did not resolve: {error}"),
                        ))
                    }
                    Ok(Ok(addresses)) if addresses.is_empty() => {
                        return Err(upstream_error(
                            UpstreamErrorKind::Unresolved,
                            target,
                            "the name has no addresses",
                        ))
                    }
                    Ok(Ok(addresses)) => addresses,
                }
            }
        };
        let policy = self.policy.load();
        let mut vetted = Vec::with_capacity(addresses.len());
        for address in addresses {
            let address = canonical_ip(address);
            if let Err(Decision::Deny { reason, rule }) =
                policy.check_resolved(host, address, *port)
            {
                return Err(Blocked::new(
                    reason,
                    Source::Connector,
                    target.clone(),
                    protocol,
                    method,
                )
                .with_rule(Some(rule))
                .into());
            }
            vetted.push(SocketAddr::new(address, *port));
        }
        Ok(vetted)
    }

    /// Connects to the first reachable vetted address of `target`.
    pub async fn connect(
        &self,
        target: &Target,
        protocol: Protocol,
        method: &Method,
    ) -> Result<TcpStream, BoxError> {
        let addresses = self.resolve_vetted(target, protocol, method).await?;
        let mut last_error = None;
        for address in addresses {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(error)) => last_error = Some(UpstreamError::from_io(target, &error)),
                Err(_) => {
                    last_error = Some(UpstreamError {
                        kind: UpstreamErrorKind::TimedOut,
                        target: target.to_string(),
                        detail: format!("connecting to {address} timed out"),
                    })
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| UpstreamError {
                kind: UpstreamErrorKind::Unresolved,
                target: target.to_string(),
                detail: "no address to dial".into(),
            })
            .into())
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
}

fn upstream_error(kind: UpstreamErrorKind, target: &Target, detail: &str) -> BoxError {
    UpstreamError {
        kind,
        target: target.to_string(),
        detail: detail.to_owned(),
    }
    .into()
}

/// A pooled connection: a TCP stream, marked when it leads to an upstream
/// HTTP proxy (so requests on it keep their absolute form).
#[derive(Debug)]
pub struct PooledStream {
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
pub struct VettedConnector {
    dialer: Dialer,
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
            let target = Target::from_uri(&uri)
                .map_err(|e| BadRequest::new(format!("invalid destination: {e}")))?;
            if let Some(intercept) = upstream.as_ref().and_then(|u| u.for_uri(&uri)) {
                let timeout = dialer.connect_timeout();
                return if uri.scheme_str() == Some("https") {
                    let stream = upstream::tunnel(&intercept, &target.to_string(), timeout).await?;
                    Ok(PooledStream {
                        io: TokioIo::new(stream),
                        proxied: false,
                    })
                } else {
                    let stream = upstream::connect_proxy(&intercept, timeout).await?;
                    Ok(PooledStream {
                        io: TokioIo::new(stream),
                        proxied: true,
                    })
                };
            }
            let stream = dialer
                .connect(&target, Protocol::Http, &Method::GET)
                .await?;
            Ok(PooledStream {
                io: TokioIo::new(stream),
                proxied: false,
            })
        })
    }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<VettedConnector>, Body>;

/// The innermost service of the stack; see the [module docs](self).
#[derive(Clone)]
pub struct Connector {
    dialer: Dialer,
    client: HttpClient,
    upstream: Option<Arc<UpstreamProxies>>,
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
    pub fn new(
        dialer: Dialer,
        tls: rustls::ClientConfig,
        upstream: Option<Arc<UpstreamProxies>>,
    ) -> Connector {
        let vetted = VettedConnector {
            dialer: dialer.clone(),
            upstream: upstream.clone(),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(vetted);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .build(https);
        Connector {
            dialer,
            client,
            upstream,
        }
    }

    /// The dialer.
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    async fn tunnel(self, info: RequestInfo) -> Result<Response<Body>, BoxError> {
        let uri = format!("https://{}/", info.target);
        let intercept = match (&self.upstream, uri.parse::<Uri>()) {
            (Some(upstream), Ok(uri)) => upstream.for_uri(&uri),
            _ => None,
        };
        let stream = match intercept {
            Some(intercept) => {
                upstream::tunnel(
                    &intercept,
                    &info.target.to_string(),
                    self.dialer.connect_timeout(),
                )
                .await?
            }
            None => {
                self.dialer
                    .connect(&info.target, info.protocol, &info.method)
                    .await?
            }
        };
        let mut response = Response::new(body::empty());
        response
            .extensions_mut()
            .insert(UpstreamConnection::new(stream));
        Ok(response)
    }

    async fn forward(
        self,
        mut request: Request<Body>,
        info: RequestInfo,
    ) -> Result<Response<Body>, BoxError> {
        // Forward to the canonical authority: the host we checked is the host we dial.
        let scheme = request.uri().scheme_str().unwrap_or("http").to_owned();
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let uri: Uri = format!("{scheme}://{}{path}", info.target)
            .parse()
            .map_err(|e| BadRequest::new(format!("cannot forward to {}: {e}", info.target)))?;
        if let Some(intercept) = self.upstream.as_ref().and_then(|u| u.for_uri(&uri)) {
            if let (Some(auth), "http") = (intercept.basic_auth(), scheme.as_str()) {
                request
                    .headers_mut()
                    .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
            }
        }
        *request.uri_mut() = uri;
        match self.client.request(request).await {
            Ok(response) => Ok(response.map(body::boxed)),
            Err(error) => Err(relabel(error.into(), &info)),
        }
    }
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

impl Service<Request<Body>> for Connector {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Response<Body>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let info = match RequestInfo::from_request(&request) {
            Ok(info) => info,
            Err(bad) => return Box::pin(async move { Err(bad.into()) }),
        };
        if request.extensions().get::<AwaitingApproval>().is_some() {
            let blocked = Blocked::new(
                Reason::NotAllowed,
                Source::Connector,
                info.target,
                info.protocol,
                &info.method,
            )
            .with_decision(BlockDecision::Ask);
            return Box::pin(async move { Err(blocked.into()) });
        }
        let this = self.clone();
        match &info.target {
            Target::Unix(path) => {
                let path = path.clone();
                Box::pin(forward_unix(request, path))
            }
            Target::Host { .. } if info.protocol == Protocol::Socks5Udp => Box::pin(async move {
                let addresses = this
                    .dialer
                    .resolve_vetted(&info.target, info.protocol, &info.method)
                    .await?;
                let mut response = Response::new(body::empty());
                response.extensions_mut().insert(VettedAddresses(addresses));
                Ok(response)
            }),
            Target::Host { .. } if info.method == Method::CONNECT || info.protocol.is_tunnel() => {
                Box::pin(this.tunnel(info))
            }
            Target::Host { .. } => Box::pin(this.forward(request, info)),
        }
    }
}

/// Forwards a request over a Unix socket, in origin form.
async fn forward_unix(
    mut request: Request<Body>,
    path: PathBuf,
) -> Result<Response<Body>, BoxError> {
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|error| UpstreamError::from_io(format!("unix:{}", path.display()), &error))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "unix socket connection ended");
        }
    });
    let origin: Uri = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|_| BadRequest::new("invalid request path"))?;
    *request.uri_mut() = origin;
    if !request.headers().contains_key(http::header::HOST) {
        request.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_static("localhost"),
        );
    }
    let response = sender.send_request(request).await?;
    Ok(response.map(body::boxed))
}

/// Whether a response from the connector carries a tunnel.
pub fn is_tunnel_response(response: &Response<Body>) -> bool {
    response.status() == StatusCode::OK
        && response.extensions().get::<UpstreamConnection>().is_some()
}
