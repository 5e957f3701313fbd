//! Limited mode with HTTPS interception, end to end: a local HTTPS origin
//! with its own test CA, curl, python's `ssl` in strict mode, raw TLS, and
//! git over smart HTTP behind TLS. Loopback only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::*;
use portcullis::middleware::request_rules::RequestRules;
use portcullis::middleware::{
    Mode, NetworkPolicy, PolicyHandle, Protocol, Reason, ViolationLogLayer, ViolationRing,
};
use portcullis::mitm::CertificateAuthority;
use portcullis::resolve::{StaticResolver, SystemResolver};
use portcullis::{Proxy, ProxyHandle};

const ORIGIN: &str = "origin.test";

/// The secret `/private/` asks for, as the password of `x-access-token`.
const GIT_SECRET: &str = "gho_GITsecretGITsecretGITsecret000000000";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA of the origin's own, and the origin's certificate for `origin.test`.
struct OriginPki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn origin_pki() -> OriginPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "origin test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec![ORIGIN.to_owned()]).unwrap();
    let leaf = params.signed_by(&key, &issuer).unwrap();
    OriginPki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        chain: vec![leaf.der().clone(), ca.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// An HTTPS origin on loopback, speaking HTTP/2 (offered first by ALPN) or
/// HTTP/1.1: `/git/…` is git's smart HTTP (http-backend over `git_root`),
/// anything else answers `hello <METHOD> <path>`; every answer says the
/// version it was asked in (`x-origin-version`).
async fn https_origin(pki: &OriginPki, git_root: PathBuf) -> SocketAddr {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pki.chain.clone(), pki.key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let git_root = git_root.clone();
            // Which of the proxy's connections asked (`x-origin-peer`).
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let git_root = git_root.clone();
                    let peer = peer.clone();
                    let version = format!("{:?}", request.version());
                    async move {
                        let path = request.uri().path().to_owned();
                        // As nginx: over HTTP/2 a `host` beside `:authority`
                        // is a duplicate, refused.
                        let duplicate_host = request.version() == http::Version::HTTP_2
                            && request.headers().contains_key(http::header::HOST);
                        let mut response = if duplicate_host {
                            let mut refused =
                                Response::new(Full::new(Bytes::from_static(b"duplicate host")));
                            *refused.status_mut() = StatusCode::BAD_REQUEST;
                            refused.map(|b| b.map_err(|e| match e {}).boxed_unsync())
                        } else if path == "/ws/echo" {
                            websocket_echo(request)
                                .map(|b| b.map_err(|e| match e {}).boxed_unsync())
                        } else if path == "/issues/stream" {
                            streamed(request)
                                .await
                                .map(|b| b.map_err(|e| match e {}).boxed_unsync())
                        } else if path.starts_with("/test.Echo/") {
                            grpc::serve(request).await
                        } else {
                            answer(request, git_root)
                                .await
                                .map(|b| b.map_err(|e| match e {}).boxed_unsync())
                        };
                        response
                            .headers_mut()
                            .insert("x-origin-version", version.parse().unwrap());
                        response
                            .headers_mut()
                            .insert("x-origin-peer", peer.parse().unwrap());
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await;
            });
        }
    });
    addr
}

/// A body of frames given in advance: data, then trailers if any.
struct Frames(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

impl From<Vec<hyper::body::Frame<Bytes>>> for Frames {
    fn from(frames: Vec<hyper::body::Frame<Bytes>>) -> Frames {
        Frames(frames.into())
    }
}

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// `/ws/echo`: a WebSocket that sends back every message it gets.
fn websocket_echo(mut request: Request<Incoming>) -> Response<Full<Bytes>> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        let mut refused = Response::new(Full::new(Bytes::from_static(b"not a websocket")));
        *refused.status_mut() = StatusCode::BAD_REQUEST;
        return refused;
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        use futures_util::{SinkExt, StreamExt};
        let Ok(upgraded) = upgrade.await else { return };
        let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = socket.next().await {
            if (message.is_binary() || message.is_text()) && socket.send(message).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
    headers.insert("connection", http::HeaderValue::from_static("upgrade"));
    headers.insert(
        "sec-websocket-accept",
        derive_accept_key(key.as_bytes()).parse().unwrap(),
    );
    response
}

/// A gRPC service without generated code: `test.Echo` with `Unary` (the
/// message reversed) and `Stream` (the message three times, then the OK
/// status in trailers), over a codec of raw bytes.
mod grpc {
    use super::*;
    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    pub(super) type Boxed =
        http_body_util::combinators::UnsyncBoxBody<Bytes, portcullis::middleware::BoxError>;

    #[derive(Debug, Clone, Copy, Default)]
    pub(super) struct Raw;

    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }

    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let length = src.remaining();
            Ok(Some(src.copy_to_bytes(length).to_vec()))
        }
    }

    struct Unary;

    impl tonic::server::UnaryService<Vec<u8>> for Unary {
        type Response = Vec<u8>;
        type Future = std::future::Ready<Result<tonic::Response<Vec<u8>>, Status>>;
        fn call(&mut self, request: tonic::Request<Vec<u8>>) -> Self::Future {
            let mut message = request.into_inner();
            message.reverse();
            std::future::ready(Ok(tonic::Response::new(message)))
        }
    }

    struct Streaming;

    impl tonic::server::ServerStreamingService<Vec<u8>> for Streaming {
        type Response = Vec<u8>;
        type ResponseStream =
            futures_util::stream::Iter<std::vec::IntoIter<Result<Vec<u8>, Status>>>;
        type Future = std::future::Ready<Result<tonic::Response<Self::ResponseStream>, Status>>;
        fn call(&mut self, request: tonic::Request<Vec<u8>>) -> Self::Future {
            let message = request.into_inner();
            let replies = vec![Ok(message.clone()), Ok(message.clone()), Ok(message)];
            std::future::ready(Ok(tonic::Response::new(futures_util::stream::iter(
                replies,
            ))))
        }
    }

    pub(super) async fn serve(request: Request<Incoming>) -> Response<Boxed> {
        let mut grpc = tonic::server::Grpc::new(Raw);
        let response = match request.uri().path() {
            "/test.Echo/Unary" => grpc.unary(Unary, request).await,
            "/test.Echo/Stream" => grpc.server_streaming(Streaming, request).await,
            _ => Status::unimplemented("no such method").into_http(),
        };
        response.map(|body| body.map_err(Into::into).boxed_unsync())
    }

    /// A client for `test.Echo` over one HTTP/2 connection's sender.
    pub(super) fn client(
        sender: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
        origin: http::Uri,
    ) -> tonic::client::Grpc<
        impl tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<Incoming>,
                Error = hyper::Error,
                Future = impl Send,
            > + Clone,
    > {
        let service = tower::service_fn(move |request: http::Request<tonic::body::Body>| {
            let mut sender = sender.clone();
            async move { sender.send_request(request).await }
        });
        tonic::client::Grpc::with_origin(service, origin)
    }
}

/// `/issues/stream`, gRPC-like: the request body is read to its trailers; the
/// answer is three data frames, then trailers (`grpc-status: 0` and the
/// request's `x-echo` trailer given back).
async fn streamed(request: Request<Incoming>) -> Response<Frames> {
    let collected = request.into_body().collect().await.unwrap();
    let echo = collected
        .trailers()
        .and_then(|t| t.get("x-echo").cloned())
        .unwrap_or(http::HeaderValue::from_static("none"));
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers.insert("x-echo", echo);
    Response::new(Frames::from(vec![
        hyper::body::Frame::data(Bytes::from_static(b"one ")),
        hyper::body::Frame::data(Bytes::from_static(b"two ")),
        hyper::body::Frame::data(Bytes::from_static(b"three")),
        hyper::body::Frame::trailers(trailers),
    ]))
}

async fn answer(request: Request<Incoming>, git_root: PathBuf) -> Response<Full<Bytes>> {
    if request.uri().path().starts_with("/git/") {
        return git_http_backend(request, &git_root).await;
    }
    // `/private/git/…`: the same repositories, for a Basic credential only.
    if let Some(rest) = request.uri().path().strip_prefix("/private") {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("x-access-token:{GIT_SECRET}"))
        );
        if request.headers().get("authorization").map(|v| v.as_bytes()) != Some(expected.as_bytes())
        {
            let mut refused = Response::new(Full::new(Bytes::from_static(b"who are you?")));
            *refused.status_mut() = StatusCode::UNAUTHORIZED;
            refused.headers_mut().insert(
                "www-authenticate",
                http::HeaderValue::from_static("Basic realm=\"git\""),
            );
            return refused;
        }
        let target = match request.uri().query() {
            Some(query) => format!("{rest}?{query}"),
            None => rest.to_owned(),
        };
        let (mut parts, body) = request.into_parts();
        parts.uri = target.parse().unwrap();
        return git_http_backend(Request::from_parts(parts, body), &git_root).await;
    }
    if request.uri().path() == "/whoami" {
        let auth = request
            .headers()
            .get("authorization")
            .map_or("none", |v| v.to_str().unwrap_or("?"));
        return Response::new(Full::new(Bytes::from(format!("auth {auth}"))));
    }
    let text = format!("hello {} {}", request.method(), request.uri().path());
    // Read the body before answering, as a real server does: over HTTP/2 an
    // answer sent before the request's DATA arrived ends the stream with a
    // RST_STREAM, which curl 7.88 may report as error 92 (a flaky test, not
    // a proxy fault: the tunnel in full mode only splices bytes).
    let _ = request.into_body().collect().await;
    Response::new(Full::new(Bytes::from(text)))
}

/// A bare repository `repo.git` in `root` with one commit (`README`:
/// "hello"), pushes allowed, served by http-backend over TLS.
async fn seed_repository(root: &Path, work: &Path, author: &[(&str, &str)]) {
    assert!(
        git(&["init", "-q", "--bare", "repo.git"], root, &[])
            .await
            .0
    );
    assert!(
        git(
            &["config", "http.receivepack", "true"],
            &root.join("repo.git"),
            &[]
        )
        .await
        .0
    );
    assert!(git(&["init", "-q", "seed"], work, &[]).await.0);
    let seed = work.join("seed");
    std::fs::write(seed.join("README"), "hello\n").unwrap();
    assert!(git(&["add", "README"], &seed, &[]).await.0);
    assert!(git(&["commit", "-q", "-m", "first"], &seed, author).await.0);
    let bare = root.join("repo.git").display().to_string();
    let (pushed, out) = git(&["push", "-q", &bare, "HEAD:refs/heads/main"], &seed, &[]).await;
    assert!(pushed, "{out}");
    assert!(
        git(
            &["symbolic-ref", "HEAD", "refs/heads/main"],
            &root.join("repo.git"),
            &[]
        )
        .await
        .0
    );
}

/// Runs `git http-backend` as a CGI program for one request.
async fn git_http_backend(request: Request<Incoming>, root: &Path) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", "tester")
        .env("PATH_INFO", parts.uri.path().trim_start_matches("/git"))
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&body).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    let text = output.stdout;
    let split = text
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| text.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
        .expect("CGI headers");
    let head = String::from_utf8_lossy(&text[..split.0]).into_owned();
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(
        &text[split.0 + split.1..],
    )));
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value.split_whitespace().next().unwrap().parse().unwrap();
            *response.status_mut() = StatusCode::from_u16(code).unwrap();
        } else {
            response.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
    }
    response
}

struct Setup {
    proxy: ProxyHandle,
    ring: ViolationRing,
    ca_dir: tempfile::TempDir,
    origin: SocketAddr,
    pki: OriginPki,
    git_root: tempfile::TempDir,
}

impl Setup {
    fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy.http_addr())
    }
    fn our_ca(&self) -> String {
        self.ca_dir.path().join("ca.pem").display().to_string()
    }
    fn url(&self, path: &str) -> String {
        format!("https://{ORIGIN}:{}{path}", self.origin.port())
    }
    fn origin_ca_file(&self) -> PathBuf {
        let path = self.ca_dir.path().join("origin-ca.pem");
        std::fs::write(&path, &self.pki.ca_pem).unwrap();
        path
    }
}

/// A proxy in `mode` with interception on, allowing the origin (a name that
/// resolves to 127.0.0.1, so local binding is allowed for it).
async fn setup(mode: Mode, mitm: bool) -> Setup {
    setup_with(mode, mitm, RequestRules::default()).await
}

async fn setup_with(mode: Mode, mitm: bool, rules: RequestRules) -> Setup {
    setup_injecting(mode, mitm, rules, Default::default()).await
}

async fn setup_limited(mode: Mode, rules: RequestRules, limits: portcullis::Limits) -> Setup {
    setup_full(mode, true, rules, Default::default(), limits).await
}

async fn setup_injecting(
    mode: Mode,
    mitm: bool,
    rules: RequestRules,
    credentials: portcullis::middleware::credentials::Credentials,
) -> Setup {
    setup_full(
        mode,
        mitm,
        rules,
        credentials,
        portcullis::Limits::default(),
    )
    .await
}

async fn setup_full(
    mode: Mode,
    mitm: bool,
    rules: RequestRules,
    credentials: portcullis::middleware::credentials::Credentials,
    limits: portcullis::Limits,
) -> Setup {
    setup_trusting(mode, mitm, rules, credentials, limits, true).await
}

/// The same, the origin's CA among the proxy's roots or not.
async fn setup_trusting(
    mode: Mode,
    mitm: bool,
    rules: RequestRules,
    credentials: portcullis::middleware::credentials::Credentials,
    limits: portcullis::Limits,
    trusted: bool,
) -> Setup {
    let pki = origin_pki();
    let git_root = tempfile::tempdir().unwrap();
    let origin = https_origin(&pki, git_root.path().to_owned()).await;
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(CertificateAuthority::load_or_create(ca_dir.path()).unwrap());
    let policy = NetworkPolicy::builder()
        .mode(mode)
        .allow_local_binding(true)
        .allow(ORIGIN)
        .unwrap()
        .request_rules(rules)
        .build();
    let mut hosts: HashMap<String, Vec<IpAddr>> = HashMap::new();
    hosts.insert(ORIGIN.into(), vec!["127.0.0.1".parse().unwrap()]);
    let ring = ViolationRing::default();
    let proxy = Proxy::builder()
        .policy(PolicyHandle::new(policy))
        .resolver(Arc::new(StaticResolver::new(
            hosts,
            Arc::new(SystemResolver),
        )))
        .violations(ViolationLogLayer::new(ring.clone()))
        .upstream_roots(if trusted {
            vec![pki.ca_der.clone()]
        } else {
            Vec::new()
        })
        .mitm(mitm.then_some(ca))
        .inject_credentials(credentials)
        .limits(limits)
        .start()
        .await
        .unwrap();
    Setup {
        proxy,
        ring,
        ca_dir,
        origin,
        pki,
        git_root,
    }
}

#[tokio::test]
async fn curl_reads_through_an_intercepted_tunnel_and_cannot_write() {
    let setup = setup(Mode::Limited, true).await;
    let (proxy, ca) = (setup.proxy_url(), setup.our_ca());

    let out = curl(&["--cacert", &ca, "-x", &proxy, &setup.url("/read")]).await;
    assert_eq!(out.stdout, "hello GET /read", "{}", out.stderr);

    let out = curl(&[
        "-i",
        "--cacert",
        &ca,
        "-x",
        &proxy,
        "-d",
        "x=1",
        &setup.url("/write"),
    ])
    .await;
    let (status, headers, body) = parse_response(
        out.stdout
            .split("\r\n\r\n")
            .skip(1)
            .collect::<Vec<_>>()
            .join("\r\n\r\n")
            .as_str(),
    );
    assert_eq!(status, 403, "{}", out.stdout);
    assert_eq!(headers["x-proxy-error"], "blocked-by-method-policy");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["reason"], "method_not_allowed");
    assert_eq!(json["protocol"], "https_mitm");
    assert_eq!(json["method"], "POST");
    assert!(json["message"]
        .as_str()
        .unwrap()
        .contains("POST origin.test"));

    // A Host naming another server inside the tunnel is a 400 (curl speaks
    // HTTP/2 in the tunnel, offered by ALPN: `:authority` is its Host).
    let out = curl(&[
        "-i",
        "--cacert",
        &ca,
        "-x",
        &proxy,
        "-H",
        "Host: elsewhere.test",
        &setup.url("/"),
    ])
    .await;
    assert!(out.stdout.contains("HTTP/2 400"), "{}", out.stdout);

    // Without our CA the client refuses our certificate.
    let out = curl(&["-x", &proxy, &setup.url("/")]).await;
    assert_ne!(
        out.code,
        Some(0),
        "the origin's CA does not vouch for our leaf"
    );
}

#[tokio::test]
async fn without_interception_limited_mode_refuses_connect_and_full_mode_never_intercepts() {
    let limited = setup(Mode::Limited, false).await;
    let (mut stream, head) = raw_exchange(
        limited.proxy.http_addr(),
        &format!(
            "CONNECT {ORIGIN}:{0} HTTP/1.1\r\nHost: {ORIGIN}:{0}\r\n\r\n",
            limited.origin.port()
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.contains("x-proxy-error: blocked-by-mitm-required"),
        "{head}"
    );
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut body)).await;
    assert!(String::from_utf8_lossy(&body).contains("mitm_required"));

    // Full mode with interception configured: the client sees the origin's
    // own certificate (its CA works, ours does not).
    let full = setup(Mode::Full, true).await;
    let origin_ca = full.origin_ca_file();
    let out = curl(&[
        "--cacert",
        origin_ca.to_str().unwrap(),
        "-x",
        &full.proxy_url(),
        &full.url("/direct"),
    ])
    .await;
    assert_eq!(out.stdout, "hello GET /direct", "{}", out.stderr);
    let out = curl(&[
        "--cacert",
        &full.our_ca(),
        "-x",
        &full.proxy_url(),
        &full.url("/direct"),
    ])
    .await;
    assert_ne!(out.code, Some(0), "our CA is not in play in full mode");
    let out = curl(&[
        "-d",
        "x",
        "--cacert",
        origin_ca.to_str().unwrap(),
        "-x",
        &full.proxy_url(),
        &full.url("/w"),
    ])
    .await;
    assert_eq!(
        out.stdout, "hello POST /w",
        "full mode writes: curl {:?} {}",
        out.code, out.stderr
    );
}

/// Opens a CONNECT tunnel and a TLS session inside it that trusts our CA.
async fn tls_tunnel(setup: &Setup) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_tunnel_offering(setup, &[]).await
}

/// The same, offering `alpn` in the ClientHello.
async fn tls_tunnel_offering(
    setup: &Setup,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let authority = format!("{ORIGIN}:{}", setup.origin.port());
    let (stream, head) = raw_exchange(
        setup.proxy.http_addr(),
        &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read_to_string(setup.our_ca()).unwrap();
    let der = pem::parse(ca_pem).unwrap().into_contents();
    roots.add(CertificateDer::from(der)).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(ServerName::try_from(ORIGIN).unwrap(), stream)
        .await
        .expect("our leaf verifies against our CA")
}

async fn exchange(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, request: &str) -> String {
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut response))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&response[..n]).into_owned()
}

/// The value of header `name` in a response head, lower-cased names.
fn header_value(response: &str, name: &str) -> String {
    response
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {name} in {response}"))
}

#[tokio::test]
async fn an_origin_whose_certificate_is_not_trusted_is_a_502_saying_so() {
    let setup = setup_trusting(
        Mode::Limited,
        true,
        RequestRules::default(),
        Default::default(),
        portcullis::Limits::default(),
        false,
    )
    .await;
    let authority = format!("{ORIGIN}:{}", setup.origin.port());
    // HTTP/1.1 inside the tunnel (a kept connection) and HTTP/2 (the pool).
    let mut tls = tls_tunnel(&setup).await;
    let response = exchange(
        &mut tls,
        &format!("GET / HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    let said = "could not reach origin.test:";
    let why = "invalid peer certificate: UnknownIssuer";
    let fix = "add that CA's PEM file to [mitm] upstream_ca_files";
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    assert!(
        response.contains(said) && response.contains(why) && response.contains(fix),
        "{response}"
    );
    let out = curl(&[
        "-s",
        "-i",
        "--http2",
        "--cacert",
        &setup.our_ca(),
        "-x",
        &setup.proxy_url(),
        "--resolve",
        &format!("{authority}:127.0.0.1"),
        &setup.url("/"),
    ])
    .await;
    let answer = out.stdout.split("HTTP/2 ").nth(1).unwrap_or_default();
    assert!(answer.starts_with("502"), "{}", out.stdout);
    assert!(
        answer.contains(said) && answer.contains(why) && answer.contains(fix),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn an_http1_client_s_intercepted_requests_share_one_kept_origin_connection() {
    let setup = setup(Mode::Limited, true).await;
    let authority = format!("{ORIGIN}:{}", setup.origin.port());
    let get = format!("GET /kept HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let mut tls = tls_tunnel(&setup).await;
    let mut peers = Vec::new();
    for _ in 0..3 {
        let response = exchange(&mut tls, &get).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        // Asked as it was asked, over the connection the tunnel keeps (the
        // pool would have offered h2, which this origin prefers).
        assert_eq!(header_value(&response, "x-origin-version"), "HTTP/1.1");
        peers.push(header_value(&response, "x-origin-peer"));
    }
    assert!(
        peers.iter().all(|peer| *peer == peers[0]),
        "one origin connection for the tunnel's requests: {peers:?}"
    );
}

#[tokio::test]
async fn inside_the_tunnel_nested_connect_mismatched_hosts_and_plaintext_are_refused() {
    let setup = setup(Mode::Limited, true).await;
    let authority = format!("{ORIGIN}:{}", setup.origin.port());

    let mut tls = tls_tunnel(&setup).await;
    let answer = exchange(
        &mut tls,
        &format!("CONNECT other.test:443 HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");

    let mut tls = tls_tunnel(&setup).await;
    let answer = exchange(
        &mut tls,
        "GET https://other.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let mut tls = tls_tunnel(&setup).await;
    let answer = exchange(
        &mut tls,
        &format!("GET /x HTTP/1.1\r\nHost: {authority}\r\nX-HTTP-Method-Override: DELETE\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("blocked-by-method-policy"), "{answer}");

    let mut tls = tls_tunnel(&setup).await;
    let answer = exchange(
        &mut tls,
        &format!("GET /ok HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello GET /ok"),
        "{answer}"
    );

    // Plain HTTP after CONNECT (what `ws://` clients send): request by
    // request through the stack, so limited mode still refuses a DELETE.
    let (mut stream, head) = raw_exchange(
        setup.proxy.http_addr(),
        &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
        .write_all(
            format!("DELETE /plain HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "answered and closed");
    let answer = String::from_utf8_lossy(&rest);
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.contains("blocked-by-method-policy"),
        "{answer}"
    );
    let last = setup.ring.snapshot().pop().expect("recorded");
    assert_eq!(last.blocked.reason, Reason::MethodNotAllowed);
    assert_eq!(last.blocked.protocol, Protocol::Http);

    // Bytes that are neither TLS nor HTTP/1 after CONNECT: closed, never
    // passed on, and recorded.
    let (mut stream, head) = raw_exchange(
        setup.proxy.http_addr(),
        &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
        .write_all(b"SSH-2.0-OpenSSH_9.6\r\nhello origin\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the tunnel is closed");
    assert!(
        !String::from_utf8_lossy(&rest).contains("hello"),
        "nothing reached the origin"
    );
    let last = setup.ring.snapshot().pop().expect("recorded");
    assert_eq!(last.blocked.reason, Reason::TlsRequired);
    assert_eq!(last.blocked.protocol, Protocol::HttpsMitm);
    // Interception is not only limited mode's (rules and credentials too):
    // the wording does not blame a mode.
    assert!(
        last.blocked
            .message
            .contains("intercepts it to see its requests")
            && !last.blocked.message.contains("limited mode intercepts"),
        "{}",
        last.blocked.message
    );
}

#[tokio::test]
async fn python_strict_x509_verification_accepts_our_leaf() {
    let setup = setup(Mode::Limited, true).await;
    let script = r#"
import http.client, ssl, sys
proxy_host, proxy_port, origin, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
context = ssl.create_default_context(cafile=cafile)
context.verify_flags |= ssl.VERIFY_X509_STRICT
connection = http.client.HTTPSConnection(proxy_host, proxy_port, context=context, timeout=20)
connection.set_tunnel(origin, port)
connection.request("GET", "/strict")
response = connection.getresponse()
print(response.status, response.read().decode())
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-c", script, "127.0.0.1"])
        .arg(setup.proxy.http_addr().port().to_string())
        .arg(ORIGIN)
        .arg(setup.origin.port().to_string())
        .arg(setup.our_ca())
        .output()
        .await
        .expect("python3 is installed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.trim(),
        "200 hello GET /strict",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn git(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let output = tokio::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test]
async fn git_clones_over_https_in_limited_mode_and_cannot_push() {
    let setup = setup(Mode::Limited, true).await;
    let root = setup.git_root.path();
    let work = tempfile::tempdir().unwrap();
    let author = [
        ("GIT_AUTHOR_NAME", "t"),
        ("GIT_AUTHOR_EMAIL", "t@t.test"),
        ("GIT_COMMITTER_NAME", "t"),
        ("GIT_COMMITTER_EMAIL", "t@t.test"),
    ];
    seed_repository(root, work.path(), &author).await;

    let proxy = setup.proxy_url();
    let ca = setup.our_ca();
    let through = [
        ("HTTPS_PROXY", proxy.as_str()),
        ("GIT_SSL_CAINFO", ca.as_str()),
    ];
    let url = setup.url("/git/repo.git");
    let (cloned, out) = git(&["clone", "-q", &url, "clone"], work.path(), &through).await;
    assert!(cloned, "git clone through the intercepted tunnel: {out}");
    let clone = work.path().join("clone");
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "hello\n"
    );
    let (fetched, out) = git(&["fetch", "-q"], &clone, &through).await;
    assert!(fetched, "{out}");

    std::fs::write(clone.join("README"), "changed\n").unwrap();
    assert!(
        git(&["commit", "-q", "-am", "second"], &clone, &author)
            .await
            .0
    );
    let (pushed, out) = git(&["push", "-q", "origin", "HEAD:main"], &clone, &through).await;
    assert!(!pushed, "a push is a write: {out}");
    assert!(out.contains("403"), "{out}");
    let last = setup
        .ring
        .snapshot()
        .pop()
        .expect("the refusal is recorded");
    // Refused at its start: `GET …/info/refs?service=git-receive-pack`.
    assert_eq!(last.blocked.reason, Reason::MethodNotAllowed);
    assert_eq!(last.blocked.method, "GET");
    assert!(
        last.blocked.message.contains(&format!("GET {ORIGIN}:")),
        "{}",
        last.blocked.message
    );
}

/// The trick families that an intercepted tunnel can carry: the tunnel's
/// destination was decided at CONNECT (the families on that path are in
/// `tests/security.rs`), so inside it what matters is a request naming
/// another host, or hiding a write in limited mode. Every request gets a
/// fresh tunnel.
#[tokio::test]
async fn inner_requests_get_the_same_verdicts_as_every_other_path() {
    let setup = setup(Mode::Limited, true).await;
    let port = setup.origin.port();
    let authority = format!("{ORIGIN}:{port}");
    let through = [
        format!("GET /ok HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: ORIGIN.TEST:{port}\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: origin.test.:{port}\r\n\r\n"),
        format!("GET https://{authority}/ok HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
        format!("HEAD /ok HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    ];
    let malformed = [
        format!("GET /ok HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: {ORIGIN}\r\n\r\n"), // port 443, not the tunnel's
        format!("GET /ok HTTP/1.1\r\nHost: {authority}\r\nHost: other.test:{port}\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: other.test@{authority}\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: {authority}@other.test\r\n\r\n"),
        format!("GET https://other.test:{port}/ok HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
        format!("GET https://user@{authority}/ok HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: origin%2etest:{port}\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: origin.test:{port}0000\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    ];
    let refused = [
        format!("POST /ok HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\n\r\n"),
        format!("DELETE /ok HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: {authority}\r\nX-HTTP-Method-Override: PUT\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: {authority}\r\nX-Original-Method: PUT\r\n\r\n"),
        format!("GET /ok HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 3\r\n\r\nabc"),
        format!("GET /ok HTTP/1.1\r\nHost: {authority}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ];
    let mut cases = 0;
    for (requests, expected) in [
        (&through[..], "200"),
        (&malformed[..], "400"),
        (&refused[..], "403"),
    ] {
        for request in requests {
            let mut tls = tls_tunnel(&setup).await;
            let answer = exchange(&mut tls, request).await;
            let status = answer.split_whitespace().nth(1).unwrap_or("");
            assert_eq!(status, expected, "{request:?}: {answer}");
            cases += 1;
        }
    }
    println!("{cases} inner-request cases agreed");
}

/// A body of pkt-lines, as git writes them.
fn pkt_lines(lines: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    for line in lines {
        match *line {
            "0000" | "0001" => body.extend_from_slice(line.as_bytes()),
            _ => body.extend_from_slice(format!("{:04x}{line}", line.len() + 4).as_bytes()),
        }
    }
    body
}

fn gzipped(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn writes_dressed_as_git_fetches_and_override_channels_are_refused() {
    let setup = setup(Mode::Limited, true).await;
    let (proxy, ca) = (setup.proxy_url(), setup.our_ca());
    let dir = tempfile::tempdir().unwrap();
    let git_type = "Content-Type: application/x-git-upload-pack-request";
    let oid = "0123456789abcdef0123456789abcdef01234567";
    let fetch = pkt_lines(&[
        "command=fetch",
        "agent=git/2.47.3",
        "0001",
        &format!("want {oid}\n"),
        "done\n",
        "0000",
    ]);
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        format!("@{}", path.display())
    };
    let fetch_file = write("fetch", &fetch);
    let fetch_gz_file = write("fetch.gz", &gzipped(&fetch));
    let paste_file = write("paste", b"content=my+secret+paste");
    let paste_gz_file = write("paste.gz", &gzipped(b"content=my+secret+paste"));
    let status = |out: &CurlOutput| -> u16 {
        // The last head: the CONNECT's own 200 comes first.
        out.stdout
            .split("\r\n\r\n")
            .filter(|head| head.starts_with("HTTP/"))
            .last()
            .and_then(|head| head.split_whitespace().nth(1))
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    };
    let post = |path: &str, file: &str, gzip: bool| {
        let mut args = vec![
            "-i".to_owned(),
            "--cacert".to_owned(),
            ca.clone(),
            "-x".to_owned(),
            proxy.clone(),
            "-H".to_owned(),
            git_type.to_owned(),
            "--data-binary".to_owned(),
            file.to_owned(),
            setup.url(path),
        ];
        if gzip {
            args.splice(0..0, ["-H".to_owned(), "Content-Encoding: gzip".to_owned()]);
        }
        args
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&args).await
    };
    // A real fetch request reaches the origin, plain or gzipped as git sends it.
    for gzip in [false, true] {
        let file = if gzip { &fetch_gz_file } else { &fetch_file };
        let out = run(post("/owner/repo.git/git-upload-pack", file, gzip)).await;
        assert_eq!(status(&out), 200, "gzip {gzip}: {}", out.stdout);
        assert!(
            out.stdout
                .ends_with("hello POST /owner/repo.git/git-upload-pack"),
            "{}",
            out.stdout
        );
    }
    // Anything else posted to a path ending in /git-upload-pack is a write.
    for (path, file, gzip) in [
        ("/api/paste/git-upload-pack", &paste_file, false),
        ("/api/paste/git-upload-pack", &paste_gz_file, true),
        ("/upload;/git-upload-pack", &fetch_file, false),
        (
            "/owner/repo.git/git-upload-pack?next=/upload",
            &fetch_file,
            false,
        ),
        ("/git-upload-pack", &fetch_file, false),
    ] {
        let out = run(post(path, file, gzip)).await;
        assert_eq!(status(&out), 403, "{path} {file}: {}", out.stdout);
        assert!(
            out.stdout.contains("blocked-by-method-policy"),
            "{}",
            out.stdout
        );
    }
    let last = setup.ring.snapshot().pop().unwrap();
    assert_eq!(last.blocked.reason, Reason::MethodNotAllowed);
    // Override channels and the start of a push.
    for (path, header) in [
        ("/repo.git/info/refs?service=git-receive-pack", None),
        ("/items/1?_method=DELETE", None),
        ("/items/1", Some("X-Method: DELETE")),
        ("/items/1", Some("X-Forwarded-Method: PUT")),
    ] {
        let mut args = vec!["-i", "--cacert", &ca, "-x", &proxy];
        if let Some(header) = header {
            args.extend(["-H", header]);
        }
        let url = setup.url(path);
        args.push(&url);
        let out = curl(&args).await;
        assert_eq!(status(&out), 403, "{path} {header:?}: {}", out.stdout);
    }
    let out = curl(&[
        "--cacert",
        &ca,
        "-x",
        &proxy,
        &setup.url("/repo.git/info/refs?service=git-upload-pack"),
    ])
    .await;
    assert!(
        out.stdout.starts_with("hello GET"),
        "the start of a fetch: {}",
        out.stdout
    );
}

#[tokio::test]
async fn git_clones_a_repository_whose_fetch_request_git_gzips() {
    let setup = setup(Mode::Limited, true).await;
    let root = setup.git_root.path();
    assert!(
        git(&["init", "-q", "--bare", "many.git"], root, &[])
            .await
            .0
    );
    // 80 branches on 80 commits: the fetch wants 80 ids, over git's 1 KiB
    // gzip threshold.
    let mut stream = String::new();
    for n in 0..80 {
        let message = format!("commit {n}\n");
        stream.push_str(&format!(
            "commit refs/heads/b{n}\ncommitter t <t@t.test> 1700000000 +0000\ndata {}\n{message}\n",
            message.len()
        ));
    }
    let mut import = tokio::process::Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(root.join("many.git"))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    import
        .stdin
        .take()
        .unwrap()
        .write_all(stream.as_bytes())
        .await
        .unwrap();
    assert!(import.wait().await.unwrap().success());
    let work = tempfile::tempdir().unwrap();
    let (proxy, ca) = (setup.proxy_url(), setup.our_ca());
    let through = [
        ("HTTPS_PROXY", proxy.as_str()),
        ("GIT_SSL_CAINFO", ca.as_str()),
    ];
    let url = setup.url("/git/many.git");
    let (cloned, out) = git(
        &["clone", "-q", "--mirror", &url, "clone.git"],
        work.path(),
        &through,
    )
    .await;
    assert!(cloned, "{out}");
    let (listed, branches) = git(&["branch", "--list"], &work.path().join("clone.git"), &[]).await;
    assert!(listed);
    assert_eq!(branches.lines().count(), 80, "{branches}");
    assert_eq!(setup.ring.total(), 0, "nothing refused");
}

#[tokio::test]
async fn full_mode_intercepts_a_host_with_rules_and_decides_each_request() {
    let setup = setup_with(Mode::Full, true, sample_rules(ORIGIN)).await;
    let (proxy, ca) = (setup.proxy_url(), setup.our_ca());
    let request = |args: &[&str]| {
        let mut all = vec!["-i", "--path-as-is", "--cacert", &ca, "-x", &proxy];
        all.extend_from_slice(args);
        let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            let out = curl(&refs).await;
            // The proxy's CONNECT answer comes first; the origin's after it.
            let inner = out
                .stdout
                .split("\r\n\r\n")
                .skip(1)
                .collect::<Vec<_>>()
                .join("\r\n\r\n");
            (parse_response(&inner), out.stderr)
        }
    };
    // Our CA signed what the client saw: the tunnel is intercepted in full mode.
    let ((status, _, body), stderr) = request(&[&setup.url("/repos/x")]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello GET /repos/x"),
        "{stderr}"
    );
    let ((status, _, body), stderr) = request(&["-d", "x", &setup.url("/issues/2")]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello POST /issues/2"),
        "{stderr}"
    );
    let ((status, headers, body), _) = request(&["-d", "x", &setup.url("/pulls/2")]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(headers["x-proxy-error"], "blocked-by-request-rule");
    for path in [
        "/secret/x",
        "/repos/../secret/x",
        "/%2e%2e/secret/x",
        "/Secret/x",
        "/secret%2Fx",
    ] {
        let ((status, headers, body), _) = request(&[&setup.url(path)]).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(
            headers["x-proxy-error"], "blocked-by-request-rule",
            "{path}"
        );
        assert!(!body.contains("hello"), "{path} reached the origin");
    }
    let last = setup.ring.snapshot().pop().unwrap();
    assert_eq!(last.blocked.protocol, Protocol::HttpsMitm);
}

#[tokio::test]
async fn full_mode_leaves_a_host_without_rules_unseen() {
    // Rules for another host only: this one's tunnel is relayed as is, so
    // the client sees the origin's own certificate, not ours.
    let setup = setup_with(Mode::Full, true, sample_rules("elsewhere.test")).await;
    let proxy = setup.proxy_url();
    let origin_ca = setup.origin_ca_file().display().to_string();
    let out = curl(&[
        "--cacert",
        &origin_ca,
        "-x",
        &proxy,
        "-X",
        "DELETE",
        &setup.url("/secret/x"),
    ])
    .await;
    assert_eq!(out.stdout, "hello DELETE /secret/x", "{}", out.stderr);
    let out = curl(&["--cacert", &setup.our_ca(), "-x", &proxy, &setup.url("/")]).await;
    assert_eq!(out.code, Some(60), "our CA did not sign it: {}", out.stderr);
}

#[tokio::test]
async fn limited_mode_and_rules_compose_inside_the_tunnel() {
    let setup = setup_with(Mode::Limited, true, sample_rules(ORIGIN)).await;
    let (proxy, ca) = (setup.proxy_url(), setup.our_ca());
    let status = |args: Vec<String>| {
        let (proxy, ca) = (proxy.clone(), ca.clone());
        async move {
            let mut all: Vec<String> = vec![
                "-s".into(),
                "-o".into(),
                "/dev/null".into(),
                "-w".into(),
                "%{http_code}".into(),
                "--cacert".into(),
                ca,
                "-x".into(),
                proxy,
            ];
            all.extend(args);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            curl(&refs).await.stdout
        }
    };
    assert_eq!(status(vec![setup.url("/repos/x")]).await, "200");
    // Rules would allow it; limited mode does not.
    assert_eq!(
        status(vec!["-d".into(), "x".into(), setup.url("/issues/2")]).await,
        "403"
    );
    assert_eq!(
        setup.ring.snapshot().pop().unwrap().blocked.reason,
        Reason::MethodNotAllowed
    );
    // Limited mode would allow it; the rules do not.
    assert_eq!(status(vec![setup.url("/secret/x")]).await, "403");
    assert_eq!(
        setup.ring.snapshot().pop().unwrap().blocked.reason,
        Reason::RuleDenied
    );
}

#[tokio::test]
async fn a_credential_is_added_on_its_host_and_its_placeholder_refused_elsewhere() {
    use portcullis::middleware::credentials::{Credential, Credentials, Injection, StaticSecrets};
    const PLACEHOLDER: &str = "ghp_PLACEHOLDERplaceholderPLACEHOLDER0000";
    let secrets = StaticSecrets::default();
    secrets.set("origin", "ghp_REAL_SECRET");
    let credential = Credential::new(
        "origin",
        Injection::header("authorization", "Bearer {secret}").unwrap(),
    )
    .host(ORIGIN)
    .unwrap()
    .placeholder(PLACEHOLDER);
    let credentials = Credentials::new(vec![credential], Arc::new(secrets));
    // Full mode, no rules: the credential's host is intercepted for it.
    let setup = setup_injecting(Mode::Full, true, RequestRules::default(), credentials).await;
    let (proxy, ca) = (setup.proxy_url(), setup.our_ca());
    let bearer = format!("authorization: Bearer {PLACEHOLDER}");
    let out = curl(&[
        "--cacert",
        &ca,
        "-x",
        &proxy,
        "-H",
        &bearer,
        &setup.url("/whoami"),
    ])
    .await;
    assert_eq!(out.stdout, "auth Bearer ghp_REAL_SECRET", "{}", out.stderr);
    let out = curl(&["--cacert", &ca, "-x", &proxy, &setup.url("/whoami")]).await;
    assert_eq!(
        out.stdout, "auth Bearer ghp_REAL_SECRET",
        "added when absent"
    );
    // The placeholder, over plain HTTP to the same host: refused, named.
    let plain = format!("http://{ORIGIN}:{}/whoami", setup.origin.port());
    let out = curl(&["-i", "-x", &proxy, "-H", &bearer, &plain]).await;
    let (status, headers, body) = parse_response(&out.stdout);
    assert_eq!(status, 403, "{}", out.stdout);
    assert_eq!(headers["x-proxy-error"], "blocked-by-credential-guard");
    assert!(
        body.contains("credential_mismatch") && body.contains("\\\"origin\\\""),
        "{body}"
    );
    assert!(
        !body.contains("ghp_REAL") && !body.contains(PLACEHOLDER),
        "{body}"
    );
    let refusal = setup.ring.snapshot().pop().unwrap();
    assert_eq!(
        refusal.blocked.reason,
        portcullis::middleware::Reason::CredentialMismatch
    );
    assert!(!format!("{refusal:?}").contains("ghp_REAL"));
}

#[tokio::test]
async fn git_clones_a_private_repository_with_a_placeholder_in_its_url() {
    use portcullis::middleware::credentials::{Credential, Credentials, Injection, StaticSecrets};
    const PLACEHOLDER: &str = "gho_PLACEHOLDERplaceholderPLACEHOLDER0000";
    let secrets = StaticSecrets::default();
    secrets.set("git", GIT_SECRET);
    let credential = Credential::new("git", Injection::basic("x-access-token").unwrap())
        .host(ORIGIN)
        .unwrap()
        .placeholder(PLACEHOLDER);
    let credentials = Credentials::new(vec![credential], Arc::new(secrets));
    let setup = setup_injecting(Mode::Full, true, RequestRules::default(), credentials).await;
    let work = tempfile::tempdir().unwrap();
    let author = [
        ("GIT_AUTHOR_NAME", "t"),
        ("GIT_AUTHOR_EMAIL", "t@t.test"),
        ("GIT_COMMITTER_NAME", "t"),
        ("GIT_COMMITTER_EMAIL", "t@t.test"),
    ];
    seed_repository(setup.git_root.path(), work.path(), &author).await;
    // git, through `setup`'s proxy, with only the placeholder in its URL.
    let clone = |setup: &Setup, into: &'static str| {
        let (proxy, ca) = (setup.proxy_url(), setup.our_ca());
        let url = format!(
            "https://x-access-token:{PLACEHOLDER}@{ORIGIN}:{}/private/git/repo.git",
            setup.origin.port()
        );
        let work = work.path().to_owned();
        async move {
            let through = [
                ("HTTPS_PROXY", proxy.as_str()),
                ("GIT_SSL_CAINFO", ca.as_str()),
            ];
            git(&["clone", "-q", &url, into], &work, &through).await
        }
    };
    // The origin wants the secret.
    let (cloned, out) = clone(&setup, "clone").await;
    assert!(cloned, "{out}");
    assert_eq!(
        std::fs::read_to_string(work.path().join("clone").join("README")).unwrap(),
        "hello\n"
    );
    // Without the proxy's credential (intercepted all the same, in limited
    // mode), the origin refuses the placeholder.
    let bare = setup_injecting(
        Mode::Limited,
        true,
        RequestRules::default(),
        Default::default(),
    )
    .await;
    let elsewhere = tempfile::tempdir().unwrap();
    seed_repository(bare.git_root.path(), elsewhere.path(), &author).await;
    let (cloned, out) = clone(&bare, "again").await;
    assert!(!cloned && out.contains("Authentication failed"), "{out}");
}

#[tokio::test]
async fn http2_both_ways_through_interception_and_a_refused_stream_fails_alone() {
    for (mode, rules, refused) in [
        (Mode::Full, sample_rules(ORIGIN), "/secret/x"),
        (Mode::Limited, RequestRules::default(), "/write"),
    ] {
        let setup = setup_with(mode, true, rules).await;
        let (proxy, ca) = (setup.proxy_url(), setup.our_ca());
        // One curl, one tunnel, three streams: the middle one is refused
        // (a rule, or limited mode's POST) and the connection goes on.
        let method = if mode == Mode::Limited { "POST" } else { "GET" };
        let common = [
            "--http2",
            "--cacert",
            &ca,
            "-x",
            &proxy,
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{response_code} %{num_connects}\\n",
        ];
        let (first, second, third) = (
            setup.url("/repos/a"),
            setup.url(refused),
            setup.url("/repos/b"),
        );
        let mut args: Vec<&str> = common.to_vec();
        args.push(&first);
        args.push("--next");
        args.extend(common);
        args.extend(["-X", method, &second, "--next"]);
        args.extend(common);
        args.push(&third);
        let out = curl(&args).await;
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(
            lines,
            ["2 200 1", "2 403 0", "2 200 0"],
            "{mode:?}: {}",
            out.stderr
        );
        // The origin was asked in HTTP/2 too.
        let out = curl(&[
            "--http2",
            "-s",
            "-i",
            "--cacert",
            &ca,
            "-x",
            &proxy,
            &setup.url("/repos/c"),
        ])
        .await;
        let inner = out.stdout.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(inner.starts_with("HTTP/2 200"), "{mode:?}: {}", out.stdout);
        assert!(
            inner.contains("x-origin-version: HTTP/2.0"),
            "{mode:?}: {}",
            out.stdout
        );
        let last = setup.ring.snapshot().pop().unwrap();
        assert_eq!(last.blocked.protocol, Protocol::HttpsMitm);
    }
}

#[tokio::test]
async fn trailers_and_streamed_frames_pass_both_ways_over_http2() {
    let setup = setup_with(Mode::Full, true, sample_rules(ORIGIN)).await;
    let tls = tls_tunnel_offering(&setup, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-echo", http::HeaderValue::from_static("from-the-client"));
    // (The sample rules allow POST under /issues/.)
    let request = Request::post(setup.url("/issues/stream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Frames::from(vec![
            hyper::body::Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
            hyper::body::Frame::trailers(trailers),
        ]))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.headers()["x-origin-version"], "HTTP/2.0");
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers came back");
    assert_eq!(collected.to_bytes(), "one two three");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echo"], "from-the-client");
    // A stream the rules refuse fails alone; the connection serves on.
    let refused = sender
        .send_request(
            Request::get(setup.url("/secret/x"))
                .body(Frames::from(vec![]))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let again = sender
        .send_request(
            Request::get(setup.url("/repos/z"))
                .body(Frames::from(vec![]))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
}

#[tokio::test]
async fn a_websocket_through_interception_round_trips_a_megabyte_and_idles_out() {
    use futures_util::{SinkExt, StreamExt};
    use portcullis::middleware::request_rules::{RuleBlock, RuleEntry};
    use tokio_tungstenite::tungstenite::Message;
    // Reads everywhere, and WebSockets only under /ws/ (an upgrade needs an
    // entry that names its paths).
    let rules = RequestRules::new(vec![RuleBlock::new(ORIGIN, "rules[0]")
        .unwrap()
        .allow(RuleEntry::new().methods(["GET"]).unwrap())
        .allow(
            RuleEntry::new()
                .methods(["GET"])
                .unwrap()
                .paths(["/ws/**"])
                .unwrap(),
        )]);
    let mut limits = portcullis::Limits::default();
    limits.tunnel_idle_timeout = Duration::from_secs(1);
    let setup = setup_limited(Mode::Full, rules, limits).await;
    let url = format!("wss://{ORIGIN}:{}/ws/echo", setup.origin.port());
    let tls = tls_tunnel_offering(&setup, &[b"http/1.1"]).await;
    let (mut socket, response) = tokio_tungstenite::client_async(url.as_str(), tls)
        .await
        .expect("the WebSocket handshake goes through the stack");
    assert_eq!(response.status(), 101);
    let megabyte: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    socket
        .send(Message::binary(megabyte.clone()))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_data().as_ref(), megabyte.as_slice());
    // Nothing moves for the tunnel idle timeout: the stream is closed.
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("the idle stream is closed");
    assert!(!matches!(ended, Some(Ok(Message::Binary(_)))), "{ended:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A path no entry names for upgrades is refused before any stream.
    let tls = tls_tunnel_offering(&setup, &[b"http/1.1"]).await;
    let refused = format!("wss://{ORIGIN}:{}/other", setup.origin.port());
    let error = tokio_tungstenite::client_async(refused.as_str(), tls)
        .await
        .expect_err("refused by the rules");
    assert!(error.to_string().contains("403"), "{error}");

    // Limited mode refuses every upgrade.
    let setup = setup_limited(
        Mode::Limited,
        RequestRules::default(),
        portcullis::Limits::default(),
    )
    .await;
    let tls = tls_tunnel_offering(&setup, &[b"http/1.1"]).await;
    let url = format!("wss://{ORIGIN}:{}/ws/echo", setup.origin.port());
    let error = tokio_tungstenite::client_async(url.as_str(), tls)
        .await
        .expect_err("limited mode refuses upgrades");
    assert!(error.to_string().contains("403"), "{error}");
}

#[tokio::test]
async fn shutdown_waits_for_a_websocket_inside_an_intercepted_tunnel() {
    use futures_util::{SinkExt, StreamExt};
    use portcullis::middleware::request_rules::{RuleBlock, RuleEntry};
    use tokio_tungstenite::tungstenite::Message;
    let rules = RequestRules::new(vec![RuleBlock::new(ORIGIN, "rules[0]").unwrap().allow(
        RuleEntry::new()
            .methods(["GET"])
            .unwrap()
            .paths(["/ws/**"])
            .unwrap(),
    )]);
    let setup = setup_limited(Mode::Full, rules, portcullis::Limits::default()).await;
    let url = format!("wss://{ORIGIN}:{}/ws/echo", setup.origin.port());
    let tls = tls_tunnel_offering(&setup, &[b"http/1.1"]).await;
    let (mut socket, _) = tokio_tungstenite::client_async(url.as_str(), tls)
        .await
        .unwrap();
    socket.send(Message::text("hello")).await.unwrap();
    let echoed = socket.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "hello");
    // The tunnel's HTTP connection ended with the upgrade; the WebSocket
    // still holds the drain, so shutdown waits for it and cuts it.
    let cut = setup.proxy.shutdown(Duration::from_millis(300)).await;
    assert_eq!(cut, 1, "the open WebSocket was held by the drain and cut");
}

/// A TLS origin that answers once per connection with `answer` and then
/// drops the connection without `close_notify` (as some servers do).
async fn origin_without_close_notify(pki: &OriginPki, answer: &'static [u8]) -> SocketAddr {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pki.chain.clone(), pki.key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = read_head(&mut tls).await;
                let _ = tls.write_all(answer).await;
                let _ = tls.flush().await;
                // Dropped, not shut down: the TCP stream ends with no
                // close_notify.
                drop(tls);
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_origin_that_ends_tls_without_close_notify_is_read_to_its_end() {
    let setup = setup(Mode::Limited, true).await;
    // A body that runs to the connection's end: complete at that end, as
    // curl and browsers read it (an HTTP/2 client saw INTERNAL_ERROR).
    let ended = origin_without_close_notify(
        &setup.pki,
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nthe whole body",
    )
    .await;
    for http in ["--http1.1", "--http2"] {
        let out = curl(&[
            http,
            "--cacert",
            &setup.our_ca(),
            "-x",
            &setup.proxy_url(),
            &format!("https://{ORIGIN}:{}/", ended.port()),
        ])
        .await;
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (Some(0), "the whole body"),
            "{http}: {}",
            out.stderr
        );
    }
    // A body its Content-Length says is longer: still the origin's
    // failure, never passed off as complete.
    let cut = origin_without_close_notify(
        &setup.pki,
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part",
    )
    .await;
    let out = curl(&[
        "--http2",
        "--cacert",
        &setup.our_ca(),
        "-x",
        &setup.proxy_url(),
        &format!("https://{ORIGIN}:{}/", cut.port()),
    ])
    .await;
    assert_ne!(
        out.code,
        Some(0),
        "a cut body is not complete: {}",
        out.stderr
    );
}

#[tokio::test]
async fn grpc_unary_and_server_streaming_calls_pass_an_intercepted_host_with_rules() {
    use futures_util::StreamExt;
    use portcullis::middleware::request_rules::{RuleBlock, RuleEntry};
    // gRPC is POST to /package.Service/Method: only test.Echo's Unary and
    // Stream are allowed.
    let rules = RequestRules::new(vec![RuleBlock::new(ORIGIN, "rules[0]").unwrap().allow(
        RuleEntry::new()
            .methods(["POST"])
            .unwrap()
            .paths(["/test.Echo/Unary", "/test.Echo/Stream"])
            .unwrap(),
    )]);
    let setup = setup_with(Mode::Full, true, rules).await;
    let tls = tls_tunnel_offering(&setup, &[b"h2"]).await;
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let origin: http::Uri = format!("https://{ORIGIN}:{}", setup.origin.port())
        .parse()
        .unwrap();
    let mut client = grpc::client(sender, origin);
    let path = |p: &'static str| http::uri::PathAndQuery::from_static(p);

    client.ready().await.unwrap();
    let reply = client
        .unary(
            tonic::Request::new(b"ping".to_vec()),
            path("/test.Echo/Unary"),
            grpc::Raw,
        )
        .await
        .expect("a unary call, its status from the trailers");
    assert_eq!(reply.into_inner(), b"gnip");

    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(
            tonic::Request::new(b"tick".to_vec()),
            path("/test.Echo/Stream"),
            grpc::Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.next().await {
        messages.push(message.expect("each streamed message"));
    }
    assert_eq!(messages, vec![b"tick".to_vec(); 3]);
    // The status came in the trailers, and they were read.
    assert!(stream.trailers().await.unwrap().is_some());

    // A method the rules do not allow fails that call only.
    client.ready().await.unwrap();
    let refused = client
        .unary(
            tonic::Request::new(b"x".to_vec()),
            path("/test.Echo/Admin"),
            grpc::Raw,
        )
        .await
        .expect_err("refused by the rules");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("rules[0]"), "{refused:?}");
    assert_eq!(
        refused.metadata().get("x-proxy-error").unwrap(),
        "blocked-by-request-rule"
    );
    client.ready().await.unwrap();
    let again = client
        .unary(
            tonic::Request::new(b"ab".to_vec()),
            path("/test.Echo/Unary"),
            grpc::Raw,
        )
        .await
        .unwrap();
    assert_eq!(again.into_inner(), b"ba");
}
