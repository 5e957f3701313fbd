//! The origin connection a client's HTTP/1 connection keeps for its own
//! requests: plain HTTP from the HTTP/1 listener, and the requests inside an
//! intercepted tunnel whose client speaks HTTP/1.1 (to the origin over TLS,
//! HTTP/1.1 by ALPN, the certificate checked as the pool checks it).
//!
//! A client's requests on one HTTP/1 connection come one after another, and
//! almost always to the same origin: the listener gives each connection one
//! [`KeptUpstream`], and the connector sends that connection's requests over
//! one HTTP/1 connection to the origin, dialled (and vetted) by the same
//! [`Dialer`] as every other. No pool lies between: no checkout, no hashing
//! of the destination, no hand-off to a connection another client returned.
//! A request to another destination closes the kept connection and dials
//! its own. When the client goes, its origin connection waits in
//! [`IdleOrigins`] for the next client connection to the same destination
//! (90 seconds at most, 64 per destination): the hashing and locking of a
//! pool happen once a client connection, not twice a request.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Request, Response};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use portcullis_middleware::{BadRequest, BoxError, HasBody, Host, RequestInfo, Target};

use super::{first_cause, origin_failure, relabel, Dialer, Refusing};
use crate::body::{self, Body};

/// One client connection's origin connection (empty until its first plain
/// HTTP request). Cloning shares it.
#[derive(Clone, Default)]
pub(crate) struct KeptUpstream(Arc<Mutex<Slot>>);

#[derive(Default)]
struct Slot {
    kept: Option<Kept>,
    /// Where the kept connection goes when the client connection ends.
    idle: Option<Arc<IdleOrigins>>,
}

struct Kept {
    origin: Origin,
    sender: SendRequest<Body>,
}

/// Where an origin connection goes: the vetted destination, and whether it
/// speaks TLS (a plain connection is never handed to an `https` request,
/// nor a TLS one to `http`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    target: Target,
    tls: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let (Some(kept), Some(idle)) = (self.kept.take(), &self.idle) {
            idle.put(kept.origin, kept.sender);
        }
    }
}

/// How long an origin connection no client holds stays open.
const IDLE_FOR: Duration = Duration::from_secs(90);
/// The most origin connections kept idle for one destination.
const MAX_IDLE_PER_ORIGIN: usize = 64;
/// Past this many destinations, every expired or closed one is swept.
const SWEEP_PAST: usize = 256;

/// Origin connections whose client connections have ended, by destination.
#[derive(Default)]
pub(crate) struct IdleOrigins(Mutex<HashMap<Origin, Vec<Idle>>>);

/// An origin connection and when it was left.
type Idle = (Instant, SendRequest<Body>);

impl fmt::Debug for IdleOrigins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let destinations = self.0.lock().map(|idle| idle.len()).unwrap_or_default();
        f.debug_struct("IdleOrigins")
            .field("destinations", &destinations)
            .finish()
    }
}

fn usable(since: &Instant, sender: &SendRequest<Body>) -> bool {
    since.elapsed() < IDLE_FOR && !sender.is_closed()
}

impl IdleOrigins {
    fn take(&self, origin: &Origin) -> Option<SendRequest<Body>> {
        let mut idle = self.0.lock().ok()?;
        let list = idle.get_mut(origin)?;
        let mut found = None;
        while let Some((since, sender)) = list.pop() {
            if usable(&since, &sender) {
                found = Some(sender);
                break;
            }
        }
        if list.is_empty() {
            idle.remove(origin);
        }
        found
    }

    fn put(&self, origin: Origin, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let Ok(mut idle) = self.0.lock() else {
            return;
        };
        let list = idle.entry(origin).or_default();
        list.retain(|(since, sender)| usable(since, sender));
        if list.len() >= MAX_IDLE_PER_ORIGIN {
            list.remove(0);
        }
        list.push((Instant::now(), sender));
        if idle.len() > SWEEP_PAST {
            idle.retain(|_, list| {
                list.retain(|(since, sender)| usable(since, sender));
                !list.is_empty()
            });
        }
    }
}

impl fmt::Debug for KeptUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = self
            .0
            .lock()
            .ok()
            .and_then(|slot| slot.kept.as_ref().map(|k| k.origin.target.to_string()));
        f.debug_tuple("KeptUpstream").field(&target).finish()
    }
}

impl KeptUpstream {
    /// The kept connection when it goes to `target` and is still open,
    /// else one an ended client connection left to `target`. A kept
    /// connection to another destination goes to `idle`.
    fn take(&self, origin: &Origin, idle: &Arc<IdleOrigins>) -> Option<SendRequest<Body>> {
        let kept = {
            let mut slot = self.0.lock().ok()?;
            if slot.idle.is_none() {
                slot.idle = Some(idle.clone());
            }
            slot.kept.take()
        };
        match kept {
            Some(kept) if kept.origin == *origin && !kept.sender.is_closed() => Some(kept.sender),
            Some(kept) => {
                idle.put(kept.origin, kept.sender);
                idle.take(origin)
            }
            None => idle.take(origin),
        }
    }

    fn put(&self, origin: Origin, sender: SendRequest<Body>) {
        if let Ok(mut slot) = self.0.lock() {
            slot.kept = Some(Kept { origin, sender });
        }
    }

    /// Sends `request` (already checked by the stack) to its origin over
    /// the kept connection, or a new one (over TLS through `tls` for an
    /// `https` request): origin-form, `Host` the vetted authority (without
    /// the scheme's default port, as the pool writes it).
    pub(crate) async fn forward(
        &self,
        dialer: &Dialer,
        tls: &TlsHttp1,
        idle: &Arc<IdleOrigins>,
        mut request: Request<Body>,
        info: &RequestInfo,
    ) -> Result<Response<Body>, BoxError> {
        let Target::Host { host, port } = &info.target else {
            return Err(BadRequest::new(format!("cannot forward to {}", info.target)).into());
        };
        let origin = Origin {
            target: info.target.clone(),
            tls: request.uri().scheme() == Some(&http::uri::Scheme::HTTPS),
        };
        let default_port = if origin.tls { 443 } else { 80 };
        // Most requests already carry exactly that one Host: kept as it is.
        let mut hosts = request.headers().get_all(header::HOST).iter();
        let carried = match (hosts.next(), hosts.next()) {
            (Some(one), None) => one
                .to_str()
                .is_ok_and(|text| info.target.is_written_as(text, Some(default_port))),
            _ => false,
        };
        if !carried {
            let authority = if *port == default_port {
                HeaderValue::from_str(&host.to_string())
            } else {
                HeaderValue::from_str(&info.target.to_string())
            }
            .map_err(|e| BadRequest::new(format!("cannot forward to {}: {e}", info.target)))?;
            request.headers_mut().insert(header::HOST, authority);
        }
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *request.uri_mut() = http::Uri::from(path);
        *request.version_mut() = http::Version::HTTP_11;

        let failed = |error: hyper::Error| relabel(origin_failure(error.into(), info), info);
        let dial = || dial(dialer, tls, origin.tls, host, *port, info);
        let (mut sender, reused) = match self.take(&origin, idle) {
            Some(mut sender) => match sender.ready().await {
                Ok(()) => (sender, true),
                // Closed by the origin since the last answer.
                Err(_) => (dial().await?, false),
            },
            None => (dial().await?, false),
        };
        // An origin may close an idle connection just as a request goes out
        // on it: a request that can be sent again (no body, a method without
        // side effects) is, once, on a new connection — as browsers do.
        let again = (reused && can_repeat(&request)).then(|| head_of(&request));
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut error) => match (error.take_message(), again) {
                // Never written: once more, on a new connection.
                (Some(request), _) => {
                    sender = dial().await?;
                    sender.send_request(request).await.map_err(failed)?
                }
                (None, Some(again)) if closed_before_answering(error.error()) => {
                    sender = dial().await?;
                    sender.send_request(again).await.map_err(failed)?
                }
                (None, _) => return Err(failed(error.into_error())),
            },
        };
        self.put(origin, sender);
        Ok(response.map(body::boxed))
    }
}

/// Whether `request` may be sent a second time: a method without side
/// effects, and no body (the listener marks a request that has one).
fn can_repeat(request: &Request<Body>) -> bool {
    use http::Method;
    matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) && request.extensions().get::<HasBody>().is_none()
}

/// The request again, from its head (the body is empty).
fn head_of(request: &Request<Body>) -> Request<Body> {
    let mut again = Request::new(body::empty());
    *again.method_mut() = request.method().clone();
    *again.uri_mut() = request.uri().clone();
    *again.version_mut() = request.version();
    *again.headers_mut() = request.headers().clone();
    again
}

/// The connection ended before any answer came (not a malformed answer).
fn closed_before_answering(error: &hyper::Error) -> bool {
    use std::io::ErrorKind as K;
    error.is_incomplete_message()
        || error.is_canceled()
        || error.is_closed()
        || first_cause::<std::io::Error>(error).is_some_and(|io| {
            matches!(
                io.kind(),
                K::ConnectionReset | K::BrokenPipe | K::UnexpectedEof
            )
        })
}

/// The TLS connector of the pool's HTTP/1.1-only client (its dials vetted
/// by the same [`Dialer`], the origin's certificate checked by the same
/// roots), used for kept connections to `https` origins.
pub(crate) type TlsHttp1 =
    super::eof::EofTolerant<hyper_rustls::HttpsConnector<super::VettedConnector>>;

/// A new HTTP/1 connection to the vetted address of `host` (over TLS when
/// `over_tls`); its driver runs on its own task until the last sender is
/// gone.
async fn dial(
    dialer: &Dialer,
    tls: &TlsHttp1,
    over_tls: bool,
    host: &Host,
    port: u16,
    info: &RequestInfo,
) -> Result<SendRequest<Body>, BoxError> {
    if over_tls {
        // The connector reads the destination from the URI: the vetted
        // target, written canonically (it names the TLS server too).
        let uri: http::Uri = format!("https://{}/", info.target)
            .parse()
            .map_err(|e| BadRequest::new(format!("cannot forward to {}: {e}", info.target)))?;
        let stream = tower::ServiceExt::oneshot(tls.clone(), uri)
            .await
            .map_err(|e| relabel(origin_failure(e, info), info))?;
        start(stream, info).await
    } else {
        let stream = dialer.connect(host, port, Refusing::from(info)).await?;
        start(TokioIo::new(stream), info).await
    }
}

/// HTTP/1 over `io`, its driver on a task of its own, ready for a request.
async fn start<T>(io: T, info: &RequestInfo) -> Result<SendRequest<Body>, BoxError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| relabel(origin_failure(e.into(), info), info))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "origin connection ended with an error");
        }
    });
    sender
        .ready()
        .await
        .map_err(|e| relabel(origin_failure(e.into(), info), info))?;
    Ok(sender)
}
