//! The runner: reserves the listeners, builds the stack, serves, and shuts
//! down gracefully.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use portcullis::Proxy;
//! use portcullis_middleware::{NetworkPolicy, PolicyHandle};
//!
//! let policy = PolicyHandle::new(NetworkPolicy::builder().allow("*.crates.io")?.build());
//! let proxy = Proxy::builder().policy(policy).start().await?;
//! println!("HTTP proxy on {}", proxy.http_addr());
//! proxy.shutdown(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tower::util::BoxCloneService;
use tower::Layer;

use portcullis_middleware::{
    ApprovalOutcome, ApprovalRequest, BoxError, DefaultStack, PolicyHandle, ViolationLogLayer,
    ViolationRing,
};

use crate::body::Body;
use crate::connector::{Connector, Dialer};
use crate::resolve::{Resolve, SystemResolver};
use crate::upstream::UpstreamProxies;

/// The whole stack, type-erased, as every transport drives it.
pub type ProxyService = BoxCloneService<Request<Body>, Response<Body>, BoxError>;

/// A type-erased approver.
pub type BoxApprover = BoxCloneService<ApprovalRequest, ApprovalOutcome, BoxError>;

type ServiceMap = Arc<dyn ProxyLayer>;

/// A tower layer that can wrap the type-erased stack: what
/// [`ProxyBuilder::outer_layer`] and [`ProxyBuilder::inner_layer`] take.
/// Implemented for every `Layer<ProxyService>` whose service speaks our
/// request and response types.
pub trait ProxyLayer: Send + Sync + 'static {
    /// Wraps `service`.
    fn wrap(&self, service: ProxyService) -> ProxyService;
}

impl<L> ProxyLayer for L
where
    L: Layer<ProxyService> + Send + Sync + 'static,
    L::Service: tower::Service<Request<Body>, Response = Response<Body>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<Request<Body>>>::Future: Send + 'static,
{
    fn wrap(&self, service: ProxyService) -> ProxyService {
        ProxyService::new(self.layer(service))
    }
}

/// Accepts on `listener` until shutdown starts, handing each connection
/// (with a drain guard) to `serve_one` on its own task.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut shutdown: ShutdownSignal,
    drain: DrainGuard,
    what: &'static str,
    serve_one: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, DrainGuard) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.wait() => break,
        };
        match accepted {
            Ok((stream, client)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_one(stream, client, drain.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(%error, "accept failed on the {what} listener");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The integrator's outer layers, applied in order around the inner stack.
#[derive(Clone)]
struct OuterLayers(Vec<ServiceMap>);

impl<S> Layer<S> for OuterLayers
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Service = ProxyService;

    fn layer(&self, service: S) -> ProxyService {
        let mut service = ProxyService::new(service);
        for map in self.0.iter().rev() {
            service = map.wrap(service);
        }
        service
    }
}

/// Drives the stack with one request. The future is boxed here, with its
/// `Send` bound spelled out, so every transport can spawn it.
pub(crate) fn call_stack(
    stack: ProxyService,
    request: Request<Body>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, BoxError>> + Send>> {
    Box::pin(tower::ServiceExt::oneshot(stack, request))
}

/// Resolves when shutdown starts.
#[derive(Clone, Debug)]
pub(crate) struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    pub(crate) async fn wait(&mut self) {
        while !*self.0.borrow_and_update() {
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Held by every connection and tunnel; shutdown waits until all are gone.
pub(crate) type DrainGuard = mpsc::Sender<()>;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS client configuration could not be built.
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Builds and starts a proxy; see the [module docs](self).
pub struct ProxyBuilder {
    http_addr: SocketAddr,
    socks_addr: Option<SocketAddr>,
    socks_udp: bool,
    socks_credentials: Option<Arc<(String, String)>>,
    allow_non_loopback: bool,
    force_loopback: bool,
    policy: PolicyHandle,
    resolver: Arc<dyn Resolve>,
    resolve_timeout: Duration,
    connect_timeout: Duration,
    upstream: Option<Arc<UpstreamProxies>>,
    crypto: Option<Arc<rustls::crypto::CryptoProvider>>,
    violations: ViolationLogLayer,
    approver: Option<(BoxApprover, Duration)>,
    outer: Vec<ServiceMap>,
    inner: Vec<ServiceMap>,
}

impl fmt::Debug for ProxyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyBuilder")
            .field("http_addr", &self.http_addr)
            .field("socks_addr", &self.socks_addr)
            .field("allow_non_loopback", &self.allow_non_loopback)
            .finish_non_exhaustive()
    }
}

/// The proxy; start one with [`Proxy::builder`].
#[derive(Debug)]
pub struct Proxy;

impl Proxy {
    /// A builder with safe defaults: HTTP on `127.0.0.1:0`, no SOCKS5, a
    /// policy that refuses everything, the system resolver, no upstream proxy.
    pub fn builder() -> ProxyBuilder {
        ProxyBuilder {
            http_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            socks_addr: None,
            socks_udp: true,
            socks_credentials: None,
            allow_non_loopback: false,
            force_loopback: false,
            policy: PolicyHandle::default(),
            resolver: Arc::new(SystemResolver),
            resolve_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            upstream: None,
            crypto: None,
            violations: ViolationLogLayer::default(),
            approver: None,
            outer: Vec::new(),
            inner: Vec::new(),
        }
    }
}

impl ProxyBuilder {
    /// The HTTP listener address (port 0: ephemeral).
    pub fn http_addr(mut self, address: SocketAddr) -> ProxyBuilder {
        self.http_addr = address;
        self
    }

    /// Serves SOCKS5 on this address (port 0: ephemeral); `None` turns it off.
    pub fn socks_addr(mut self, address: Option<SocketAddr>) -> ProxyBuilder {
        self.socks_addr = address;
        self
    }

    /// Whether SOCKS5 UDP ASSOCIATE is served (default: yes).
    pub fn socks_udp(mut self, enabled: bool) -> ProxyBuilder {
        self.socks_udp = enabled;
        self
    }

    /// Requires SOCKS5 clients to authenticate with this username and
    /// password (no-auth is then refused with `05 FF`).
    pub fn socks_credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> ProxyBuilder {
        self.socks_credentials = Some(Arc::new((username.into(), password.into())));
        self
    }

    /// Allows binding non-loopback addresses (otherwise they are clamped to
    /// 127.0.0.1 with a warning).
    pub fn dangerously_allow_non_loopback(mut self, allow: bool) -> ProxyBuilder {
        self.allow_non_loopback = allow;
        self
    }

    /// Forces loopback listeners whatever else is set (any Unix socket
    /// permission does this).
    pub fn force_loopback(mut self, force: bool) -> ProxyBuilder {
        self.force_loopback = force;
        self
    }

    /// The live policy.
    pub fn policy(mut self, policy: PolicyHandle) -> ProxyBuilder {
        self.policy = policy;
        self
    }

    /// The resolver the connector uses.
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>) -> ProxyBuilder {
        self.resolver = resolver;
        self
    }

    /// How long a name lookup may take (default 5 s).
    pub fn resolve_timeout(mut self, timeout: Duration) -> ProxyBuilder {
        self.resolve_timeout = timeout;
        self
    }

    /// How long a connect may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> ProxyBuilder {
        self.connect_timeout = timeout;
        self
    }

    /// Chains through these upstream proxies.
    pub fn upstream(mut self, upstream: Option<UpstreamProxies>) -> ProxyBuilder {
        self.upstream = upstream.map(Arc::new);
        self
    }

    /// The rustls crypto provider for TLS to `https://` upstreams (default:
    /// ring, created here; nothing is installed process-wide).
    pub fn crypto_provider(
        mut self,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> ProxyBuilder {
        self.crypto = Some(provider);
        self
    }

    /// Records violations with this layer.
    pub fn violations(mut self, violations: ViolationLogLayer) -> ProxyBuilder {
        self.violations = violations;
        self
    }

    /// Asks `approver` about allowlist misses.
    pub fn approver(mut self, approver: BoxApprover, timeout: Duration) -> ProxyBuilder {
        self.approver = Some((approver, timeout));
        self
    }

    /// Inserts a layer of your own just inside the violation log (it sees
    /// every request; its refusals are logged). Layers added later sit
    /// further in.
    pub fn outer_layer(mut self, layer: impl ProxyLayer) -> ProxyBuilder {
        self.outer.push(Arc::new(layer));
        self
    }

    /// Inserts a layer of your own just outside the connector (it sees only
    /// allowed requests). Layers added later sit further in.
    pub fn inner_layer(mut self, layer: impl ProxyLayer) -> ProxyBuilder {
        self.inner.push(Arc::new(layer));
        self
    }

    fn clamp(&self, address: SocketAddr, what: &str) -> SocketAddr {
        let loopback = address.ip().is_loopback();
        if loopback || (self.allow_non_loopback && !self.force_loopback) {
            return address;
        }
        let reason = if self.force_loopback {
            "unix socket forwarding is allowed"
        } else {
            "dangerously_allow_non_loopback_proxy is off"
        };
        tracing::warn!(requested = %address, "{what} listener clamped to 127.0.0.1 because {reason}");
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), address.port())
    }

    /// The stack, without listeners (for `check`, tests and other transports).
    pub fn build_service(&self) -> Result<ProxyService, StartError> {
        let provider = self
            .crypto
            .clone()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::debug!(%error, "while loading the system's CA certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(
            added,
            ignored,
            "system CA certificates for https:// upstreams"
        );
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let dialer = Dialer::new(
            self.policy.clone(),
            self.resolver.clone(),
            self.resolve_timeout,
            self.connect_timeout,
        );
        let mut connector = ProxyService::new(Connector::new(dialer, tls, self.upstream.clone()));
        for map in self.inner.iter().rev() {
            connector = map.wrap(connector);
        }
        let outer = OuterLayers(self.outer.clone());
        let stack = DefaultStack::new(self.policy.clone()).violations(self.violations.clone());
        Ok(match &self.approver {
            Some((approver, timeout)) => ProxyService::new(
                stack
                    .approver(approver.clone(), *timeout)
                    .outer(outer)
                    .layer(connector),
            ),
            None => ProxyService::new(stack.outer(outer).layer(connector)),
        })
    }

    /// Binds the listeners (before anything else starts), then serves them.
    pub async fn start(self) -> Result<ProxyHandle, StartError> {
        let http_addr = self.clamp(self.http_addr, "HTTP");
        let http = TcpListener::bind(http_addr)
            .await
            .map_err(|source| StartError::Bind {
                address: http_addr,
                source,
            })?;
        let socks = match self.socks_addr {
            Some(address) => {
                let address = self.clamp(address, "SOCKS5");
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| StartError::Bind { address, source })?,
                )
            }
            None => None,
        };
        let local = |listener: &TcpListener, fallback| listener.local_addr().unwrap_or(fallback);
        let http_addr = local(&http, http_addr);
        let socks_addr = socks.as_ref().map(|l| local(l, http_addr));
        let service = self.build_service()?;
        let (stop, stopping) = watch::channel(false);
        let (drain, drained) = mpsc::channel(1);
        let signal = ShutdownSignal(stopping);
        tokio::spawn(crate::http1::serve(
            http,
            service.clone(),
            signal.clone(),
            drain.clone(),
        ));
        if let Some(socks) = socks {
            let settings = crate::socks5::Settings {
                udp: self.socks_udp,
                credentials: self.socks_credentials.clone(),
            };
            tokio::spawn(crate::socks5::serve(
                socks,
                service.clone(),
                settings,
                signal.clone(),
                drain.clone(),
            ));
        }
        drop(drain);
        tracing::info!(http = %http_addr, socks = ?socks_addr, "portcullis listening");
        Ok(ProxyHandle {
            http_addr,
            socks_addr,
            stop,
            drained: Some(drained),
            violations: self.violations.ring().clone(),
            policy: self.policy,
        })
    }
}

/// A running proxy. Dropping it stops the listeners; [`ProxyHandle::shutdown`]
/// also waits for open connections and tunnels to finish.
#[derive(Debug)]
pub struct ProxyHandle {
    http_addr: SocketAddr,
    socks_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    drained: Option<mpsc::Receiver<()>>,
    violations: ViolationRing,
    policy: PolicyHandle,
}

impl ProxyHandle {
    /// The HTTP listener's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The SOCKS5 listener's address, when SOCKS5 is on.
    pub fn socks_addr(&self) -> Option<SocketAddr> {
        self.socks_addr
    }

    /// The recent violations.
    pub fn violations(&self) -> &ViolationRing {
        &self.violations
    }

    /// The live policy (store a new one to change the next decision).
    pub fn policy(&self) -> &PolicyHandle {
        &self.policy
    }

    /// The environment a child process needs to use this proxy.
    pub fn child_env(&self) -> Vec<(String, String)> {
        crate::env::proxy_env(self.http_addr, self.socks_addr)
    }

    /// Stops accepting, lets connections and tunnels finish for up to
    /// `deadline`, then returns (whatever is left is dropped).
    pub async fn shutdown(mut self, deadline: Duration) {
        let _ = self.stop.send(true);
        if let Some(mut drained) = self.drained.take() {
            if tokio::time::timeout(deadline, drained.recv())
                .await
                .is_err()
            {
                tracing::warn!("shutdown deadline reached with connections still open");
            }
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
