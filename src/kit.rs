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
//!    the client to it (the idle timeout and counters of the proxy);
//! 4. on failure, answers with its wire's words for the error:
//!    [`http_response`] or [`socks5_reply_code`] for the built-in wires, or
//!    its own from [`find_blocked`](crate::middleware::find_blocked).
//!
//! It joins graceful shutdown by stopping its accept loop when
//! [`Ingress::stopping`] resolves and holding a guard from
//! [`Ingress::open`] for each connection; `ProxyHandle::shutdown` waits for
//! them, as it waits for its own listeners'.
//!
//! A layer in the stack must be `Clone + Send` (tower's `Buffer` makes one
//! of a layer that is not: `ServiceBuilder::new().buffer(…)`), and its
//! future `Send`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use tokio::net::TcpStream;

use portcullis_middleware::BoxError;

use crate::body::Body;
use crate::metrics::Metrics;
use crate::transport::{self, Limits, ProxyService};

pub use crate::connector::Tunnel;
pub use crate::transport::model::RequestModel;
pub use crate::transport::{DrainGuard, ShutdownSignal};

/// The HTTP answer to an error from the stack: a refusal's 403 with its
/// JSON body and `x-proxy-error`, a 400, a 502 or 504, as the built-in
/// HTTP transport answers.
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
}

impl Ingress {
    pub(crate) fn new(
        service: ProxyService,
        drain: DrainGuard,
        signal: ShutdownSignal,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Ingress {
        Ingress {
            service: Arc::new(Mutex::new(service)),
            drain,
            signal,
            limits,
            metrics,
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
    /// upstream, to the client). Counted in the proxy's metrics.
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
}
