//! Captured TCP connections. The bridge inside the namespace sends each
//! connection the child opened (to any address, any port) to `capture.sock`
//! after one line, `SOURCE DESTINATION\n` (socket addresses, the
//! destination as the child dialled it). Here it becomes a synthesized
//! `CONNECT` through the proxy's stack with protocol `transparent`:
//!
//! | the child dialled | decided as |
//! | --- | --- |
//! | a synthetic address our DNS server gave | the name it maps to, on that port |
//! | a synthetic address never given | refused (closed) |
//! | any other address | that IP, on that port |
//!
//! Once allowed: when a layer asks to intercept (request rules,
//! credentials, limited mode), the TLS inside is terminated as on a
//! `CONNECT` (with the CA; without one it is closed) and each request goes
//! through the stack, and plain HTTP is served request by request
//! (protocol `http`, its `Host` held to the mapped name); otherwise the first
//! bytes the child sends are checked before they go on — a TLS ClientHello
//! whose SNI names another host than the mapped name, or an HTTP request
//! whose `Host` does, closes the connection (no fronting one name behind
//! another) — and the rest is relayed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

use portcullis_middleware::target::{canonical_ip, Host};
use portcullis_middleware::{Intercept, Interceptable, NamedAnotherHost, Protocol, Target};

use super::names::SyntheticNames;
use crate::kit::{Ingress, RequestModel, Tunnel};
use crate::transport::mitm::{self, Interceptor};
use crate::transport::{splice, Peer};

/// The most bytes read while looking for an SNI or a `Host`.
const MAX_FIRST_BYTES: usize = 16 * 1024;

/// What the capture transport needs besides the stack.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) names: Arc<SyntheticNames>,
    pub(crate) interceptor: Option<Arc<Interceptor>>,
    pub(crate) answers: mitm::Answers,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

/// Serves `capture.sock` until the proxy stops.
pub(crate) async fn serve(
    listener: UnixListener,
    ingress: Ingress,
    peer: super::BridgePeer,
    settings: Settings,
) {
    let settings = Arc::new(settings);
    super::accept_each(
        listener,
        ingress,
        peer,
        super::CAPTURE_SOCKET,
        move |stream, ingress| {
            let settings = settings.clone();
            async move {
                if let Err(why) = serve_one(stream, &ingress, &settings).await {
                    tracing::debug!("captured connection closed: {why}");
                }
            }
        },
    )
    .await;
}

async fn serve_one(
    stream: UnixStream,
    ingress: &Ingress,
    settings: &Settings,
) -> Result<(), String> {
    let limits = settings.answers.limits;
    let mut stream = stream;
    let line = tokio::time::timeout(limits.header_read_timeout, super::read_line(&mut stream))
        .await
        .map_err(|_| "no destination line in time".to_owned())??;
    let (source, destination) = parse_line(&line)?;
    let ip = canonical_ip(destination.ip());
    let target = if SyntheticNames::is_synthetic(ip) {
        let Some(name) = settings.names.name(ip) else {
            tracing::warn!(%destination, "a captured connection to a synthetic address our DNS server never gave: refused; connect by name (resolved inside the run), not by a remembered 198.18/fd70 address");
            return Err("unknown synthetic address".to_owned());
        };
        let host = Host::parse(&name).map_err(|e| e.to_string())?;
        Target::host(host, destination.port())
    } else {
        Target::from_ip(ip, destination.port()).map_err(|e| e.to_string())?
    };
    // Always offered: plain HTTP can be served request by request without
    // a CA; TLS needs one (refused below when there is none).
    let request = RequestModel::new(target.clone(), Protocol::Transparent, source)
        .mark(Interceptable)
        .connect()
        .map_err(|e| e.to_string())?;
    // A refusal is recorded by the stack; the child is told in its own
    // protocol where it has one, and the connection closes.
    let mut response = match ingress.call(request).await {
        Ok(response) => response,
        Err(error) => {
            answer_refusal(
                stream,
                &error,
                &settings.answers.fixes,
                limits.header_read_timeout,
            )
            .await;
            return Err(format!("refused: {error}"));
        }
    };
    let upstream = response
        .extensions_mut()
        .remove::<Tunnel>()
        .and_then(|tunnel| tunnel.take())
        .ok_or_else(|| "the stack gave no tunnel".to_owned())?;
    let guard = ingress.open(format!("captured connection from {source} to {target}"));
    // A place under a concurrency cap: kept while the connection is open.
    let _held = response
        .extensions_mut()
        .remove::<portcullis_middleware::HeldWhileOpen>();
    if response.extensions().get::<Intercept>().is_some() {
        drop(upstream);
        let peer = Peer {
            addr: source,
            user: None,
        };
        // TLS is terminated as on a CONNECT; plain HTTP is served request
        // by request; anything else is refused by the TLS path (recorded).
        let first = tokio::time::timeout(limits.header_read_timeout, peek_first_byte(&stream))
            .await
            .map_err(|_| "no first byte in time".to_owned())??;
        let mut answers = settings.answers.clone();
        answers.drain = Some(guard.clone());
        match (first, settings.interceptor.clone()) {
            (Some(byte), _) if byte.is_ascii_uppercase() => {
                mitm::serve_plain(stream, target, peer, ingress.service(), answers).await;
            }
            (_, Some(interceptor)) => {
                mitm::serve(
                    stream,
                    target,
                    peer,
                    interceptor,
                    ingress.service(),
                    answers,
                )
                .await;
            }
            (_, None) => {
                // Asked again without the offer, the stack refuses it
                // (mitm_required) and records why.
                let refused = RequestModel::new(target.clone(), Protocol::Transparent, source)
                    .connect()
                    .map(|request| ingress.call(request));
                if let Ok(refused) = refused {
                    if refused.await.is_ok() {
                        tracing::warn!(%target, "the stack let a captured connection through that it had asked to intercept; closed anyway");
                    }
                }
            }
        }
        drop(guard);
        return Ok(());
    }
    let mut upstream = upstream;
    let first = match first_bytes(&mut stream, &upstream, &target, limits.header_read_timeout)
        .await?
    {
        Ok(first) => first,
        Err(named) => {
            // Refused by the stack (host_mismatch), on the record like any
            // refusal; the connection closes either way.
            drop(upstream);
            let refused = RequestModel::new(target.clone(), Protocol::Transparent, source)
                .mark(NamedAnotherHost {
                    named: named.clone(),
                })
                .connect()
                .map(|request| ingress.call(request));
            if let Ok(refused) = refused {
                if refused.await.is_ok() {
                    tracing::warn!(%target, "the stack let a captured connection through that named another host; closed anyway");
                }
            }
            drop(guard);
            return Err(format!("{named:?} is not {target}"));
        }
    };
    if !first.is_empty() {
        upstream
            .write_all(&first)
            .await
            .map_err(|e| e.to_string())?;
    }
    let moved = splice::bidirectional(
        &mut stream,
        &mut upstream,
        limits.tunnel_idle_timeout,
        &settings.metrics,
    )
    .await;
    moved.log(source, &target);
    drop(guard);
    Ok(())
}

/// A TLS alert record: fatal (2), `access_denied` (49), TLS 1.2's record
/// version (what a 1.3 peer accepts before the handshake).
const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];

/// Tells a refused captured connection why, as the HTTP listener would: an
/// HTTP request gets the same 403 (JSON body, `x-proxy-error`) and the
/// connection closes; a TLS ClientHello gets a fatal `access_denied` alert
/// (no certificate is made for a refused host); anything else, or nothing
/// within `wait`, is just closed.
async fn answer_refusal(
    stream: UnixStream,
    error: &portcullis_middleware::BoxError,
    fixes: &crate::hints::Fixes,
    wait: Duration,
) {
    use http_body_util::BodyExt;
    let first =
        tokio::time::timeout(wait.min(Duration::from_secs(5)), peek_first_byte(&stream)).await;
    let Ok(Ok(Some(first))) = first else {
        return;
    };
    if first == 0x16 {
        let mut stream = stream;
        // The ClientHello is read (and dropped) first, so closing with it
        // unread does not cut the alert short.
        let mut hello = vec![0u8; MAX_FIRST_BYTES];
        let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut hello)).await;
        let _ = stream.write_all(&ACCESS_DENIED_ALERT).await;
        let _ = stream.shutdown().await;
        return;
    }
    if !first.is_ascii_uppercase() {
        return;
    }
    let answer = crate::transport::http1::rescue::http_response(error, fixes);
    let (parts, body) = answer.into_parts();
    let Ok(body) = body.collect().await.map(|collected| collected.to_bytes()) else {
        return;
    };
    let (status, headers) = (parts.status, parts.headers);
    let service = hyper::service::service_fn(move |_request| {
        let mut response = http::Response::new(crate::body::full(body.clone()));
        *response.status_mut() = status;
        *response.headers_mut() = headers.clone();
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .header_read_timeout(wait)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let _ = tokio::time::timeout(wait, served).await;
}

/// The child's first byte, left in the socket (`None`: it closed).
async fn peek_first_byte(stream: &UnixStream) -> Result<Option<u8>, String> {
    use std::os::fd::AsRawFd;
    loop {
        stream.readable().await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            nix::sys::socket::recv(
                stream.as_raw_fd(),
                &mut byte,
                nix::sys::socket::MsgFlags::MSG_PEEK,
            )
            .map_err(std::io::Error::from)
        });
        match peeked {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(byte.first().copied()),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error.to_string()),
        }
    }
}

fn parse_line(line: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (source, destination) = line
        .trim_end()
        .split_once(' ')
        .ok_or_else(|| "a bad destination line".to_owned())?;
    let parse = |text: &str| {
        text.parse::<SocketAddr>()
            .map_err(|_| format!("a bad address in the destination line: {:?}", text))
    };
    Ok((parse(source)?, parse(destination)?))
}

/// The child's first bytes, read and checked before they go on: when it
/// speaks first with TLS, the SNI must name the target; with HTTP, the
/// `Host` must (`Ok(Err(named))` when it names another). When the server
/// speaks first, nothing is read here.
async fn first_bytes(
    client: &mut UnixStream,
    upstream: &TcpStream,
    target: &Target,
    timeout: Duration,
) -> Result<Result<Vec<u8>, String>, String> {
    let Some(Host::Name(name)) = target.host_ref() else {
        // Dialled by address: decided by that address; nothing to agree with.
        return Ok(Ok(Vec::new()));
    };
    tokio::select! {
        biased;
        ready = client.readable() => ready.map_err(|e| e.to_string())?,
        ready = upstream.readable() => {
            ready.map_err(|e| e.to_string())?;
            return Ok(Ok(Vec::new()));
        }
    }
    let mut buffer = Vec::with_capacity(2048);
    let mut tls = rustls::server::Acceptor::default();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(deadline, client.read(&mut chunk))
            .await
            .map_err(|_| "the first bytes did not come in time".to_owned())?
            .map_err(|e| e.to_string())?;
        let Some(chunk) = chunk.get(..read) else {
            return Err("a bad read".to_owned());
        };
        if chunk.is_empty() {
            return Ok(Ok(buffer));
        }
        buffer.extend_from_slice(chunk);
        match classify(&buffer, chunk, &mut tls)? {
            Named::Incomplete if buffer.len() < MAX_FIRST_BYTES => continue,
            Named::Incomplete => {
                return Err("no complete ClientHello or request head in 16 KiB".to_owned())
            }
            Named::Nothing => return Ok(Ok(buffer)),
            Named::Host(named) => {
                let named = named.trim_end_matches('.').to_ascii_lowercase();
                if named == *name {
                    return Ok(Ok(buffer));
                }
                return Ok(Err(named));
            }
        }
    }
}

enum Named {
    Incomplete,
    Nothing,
    Host(String),
}

/// What host the bytes so far name: an SNI, a `Host` header, or nothing
/// (another protocol, or TLS without SNI).
fn classify(
    buffer: &[u8],
    chunk: &[u8],
    tls: &mut rustls::server::Acceptor,
) -> Result<Named, String> {
    match buffer.first() {
        Some(0x16) => {
            tls.read_tls(&mut &chunk[..]).map_err(|e| e.to_string())?;
            match tls.accept() {
                Ok(None) => Ok(Named::Incomplete),
                Ok(Some(accepted)) => Ok(accepted
                    .client_hello()
                    .server_name()
                    .map_or(Named::Nothing, |sni| Named::Host(sni.to_owned()))),
                Err((error, _)) => Err(format!("not a TLS ClientHello: {error}")),
            }
        }
        Some(byte) if byte.is_ascii_uppercase() => {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(buffer) {
                Ok(httparse::Status::Partial) => Ok(Named::Incomplete),
                Ok(httparse::Status::Complete(_)) => {
                    let host = request
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("host"))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned());
                    match host {
                        Some(host) => {
                            let authority = Target::parse_authority(host.trim(), Some(80))
                                .map_err(|e| format!("a bad Host header: {e}"))?;
                            Ok(Named::Host(authority.host_string()))
                        }
                        None => Ok(Named::Nothing),
                    }
                }
                // Not HTTP after all: another protocol, passed on.
                Err(_) => Ok(Named::Nothing),
            }
        }
        _ => Ok(Named::Nothing),
    }
}
