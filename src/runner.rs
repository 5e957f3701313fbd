//! The runner: reserves the listeners, composes the stack once, hands it to
//! the transports, and shuts down gracefully. It depends on the transports;
//! they never depend on it.
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
use tower::layer::util::{Identity, Stack};
use tower::util::BoxCloneService;
use tower::{Layer, Service};
use tower_http::sensitive_headers::SetSensitiveRequestHeaders;

use portcullis_middleware::profiles::{ProfileSelector, Profiles, SelectProfileLayer};
use portcullis_middleware::{
    ApprovalAnswer, ApprovalRequest, ApprovalWaitLayer, BoxError, DefaultStack, PolicyHandle,
    RuleBook, ViolationLogLayer, ViolationRing,
};

use rustls::pki_types::CertificateDer;

use crate::body::Body;
use crate::connector::{Connector, Dialer, OwnListeners};
use crate::env::CaFiles;
use crate::hints::Fixes;
use crate::resolve::{Resolve, SystemResolver};
use crate::transport::mitm::{CaError, CertificateAuthority, Interceptor, DEFAULT_LEAF_CACHE_SIZE};
use crate::transport::{self, Credentials, Limits, LiveCredentials, ProxyService, Shutdown};
use crate::upstream::UpstreamProxies;

/// A type-erased approver.
pub type BoxApprover = BoxCloneService<ApprovalRequest, ApprovalAnswer, BoxError>;

/// The service the default stack makes of the connector with your outer
/// layers `O` and inner layers `I`.
type Composed<O, I> = <DefaultStack<BoxApprover, O, I> as Layer<Connector>>::Service;

/// Layers a proxy can start with: your outer layers `O` and inner layers
/// `I`, as the pair `(O, I)`, when the default stack around the connector
/// with them is a `Clone + Send + 'static` service of `Request<Body>`
/// answering `Response<Body>` or a [`BoxError`], with a `Send` future —
/// which is what a tower layer whose service is `Clone` and whose future
/// is `Send` gives. Implemented for every pair that qualifies; generic code
/// names it instead of spelling the stack:
///
/// ```
/// use portcullis::{ProxyBuilder, ProxyHandle, StackLayers, StartError};
///
/// async fn start_with<O, I>(builder: ProxyBuilder<O, I>) -> Result<ProxyHandle, StartError>
/// where
///     (O, I): StackLayers,
/// {
///     builder.start().await
/// }
/// ```
///
/// A layer whose service is not `Clone` (tower's `RateLimit`, say) is made
/// one by `tower::buffer::BufferLayer` (tower's `buffer` feature):
/// `ServiceBuilder::new().buffer(1024).layer(RateLimitLayer::new(…))`.
pub trait StackLayers: Clone {
    /// The default stack with these layers, around the connector.
    #[doc(hidden)]
    type Stack: Service<
            Request<Body>,
            Response = Response<Body>,
            Error = BoxError,
            Future = Self::StackFuture,
        > + Clone
        + Send
        + 'static;
    /// Its future.
    #[doc(hidden)]
    type StackFuture: std::future::Future<Output = Result<Response<Body>, BoxError>>
        + Send
        + 'static;
    /// `base` (the default stack, configured) with these layers, around
    /// `connector`.
    #[doc(hidden)]
    fn around(&self, base: DefaultStack<BoxApprover>, connector: Connector) -> Self::Stack;
}

impl<O, I> StackLayers for (O, I)
where
    O: Clone,
    I: Clone,
    DefaultStack<BoxApprover, O, I>: Layer<Connector>,
    Composed<O, I>: Service<Request<Body>, Response = Response<Body>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    <Composed<O, I> as Service<Request<Body>>>::Future: Send + 'static,
{
    type Stack = Composed<O, I>;
    type StackFuture = <Composed<O, I> as Service<Request<Body>>>::Future;

    fn around(&self, base: DefaultStack<BoxApprover>, connector: Connector) -> Self::Stack {
        base.layers(self.0.clone(), self.1.clone()).layer(connector)
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound.
    #[error(
        "cannot listen on {address} (the {listener} listener): {source}{}",
        bind_hint(listener, source)
    )]
    Bind {
        /// Which listener: `HTTP`, `SOCKS5` or `metrics`.
        listener: &'static str,
        /// The address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS client configuration could not be built.
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The interception CA's trust files could not be written.
    #[error(transparent)]
    Mitm(#[from] CaError),
    /// The OTLP exporter could not be set up.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// The metrics listener is not on loopback.
    #[error("[metrics] listen: {0}")]
    Metrics(String),
}

/// How many refusals a slow [`ProxyHandle::subscribe`]r may fall behind.
const SUBSCRIBED_BACKLOG: usize = 1024;

/// What to change when a listener's address is taken.
fn bind_hint(listener: &str, error: &std::io::Error) -> &'static str {
    if error.kind() != std::io::ErrorKind::AddrInUse {
        return "";
    }
    match listener {
        "HTTP" => "; another program holds it: pick another (--http 127.0.0.1:0 for any free port, or network.proxy_url)",
        "SOCKS5" => "; another program holds it: pick another (--socks 127.0.0.1:0 for any free port, network.socks_url, or --no-socks)",
        _ => "; another program holds it: pick another address for [metrics] listen",
    }
}

/// Builds and starts a proxy; see the [module docs](self).
///
/// Your own layers go into the default stack with
/// [`outer_layer`](ProxyBuilder::outer_layer) and
/// [`inner_layer`](ProxyBuilder::inner_layer), exactly as with
/// [`DefaultStack::outer`] and [`DefaultStack::inner`]; the whole stack is
/// type-erased once, where the transports take it.
pub struct ProxyBuilder<O = Identity, I = Identity> {
    /// Everything but the layers: one value, moved whole when a layer is
    /// added (a new setting is a field here and a setter, nothing else).
    settings: Settings,
    /// Your outer and inner layers.
    layers: (O, I),
}

/// A [`ProxyBuilder`]'s settings.
struct Settings {
    http_addr: SocketAddr,
    socks_addr: Option<SocketAddr>,
    socks_udp: bool,
    credentials: Option<Credentials>,
    allow_non_loopback: bool,
    force_loopback: bool,
    policy: PolicyHandle,
    resolver: Arc<dyn Resolve>,
    resolve_timeout: Duration,
    upstream: Option<Arc<UpstreamProxies>>,
    crypto: Arc<rustls::crypto::CryptoProvider>,
    mitm: Option<Arc<CertificateAuthority>>,
    leaf_cache_size: usize,
    upstream_roots: Vec<CertificateDer<'static>>,
    violations: ViolationLogLayer,
    /// Where allowed requests are recorded, if anywhere.
    telemetry: Option<crate::telemetry::TelemetrySettings>,
    access_file: Option<crate::records::AccessFile>,
    /// Secrets added for their hosts (`[[credentials]]`).
    injected: portcullis_middleware::credentials::Credentials,
    /// Variables a child gets (placeholders) and must not get (secrets).
    child_variables: (Vec<(String, String)>, Vec<String>),
    approval: Option<ApprovalWaitLayer<BoxApprover>>,
    rules: Option<Arc<dyn RuleBook>>,
    /// The listeners once bound (never a destination) and this proxy's name.
    own: OwnListeners,
    limits: Limits,
    all_proxy_socks: bool,
    fixes: Fixes,
    metrics_addr: Option<SocketAddr>,
    /// Whether the metrics listener may be beyond loopback.
    metrics_beyond_loopback: bool,
    /// The token every scrape must send, if any.
    metrics_token: Option<Arc<str>>,
    /// This proxy's counters (never another proxy's in the same process).
    metrics: Arc<crate::metrics::Metrics>,
    /// Every refusal, for [`ProxyHandle::subscribe`].
    refusals: tokio::sync::broadcast::Sender<portcullis_middleware::Violation>,
    /// The profiles, by name, in the order given.
    profiles: Vec<(String, Profile)>,
    /// Who gets which profile.
    selection: Selection,
    /// Whether a caller given no profile gets the top-level policy
    /// (otherwise it is refused).
    unmatched_default: bool,
    /// Proxy users a client may name itself as, and their passwords.
    users: Arc<std::collections::HashMap<String, transport::Secret>>,
}

/// `error` with its refusal's message written for `fixes`, when it is a
/// built-in refusal.
fn written_for(error: BoxError, fixes: &Fixes) -> BoxError {
    match error.downcast::<portcullis_middleware::Blocked>() {
        Ok(blocked) => match fixes.rephrase(&blocked) {
            Some(message) => Box::new(blocked.with_message(message)),
            None => blocked,
        },
        Err(other) => other,
    }
}

/// What one stack decides by: the top-level policy's or a profile's.
#[derive(Clone, Copy)]
struct Part<'a> {
    policy: &'a PolicyHandle,
    injected: &'a portcullis_middleware::credentials::Credentials,
    ask: bool,
}

/// A profile: a policy of its own, with its own credentials, approvals and
/// rate-limit buckets, behind the layers every profile shares; see
/// [`ProxyBuilder::profile`] and [`portcullis_middleware::profiles`].
#[derive(Clone)]
pub struct Profile {
    policy: PolicyHandle,
    injected: portcullis_middleware::credentials::Credentials,
    ask: bool,
    rules: Option<Arc<dyn RuleBook>>,
    /// Its own upstream (`Some(None)`: direct), else the proxy's.
    upstream: Option<Option<Arc<UpstreamProxies>>>,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("ask", &self.ask)
            .field("rules", &self.rules.is_some())
            .finish_non_exhaustive()
    }
}

impl Profile {
    /// A profile deciding by `policy` (keep a clone to change it live).
    /// Its allowlist misses go to the proxy's approver, if it has one.
    pub fn new(policy: PolicyHandle) -> Profile {
        Profile {
            policy,
            injected: Default::default(),
            ask: true,
            rules: None,
            upstream: None,
        }
    }

    /// Chains this profile's requests through `upstream` (`None`: direct)
    /// instead of the proxy's upstream.
    pub fn upstream(mut self, upstream: Option<UpstreamProxies>) -> Profile {
        self.upstream = Some(upstream.map(Arc::new));
        self
    }

    /// Adds these credentials' secrets for this profile's requests (see
    /// [`ProxyBuilder::inject_credentials`]).
    pub fn inject_credentials(
        mut self,
        credentials: portcullis_middleware::credentials::Credentials,
    ) -> Profile {
        self.injected = credentials;
        self
    }

    /// Whether this profile's allowlist misses are put to the proxy's
    /// approver (the default) or refused at once.
    pub fn ask(mut self, ask: bool) -> Profile {
        self.ask = ask;
        self
    }

    /// Persisted rules this profile's approvals read and write.
    pub fn rules(mut self, rules: Arc<dyn RuleBook>) -> Profile {
        self.rules = Some(rules);
        self
    }

    /// The live policy.
    pub fn policy(&self) -> &PolicyHandle {
        &self.policy
    }
}

/// How the profile of a request is chosen.
#[derive(Clone)]
enum Selection {
    /// The built-in selector, by user and source range.
    Selector(portcullis_middleware::profiles::SelectProfileLayer),
    /// An integrator's layer around the router.
    Custom(Arc<dyn Fn(Profiles<ProxyService>) -> ProxyService + Send + Sync>),
}

impl<O, I> fmt::Debug for ProxyBuilder<O, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyBuilder")
            .field("http_addr", &self.settings.http_addr)
            .field("socks_addr", &self.settings.socks_addr)
            .field("allow_non_loopback", &self.settings.allow_non_loopback)
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
            settings: Settings {
                http_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
                socks_addr: None,
                socks_udp: true,
                credentials: None,
                allow_non_loopback: false,
                force_loopback: false,
                policy: PolicyHandle::default(),
                resolver: Arc::new(SystemResolver),
                resolve_timeout: crate::resolve::DEFAULT_TIMEOUT,
                upstream: None,
                crypto: Arc::new(rustls::crypto::ring::default_provider()),
                mitm: None,
                leaf_cache_size: DEFAULT_LEAF_CACHE_SIZE,
                upstream_roots: Vec::new(),
                violations: ViolationLogLayer::default(),
                access_file: None,
                telemetry: None,
                injected: Default::default(),
                child_variables: Default::default(),
                approval: None,
                rules: None,
                own: OwnListeners::default(),
                limits: Limits::default(),
                all_proxy_socks: false,
                fixes: Fixes::Api,
                metrics_addr: None,
                metrics_beyond_loopback: false,
                metrics_token: None,
                metrics: Arc::default(),
                refusals: tokio::sync::broadcast::channel(SUBSCRIBED_BACKLOG).0,
                profiles: Vec::new(),
                selection: Selection::Selector(
                    portcullis_middleware::profiles::SelectProfileLayer::new(ProfileSelector::new()),
                ),
                unmatched_default: false,
                users: Arc::default(),
            },
            layers: (Identity::new(), Identity::new()),
        }
    }
}

impl<O, I> ProxyBuilder<O, I> {
    /// The HTTP listener address (port 0: ephemeral).
    pub fn http_addr(mut self, address: SocketAddr) -> ProxyBuilder<O, I> {
        self.settings.http_addr = address;
        self
    }

    /// Serves SOCKS5 on this address (port 0: ephemeral); `None` turns it off.
    pub fn socks_addr(mut self, address: Option<SocketAddr>) -> ProxyBuilder<O, I> {
        self.settings.socks_addr = address;
        self
    }

    /// Whether SOCKS5 UDP ASSOCIATE is served (default: yes).
    pub fn socks_udp(mut self, enabled: bool) -> ProxyBuilder<O, I> {
        self.settings.socks_udp = enabled;
        self
    }

    /// Requires every client to present this username and password:
    /// HTTP `Proxy-Authorization: Basic` (else 407) and SOCKS5
    /// username/password (no-auth refused with `05 FF`). The child
    /// environment's proxy URLs carry them.
    pub fn credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> ProxyBuilder<O, I> {
        self.settings.credentials = Some(Credentials {
            username: username.into(),
            password: password.into(),
        });
        self
    }

    /// Allows binding non-loopback addresses (otherwise they are clamped to
    /// 127.0.0.1 with a warning).
    pub fn dangerously_allow_non_loopback(mut self, allow: bool) -> ProxyBuilder<O, I> {
        self.settings.allow_non_loopback = allow;
        self
    }

    /// Forces loopback listeners whatever else is set (any Unix socket
    /// permission does this).
    pub fn force_loopback(mut self, force: bool) -> ProxyBuilder<O, I> {
        self.settings.force_loopback = force;
        self
    }

    /// The live policy.
    pub fn policy(mut self, policy: PolicyHandle) -> ProxyBuilder<O, I> {
        self.settings.policy = policy;
        self
    }

    /// The resolver the connector uses.
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>) -> ProxyBuilder<O, I> {
        self.settings.resolver = resolver;
        self
    }

    /// How long a name lookup may take (default 5 s).
    pub fn resolve_timeout(mut self, timeout: Duration) -> ProxyBuilder<O, I> {
        self.settings.resolve_timeout = timeout;
        self
    }

    /// How long a connect may take (default 10 s): [`Limits::connect_timeout`]
    /// (a later [`limits`](Self::limits) replaces it).
    pub fn connect_timeout(mut self, timeout: Duration) -> ProxyBuilder<O, I> {
        self.settings.limits.connect_timeout = timeout;
        self
    }

    /// Chains through these upstream proxies.
    pub fn upstream(mut self, upstream: Option<UpstreamProxies>) -> ProxyBuilder<O, I> {
        self.settings.upstream = upstream.map(Arc::new);
        self
    }

    /// The rustls crypto provider for every TLS configuration, client and
    /// server side (default: ring, created here; nothing is installed
    /// process-wide).
    pub fn crypto_provider(
        mut self,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> ProxyBuilder<O, I> {
        self.settings.crypto = provider;
        self
    }

    /// Intercepts HTTPS in limited mode with leaves signed by `ca`: each
    /// request inside an allowed `CONNECT` goes through the stack as
    /// `https_mitm`. Full mode never intercepts.
    pub fn mitm(mut self, ca: Option<Arc<CertificateAuthority>>) -> ProxyBuilder<O, I> {
        self.settings.mitm = ca;
        self
    }

    /// How many hosts' interception leaves are kept (default 1024).
    pub fn leaf_cache_size(mut self, size: usize) -> ProxyBuilder<O, I> {
        self.settings.leaf_cache_size = size;
        self
    }

    /// Also trusts these CA certificates for TLS to origins (beside the
    /// system's roots, which honour `SSL_CERT_FILE` and `SSL_CERT_DIR`).
    pub fn upstream_roots(mut self, roots: Vec<CertificateDer<'static>>) -> ProxyBuilder<O, I> {
        self.settings.upstream_roots = roots;
        self
    }

    /// How refusals name their fix: the library's builder methods (the
    /// default), words of your own ([`Fixes::custom`]), config keys, flags,
    /// or keys in a named file; see [`Fixes`].
    pub fn refusal_fixes(mut self, fixes: Fixes) -> ProxyBuilder<O, I> {
        self.settings.fixes = fixes;
        self
    }

    /// The live policy this proxy will decide by.
    pub fn policy_handle(&self) -> &PolicyHandle {
        &self.settings.policy
    }

    /// How this proxy words refusals (see [`refusal_fixes`](Self::refusal_fixes)).
    pub fn fixes(&self) -> &Fixes {
        &self.settings.fixes
    }

    /// Serves the Prometheus metrics at `GET /metrics` on this loopback
    /// address (port 0 for an ephemeral one); off by default. See
    /// [`ProxyHandle::metrics_addr`].
    pub fn metrics_addr(mut self, address: Option<SocketAddr>) -> ProxyBuilder<O, I> {
        self.settings.metrics_addr = address;
        self
    }

    /// Who may scrape the metrics: `bearer_token` (when given) must come
    /// with every scrape (`Authorization: Bearer …`, else 401), and with
    /// `beyond_loopback` the listener may be on any address — only with a
    /// token (otherwise `start` fails). Default: loopback, no token.
    pub fn metrics_access(
        mut self,
        beyond_loopback: bool,
        bearer_token: Option<String>,
    ) -> ProxyBuilder<O, I> {
        self.settings.metrics_beyond_loopback = beyond_loopback;
        self.settings.metrics_token = bearer_token.map(Arc::from);
        self
    }

    /// Records violations with this layer.
    pub fn violations(mut self, violations: ViolationLogLayer) -> ProxyBuilder<O, I> {
        self.settings.violations = violations;
        self
    }

    /// Adds these credentials' secrets to requests for their hosts, and
    /// refuses their placeholders anywhere else (see
    /// [`credentials`](portcullis_middleware::credentials)). A `CONNECT` to
    /// a credential's host is intercepted when a CA is set
    /// ([`mitm`](ProxyBuilder::mitm)).
    pub fn inject_credentials(
        mut self,
        credentials: portcullis_middleware::credentials::Credentials,
    ) -> ProxyBuilder<O, I> {
        self.settings.injected = credentials;
        self
    }

    /// What [`ProxyHandle::child_env`] adds (`set`: a credential's
    /// placeholder in its variable) and what a child must not inherit
    /// (`removed`: a secret's variable; see
    /// [`ProxyHandle::child_env_removed`]).
    pub fn child_variables(
        mut self,
        set: Vec<(String, String)>,
        removed: Vec<String>,
    ) -> ProxyBuilder<O, I> {
        self.settings.child_variables = (set, removed);
        self
    }

    /// Sends every record (refusals, audits, allowed requests) and the
    /// metrics to an OpenTelemetry collector over OTLP; see
    /// [`telemetry`](crate::telemetry). Set up by [`start`](Self::start),
    /// which fails if the endpoint cannot be used. Off by default.
    pub fn telemetry(
        mut self,
        settings: crate::telemetry::TelemetrySettings,
    ) -> ProxyBuilder<O, I> {
        self.settings.telemetry = Some(settings);
        self
    }

    /// Records every allowed request and every tunnel opened in `file`
    /// (see [`records`](crate::records)); refusals go to the violation
    /// log. Off by default.
    pub fn access_file(mut self, file: crate::records::AccessFile) -> ProxyBuilder<O, I> {
        self.settings.access_file = Some(file);
        self
    }

    /// Asks `approver` about allowlist misses, waiting at most `timeout`
    /// per question. Any `tower::Service<ApprovalRequest>` answering an
    /// `ApprovalOutcome` or an `ApprovalAnswer` will do (`approver_fn` makes
    /// one from a closure).
    pub fn approver<A>(mut self, approver: A, timeout: Duration) -> ProxyBuilder<O, I>
    where
        A: Service<ApprovalRequest> + Clone + Send + 'static,
        A::Response: Into<ApprovalAnswer>,
        A::Error: Into<BoxError>,
        A::Future: Send + 'static,
    {
        let approver = BoxApprover::new(
            tower::ServiceBuilder::new()
                .map_response(Into::into)
                .map_err(Into::into)
                .service(approver),
        );
        self.settings.approval = Some(ApprovalWaitLayer::new(approver, timeout));
        self
    }

    /// Bounds the questions: at most `max_pending` wait at once, at most
    /// `max_session` keys are remembered (defaults 64 and 4096).
    pub fn approval_limits(mut self, max_pending: usize, max_session: usize) -> ProxyBuilder<O, I> {
        self.settings.approval = self
            .settings
            .approval
            .map(|layer| layer.max_pending(max_pending).max_session(max_session));
        self
    }

    /// Persisted rules: consulted before the approver is asked, written
    /// when it answers *always*. They answer only with an approver; `check`
    /// reads them too.
    pub fn rules(mut self, rules: Arc<dyn RuleBook>) -> ProxyBuilder<O, I> {
        self.settings.rules = Some(rules);
        self
    }

    /// Adds the profile `name`: requests given it (see
    /// [`profile_selector`](Self::profile_selector)) are decided by its
    /// own stack. Once a proxy has profiles, a caller given none is
    /// refused (`auth_required`, a 407) unless
    /// [`unmatched_gets_default`](Self::unmatched_gets_default).
    pub fn profile(mut self, name: impl Into<String>, profile: Profile) -> ProxyBuilder<O, I> {
        let name = name.into();
        self.settings.profiles.retain(|(known, _)| *known != name);
        self.settings.profiles.push((name, profile));
        self
    }

    /// Chooses profiles with `selector` (proxy users by name, then source
    /// ranges); the default selects nobody.
    pub fn profile_selector(mut self, selector: ProfileSelector) -> ProxyBuilder<O, I> {
        self.settings.selection = Selection::Selector(SelectProfileLayer::new(selector));
        self
    }

    /// Chooses profiles with a layer of your own instead (from a header a
    /// trusted gateway sets, a JWT, …): it wraps the router and puts a
    /// [`ProfileName`](portcullis_middleware::profiles::ProfileName) in
    /// each request it lets through.
    pub fn profile_layer<L>(mut self, layer: L) -> ProxyBuilder<O, I>
    where
        L: Layer<Profiles<ProxyService>> + Send + Sync + 'static,
        L::Service: Service<Request<Body>, Response = Response<Body>, Error = BoxError>
            + Clone
            + Send
            + 'static,
        <L::Service as Service<Request<Body>>>::Future: Send + 'static,
    {
        self.settings.selection = Selection::Custom(Arc::new(move |router| {
            ProxyService::new(layer.layer(router))
        }));
        self
    }

    /// Whether a caller given no profile is served by the top-level policy
    /// (`true`) or refused (`false`, the default).
    pub fn unmatched_gets_default(mut self, default: bool) -> ProxyBuilder<O, I> {
        self.settings.unmatched_default = default;
        self
    }

    /// Proxy users a client may present (HTTP `Proxy-Authorization:
    /// Basic`, SOCKS5 username/password) to be known by name, and so given
    /// its profile. A wrong password or an unknown user is refused with a
    /// 407 and recorded; a client that presents nothing goes on unnamed
    /// (unless [`credentials`](Self::credentials) requires one of all).
    pub fn users(
        mut self,
        users: impl IntoIterator<Item = (String, String)>,
    ) -> ProxyBuilder<O, I> {
        self.settings.users = Arc::new(
            users
                .into_iter()
                .map(|(name, password)| (name, transport::Secret(password)))
                .collect(),
        );
        self
    }

    /// The bounds the transports keep (head size, timeouts); see [`Limits`].
    pub fn limits(mut self, limits: Limits) -> ProxyBuilder<O, I> {
        self.settings.limits = limits;
        self
    }

    /// Whether the child's `ALL_PROXY` is the SOCKS5 URL (codex's choice)
    /// instead of the HTTP one (the default; see [`crate::env`]).
    pub fn all_proxy_socks(mut self, socks: bool) -> ProxyBuilder<O, I> {
        self.settings.all_proxy_socks = socks;
        self
    }

    /// Inserts a layer of your own just inside the violation log: it sees
    /// every request, and its refusals are logged. Layers added later sit
    /// further in. See [`DefaultStack::outer`].
    pub fn outer_layer<L>(self, layer: L) -> ProxyBuilder<Stack<L, O>, I> {
        self.map_layers(|outer, inner| (Stack::new(layer, outer), inner))
    }

    /// Inserts a layer of your own just outside the connector: it sees only
    /// requests the policy (and approver) let through. Layers added later
    /// sit further in. See [`DefaultStack::inner`].
    pub fn inner_layer<L>(self, layer: L) -> ProxyBuilder<O, Stack<L, I>> {
        self.map_layers(|outer, inner| (outer, Stack::new(layer, inner)))
    }

    fn map_layers<O2, I2>(self, f: impl FnOnce(O, I) -> (O2, I2)) -> ProxyBuilder<O2, I2> {
        let (outer, inner) = f(self.layers.0, self.layers.1);
        ProxyBuilder {
            settings: self.settings,
            layers: (outer, inner),
        }
    }

    fn clamp(&self, address: SocketAddr, what: &str) -> SocketAddr {
        let loopback = address.ip().is_loopback();
        if loopback || (self.settings.allow_non_loopback && !self.settings.force_loopback) {
            return address;
        }
        let reason = if self.settings.force_loopback {
            "unix socket forwarding is allowed"
        } else {
            "dangerously_allow_non_loopback_proxy is off"
        };
        tracing::warn!(requested = %address, "{what} listener clamped to 127.0.0.1 because {reason}");
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), address.port())
    }

    fn dialer(&self, policy: &PolicyHandle) -> Dialer {
        Dialer::new(
            policy.clone(),
            self.settings.resolver.clone(),
            self.settings.resolve_timeout,
            self.settings.limits.connect_timeout,
            self.settings.own.clone(),
            self.settings.fixes.clone(),
        )
    }

    /// The violation log: counted per reason, published to subscribers,
    /// each record worded for `fixes`.
    fn violation_layer(&self) -> ViolationLogLayer {
        self.violation_layer_worded(&self.settings.fixes)
    }

    /// The same, worded for `fixes` (a profile's).
    fn violation_layer_worded(&self, fixes: &Fixes) -> ViolationLogLayer {
        let layer = self.settings.violations.clone();
        let metrics = self.settings.metrics.clone();
        let refusals = self.settings.refusals.clone();
        let layer = layer.with_sink(move |violation: &portcullis_middleware::Violation| {
            let blocked = &violation.blocked;
            if blocked.decision != portcullis_middleware::BlockDecision::Audit {
                metrics.refused(blocked.reason.as_str(), violation.profile.as_ref());
            }
            if blocked.reason == portcullis_middleware::Reason::SecretDetected {
                let (detector, _) = portcullis_middleware::scan::finding_parts(
                    blocked.rule.as_deref().unwrap_or_default(),
                );
                metrics.secret(detector, blocked.decision.as_str());
            }
            // Copied only when someone listens.
            if refusals.receiver_count() > 0 {
                let _ = refusals.send(violation.clone());
            }
        });
        match fixes {
            Fixes::Keys => layer,
            _ => {
                let fixes = fixes.clone();
                layer.wording(move |blocked| fixes.rephrase(blocked))
            }
        }
    }
}

impl<O, I> ProxyBuilder<O, I>
where
    (O, I): StackLayers,
{
    /// The one composition: the default stack, with your layers, around
    /// `connector`, erased once. The live proxy and `check` both come from
    /// here, so they cannot disagree.
    fn compose(
        &self,
        part: Part<'_>,
        connector: Connector,
        approval: ApprovalWaitLayer<BoxApprover>,
        violations: ViolationLogLayer,
    ) -> ProxyService {
        let base = self.base(part, approval, violations);
        ProxyService::new(self.sensitive_logged(base, connector))
    }

    /// A stack the listeners serve, boxed once: `base` around `connector`,
    /// access-logged (and in the access file, when there is one), its
    /// refusals' messages written for `wording` (a profile's) when given,
    /// so the transport's answer keeps them.
    fn live(
        &self,
        base: DefaultStack<BoxApprover>,
        connector: Connector,
        wording: Option<Fixes>,
    ) -> ProxyService {
        ProxyService::new(
            tower::ServiceBuilder::new()
                .option_layer(wording.map(|fixes| {
                    tower::util::MapErrLayer::new(move |error: BoxError| written_for(error, &fixes))
                }))
                .option_layer(
                    self.settings
                        .access_file
                        .clone()
                        .map(crate::records::AccessFileLayer::new),
                )
                .service(self.sensitive_logged(base, connector)),
        )
    }

    /// The default stack for `part`, configured.
    fn base(
        &self,
        part: Part<'_>,
        approval: ApprovalWaitLayer<BoxApprover>,
        violations: ViolationLogLayer,
    ) -> DefaultStack<BoxApprover> {
        DefaultStack::new(part.policy.clone())
            .violations(violations)
            .approval_layer(approval)
            .ask_on_miss(part.ask)
            .credentials(
                portcullis_middleware::credentials::InjectCredentialsLayer::new(
                    part.injected.clone(),
                ),
            )
    }

    /// `base` with your layers around `connector`, access-logged, with
    /// credentials hidden from traces.
    fn sensitive_logged(
        &self,
        base: DefaultStack<BoxApprover>,
        connector: Connector,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = BoxError,
        Future = impl std::future::Future<Output = Result<Response<Body>, BoxError>> + Send + 'static,
    > + Clone
           + Send
           + 'static {
        // Credentials never show in a log or trace of a request.
        let sensitive = [
            http::header::PROXY_AUTHORIZATION,
            http::header::AUTHORIZATION,
            http::header::COOKIE,
        ];
        // The access log sees every request; refusals it leaves to the
        // violation log inside.
        let logged = tower::ServiceBuilder::new()
            .map_response(|response: Response<_>| response.map(crate::body::boxed))
            .layer(crate::access_log::AccessLogLayer::counting(
                self.settings.metrics.clone(),
            ))
            .service(self.layers.around(base, connector));
        SetSensitiveRequestHeaders::new(logged, sensitive)
    }

    /// The stack the listeners serve, built once by `start` after the
    /// listeners are bound (so the loop guard knows them). Not public: a
    /// stack built before `start` would know no listener and have a pool
    /// of its own; a way in of your own gets the live one from
    /// [`ProxyHandle::ingress`].
    fn build_service(&self) -> Result<ProxyService, StartError> {
        let provider = self.settings.crypto.clone();
        // The system's CAs are read on the first TLS handshake that needs
        // them, not here: most runs never open one.
        let roots = crate::connector::SystemRoots::new(
            self.settings.upstream_roots.clone(),
            provider.clone(),
        );
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(roots))
            .with_no_client_auth();
        let violations = self.violation_layer();
        let approval = self
            .settings
            .approval
            .clone()
            .unwrap_or_else(ApprovalWaitLayer::without_approver);
        let approval_top = match &self.settings.rules {
            Some(rules) => approval.clone().rules(rules.clone()),
            None => approval.clone(),
        };
        let top = Part {
            policy: &self.settings.policy,
            injected: &self.settings.injected,
            ask: self.settings.approval.is_some(),
        };
        let connector = |policy: &PolicyHandle, upstream: Option<Arc<UpstreamProxies>>| {
            Connector::new(self.dialer(policy), tls.clone(), upstream)
        };
        let service = self.live(
            self.base(top, approval_top, violations.clone()),
            connector(&self.settings.policy, self.settings.upstream.clone()),
            None,
        );
        if self.settings.profiles.is_empty() {
            return Ok(service);
        }
        // One stack per profile: its own policy, credentials, approvals
        // and rate buckets; the records, metrics and files are shared.
        let mut stacks = Vec::with_capacity(self.settings.profiles.len());
        for (name, profile) in &self.settings.profiles {
            let ask = profile.ask && self.settings.approval.is_some();
            let approval = if ask {
                approval.for_profile(name)
            } else {
                ApprovalWaitLayer::without_approver()
            };
            let approval = match &profile.rules {
                Some(rules) => approval.rules(rules.clone()),
                None => approval,
            };
            let part = Part {
                policy: &profile.policy,
                injected: &profile.injected,
                ask,
            };
            // Its refusals say which profile refused, and name its keys:
            // in its records, and in the answer.
            let fixes = self.settings.fixes.for_profile(name);
            let base = self.base(part, approval, self.violation_layer_worded(&fixes));
            let upstream = match &profile.upstream {
                Some(upstream) => upstream.clone(),
                None => self.settings.upstream.clone(),
            };
            let stack = self.live(base, connector(&profile.policy, upstream), Some(fixes));
            stacks.push((name.clone(), stack));
        }
        let mut router = Profiles::new(stacks)
            .recording(violations.late())
            .challenge_unnamed(!self.settings.users.is_empty());
        if self.settings.unmatched_default {
            router = router.unmatched(service);
        }
        Ok(match &self.settings.selection {
            Selection::Selector(selector) => ProxyService::new(selector.layer(router)),
            Selection::Custom(wrap) => wrap(router),
        })
    }

    /// The same stack over a connector that resolves and vets but never
    /// dials, and an approval stage that asks nobody: a request answers
    /// `200` when the proxy would let it through, and otherwise fails with
    /// the refusal a live request would get (decision *ask* where an
    /// approver would be asked). Refusals are logged on the tracing target
    /// but not recorded in the configured ring or files. `portcullis check`
    /// is built on this.
    pub fn decision_service(&self) -> ProxyService {
        let approval = match (&self.settings.rules, self.settings.approval.is_some()) {
            (Some(rules), true) => ApprovalWaitLayer::without_approver().rules(rules.clone()),
            _ => ApprovalWaitLayer::without_approver(),
        };
        let top = Part {
            policy: &self.settings.policy,
            injected: &self.settings.injected,
            ask: self.settings.approval.is_some(),
        };
        self.compose(
            top,
            Connector::vet_only(self.dialer(&self.settings.policy)),
            approval,
            ViolationLogLayer::new(ViolationRing::new(0)),
        )
    }

    /// Binds the listeners (before anything else starts), then serves them.
    pub async fn start(mut self) -> Result<ProxyHandle, StartError> {
        let http_addr = self.clamp(self.settings.http_addr, "HTTP");
        let http = TcpListener::bind(http_addr)
            .await
            .map_err(|source| StartError::Bind {
                listener: "HTTP",
                address: http_addr,
                source,
            })?;
        let socks = match self.settings.socks_addr {
            Some(address) => {
                let address = self.clamp(address, "SOCKS5");
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| StartError::Bind {
                            listener: "SOCKS5",
                            address,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let metrics = match self.settings.metrics_addr {
            Some(address) => {
                let address = crate::metrics::check_address(
                    address,
                    self.settings.metrics_beyond_loopback,
                    self.settings.metrics_token.is_some(),
                )
                .map_err(StartError::Metrics)?;
                if !address.ip().is_loopback() {
                    tracing::warn!(
                        %address,
                        "the metrics listener is beyond loopback ([metrics] dangerously_allow_non_loopback): every scrape must send the bearer token"
                    );
                }
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| StartError::Bind {
                            listener: "metrics",
                            address,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let local = |listener: &TcpListener, fallback| listener.local_addr().unwrap_or(fallback);
        let http_addr = local(&http, http_addr);
        let socks_addr = socks.as_ref().map(|l| local(l, http_addr));
        let metrics_addr = metrics.as_ref().map(|l| local(l, http_addr));
        // Every listener is never a destination, the metrics one included.
        let listening: Vec<SocketAddr> = std::iter::once(http_addr)
            .chain(socks_addr)
            .chain(metrics_addr)
            .collect();
        self.settings.own = OwnListeners::new(&listening);
        // The approvals waiting, read by the metrics (the layer holds the
        // approver, which is Send but not Sync).
        let pending: Arc<dyn Fn() -> usize + Send + Sync> = {
            let approval = std::sync::Mutex::new(self.settings.approval.clone());
            Arc::new(move || {
                approval
                    .lock()
                    .ok()
                    .and_then(|a| a.as_ref().map(|a| a.pending()))
                    .unwrap_or(0)
            })
        };
        let telemetry = match &self.settings.telemetry {
            Some(settings) => {
                let telemetry = crate::telemetry::Telemetry::start(
                    settings,
                    self.settings.metrics.clone(),
                    pending.clone(),
                )?;
                // Every refusal and audit, and (unless turned off) every
                // allowed request, leaves as OTLP too.
                self.settings.violations = self
                    .settings
                    .violations
                    .clone()
                    .with_sink(crate::records::OcsfExport::new(telemetry.clone()));
                if telemetry.exports_access() {
                    let records = self
                        .settings
                        .access_file
                        .take()
                        .unwrap_or_else(crate::records::AccessFile::none);
                    self.settings.access_file = Some(records.exporting(telemetry.clone()));
                }
                tracing::info!(endpoint = %settings.endpoint, protocol = settings.protocol.as_str(), "exporting records and metrics over OTLP");
                Some(telemetry)
            }
            None => None,
        };
        let service = self.build_service()?;
        let ca_files = match &self.settings.mitm {
            Some(ca) => Some(transport::mitm::trust_files(ca)?),
            None => None,
        };
        let interceptor = self.settings.mitm.clone().map(|ca| {
            Arc::new(Interceptor::new(
                ca,
                self.settings.crypto.clone(),
                self.settings.leaf_cache_size,
            ))
        });
        let shutdown = Shutdown::new();
        if let Some(listener) = metrics {
            tokio::spawn(crate::metrics::serve(
                listener,
                self.settings.metrics.clone(),
                pending,
                self.settings.metrics_token.clone(),
                {
                    let mut signal = shutdown.signal();
                    async move { signal.wait().await }
                },
            ));
        }
        let credentials = LiveCredentials::default();
        credentials.store_all(
            self.settings.credentials.clone(),
            self.settings.users.clone(),
        );
        let settings = transport::http1::Settings {
            interceptor: interceptor.clone(),
            own: self.settings.own.clone(),
            limits: self.settings.limits,
            credentials: credentials.clone(),
            refusals: Some(self.violation_layer().late()),
            metrics: self.settings.metrics.clone(),
            fixes: self.settings.fixes.clone(),
        };
        let ingress_service = service.clone();
        tokio::spawn(transport::http1::serve(
            http,
            service.clone(),
            settings,
            shutdown.signal(),
            shutdown.guard(),
        ));
        if let Some(socks) = socks {
            let settings = transport::socks5::Settings {
                udp: self.settings.socks_udp,
                policy_generation: self.settings.policy.generation_counter(),
                limits: self.settings.limits,
                credentials: credentials.clone(),
                udp_budget: Arc::default(),
                metrics: self.settings.metrics.clone(),
            };
            tokio::spawn(transport::socks5::serve(
                socks,
                service,
                settings,
                shutdown.signal(),
                shutdown.guard(),
            ));
        }
        tracing::info!(http = %http_addr, socks = ?socks_addr, metrics = ?metrics_addr, "portcullis listening");
        Ok(ProxyHandle {
            http_addr,
            socks_addr,
            metrics_addr,
            shutdown,
            violations: self.settings.violations.ring().clone(),
            violation_log: self.settings.violations.clone(),
            access_file: self.settings.access_file,
            telemetry,
            child_variables: self.settings.child_variables,
            policy: self.settings.policy,
            ca_files,
            credentials,
            all_proxy_socks: self.settings.all_proxy_socks,
            service: ingress_service,
            refusals: self.settings.refusals.clone(),
            limits: self.settings.limits,
            metrics: self.settings.metrics.clone(),
            interceptor,
            fixes: self.settings.fixes.clone(),
            own: self.settings.own.clone(),
            profiles: self
                .settings
                .profiles
                .iter()
                .map(|(name, profile)| (name.clone(), profile.policy.clone()))
                .collect(),
            selector: match &self.settings.selection {
                Selection::Selector(selector) => Some(selector.clone()),
                Selection::Custom(_) => None,
            },
            upstreams: (
                self.settings.upstream.clone(),
                self.settings
                    .profiles
                    .iter()
                    .filter_map(|(name, profile)| Some((name.clone(), profile.upstream.clone()??)))
                    .collect(),
            ),
        })
    }
}

/// A running proxy. Dropping it stops the listeners; [`ProxyHandle::shutdown`]
/// also waits for open connections and tunnels to finish.
#[derive(Debug)]
pub struct ProxyHandle {
    http_addr: SocketAddr,
    socks_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    shutdown: Shutdown,
    ca_files: Option<CaFiles>,
    credentials: LiveCredentials,
    all_proxy_socks: bool,
    violations: ViolationRing,
    /// The violation log, to flush its sinks at shutdown.
    violation_log: ViolationLogLayer,
    /// The access file, to flush at shutdown.
    access_file: Option<crate::records::AccessFile>,
    /// The OTLP exporter, to send what is queued at shutdown.
    telemetry: Option<crate::telemetry::Telemetry>,
    /// Placeholders a child gets; variables it must not inherit.
    child_variables: (Vec<(String, String)>, Vec<String>),
    policy: PolicyHandle,
    /// The very stack the listeners serve (loop guard, pool and all).
    service: ProxyService,
    refusals: tokio::sync::broadcast::Sender<portcullis_middleware::Violation>,
    limits: Limits,
    metrics: Arc<crate::metrics::Metrics>,
    /// HTTPS interception, for a transport started later (capture).
    interceptor: Option<Arc<Interceptor>>,
    fixes: Fixes,
    /// The loop guard's listeners, which a way in of yours joins.
    own: OwnListeners,
    /// Each profile's live policy.
    profiles: std::collections::BTreeMap<String, PolicyHandle>,
    /// The built-in profile selector, when it chooses.
    selector: Option<SelectProfileLayer>,
    /// The upstream proxies the connectors chain through.
    upstreams: Upstreams,
}

/// The top level's upstream proxies (when it may chain), and those of the
/// profiles that have their own.
pub(crate) type Upstreams = (
    Option<Arc<UpstreamProxies>>,
    std::collections::BTreeMap<String, Arc<UpstreamProxies>>,
);

impl ProxyHandle {
    /// Interception, when this proxy has a CA.
    pub(crate) fn interceptor(&self) -> Option<Arc<Interceptor>> {
        self.interceptor.clone()
    }

    /// How an intercepted tunnel answers.
    pub(crate) fn answers(&self) -> transport::mitm::Answers {
        transport::mitm::Answers {
            limits: self.limits,
            fixes: self.fixes.clone(),
            metrics: self.metrics.clone(),
            drain: None,
        }
    }

    /// This proxy's counters.
    pub(crate) fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.metrics.clone()
    }

    /// The HTTP listener's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The SOCKS5 listener's address, when SOCKS5 is on.
    pub fn socks_addr(&self) -> Option<SocketAddr> {
        self.socks_addr
    }

    /// The metrics listener's address, when one was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
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
        let current = self.credentials.current();
        let credentials = current
            .as_ref()
            .and_then(|accounts| accounts.main.as_ref())
            .map(|c| (c.username.as_str(), c.password.as_str()));
        let mut env = crate::env::proxy_env(&crate::env::ProxyEnv {
            http: self.http_addr,
            socks: self.socks_addr,
            ca: self.ca_files.as_ref(),
            credentials,
            all_proxy_socks: self.all_proxy_socks,
        });
        env.extend(self.child_variables.0.iter().cloned());
        env
    }

    /// Variables a child must not inherit from this process: the ones a
    /// credential's secret is read from (`source.env`).
    pub fn child_env_removed(&self) -> &[String] {
        &self.child_variables.1
    }

    /// Changes the credential clients must present (`None`: none), from
    /// the next SOCKS5 connection and the next HTTP request on. Tunnels and
    /// connections already authenticated are not cut.
    pub fn set_credentials(&self, credentials: Option<(String, String)>) {
        self.credentials
            .store(credentials.map(|(username, password)| Credentials { username, password }));
    }

    /// Every refusal from now on, as it is recorded (the same ones the
    /// violation log and ring see), for as long as the receiver is kept. A
    /// receiver that falls more than 1,024 refusals behind skips the oldest
    /// and is told how many (`RecvError::Lagged`).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<portcullis_middleware::Violation> {
        self.refusals.subscribe()
    }

    /// What a way in of your own needs: this proxy's own stack (the same
    /// loop guard, policy, violation log and connection pool as its
    /// listeners), its shutdown, its tunnel relay. See [`crate::kit`].
    pub fn ingress(&self) -> crate::kit::Ingress {
        crate::kit::Ingress::new(
            self.service.clone(),
            self.shutdown.guard(),
            self.shutdown.signal(),
            self.limits,
            self.metrics.clone(),
            self.own.clone(),
            self.fixes.clone(),
        )
    }

    /// The live policy of the profile `name`, if this proxy has it.
    pub fn profile_policy(&self, name: &str) -> Option<&PolicyHandle> {
        self.profiles.get(name)
    }

    /// The profiles' names.
    pub fn profile_names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    /// Replaces who gets which profile, from the next request on (a proxy
    /// whose profiles a layer of yours chooses has no selector: `false`).
    pub fn set_profile_selector(&self, selector: ProfileSelector) -> bool {
        match &self.selector {
            Some(layer) => {
                layer.store(selector);
                true
            }
            None => false,
        }
    }

    /// Replaces the proxy users and the credential every client must
    /// present, at once, from the next SOCKS5 connection and HTTP request.
    pub fn set_accounts(
        &self,
        credentials: Option<(String, String)>,
        users: impl IntoIterator<Item = (String, String)>,
    ) {
        let users = users
            .into_iter()
            .map(|(name, password)| (name, transport::Secret(password)))
            .collect();
        self.credentials.store_all(
            credentials.map(|(username, password)| Credentials { username, password }),
            Arc::new(users),
        );
    }

    /// The live upstream proxies, for the reloader.
    pub(crate) fn upstream_handles(&self) -> Upstreams {
        self.upstreams.clone()
    }

    /// Each profile's live policy and the selector, for the reloader.
    pub(crate) fn profile_handles(
        &self,
    ) -> (
        std::collections::BTreeMap<String, PolicyHandle>,
        Option<SelectProfileLayer>,
    ) {
        (self.profiles.clone(), self.selector.clone())
    }

    /// The credential handle itself, for the reloader.
    pub(crate) fn live_credentials(&self) -> LiveCredentials {
        self.credentials.clone()
    }

    /// Stops accepting, lets connections and tunnels finish for up to
    /// `deadline`, then returns how many were still open (they are cut).
    /// Dropping the handle stops accepting too.
    pub async fn shutdown(self, deadline: Duration) -> usize {
        let started = std::time::Instant::now();
        let cut = self.shutdown.drain(deadline).await;
        if !cut.is_empty() {
            tracing::warn!(
                cut = cut.len(),
                "shutdown deadline ({deadline:?}) reached: {} open connection(s) or tunnel(s) cut",
                cut.len()
            );
            const NAMED: usize = 20;
            for name in cut.iter().take(NAMED) {
                tracing::warn!("cut at the shutdown deadline: {name}");
            }
            if cut.len() > NAMED {
                tracing::warn!(
                    "cut at the shutdown deadline: and {} more",
                    cut.len() - NAMED
                );
            }
        }
        // Every refusal recorded is stored before the proxy is gone.
        let log = self.violation_log.clone();
        let access = self.access_file.clone();
        let telemetry = self.telemetry.clone();
        // What the OTLP exporter holds goes within what is left of the
        // deadline (at least a second: a deadline spent on draining must
        // not lose the records of the requests it drained).
        let left = deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        let _ = tokio::task::spawn_blocking(move || {
            log.flush();
            if let Some(access) = access {
                access.flush();
            }
            if let Some(telemetry) = telemetry {
                telemetry.shutdown(left);
            }
        })
        .await;
        cut.len()
    }
}
