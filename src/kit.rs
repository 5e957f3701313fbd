//! The transport kit: what a way into the proxy needs, public, so a new
//! ingress can be written outside this crate and get exactly the decisions
//! the built-in ones get (see `examples/custom_transport.rs`).
//!
//! A transport parses its own wire, then:
//!
//! 1. builds the [`RequestModel`] — [`connect`](RequestModel::connect)
//!    for a byte stream to a target (or [`apply`](RequestModel::apply) it
//!    to an HTTP request it parsed), with a [`Protocol`](crate::middleware::Protocol)
//!    ([`Protocol::Custom`](crate::middleware::Protocol::Custom) for a
//!    protocol of its own) and the marks only
//!    it can know; the built-in transports and `check` go through the same
//!    step;
//! 2. drives the running proxy's own stack through an [`Ingress`]
//!    ([`ProxyHandle::ingress`](crate::ProxyHandle::ingress)): the same loop guard, policy, approvals,
//!    violation log and connection pool as every other way in;
//! 3. on success of a `CONNECT`-shaped request, takes the dialled stream
//!    from the response's [`Tunnel`] extension and [`relay`](Ingress::relay)s
//!    the client to it (the idle timeout and counters of the proxy), or
//!    [`relay_stream`](Ingress::relay_stream)s any stream, with the bytes it
//!    already read sent first;
//! 4. on failure, answers with its wire's words for the error:
//!    [`Ingress::http_response`] or [`socks5_reply_code`] for the built-in
//!    wires, or its own from [`find_blocked`](crate::middleware::find_blocked)
//!    and [`Ingress::refusal_message`].
//!
//! It registers its listener with [`Ingress::listening_on`], so the loop
//! guard refuses what would come back to it; decides by what a client
//! sends first with [`peek_at_least`]; joins graceful shutdown by stopping
//! its accept loop when [`Ingress::stopping`] resolves and holding a guard
//! from [`Ingress::open`] for each connection (`ProxyHandle::shutdown`
//! waits for them, as it waits for its own listeners'); and is unit-tested
//! against a mock stack with [`Ingress::standalone`] (see
//! `examples/sni_passthrough.rs` and its test).
//!
//! A layer in the stack must make a `Clone + Send` service with a `Send`
//! future ([`StackLayers`](crate::StackLayers) names the requirement for
//! generic code); tower's `Buffer` makes one of a service that is not
//! `Clone`: `ServiceBuilder::new().buffer(1024)`, with tower's `buffer`
//! feature enabled in your `Cargo.toml` (`tower = { version = "0.5",
//! features = ["buffer"] }`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::{Service, ServiceExt};

use portcullis_middleware::BoxError;

use crate::body::Body;
use crate::connector::OwnListeners;
use crate::metrics::Metrics;
use crate::transport::{self, Limits, ProxyService, Shutdown};

pub use crate::connector::Tunnel;
pub use crate::transport::model::RequestModel;
pub use crate::transport::{DrainGuard, ShutdownSignal};

/// The HTTP answer to an error from the stack: a refusal's 403 with its
/// JSON body and `x-proxy-error`, a 400, a 502 or 504, as the built-in
/// HTTP transport answers — the refusal worded by config keys
/// ([`Fixes::Keys`](crate::hints::Fixes::Keys)).
/// [`Ingress::http_response`] words it as the running proxy does.
pub fn http_response(error: &BoxError) -> Response<Body> {
    transport::http1::rescue::http_response(error, &crate::hints::Fixes::Keys)
}

/// The SOCKS5 reply code for an error from the stack (0x02 for a refusal,
/// 0x01, 0x03–0x06 for the rest), as the built-in SOCKS5 transport replies.
pub fn socks5_reply_code(error: &BoxError) -> u8 {
    transport::socks5::rescue::reply(error).as_u8()
}

/// A running proxy's stack and shutdown, for a way in of your own; made by
/// [`ProxyHandle::ingress`](crate::ProxyHandle::ingress). Shutdown waits
/// until every `Ingress` is dropped and every guard from
/// [`open`](Ingress::open) is gone. Cloning is cheap (one per connection
/// task); each clone holds the proxy's shutdown open until dropped.
#[derive(Debug, Clone)]
pub struct Ingress {
    /// Behind a lock only to be cloned: the type-erased stack is `Send`
    /// but not `Sync`, and an `Ingress` borrowed across an `.await` must
    /// keep the future `Send`.
    service: Arc<Mutex<ProxyService>>,
    drain: DrainGuard,
    signal: ShutdownSignal,
    limits: Limits,
    metrics: Arc<Metrics>,
    own: OwnListeners,
    fixes: crate::hints::Fixes,
}

impl Ingress {
    pub(crate) fn new(
        service: ProxyService,
        drain: DrainGuard,
        signal: ShutdownSignal,
        limits: Limits,
        metrics: Arc<Metrics>,
        own: OwnListeners,
        fixes: crate::hints::Fixes,
    ) -> Ingress {
        Ingress {
            service: Arc::new(Mutex::new(service)),
            drain,
            signal,
            limits,
            metrics,
            own,
            fixes,
        }
    }

    /// The HTTP answer to an error from the stack, as [`http_response`],
    /// the refusal worded as this proxy words them
    /// ([`ProxyBuilder::refusal_fixes`](crate::ProxyBuilder::refusal_fixes)).
    pub fn http_response(&self, error: &BoxError) -> Response<Body> {
        transport::http1::rescue::http_response(error, &self.fixes)
    }

    /// A refusal's message worded as this proxy words them, for an answer
    /// in your wire's own words (`blocked.message` holds the middleware's,
    /// which names config keys).
    pub fn refusal_message(&self, blocked: &portcullis_middleware::Blocked) -> String {
        self.fixes.message(blocked)
    }

    /// An `Ingress` over `service` instead of a running proxy's stack: a
    /// test seam, so a way in of your own can be unit-tested against a
    /// `tower_test::mock::pair` (or any stand-in) without sockets to a real
    /// stack. Default limits, metrics of its own, no loop guard. The
    /// [`StandaloneShutdown`] does for it what `ProxyHandle::shutdown`
    /// does for a proxy's.
    pub fn standalone<S>(service: S) -> (Ingress, StandaloneShutdown)
    where
        S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let shutdown = Shutdown::new();
        let service = ProxyService::new(service.map_err(Into::into));
        let ingress = Ingress::new(
            service,
            shutdown.guard(),
            shutdown.signal(),
            Limits::default(),
            Arc::new(Metrics::new()),
            OwnListeners::default(),
            crate::hints::Fixes::default(),
        );
        (ingress, StandaloneShutdown(shutdown))
    }

    /// Tells the proxy's loop guard that a listener of yours is bound at
    /// `address`: a request whose destination reaches it (that address, or
    /// its port on loopback or any of this host's addresses when it is
    /// bound to all of them) is refused as a loop, as for the proxy's own
    /// listeners. Counts while the returned guard lives: drop it when the
    /// listener closes, and register the new address when it is rebound.
    pub fn listening_on(&self, address: SocketAddr) -> Listening {
        Listening {
            number: self.own.register(address),
            own: self.own.clone(),
        }
    }

    /// The proxy's own stack (loop guard, policy, approvals, violation
    /// log, connector and its pool), type-erased.
    pub fn service(&self) -> ProxyService {
        self.service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Drives the stack with one request; the future is `Send`, so it can
    /// be awaited inside `tokio::spawn`.
    pub fn call(
        &self,
        request: Request<Body>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>> {
        transport::call_stack(self.service(), request)
    }

    /// A guard to hold while a connection or tunnel is open: shutdown
    /// waits for it, and names it (`name`) if its deadline cuts it.
    pub fn open(&self, name: impl Into<String>) -> DrainGuard {
        self.drain.open(name.into())
    }

    /// Resolves when the proxy starts shutting down: stop accepting then.
    pub async fn stopping(&self) {
        self.signal.clone().wait().await;
    }

    /// Relays bytes both ways between a client and the upstream a
    /// [`Tunnel`] gave, until both ends close or nothing moves for the
    /// proxy's tunnel idle timeout; returns the bytes moved (to the
    /// upstream, to the client). Counted in the proxy's metrics. Between
    /// two TCP sockets it copies small reads and splices bulk in the kernel
    /// (Linux); [`relay_stream`](Self::relay_stream) takes any stream.
    pub async fn relay(&self, client: &TcpStream, upstream: &TcpStream) -> (u64, u64) {
        let moved = transport::splice::tcp(
            client,
            upstream,
            self.limits.tunnel_idle_timeout,
            &self.metrics,
        )
        .await;
        (moved.up, moved.down)
    }

    /// As [`relay`](Self::relay), for any client and upstream streams (a
    /// TLS stream, a `Unix` socket, a stream behind a PROXY-protocol
    /// header), first sending the upstream `already_read`: the bytes a way
    /// in read from the client before it knew where they go (a PROXY line
    /// it consumed is not among them; a ClientHello it only peeked at is
    /// still in the stream). The bytes moved count `already_read`.
    pub async fn relay_stream<C, U>(
        &self,
        client: &mut C,
        already_read: &[u8],
        upstream: &mut U,
    ) -> (u64, u64)
    where
        C: AsyncRead + AsyncWrite + Unpin + ?Sized,
        U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        if !already_read.is_empty() && upstream.write_all(already_read).await.is_err() {
            return (0, 0);
        }
        let moved = transport::splice::bidirectional(
            client,
            upstream,
            self.limits.tunnel_idle_timeout,
            &self.metrics,
        )
        .await;
        (moved.up + already_read.len() as u64, moved.down)
    }
}

/// A listener of yours known to the loop guard, from
/// [`Ingress::listening_on`]; forgotten when dropped.
#[derive(Debug)]
pub struct Listening {
    own: OwnListeners,
    number: u64,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.own.forget(self.number);
    }
}

/// The shutdown of an [`Ingress::standalone`].
#[derive(Debug)]
pub struct StandaloneShutdown(Shutdown);

impl StandaloneShutdown {
    /// Makes [`Ingress::stopping`] resolve, waits up to `deadline` for
    /// every `Ingress` clone and every guard from [`Ingress::open`] to be
    /// dropped, and returns how many were still open.
    pub async fn shutdown(self, deadline: Duration) -> usize {
        self.0.drain(deadline).await.len()
    }
}

/// The first `n` bytes the peer sent on `stream`, without consuming them
/// (`MSG_PEEK`): waits until that many have arrived, for at most
/// `deadline`. For a way in that decides by what the client sends first
/// (a TLS ClientHello's SNI, a PROXY-protocol line) and then relays the
/// stream whole. Fails with `UnexpectedEof` when the peer closes first and
/// `TimedOut` at the deadline; `n` above 64 KiB is refused
/// (`InvalidInput`).
pub async fn peek_at_least(
    stream: &TcpStream,
    n: usize,
    deadline: Duration,
) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind};
    use tokio::io::Interest;
    const MOST: usize = 64 * 1024;
    if n > MOST {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("peek_at_least: at most {MOST} bytes"),
        ));
    }
    let mut buffer = vec![0u8; n];
    let waiting = async {
        loop {
            let ready = stream.ready(Interest::READABLE).await?;
            // Fewer than `n` bytes: clear readiness and wait for more (the
            // next arrival is a new readiness event).
            let peeked = stream.try_io(Interest::READABLE, || {
                let got = peek_now(stream, &mut buffer)?;
                if got >= n || got == 0 || ready.is_read_closed() {
                    Ok(got)
                } else {
                    Err(ErrorKind::WouldBlock.into())
                }
            });
            match peeked {
                Ok(got) if got >= n => return Ok(()),
                Ok(_) => {
                    return Err(Error::new(
                        ErrorKind::UnexpectedEof,
                        format!("the peer closed before sending {n} bytes"),
                    ))
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
    };
    match tokio::time::timeout(deadline, waiting).await {
        Ok(Ok(())) => Ok(buffer),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(Error::new(
            ErrorKind::TimedOut,
            format!("fewer than {n} bytes arrived within {deadline:?}"),
        )),
    }
}

/// One `recv(MSG_PEEK)` without waiting, into `buffer`.
fn peek_now(stream: &TcpStream, buffer: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    nix::sys::socket::recv(
        stream.as_raw_fd(),
        buffer,
        nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)
}
