//! The tunnel prober of the end-to-end bench (`benches/load/run.sh`): not a
//! criterion bench, a native client, so latency figures are the proxies',
//! not an interpreter's. Loopback only; every loop is bounded.
//!
//! ```text
//! cargo bench --bench tunnels -- handshake PROXY ORIGIN COUNT      # p50 p99 ms, batches of 100
//! cargo bench --bench tunnels -- hold PROXY ORIGIN COUNT PID       # RSS KiB of PID per held, once-used tunnel
//! cargo bench --bench tunnels -- bursts PROXY ORIGIN COUNT N PID   # RSS MiB of PID after N bursts of COUNT
//! cargo bench --bench tunnels -- plain PROXY|direct ORIGIN CONNS SECONDS tunnel|absolute
//!                                   # keep-alive GETs/s: inside a CONNECT tunnel (a byte relay,
//!                                   # the ceiling for any proxy) or absolute-form, or direct
//! cargo bench --bench tunnels -- tls PROXY|direct ORIGIN CONNS SECONDS CA_PEM NAME
//!                                   # keep-alive HTTPS GETs/s over CONNS connections (through
//!                                   # PROXY's CONNECT, or direct), trusting CA_PEM for NAME
//! cargo bench --bench tunnels -- h2 PROXY|direct ORIGIN STREAMS SECONDS CA_PEM NAME
//!                                   # HTTPS GETs/s over STREAMS concurrent HTTP/2 streams
//!                                   # on one connection (through PROXY's CONNECT, or direct)
//! ```

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::expect_used,
    clippy::unwrap_used
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A CONNECT through `proxy` to `origin`, used for one GET when `used`.
async fn tunnel(proxy: SocketAddr, origin: &str, used: bool) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    stream
        .write_all(format!("CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes())
        .await?;
    read_head(&mut stream).await?;
    if used {
        stream
            .write_all(format!("GET / HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes())
            .await?;
        if read_head(&mut stream).await? == 0 {
            let mut body = [0u8; 64];
            let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut body)).await;
        }
    }
    Ok(stream)
}

/// Reads an answer's head. Buffered: no proxy sends a byte past the head
/// of a CONNECT answer before the client speaks, and the one GET's body is
/// read and dropped anyway. Returns how many bytes came after the head.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<usize> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let end = loop {
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 || head.len() > 8192 {
            return Err(std::io::Error::other("closed before the answer"));
        }
        head.extend_from_slice(&chunk[..n]);
    };
    if head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200") {
        Ok(head.len() - end)
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&head[..head.len().min(40)]).into_owned(),
        ))
    }
}

/// `count` tunnels, at most `parallel` being opened at once.
async fn open_many(
    proxy: SocketAddr,
    origin: &Arc<str>,
    count: usize,
    parallel: usize,
) -> Vec<TcpStream> {
    let gate = Arc::new(Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let origin = origin.clone();
        tasks.push(tokio::spawn(async move {
            let opened = tunnel(proxy, &origin, true).await;
            drop(permit);
            opened
        }));
    }
    let mut held = Vec::with_capacity(count);
    for task in tasks {
        match task.await.unwrap() {
            Ok(stream) => held.push(stream),
            Err(error) => eprintln!("a tunnel failed: {error}"),
        }
    }
    held
}

/// How the keep-alive GETs reach the origin.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// Straight to the origin.
    Direct,
    /// Inside a CONNECT tunnel: the proxy relays bytes and does no work
    /// per request, so this is the ceiling for any proxy on this machine.
    Tunnel,
    /// Absolute-form requests to the proxy, which reads and forwards each.
    AbsoluteForm,
}

/// Keep-alive plain GETs over `conns` connections for `duration`; returns
/// the answers received.
async fn plain_gets(
    proxy: SocketAddr,
    origin: &Arc<str>,
    conns: usize,
    duration: Duration,
    via: Via,
) -> u64 {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let origin = origin.clone();
        tasks.push(tokio::spawn(async move {
            let stream = match via {
                Via::Tunnel => tunnel(proxy, &origin, false).await,
                Via::Direct | Via::AbsoluteForm => TcpStream::connect(proxy).await,
            };
            let Ok(mut stream) = stream else { return 0 };
            let _ = stream.set_nodelay(true);
            let request = if via == Via::AbsoluteForm {
                format!("GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\n\r\n")
            } else {
                format!("GET / HTTP/1.1\r\nHost: {origin}\r\n\r\n")
            };
            get_loop(&mut stream, request.as_bytes(), deadline).await
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap_or(0);
    }
    total
}

/// Sends `request` and reads its whole answer (head, then a
/// `Content-Length` body), over and over until `deadline`; returns the
/// answers read. Proxies may write the head and the body separately, so a
/// read is not an answer.
async fn get_loop<S>(stream: &mut S, request: &[u8], deadline: Instant) -> u64
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut done = 0u64;
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        if stream.write_all(request).await.is_err() {
            break;
        }
        buffer.clear();
        let complete = loop {
            if let Some(length) = answer_length(&buffer) {
                if buffer.len() >= length {
                    break true;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 && buffer.len() < 65536 => buffer.extend_from_slice(&chunk[..n]),
                _ => break false,
            }
        };
        if !complete || !buffer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        done += 1;
    }
    done
}

/// The length of a whole answer (head and `Content-Length` body) once its
/// head is in `buffer`.
fn answer_length(buffer: &[u8]) -> Option<usize> {
    let end = buffer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buffer[..end]).ok()?;
    let body = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    })?;
    Some(end + body)
}

/// Keep-alive GETs over `conns` TLS connections for `duration`: through
/// `proxy`'s CONNECT when given (the proxy may intercept; `ca` is then its
/// CA), else straight to `origin`. Returns the answers received.
async fn tls_gets(
    proxy: Option<SocketAddr>,
    origin: &Arc<str>,
    conns: usize,
    duration: Duration,
    ca: &str,
    name: &str,
) -> u64 {
    let connector = tls_connector(ca, &[]);
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let connector = connector.clone();
        let origin = origin.clone();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("a name");
        tasks.push(tokio::spawn(async move {
            let stream = match proxy {
                Some(proxy) => tunnel(proxy, &origin, false).await,
                None => TcpStream::connect(&*origin).await,
            };
            let Ok(stream) = stream else { return 0u64 };
            let Ok(mut tls) = connector.connect(name, stream).await else {
                eprintln!("a TLS handshake failed");
                return 0;
            };
            let request = format!("GET / HTTP/1.1\r\nHost: {origin}\r\n\r\n");
            get_loop(&mut tls, request.as_bytes(), deadline).await
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap_or(0);
    }
    total
}

/// A TLS client trusting only `ca` (PEM), offering `alpn`.
fn tls_connector(ca: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let der = pem::parse(ca).expect("a PEM certificate").into_contents();
    roots
        .add(rustls::pki_types::CertificateDer::from(der))
        .expect("a CA certificate");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// GETs over `streams` concurrent HTTP/2 streams of one TLS connection
/// (ALPN `h2`) for `duration`: through `proxy`'s CONNECT when given, else
/// straight to `origin`. Returns the answers received.
async fn h2_gets(
    proxy: Option<SocketAddr>,
    origin: &Arc<str>,
    streams: usize,
    duration: Duration,
    ca: &str,
    name: &str,
) -> u64 {
    use http_body_util::{BodyExt, Empty};
    let connector = tls_connector(ca, &[b"h2"]);
    let stream = match proxy {
        Some(proxy) => tunnel(proxy, origin, false).await,
        None => TcpStream::connect(&**origin).await,
    };
    let Ok(stream) = stream else { return 0 };
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("a name");
    let Ok(tls) = connector.connect(name, stream).await else {
        eprintln!("a TLS handshake failed");
        return 0;
    };
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        eprintln!("the server did not choose h2");
        return 0;
    }
    let Ok((sender, connection)) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    else {
        eprintln!("the HTTP/2 handshake failed");
        return 0;
    };
    tokio::spawn(connection);
    let deadline = Instant::now() + duration;
    let uri: http::Uri = format!("https://{origin}/").parse().expect("a URI");
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut sender = sender.clone();
        let uri = uri.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                let request = http::Request::get(uri.clone())
                    .body(Empty::<bytes::Bytes>::new())
                    .expect("a request");
                let Ok(response) = sender.send_request(request).await else {
                    break;
                };
                if response.into_body().collect().await.is_err() {
                    break;
                }
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap_or(0);
    }
    total
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.is_empty() {
        // `cargo bench` with no arguments runs every bench: nothing to do here.
        return;
    }
    let what = args[0].as_str();
    let proxy: SocketAddr = if args[1] == "direct" {
        args[2].parse().expect("ORIGIN is IP:PORT")
    } else {
        args[1].parse().expect("PROXY is IP:PORT")
    };
    let origin: Arc<str> = args[2].as_str().into();
    let count: usize = args[3].parse().expect("COUNT");
    match what {
        "handshake" => {
            let mut times = Vec::with_capacity(count);
            for _ in 0..count / 100 {
                let mut batch = Vec::with_capacity(100);
                for _ in 0..100 {
                    let origin = origin.clone();
                    batch.push(tokio::spawn(async move {
                        let started = Instant::now();
                        let opened = tunnel(proxy, &origin, false).await;
                        opened.map(|_| started.elapsed())
                    }));
                }
                for task in batch {
                    if let Ok(elapsed) = task.await.unwrap() {
                        times.push(elapsed.as_secs_f64() * 1000.0);
                    }
                }
            }
            times.sort_by(f64::total_cmp);
            let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
            println!("{:.2} {:.2}", at(0.50), at(0.99));
        }
        "hold" => {
            let pid: u32 = args[4].parse().expect("PID");
            let before = rss_kib(pid);
            let held = open_many(proxy, &origin, count, 200).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let during = rss_kib(pid);
            println!(
                "{:.1}",
                during.saturating_sub(before) as f64 / held.len().max(1) as f64
            );
        }
        "bursts" => {
            let rounds: usize = args[4].parse().expect("N");
            let pid: u32 = args[5].parse().expect("PID");
            for _ in 0..rounds.min(100) {
                let held = open_many(proxy, &origin, count, 200).await;
                drop(held);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            println!("{:.1}", rss_kib(pid) as f64 / 1024.0);
        }
        "plain" => {
            // plain PROXY|direct ORIGIN CONNS SECONDS tunnel|absolute
            let seconds: u64 = args[4].parse().expect("SECONDS");
            let via = match (args[1].as_str(), args.get(5).map(String::as_str)) {
                ("direct", _) => Via::Direct,
                (_, Some("tunnel")) => Via::Tunnel,
                (_, Some("absolute")) => Via::AbsoluteForm,
                _ => {
                    eprintln!("usage: plain PROXY|direct ORIGIN CONNS SECONDS tunnel|absolute");
                    std::process::exit(64);
                }
            };
            let done = plain_gets(proxy, &origin, count, Duration::from_secs(seconds), via).await;
            println!("{:.0}", done as f64 / seconds as f64);
        }
        "tls" | "h2" => {
            let seconds: u64 = args[4].parse().expect("SECONDS");
            let ca = std::fs::read_to_string(&args[5]).expect("CA_PEM");
            let name = args[6].clone();
            let through = (args[1] != "direct").then_some(proxy);
            let duration = Duration::from_secs(seconds);
            let done = if what == "tls" {
                tls_gets(through, &origin, count, duration, &ca, &name).await
            } else {
                h2_gets(through, &origin, count, duration, &ca, &name).await
            };
            println!("{:.0}", done as f64 / seconds as f64);
        }
        other => eprintln!("unknown measure {other}"),
    }
}
