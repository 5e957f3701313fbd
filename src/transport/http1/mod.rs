//! The HTTP/1 listener: absolute-form requests, `CONNECT`, and
//! `x-unix-socket` requests, each parsed once into the request model and
//! sent through the one stack.
//!
//! | request | target | protocol |
//! | --- | --- | --- |
//! | `GET http://host:port/path` | the URI authority (a disagreeing `Host` is a 400) | `http` |
//! | `CONNECT host:port` (port 443 when absent) | the authority | `https_connect` |
//! | any method with `x-unix-socket: /abs/path` | the socket path | `unix_socket` |
//! | origin-form (`GET /path`) without `x-unix-socket` | — | 400: not a reverse proxy |
//!
//! Errors from the stack become answers in [`rescue`] and nowhere else.

pub(crate) mod rescue;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use portcullis_middleware::strip_headers::is_upgrade;
use portcullis_middleware::target::default_port_for_scheme;
use portcullis_middleware::{
    CameRound, HeldWhileOpen, Intercept, Interceptable, Protocol, ProxyUser, Target,
};

use crate::body::{self, Body};
use crate::connector::{KeptUpstream, OwnListeners, Tunnel};
use crate::hints::Fixes;
use crate::transport::mitm::{self, Interceptor};
use crate::transport::model::RequestModel;
use crate::transport::{
    accept_loop, call_stack, splice, unix, Accounts, DrainGuard, Limits, Listening,
    LiveCredentials, Peer, ProxyService, ShutdownSignal,
};

/// What the HTTP/1 listener needs besides the stack.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// HTTPS interception, when `mitm` is on: offered on every CONNECT,
    /// used when the stack asks for it.
    pub(crate) interceptor: Option<Arc<Interceptor>>,
    /// Who we are: a request whose `Via` names us has come round a loop.
    pub(crate) own: OwnListeners,
    /// Head size and count, timeouts.
    pub(crate) limits: Limits,
    /// When set, every request must carry them in `Proxy-Authorization`.
    pub(crate) credentials: LiveCredentials,
    /// Where a request refused for a wrong credential is recorded.
    pub(crate) refusals: Option<portcullis_middleware::RecordLater>,
    /// This proxy's counters.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// How refusals are worded in the answers.
    pub(crate) fixes: Fixes,
}

/// Accepts connections until shutdown, serving each on its own task.
pub(crate) async fn serve(
    listener: TcpListener,
    stack: ProxyService,
    settings: Settings,
    shutdown: ShutdownSignal,
    drain: DrainGuard,
) {
    let settings = Arc::new(settings);
    let signal = shutdown.clone();
    let max_connections = settings.limits.max_connections;
    accept_loop(
        listener,
        signal,
        drain,
        Listening {
            what: "HTTP",
            max_connections,
            metrics: settings.metrics.clone(),
        },
        move |stream, client, drain| {
            let stack = stack.clone();
            let settings = settings.clone();
            let limits = settings.limits;
            let mut shutdown = shutdown.clone();
            async move {
                let service_drain = drain.clone();
                // This connection's own origin connection for plain HTTP.
                let kept = KeptUpstream::default();
                let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                    request.extensions_mut().insert(kept.clone());
                    let route = route(
                        request,
                        client,
                        stack.clone(),
                        service_drain.clone(),
                        settings.clone(),
                    );
                    async move { Ok::<_, Infallible>(route.await.unwrap_or_else(|refused| refused)) }
                });
                let connection = crate::transport::http1_server(&limits)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                tokio::pin!(connection);
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%error, %client, "HTTP connection ended with an error");
                        }
                    }
                    () = shutdown.wait() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
                drop(drain);
            }
        },
        refuse_busy,
    )
    .await;
}

/// Past the connection limit: a 503 saying so, then close.
async fn refuse_busy(mut stream: tokio::net::TcpStream) {
    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &rescue::busy_bytes()).await;
}

/// Handles one request; an `Err` is an answer of the transport's own.
async fn route(
    mut request: Request<Incoming>,
    client: SocketAddr,
    stack: ProxyService,
    drain: DrainGuard,
    settings: Arc<Settings>,
) -> Result<Response<Body>, Response<Body>> {
    if crate::transport::head_over_limits(&request, &settings.limits) {
        return Err(rescue::head_too_large(&settings.limits));
    }
    let user = match settings.credentials.current() {
        Some(accounts) => match authorized(&request, &accounts) {
            Authorized::User(user) => Some(ProxyUser(user)),
            Authorized::Nobody if !accounts.required() => None,
            Authorized::Nobody => return Err(rescue::authentication_required()),
            Authorized::Refused(attempted) => {
                // A credential that is not a user's: on the record (a
                // client that sent none is only asked for one).
                refuse_credential(&request, client, attempted, &settings);
                return Err(rescue::authentication_required());
            }
        },
        None => None,
    };
    // The stack's loop guard refuses a request that came round, on the
    // record like any refusal.
    let came_round = came_round(&request, &settings.own).then(|| CameRound {
        rule: "Via names this proxy".to_owned(),
    });
    let model = |target, protocol| {
        let model = RequestModel::new(target, protocol, client).user(user.clone());
        match came_round.clone() {
            Some(mark) => model.mark(mark),
            None => model,
        }
    };
    if request.method() == Method::CONNECT {
        let target = connect_target(&request).map_err(|m| rescue::bad_request(&m))?;
        let on_upgrade = hyper::upgrade::on(&mut request);
        let (parts, _) = request.into_parts();
        let mut request = Request::from_parts(parts, body::empty());
        // We offer to intercept when we can; a layer decides (limited mode
        // asks, to see methods) and says so in the response.
        let mut model = model(target.clone(), Protocol::HttpsConnect);
        if settings.interceptor.is_some() {
            model = model.mark(Interceptable);
        }
        model.apply(&mut request);
        let mut response = call(stack.clone(), request, &settings.fixes).await?;
        let Some(upstream) = response
            .extensions_mut()
            .remove::<Tunnel>()
            .and_then(|u| u.take())
        else {
            return Ok(response);
        };
        // A place under a concurrency cap: kept while the tunnel is open.
        let held = response.extensions_mut().remove::<HeldWhileOpen>();
        let interceptor = match response.extensions().get::<Intercept>() {
            Some(Intercept) => match settings.interceptor.clone() {
                Some(interceptor) => Some(interceptor),
                // Asked without our offer: never relay it opaquely.
                None => return Err(rescue::cannot_intercept()),
            },
            None => None,
        };
        let tunnel = drain.open(format!("CONNECT tunnel from {client} to {target}"));
        drop(drain);
        tokio::spawn(async move {
            match (on_upgrade.await, interceptor) {
                (Ok(upgraded), None) => {
                    let idle = settings.limits.tunnel_idle_timeout;
                    if let Some(moved) =
                        splice_upgraded(upgraded, upstream, idle, &settings.metrics).await
                    {
                        moved.log(client, &target);
                    }
                }
                (Ok(upgraded), Some(interceptor)) => {
                    // The dial proved the origin reachable; requests inside
                    // go through the stack and the connector's own pool.
                    drop(upstream);
                    let io = TokioIo::new(upgraded);
                    let answers = mitm::Answers {
                        limits: settings.limits,
                        fixes: settings.fixes.clone(),
                        metrics: settings.metrics.clone(),
                        drain: Some(tunnel.clone()),
                    };
                    let peer = Peer { addr: client, user };
                    // Boxed: interception's state is large, and inline it
                    // would size every opaque tunnel's task too (7.7 KiB a
                    // held tunnel, against 4 KiB with it boxed).
                    Box::pin(mitm::serve(io, target, peer, interceptor, stack, answers)).await;
                }
                (Err(error), _) => tracing::debug!(%error, "CONNECT upgrade failed"),
            }
            drop((tunnel, held));
        });
        return Ok(Response::new(body::empty()));
    }

    let (target, protocol) = if let Some(value) = request.headers().get(unix::X_UNIX_SOCKET) {
        let target = unix::target(value)
            .await
            .map_err(|bad| rescue::bad_request(&bad.message))?;
        (target, Protocol::UnixSocket)
    } else {
        (
            absolute_form_target(&request).map_err(|m| rescue::bad_request(&m))?,
            Protocol::Http,
        )
    };

    let client_upgrade = is_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
    let (parts, incoming) = request.into_parts();
    let has_body = !hyper::body::Body::is_end_stream(&incoming);
    let mut request = Request::from_parts(
        parts,
        body::client_body(
            incoming,
            settings.limits.body_idle_timeout,
            settings.limits.body_min_rate,
        ),
    );
    let name = client_upgrade
        .as_ref()
        .map(|_| format!("upgraded connection from {client} to {target}"));
    model(target, protocol)
        .has_body(has_body)
        .apply(&mut request);
    let asked_upgrade = client_upgrade.is_some();
    let mut response = match call(stack, request, &settings.fixes).await {
        Ok(response) => response,
        // An upgrade that failed leaves nothing to keep the connection for.
        Err(refused) if asked_upgrade => return Err(crate::transport::closing(refused)),
        Err(refused) => return Err(refused),
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let relay = crate::transport::websocket::Relay::of(&response);
            let upgraded = drain.open(name.unwrap_or_default());
            let held = response.extensions_mut().remove::<HeldWhileOpen>();
            tokio::spawn(async move {
                let idle = settings.limits.tunnel_idle_timeout;
                // (Logged by the access layer at its 101; the bytes are
                // counted in the metrics.)
                splice::upgraded(
                    client_upgrade,
                    upstream_upgrade,
                    relay,
                    idle,
                    &settings.metrics,
                )
                .await;
                drop((upgraded, held));
            });
        }
    }
    Ok(response)
}

async fn call(
    stack: ProxyService,
    request: Request<Body>,
    fixes: &Fixes,
) -> Result<Response<Body>, Response<Body>> {
    match call_stack(stack, request).await {
        Ok(response) => Ok(response),
        Err(error) => Err(rescue::http_response(&error, fixes)),
    }
}

/// Splices a CONNECT client to its upstream. When the upgraded connection
/// is our own TCP stream (always, with hyper's HTTP/1 server), it is taken
/// back so both sides are plain sockets; bytes the client sent early are
/// forwarded first.
async fn splice_upgraded(
    upgraded: hyper::upgrade::Upgraded,
    upstream: tokio::net::TcpStream,
    idle: Duration,
    metrics: &crate::metrics::Metrics,
) -> Option<splice::Moved> {
    match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
        Ok(parts) => {
            let client = parts.io.into_inner();
            let mut upstream = upstream;
            if !parts.read_buf.is_empty() {
                if let Err(error) =
                    tokio::io::AsyncWriteExt::write_all(&mut upstream, &parts.read_buf).await
                {
                    tracing::debug!(%error, "tunnel closed with an error");
                    return None;
                }
            }
            drop(parts.read_buf);
            Some(splice::tcp(&client, &upstream, idle, metrics).await)
        }
        Err(upgraded) => {
            let mut upstream = upstream;
            Some(
                splice::bidirectional(&mut TokioIo::new(upgraded), &mut upstream, idle, metrics)
                    .await,
            )
        }
    }
}

/// What a request's `Proxy-Authorization` says of its client.
enum Authorized {
    /// A known user's credential.
    User(String),
    /// No credential.
    Nobody,
    /// A credential that is no user's (the username it gave, if any).
    Refused(Option<String>),
}

/// Reads `Proxy-Authorization: Basic` against the accounts.
fn authorized<B>(request: &Request<B>, accounts: &Accounts) -> Authorized {
    use base64::Engine;
    let Some(value) = request.headers().get(header::PROXY_AUTHORIZATION) else {
        return Authorized::Nobody;
    };
    let Some((scheme, encoded)) = value.to_str().ok().and_then(|v| v.trim().split_once(' ')) else {
        return Authorized::Refused(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Authorized::Refused(None);
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return Authorized::Refused(None);
    };
    let decoded = String::from_utf8_lossy(&decoded);
    match decoded.split_once(':') {
        Some((username, password)) if accounts.accept(username, password) => {
            Authorized::User(username.to_owned())
        }
        Some((username, _)) => Authorized::Refused(Some(username.to_owned())),
        None => Authorized::Refused(None),
    }
}

/// Records a request refused for a credential no user has (when its
/// destination can be read).
fn refuse_credential<B>(
    request: &Request<B>,
    client: SocketAddr,
    attempted: Option<String>,
    settings: &Settings,
) {
    let Some(recorder) = &settings.refusals else {
        return;
    };
    let (target, protocol) = if request.method() == Method::CONNECT {
        (connect_target(request), Protocol::HttpsConnect)
    } else {
        (absolute_form_target(request), Protocol::Http)
    };
    let Ok(target) = target else {
        return;
    };
    let blocked = portcullis_middleware::profiles::credential_refused(
        target,
        protocol,
        request.method(),
        attempted.as_deref(),
    );
    let user = attempted.map(ProxyUser);
    recorder.record_as(Some(client), user.as_ref(), None, &blocked);
}

/// Whether the request's `Via` names this proxy: it was sent out through an
/// upstream proxy and has come back.
fn came_round<B>(request: &Request<B>, own: &OwnListeners) -> bool {
    request
        .headers()
        .get_all(header::VIA)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| own.seen_in(value))
}

fn connect_target<B>(request: &Request<B>) -> Result<Target, String> {
    let uri = request.uri();
    if uri.scheme().is_some()
        || uri
            .path_and_query()
            .is_some_and(|p| !p.as_str().is_empty() && p.as_str() != "/")
    {
        return Err("CONNECT needs an authority-form target (CONNECT host:port)".to_owned());
    }
    let authority = uri
        .authority()
        .ok_or_else(|| "CONNECT needs an authority-form target (CONNECT host:port)".to_owned())?;
    Target::parse_authority(authority.as_str(), Some(443))
        .map_err(|e| format!("invalid CONNECT target: {e}"))
}

fn absolute_form_target<B>(request: &Request<B>) -> Result<Target, String> {
    let uri = request.uri();
    let Some(scheme) = uri.scheme_str() else {
        return Err("portcullis is a forward proxy: send absolute-form requests (GET http://host/path), for example by setting HTTP_PROXY".to_owned());
    };
    let target = Target::from_uri(uri).map_err(|e| format!("invalid request target: {e}"))?;
    // The common case: one Host header, the same text as the target's
    // authority; the same text parses to the same target, so it is not
    // parsed again.
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    if let (Some(host), None, Some(authority)) = (hosts.next(), hosts.next(), uri.authority()) {
        if host.as_bytes() == authority.as_str().as_bytes() {
            return Ok(target);
        }
    }
    let default_port = default_port_for_scheme(scheme).map_err(|e| e.to_string())?;
    if let Some(host_target) = crate::transport::host_header(request, default_port)? {
        if host_target != target {
            return Err(format!(
                "the Host header ({host_target}) does not match the request target ({target})"
            ));
        }
    }
    Ok(target)
}
