//! The HTTP/1 transport end to end, with curl and raw sockets on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::Ordering;

use common::*;
use portcullis::middleware::{NetworkPolicy, Reason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn allowed_absolute_form_get() {
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let out = curl(&[
        "-i",
        "-x",
        &proxy.http_url(),
        &format!("http://{}/hello", origin.addr),
    ])
    .await;
    let (status, headers, body) = parse_response(&out.stdout);
    assert_eq!(status, 200, "{}", out.stderr);
    assert_eq!(body, "hello /hello");
    assert_eq!(headers["x-seen-host"], origin.addr.to_string());
    assert!(!headers.contains_key("via"));
}

#[tokio::test]
async fn refused_absolute_form_get_is_a_403_with_json() {
    let proxy = proxy(allow(&["127.0.0.1"]).deny("evil.test").unwrap(), &[]).await;
    for (url, header, reason) in [
        ("http://evil.test/x", "blocked-by-denylist", "denied"),
        ("http://other.test/x", "blocked-by-allowlist", "not_allowed"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "blocked-by-allowlist",
            "not_allowed_local",
        ),
        (
            "http://0x7f.0.0.2:9/",
            "blocked-by-allowlist",
            "not_allowed_local",
        ),
        (
            "http://2130706434/",
            "blocked-by-allowlist",
            "not_allowed_local",
        ),
    ] {
        let out = curl(&["-i", "-x", &proxy.http_url(), url]).await;
        let (status, headers, body) = parse_response(&out.stdout);
        assert_eq!(status, 403, "{url}");
        assert_eq!(headers["x-proxy-error"], header, "{url}");
        assert_eq!(headers["content-type"], "application/json");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["reason"], reason, "{url}");
        assert_eq!(json["protocol"], "http");
        assert_eq!(json["decision"], "deny");
        assert!(json["message"]
            .as_str()
            .unwrap()
            .starts_with("portcullis refused"));
    }
    assert_eq!(proxy.ring.total(), 5, "every refusal is recorded");
}

#[tokio::test]
async fn connect_allowed_and_refused_with_curl() {
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let out = curl(&[
        "-p",
        "-x",
        &proxy.http_url(),
        &format!("http://{}/tunnel", origin.addr),
    ])
    .await;
    assert_eq!(out.stdout, "hello /tunnel", "{}", out.stderr);
    let out = curl(&["-p", "-x", &proxy.http_url(), "https://not-allowed.test/"]).await;
    assert_eq!(
        out.code,
        Some(56),
        "curl reports the failed CONNECT: {}",
        out.stderr
    );
    assert!(out.stderr.contains("403"), "{}", out.stderr);
}

#[tokio::test]
async fn raw_http1_connect_against_a_live_listener() {
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let request = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", origin.addr);
    let (mut tunnel, head) = raw_exchange(proxy.handle.http_addr(), &request).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tunnel
        .write_all(b"GET /inside HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tunnel.read_to_string(&mut response).await.unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("hello /inside"),
        "{response}"
    );

    // A refused CONNECT carries the same JSON body.
    let (mut refused, head) = raw_exchange(
        proxy.handle.http_addr(),
        "CONNECT blocked.test:443 HTTP/1.1\r\nHost: blocked.test:443\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-proxy-error: blocked-by-allowlist"),
        "{head}"
    );
    let body = read_body(&mut refused, &head).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["protocol"], "https_connect");
    assert_eq!(json["port"], 443);

    // No port means 443; a malformed target is a 400 with a reason.
    let (_, head) = raw_exchange(
        proxy.handle.http_addr(),
        "CONNECT bad\0host:443 HTTP/1.1\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

/// Sends a keep-alive GET for `url` on `stream` and reads the answer:
/// its head and body.
async fn get_on(stream: &mut tokio::net::TcpStream, url: &str) -> (String, String) {
    let authority = url.trim_start_matches("http://").split('/').next().unwrap();
    stream
        .write_all(format!("GET {url} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(stream).await;
    let body = read_body(stream, &head).await;
    (head, String::from_utf8(body).unwrap())
}

#[tokio::test]
async fn each_client_connection_keeps_its_own_origin_connection_and_leaves_it_for_the_next() {
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let url = |path: &str| format!("http://{}{path}", origin.addr);
    let connect = || tokio::net::TcpStream::connect(proxy.handle.http_addr());
    let (mut first, mut second) = (connect().await.unwrap(), connect().await.unwrap());
    // Interleaved on two client connections: two origin connections, each
    // carrying its own client's requests.
    for round in 0..3 {
        for client in [&mut first, &mut second] {
            let (head, body) = get_on(client, &url(&format!("/{round}"))).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(body, format!("hello /{round}"));
        }
    }
    assert_eq!(origin.connections.load(Ordering::SeqCst), 2);
    // Both clients gone: the next client connection takes one of theirs.
    drop((first, second));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut third = connect().await.unwrap();
    let (head, _) = get_on(&mut third, &url("/3")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        origin.connections.load(Ordering::SeqCst),
        2,
        "an idle origin connection is reused"
    );
}

#[tokio::test]
async fn a_get_meeting_an_origin_s_idle_close_is_sent_again_on_a_new_connection() {
    // Answers one request per connection; a second request on it is met
    // by a close, as an origin closing an idle connection just as the next
    // request arrives (the request was written: only a GET can be sent
    // again).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = read_head(&mut stream).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                let mut next = [0u8; 1];
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut next))
                        .await;
            });
        }
    });
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let mut client = tokio::net::TcpStream::connect(proxy.handle.http_addr())
        .await
        .unwrap();
    for _ in 0..20 {
        let (head, body) = get_on(&mut client, &format!("http://{origin}/")).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}{body}");
        assert_eq!(body, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 20);
    // A POST is never sent twice: the origin's close is the answer.
    client
        .write_all(
            format!(
                "POST http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\nContent-Length: 1\r\n\r\nx"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert_eq!(accepted.load(Ordering::SeqCst), 20, "not sent again");
    server.abort();
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    for path in ["/1", "/2", "/3"] {
        let out = curl(&[
            "-x",
            &proxy.http_url(),
            &format!("http://{}{path}", origin.addr),
        ])
        .await;
        assert_eq!(out.stdout, format!("hello {path}"));
    }
    assert_eq!(
        origin.connections.load(Ordering::SeqCst),
        1,
        "three client connections, one upstream connection"
    );
}

#[tokio::test]
async fn hop_by_hop_and_proxy_headers_never_reach_the_origin() {
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let out = curl(&[
        "-i",
        "-x",
        &proxy.http_url(),
        "-U",
        "user:secret",
        "-H",
        "Connection: x-private",
        "-H",
        "X-Private: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "X-Kept: 1",
        &format!("http://{}/", origin.addr),
    ])
    .await;
    let (status, headers, _) = parse_response(&out.stdout);
    assert_eq!(status, 200);
    let seen = &headers["x-seen-headers"];
    assert!(seen.contains("x-kept"), "{seen}");
    for hidden in [
        "proxy-authorization",
        "x-private",
        "keep-alive",
        "proxy-connection",
    ] {
        assert!(
            !seen.split(',').any(|h| h == hidden),
            "{hidden} reached the origin: {seen}"
        );
    }
}

#[tokio::test]
async fn websocket_style_upgrade_is_proxied() {
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let request = format!(
        "GET http://{0}/ws HTTP/1.1\r\nHost: {0}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        origin.addr
    );
    let (mut stream, head) = raw_exchange(proxy.handle.http_addr(), &request).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
}

#[tokio::test]
async fn dial_failures_are_502_and_timeouts_504() {
    let port = closed_port().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let out = curl(&[
        "-i",
        "-x",
        &proxy.http_url(),
        &format!("http://127.0.0.1:{port}/"),
    ])
    .await;
    let (status, headers, body) = parse_response(&out.stdout);
    assert_eq!(status, 502);
    assert_eq!(headers["x-proxy-error"], "upstream-unreachable");
    assert!(body.contains("\"kind\":\"refused\""), "{body}");
    // CONNECT answers 200 only once dialled: a refused dial is a 502, not a tunnel that closes.
    let (_, head) = raw_exchange(
        proxy.handle.http_addr(),
        &format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
}

#[tokio::test]
async fn bad_requests_get_a_400_with_a_reason() {
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let cases = [
        (
            format!(
                "GET http://{0}/ HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n",
                origin.addr
            ),
            "does not match",
        ),
        (
            "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".to_owned(),
            "forward proxy",
        ),
        (
            "GET ftp://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n".to_owned(),
            "scheme",
        ),
    ];
    let malformed_chunk = format!(
        "POST http://{0}/ HTTP/1.1\r\nHost: {0}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n0\r\n\r\n",
        origin.addr
    );
    let cases: Vec<(String, &str)> = cases
        .into_iter()
        .chain([(malformed_chunk, "request body")])
        .collect();
    for (request, reason) in cases {
        let (mut stream, head) = raw_exchange(proxy.handle.http_addr(), &request).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{request:?}: {head}");
        let mut body = vec![0u8; 512];
        let n = stream.read(&mut body).await.unwrap();
        let body = String::from_utf8_lossy(&body[..n]);
        assert!(body.contains(reason), "{body}");
    }
}

#[tokio::test]
async fn names_resolve_once_and_every_answer_is_vetted() {
    let origin = origin().await;
    let localhost = "127.0.0.1".parse().unwrap();
    // Allowed by name, but the name answers with a loopback address: refused by the connector.
    let proxy = proxy(allow(&["svc.test"]), &[("svc.test", localhost)]).await;
    let out = curl(&[
        "-i",
        "-x",
        &proxy.http_url(),
        &format!("http://svc.test:{}/", origin.addr.port()),
    ])
    .await;
    let (status, _, body) = parse_response(&out.stdout);
    assert_eq!(status, 403);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["reason"], "not_allowed_local");
    assert_eq!(json["source"], "connector");
    assert_eq!(
        proxy.ring.snapshot()[0].blocked.reason,
        Reason::NotAllowedLocal
    );
    // Naming the exact address unlocks it.
    let proxy = proxy_with(
        NetworkPolicy::builder()
            .allow("svc.test")
            .unwrap()
            .allow("127.0.0.1")
            .unwrap()
            .build(),
        &[("svc.test", localhost)],
        |b| b,
    )
    .await;
    let out = curl(&[
        "-x",
        &proxy.http_url(),
        &format!("http://svc.test:{}/named", origin.addr.port()),
    ])
    .await;
    assert_eq!(out.stdout, "hello /named", "{}", out.stderr);
    // A name that does not resolve is a 502, never a silent close.
    let proxy = proxy_with(
        NetworkPolicy::builder().allow("*.invalid").unwrap().build(),
        &[],
        |b| b,
    )
    .await;
    let out = curl(&["-i", "-x", &proxy.http_url(), "http://nothing.invalid/"]).await;
    let (status, _, _) = parse_response(&out.stdout);
    assert_eq!(status, 502);
}

#[tokio::test]
async fn policy_changes_apply_to_the_next_request() {
    let origin = origin().await;
    let proxy = proxy(allow(&[]), &[]).await;
    let url = format!("http://{}/live", origin.addr);
    let (status, _, _) = parse_response(&curl(&["-i", "-x", &proxy.http_url(), &url]).await.stdout);
    assert_eq!(status, 403);
    proxy
        .handle
        .policy()
        .store(NetworkPolicy::builder().allow("127.0.0.1").unwrap().build());
    let out = curl(&["-x", &proxy.http_url(), &url]).await;
    assert_eq!(out.stdout, "hello /live");
}

#[tokio::test]
async fn a_layer_of_our_own_refuses_with_its_own_reason_on_every_path() {
    use http::Request;
    use portcullis::body::Body;
    use portcullis::middleware::{Blocked, BoxError, PolicyHandle, RequestInfo, Source};

    let origin = origin().await;
    // Requests from the "build" team only: an x-team header on HTTP; SOCKS5
    // has no headers, so it is refused there too.
    let require_team = tower::filter::FilterLayer::new(|request: Request<Body>| {
        if request
            .headers()
            .get("x-team")
            .is_some_and(|v| v == "build")
        {
            return Ok(request);
        }
        let info = RequestInfo::from_request(&request)?;
        Err::<Request<Body>, BoxError>(
            Blocked::new(
                Reason::Custom("team_header"),
                Source::Layer("require_team"),
                info.target,
                info.protocol,
                &info.method,
            )
            .with_message(
                "portcullis refused the request: it carries no x-team header; send x-team: build",
            )
            .into(),
        )
    });
    let policy = PolicyHandle::new(NetworkPolicy::builder().allow("127.0.0.1").unwrap().build());
    let proxy = portcullis::Proxy::builder()
        .policy(policy)
        .socks_addr(Some("127.0.0.1:0".parse().unwrap()))
        .outer_layer(require_team)
        .start()
        .await
        .unwrap();
    let proxy_url = format!("http://{}", proxy.http_addr());
    let url = format!("http://{}/team", origin.addr);

    let out = curl(&["-i", "-x", &proxy_url, &url]).await;
    let (status, headers, body) = parse_response(&out.stdout);
    assert_eq!(status, 403, "{}", out.stdout);
    assert_eq!(headers["x-proxy-error"], "blocked-by-team-header");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["reason"], "team_header");
    assert_eq!(json["source"], "require_team");
    assert!(json["message"].as_str().unwrap().contains("x-team"));

    let out = curl(&["-H", "x-team: build", "-x", &proxy_url, &url]).await;
    assert_eq!(out.stdout, "hello /team", "{}", out.stderr);

    let socks = format!("socks5h://{}", proxy.socks_addr().unwrap());
    let out = curl(&["--proxy", &socks, &url]).await;
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("not allowed") || out.stderr.contains("(2)"),
        "{}",
        out.stderr
    );
    assert_eq!(proxy.violations().total(), 2, "both refusals are logged");
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_framed_by_the_chunks_and_closes() {
    // hyper drops Content-Length when Transfer-Encoding is present, frames the
    // body by its chunks, and closes the connection after answering (RFC 9112
    // §6.1): the origin sees one chunked request, and nothing pipelined after
    // it is served on that connection.
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let request = format!(
        "POST http://{0}/first HTTP/1.1\r\nHost: {0}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET http://{0}/second HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
        origin.addr
    );
    let mut stream = tokio::net::TcpStream::connect(proxy.handle.http_addr())
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_string(&mut answer),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 1, "{answer}");
    assert!(
        answer.contains("hello /first") && !answer.contains("hello /second"),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    let first_seen = answer
        .lines()
        .find(|l| l.starts_with("x-seen-headers"))
        .unwrap();
    assert!(!first_seen.contains("content-length"), "{first_seen}");
}

#[tokio::test]
async fn heads_bodies_and_tunnels_are_bounded() {
    use std::time::Duration;
    let origin = origin().await;
    let limits = portcullis::Limits::default()
        .max_header_bytes(16 * 1024)
        .max_headers(50)
        .body_idle_timeout(Duration::from_millis(800))
        .body_min_rate(100)
        .tunnel_idle_timeout(Duration::from_millis(800));
    let proxy = proxy_with(allow(&["127.0.0.1"]).build(), &[], |b| b.limits(limits)).await;
    let addr = proxy.handle.http_addr();
    let authority = origin.addr.to_string();

    // A head over the limit, or with too many headers, is refused (431).
    let big = "x".repeat(20 * 1024);
    let (_, head) = raw_exchange(
        addr,
        &format!("GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nX-Big: {big}\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    let many: String = (0..80).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (_, head) = raw_exchange(
        addr,
        &format!("GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n{many}\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    // A body that stalls is refused (400) rather than holding an upstream:
    // an origin that waits for the whole body before answering.
    let patient = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let patient_addr = patient.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = patient.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut stream).await;
                let mut body = [0u8; 10];
                if stream.read_exact(&mut body).await.is_ok() {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("POST http://{patient_addr}/ HTTP/1.1\r\nHost: {patient_addr}\r\nContent-Length: 10\r\n\r\nab").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let mut body = vec![0u8; 512];
    let n = stream.read(&mut body).await.unwrap();
    assert!(String::from_utf8_lossy(&body[..n]).contains("sent nothing for"));

    // A body that trickles (a byte every 300 ms, inside the idle timeout)
    // is refused once it falls below the minimum rate.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read_half, mut write_half) = stream.into_split();
    let request = format!(
        "POST http://{patient_addr}/ HTTP/1.1\r\nHost: {patient_addr}\r\nContent-Length: 40\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        write_half.write_all(request.as_bytes()).await.unwrap();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if write_half.write_all(b"x").await.is_err() {
                break;
            }
        }
    });
    let head = tokio::time::timeout(Duration::from_secs(30), read_head(&mut read_half))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let n = read_half.read(&mut body).await.unwrap();
    let text = String::from_utf8_lossy(&body[..n]);
    assert!(text.contains("under 100 bytes a second"), "{text}");
    writer.abort();

    // A tunnel that moves keeps going past the idle timeout; a quiet one closes.
    let (mut tunnel, head) = raw_exchange(
        addr,
        &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        tunnel
            .write_all(format!("GET /r{round} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut tunnel).await;
        assert!(head.starts_with("HTTP/1.1 200"), "round {round}: {head}");
        let mut body = [0u8; 64];
        let _ = tunnel.read(&mut body).await.unwrap();
    }
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest))
        .await
        .expect("the quiet tunnel is closed")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[tokio::test]
async fn the_head_limit_is_exact_and_its_431_is_json() {
    let limits = portcullis::Limits::default()
        .max_header_bytes(16 * 1024)
        .max_headers(50);
    let proxy = proxy_with(allow(&["ok.test"]).build(), &[], |b| b.limits(limits)).await;
    let addr = proxy.handle.http_addr();
    // A head of exactly `size` bytes: the request line, Host, X-Pad.
    let head_of = |size: usize| {
        let fixed = "GET http://other.test/ HTTP/1.1\r\nHost: other.test\r\nX-Pad: \r\n\r\n".len();
        let pad = "p".repeat(size - fixed);
        format!("GET http://other.test/ HTTP/1.1\r\nHost: other.test\r\nX-Pad: {pad}\r\n\r\n")
    };
    let at_limit = head_of(16 * 1024);
    assert_eq!(at_limit.len(), 16 * 1024);
    let (_, head) = raw_exchange(addr, &at_limit).await;
    assert!(
        head.starts_with("HTTP/1.1 403"),
        "at the limit the policy decides: {head}"
    );
    let over = head_of(16 * 1024 + 1);
    let (mut stream, head) = raw_exchange(addr, &over).await;
    assert!(head.starts_with("HTTP/1.1 431"), "one byte over: {head}");
    let (_, headers, _) = parse_response(&head);
    assert_eq!(headers["x-proxy-error"], "header-too-large");
    assert_eq!(headers["content-type"], "application/json");
    let mut body = vec![0u8; headers["content-length"].parse().unwrap()];
    stream.read_exact(&mut body).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["status"], "header_too_large");
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .contains("max_header_bytes"),
        "{json}"
    );
    // One header of 30 KB (hyper alone let up to ~115 KB through at 64 KiB).
    let (_, head) = raw_exchange(addr, &head_of(30 * 1024)).await;
    assert!(
        head.starts_with("HTTP/1.1 431") && head.contains("header-too-large"),
        "{head}"
    );
    // Too many headers: 51 of a limit of 50.
    let many: String = (0..49).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (_, head) = raw_exchange(
        addr,
        &format!("GET http://other.test/ HTTP/1.1\r\nHost: other.test\r\n{many}\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 403"), "50 headers: {head}");
    let many: String = (0..50).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (_, head) = raw_exchange(
        addr,
        &format!("GET http://other.test/ HTTP/1.1\r\nHost: other.test\r\n{many}\r\n"),
    )
    .await;
    assert!(
        head.starts_with("HTTP/1.1 431") && head.contains("header-too-large"),
        "51 headers: {head}"
    );
    // A CONNECT head is counted the same way.
    let pad = "p".repeat(17 * 1024);
    let (_, head) = raw_exchange(
        addr,
        &format!("CONNECT ok.test:443 HTTP/1.1\r\nX-Pad: {pad}\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

#[tokio::test]
async fn an_origin_that_resets_or_closes_is_upstream_unreachable() {
    // Three origins: one resets after reading (plain HTTP sent to a TLS
    // port ends like this), one closes without a word, one answers bytes
    // that are not HTTP.
    async fn origin_that(behaviour: &'static str) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buffer = [0u8; 1024];
                let _ = stream.read(&mut buffer).await;
                match behaviour {
                    "reset" => {
                        let _ = stream.set_zero_linger();
                    }
                    "junk" => {
                        let _ = stream.write_all(b"\x16\x03\x01\x00\x02\x02\x28").await;
                    }
                    _ => {}
                }
                drop(stream);
            }
        });
        addr
    }
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    for behaviour in ["reset", "close", "junk"] {
        let origin = origin_that(behaviour).await;
        let out = curl(&["-i", "-x", &proxy.http_url(), &format!("http://{origin}/")]).await;
        let (status, headers, body) = parse_response(&out.stdout);
        assert_eq!(status, 502, "{behaviour}: {}", out.stdout);
        assert_eq!(
            headers["x-proxy-error"], "upstream-unreachable",
            "{behaviour}"
        );
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let message = json["message"].as_str().unwrap();
        assert!(
            message.contains(&origin.to_string()),
            "{behaviour}: {message}"
        );
        assert!(message.contains("speaking HTTP"), "{behaviour}: {message}");
        assert!(!message.contains("SendRequest"), "{behaviour}: {message}");
    }
}
