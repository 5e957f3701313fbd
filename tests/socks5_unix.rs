//! SOCKS5 (TCP and UDP), Unix-socket forwarding and limited mode, end to end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use portcullis::middleware::{Mode, NetworkPolicy, Protocol, Reason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket, UnixListener};

/// Greets with the given methods; returns the server's choice.
async fn greet(stream: &mut TcpStream, methods: &[u8]) -> [u8; 2] {
    let mut greeting = vec![5, methods.len() as u8];
    greeting.extend_from_slice(methods);
    stream.write_all(&greeting).await.unwrap();
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await.unwrap();
    choice
}

/// Sends a request with a domain address; returns the reply head (VER REP RSV ATYP).
async fn request(stream: &mut TcpStream, command: u8, domain: &str, port: u16) -> [u8; 4] {
    let mut message = vec![5, command, 0, 3, domain.len() as u8];
    message.extend_from_slice(domain.as_bytes());
    message.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&message).await.unwrap();
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await.unwrap();
    head
}

#[tokio::test]
async fn curl_socks5_hostname_allowed_refused_and_named() {
    let origin = origin().await;
    let localhost = "127.0.0.1".parse().unwrap();
    let proxy = proxy(
        allow(&["127.0.0.1", "svc.test"]),
        &[("svc.test", localhost)],
    )
    .await;
    let socks = proxy.socks_addr().to_string();
    let out = curl(&[
        "--socks5-hostname",
        &socks,
        &format!("http://{}/ip", origin.addr),
    ])
    .await;
    assert_eq!(out.stdout, "hello /ip", "{}", out.stderr);
    let out = curl(&[
        "--socks5-hostname",
        &socks,
        &format!("http://svc.test:{}/name", origin.addr.port()),
    ])
    .await;
    assert_eq!(out.stdout, "hello /name", "{}", out.stderr);
    let out = curl(&["--socks5-hostname", &socks, "http://refused.test/"]).await;
    assert_eq!(
        out.code,
        Some(97),
        "curl's code for a refused SOCKS5 connect: {}",
        out.stderr
    );
    let last = proxy.ring.snapshot().pop().unwrap();
    assert_eq!(last.blocked.protocol, Protocol::Socks5Tcp);
    assert_eq!(last.blocked.reason, Reason::NotAllowed);
}

#[tokio::test]
async fn raw_socks5_reply_codes() {
    let port = closed_port().await;
    let proxy = proxy(allow(&["127.0.0.1"]).deny("denied.test").unwrap(), &[]).await;
    let socks = proxy.socks_addr();

    let mut stream = TcpStream::connect(socks).await.unwrap();
    assert_eq!(greet(&mut stream, &[0]).await, [5, 0]);
    assert_eq!(
        request(&mut stream, 1, "denied.test", 443).await[1],
        0x02,
        "refused by policy"
    );

    let mut stream = TcpStream::connect(socks).await.unwrap();
    greet(&mut stream, &[0]).await;
    assert_eq!(
        request(&mut stream, 1, "0x7f.0.0.9", 80).await[1],
        0x02,
        "a numeric spelling of a local address"
    );

    let mut stream = TcpStream::connect(socks).await.unwrap();
    greet(&mut stream, &[0]).await;
    assert_eq!(
        request(&mut stream, 1, "127.0.0.1", port).await[1],
        0x05,
        "connection refused"
    );

    let mut stream = TcpStream::connect(socks).await.unwrap();
    greet(&mut stream, &[0]).await;
    assert_eq!(
        request(&mut stream, 2, "127.0.0.1", 80).await[1],
        0x07,
        "BIND is not supported"
    );

    let mut stream = TcpStream::connect(socks).await.unwrap();
    greet(&mut stream, &[0]).await;
    assert_eq!(
        request(&mut stream, 1, "bad\u{1}name", 80).await[1],
        0x01,
        "control bytes in a domain"
    );

    let mut stream = TcpStream::connect(socks).await.unwrap();
    assert_eq!(
        greet(&mut stream, &[2]).await,
        [5, 0xff],
        "no acceptable method"
    );
}

async fn udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buffer).await {
            let _ = socket.send_to(&buffer[..n], from).await;
        }
    });
    addr
}

fn udp_datagram(destination: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let SocketAddr::V4(v4) = destination else {
        panic!("IPv4 only here")
    };
    let mut datagram = vec![0, 0, 0, 1];
    datagram.extend_from_slice(&v4.ip().octets());
    datagram.extend_from_slice(&v4.port().to_be_bytes());
    datagram.extend_from_slice(payload);
    datagram
}

async fn recv_within(socket: &UdpSocket, millis: u64) -> Option<Vec<u8>> {
    let mut buffer = [0u8; 2048];
    match tokio::time::timeout(Duration::from_millis(millis), socket.recv_from(&mut buffer)).await {
        Ok(Ok((n, _))) => Some(buffer[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test]
async fn udp_associate_relays_to_allowed_destinations_only() {
    let echo = udp_echo().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let (control, relay) = associate(proxy.socks_addr()).await;

    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&udp_datagram(echo, b"hello"), relay)
        .await
        .unwrap();
    let answer = recv_within(&client, 5000)
        .await
        .expect("the echo comes back to the client");
    assert_eq!(
        answer,
        udp_datagram(echo, b"hello"),
        "header names the remote, payload intact"
    );

    // A refused destination is dropped and recorded; the association stays up.
    let refused: SocketAddr = format!("127.0.0.2:{}", echo.port()).parse().unwrap();
    client
        .send_to(&udp_datagram(refused, b"nope"), relay)
        .await
        .unwrap();
    assert_eq!(recv_within(&client, 300).await, None);
    let last = proxy.ring.snapshot().pop().expect("the refusal is logged");
    assert_eq!(last.blocked.protocol, Protocol::Socks5Udp);
    assert_eq!(last.blocked.reason, Reason::NotAllowedLocal);

    // Fragments are dropped.
    let mut fragment = udp_datagram(echo, b"frag");
    fragment[2] = 1;
    client.send_to(&fragment, relay).await.unwrap();
    assert_eq!(recv_within(&client, 300).await, None);

    // Datagrams from another source are ignored.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger
        .send_to(&udp_datagram(echo, b"stranger"), relay)
        .await
        .unwrap();
    assert_eq!(recv_within(&stranger, 300).await, None);
    assert_eq!(recv_within(&client, 100).await, None);

    // Still up for the client.
    client
        .send_to(&udp_datagram(echo, b"again"), relay)
        .await
        .unwrap();
    assert_eq!(
        recv_within(&client, 5000).await,
        Some(udp_datagram(echo, b"again"))
    );

    // Closing the control connection ends the association.
    drop(control);
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .send_to(&udp_datagram(echo, b"late"), relay)
        .await
        .unwrap();
    assert_eq!(recv_within(&client, 300).await, None);
}

async fn unix_origin(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("origin.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: http::Request<hyper::body::Incoming>| async move {
                        let mut names: Vec<String> =
                            request.headers().keys().map(|k| k.to_string()).collect();
                        names.sort();
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("x-seen-headers", names.join(","))
                                .body(Full::new(Bytes::from(format!(
                                    "unix {} {}",
                                    request.method(),
                                    request.uri()
                                ))))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    path
}

#[tokio::test]
async fn unix_sockets_allowed_listed_relative_and_escape_hatch() {
    let dir = tempfile::tempdir().unwrap();
    let socket = unix_origin(dir.path()).await;
    let canonical = std::fs::canonicalize(&socket).unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&socket, &link).unwrap();

    let listed = NetworkPolicy::builder()
        .allow_unix_socket(&canonical)
        .unwrap()
        .build();
    let proxy = proxy_with(listed, &[], |b| b).await;
    for path in [&socket, &link] {
        let header = format!("x-unix-socket: {}", path.display());
        let out = curl(&[
            "-i",
            "-x",
            &proxy.http_url(),
            "-H",
            &header,
            "http://localhost/v1/ping?x=1",
        ])
        .await;
        let (status, headers, body) = parse_response(&out.stdout);
        assert_eq!(status, 200, "{}", out.stderr);
        assert_eq!(body, "unix GET /v1/ping?x=1");
        assert!(!headers["x-seen-headers"].contains("x-unix-socket"));
    }

    let other = proxy_with(NetworkPolicy::builder().build(), &[], |b| b).await;
    let header = format!("x-unix-socket: {}", socket.display());
    let out = curl(&[
        "-i",
        "-x",
        &other.http_url(),
        "-H",
        &header,
        "http://localhost/",
    ])
    .await;
    let (status, headers, body) = parse_response(&out.stdout);
    assert_eq!(status, 403);
    assert_eq!(headers["x-proxy-error"], "blocked-by-allowlist");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["protocol"], "unix_socket");

    let out = curl(&[
        "-i",
        "-x",
        &proxy.http_url(),
        "-H",
        "x-unix-socket: origin.sock",
        "http://localhost/",
    ])
    .await;
    assert_eq!(
        parse_response(&out.stdout).0,
        403,
        "a relative path is always refused"
    );

    let (_, head) = raw_exchange(proxy.handle.http_addr(), "GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\nx-unix-socket: /tmp/\u{00ff}.sock\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");

    let open = proxy_with(
        NetworkPolicy::builder()
            .dangerously_allow_all_unix_sockets(true)
            .build(),
        &[],
        |b| b,
    )
    .await;
    let out = curl(&[
        "-x",
        &open.http_url(),
        "-H",
        &header,
        "http://localhost/open",
    ])
    .await;
    assert_eq!(out.stdout, "unix GET /open");
}

#[tokio::test]
async fn limited_mode_on_every_path() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = unix_origin(dir.path()).await;
    let policy = NetworkPolicy::builder()
        .allow("127.0.0.1")
        .unwrap()
        .allow_unix_socket(std::fs::canonicalize(&socket).unwrap())
        .unwrap()
        .mode(Mode::Limited)
        .build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    let url = format!("http://{}/r", origin.addr);
    assert_eq!(
        curl(&["-x", &proxy.http_url(), &url]).await.stdout,
        "hello /r"
    );
    let out = curl(&["-i", "-x", &proxy.http_url(), "-X", "POST", "-d", "x", &url]).await;
    let (status, headers, _) = parse_response(&out.stdout);
    assert_eq!(
        (status, headers["x-proxy-error"].as_str()),
        (403, "blocked-by-method-policy")
    );
    let (_, head) = raw_exchange(
        proxy.handle.http_addr(),
        &format!("CONNECT {} HTTP/1.1\r\n\r\n", origin.addr),
    )
    .await;
    assert!(
        head.to_ascii_lowercase()
            .contains("x-proxy-error: blocked-by-mitm-required"),
        "{head}"
    );
    let out = curl(&["--socks5-hostname", &proxy.socks_addr().to_string(), &url]).await;
    assert_eq!(out.code, Some(97));
    assert_eq!(
        proxy.ring.snapshot().pop().unwrap().blocked.reason,
        Reason::MethodNotAllowed
    );
    // A read that carries a body is a write in disguise.
    let out = curl(&[
        "-i",
        "-x",
        &proxy.http_url(),
        "-X",
        "GET",
        "--data-binary",
        "payload",
        &url,
    ])
    .await;
    assert_eq!(parse_response(&out.stdout).0, 403, "{}", out.stdout);
    let out = curl(&[
        "-i",
        "-x",
        &proxy.http_url(),
        "-X",
        "GET",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "payload",
        &url,
    ])
    .await;
    assert_eq!(
        parse_response(&out.stdout).0,
        403,
        "chunked: {}",
        out.stdout
    );
    // UDP ASSOCIATE is refused at the request (0x02), not datagram by datagram.
    let before = proxy.ring.total();
    let mut control = TcpStream::connect(proxy.socks_addr()).await.unwrap();
    greet(&mut control, &[0]).await;
    control
        .write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut reply = [0u8; 2];
    control.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, [5, 0x02]);
    assert_eq!(proxy.ring.total(), before + 1, "and recorded");
    let header = format!("x-unix-socket: {}", socket.display());
    let out = curl(&[
        "-i",
        "-x",
        &proxy.http_url(),
        "-X",
        "PUT",
        "-H",
        &header,
        "http://localhost/",
    ])
    .await;
    assert_eq!(parse_response(&out.stdout).0, 403);
}

#[tokio::test]
async fn username_password_when_configured() {
    let origin = origin().await;
    let proxy = proxy_with(allow(&["127.0.0.1"]).build(), &[], |b| {
        b.credentials("agent", "s3cret")
    })
    .await;
    let socks = proxy.socks_addr();
    let mut stream = TcpStream::connect(socks).await.unwrap();
    assert_eq!(
        greet(&mut stream, &[0]).await,
        [5, 0xff],
        "no-auth is refused once credentials are set"
    );
    for (password, accepted) in [("wrong", false), ("s3cret", true)] {
        let mut stream = TcpStream::connect(socks).await.unwrap();
        assert_eq!(greet(&mut stream, &[0, 2]).await, [5, 2]);
        let mut auth = vec![1, 5];
        auth.extend_from_slice(b"agent");
        auth.push(password.len() as u8);
        auth.extend_from_slice(password.as_bytes());
        stream.write_all(&auth).await.unwrap();
        let mut reply = [0u8; 2];
        stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[0], 1);
        assert_eq!(
            reply[1] == 0,
            accepted,
            "RFC 1929: 0 is success, anything else failure ({password})"
        );
    }
    let out = curl(&[
        "--socks5-hostname",
        &socks.to_string(),
        "--proxy-user",
        "agent:s3cret",
        &format!("http://{}/authed", origin.addr),
    ])
    .await;
    assert_eq!(out.stdout, "hello /authed", "{}", out.stderr);
}

/// Opens an association and returns the control connection and the relay.
async fn associate(socks: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut control = TcpStream::connect(socks).await.unwrap();
    greet(&mut control, &[0]).await;
    control
        .write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut reply = [0u8; 10];
    control.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[..2], [5, 0]);
    let relay = SocketAddr::from((
        [reply[4], reply[5], reply[6], reply[7]],
        u16::from_be_bytes([reply[8], reply[9]]),
    ));
    (control, relay)
}

#[tokio::test]
async fn udp_decisions_run_off_the_relay_loop_and_follow_the_live_policy() {
    use portcullis::middleware::{approver_fn, ApprovalOutcome, ApprovalRequest};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let asked = udp_echo().await; // a miss: put to the approver
    let allowed = udp_echo().await; // on the allowlist
    let policy = || {
        NetworkPolicy::builder()
            .allow_local_binding(true)
            .allow(&format!("127.0.0.1:{}", allowed.port()))
            .unwrap()
    };
    // The approver answers only when the test says so.
    let (answer, answers) = tokio::sync::mpsc::channel::<ApprovalOutcome>(4);
    let answers = Arc::new(tokio::sync::Mutex::new(answers));
    let calls = Arc::new(AtomicUsize::new(0));
    let approver = {
        let calls = calls.clone();
        approver_fn(move |_: ApprovalRequest| {
            let answers = answers.clone();
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let outcome = answers.lock().await.recv().await;
                outcome.ok_or_else(|| "no answer".into())
            }
        })
    };
    let proxy = proxy_with(policy().build(), &[], |builder| {
        builder.approver(approver, Duration::from_secs(30))
    })
    .await;
    let (_control, relay) = associate(proxy.socks_addr()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // A question is pending for one destination ...
    client
        .send_to(&udp_datagram(asked, b"a1"), relay)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // ... and another destination keeps flowing meanwhile.
    client
        .send_to(&udp_datagram(allowed, b"b1"), relay)
        .await
        .unwrap();
    assert_eq!(
        recv_within(&client, 3000).await,
        Some(udp_datagram(allowed, b"b1")),
        "a pending decision does not stall the association"
    );
    // More datagrams for the pending destination wait for the answer.
    client
        .send_to(&udp_datagram(asked, b"a2"), relay)
        .await
        .unwrap();
    assert_eq!(recv_within(&client, 200).await, None);
    answer.send(ApprovalOutcome::AllowOnce).await.unwrap();
    let mut echoed = vec![
        recv_within(&client, 3000)
            .await
            .expect("the first queued datagram"),
        recv_within(&client, 3000)
            .await
            .expect("the second queued datagram"),
    ];
    echoed.sort();
    assert_eq!(
        echoed,
        vec![udp_datagram(asked, b"a1"), udp_datagram(asked, b"a2")]
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one question for the queue"
    );

    // Allow once covered the datagrams that waited, nothing later.
    client
        .send_to(&udp_datagram(asked, b"a3"), relay)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "asked again");
    answer.send(ApprovalOutcome::Deny).await.unwrap();
    assert_eq!(recv_within(&client, 300).await, None, "denied: dropped");

    // A reload reaches the running association on its next datagram.
    proxy.handle.policy().store(
        policy()
            .deny(&format!("127.0.0.1:{}", allowed.port()))
            .unwrap()
            .build(),
    );
    client
        .send_to(&udp_datagram(allowed, b"b2"), relay)
        .await
        .unwrap();
    assert_eq!(
        recv_within(&client, 500).await,
        None,
        "refused after the reload"
    );
    let last = proxy.ring.snapshot().pop().expect("the refusal is logged");
    assert_eq!(last.blocked.protocol, Protocol::Socks5Udp);
    assert_eq!(last.blocked.target.port(), Some(allowed.port()));
    assert_eq!(last.blocked.reason, Reason::Denied);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "a denial is never asked");
}

#[tokio::test]
async fn an_association_belongs_to_the_sender_it_declared() {
    let echo = udp_echo().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let mine = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Declare our own UDP address in UDP ASSOCIATE.
    let mut control = TcpStream::connect(proxy.socks_addr()).await.unwrap();
    greet(&mut control, &[0]).await;
    let declared = mine.local_addr().unwrap();
    let mut message = vec![5, 3, 0, 1, 127, 0, 0, 1];
    message.extend_from_slice(&declared.port().to_be_bytes());
    control.write_all(&message).await.unwrap();
    let mut reply = [0u8; 10];
    control.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[..2], [5, 0]);
    let relay = SocketAddr::from((
        [reply[4], reply[5], reply[6], reply[7]],
        u16::from_be_bytes([reply[8], reply[9]]),
    ));
    // Another local program (same IP, another port) cannot take it over,
    // even by speaking first.
    other
        .send_to(&udp_datagram(echo, b"takeover"), relay)
        .await
        .unwrap();
    assert_eq!(recv_within(&other, 300).await, None);
    mine.send_to(&udp_datagram(echo, b"mine"), relay)
        .await
        .unwrap();
    assert_eq!(
        recv_within(&mine, 5000).await,
        Some(udp_datagram(echo, b"mine"))
    );
}

#[tokio::test]
async fn an_association_keeps_at_most_1024_destinations() {
    let echo = udp_echo().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let (_control, relay) = associate(proxy.socks_addr()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // 1,024 other destinations (closed ports: nothing answers), then the echo.
    let mut port = 20_000u16;
    let mut sent = 0;
    while sent < 1024 {
        port += 1;
        if port == echo.port() {
            continue;
        }
        let destination = SocketAddr::from(([127, 0, 0, 1], port));
        client
            .send_to(&udp_datagram(destination, b"x"), relay)
            .await
            .unwrap();
        sent += 1;
        // Paced, so the relay's receive buffer never overflows.
        if sent % 32 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    // Let the relay take them all in before the one that would be 1,025th.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    client
        .send_to(&udp_datagram(echo, b"one too many"), relay)
        .await
        .unwrap();
    assert_eq!(
        recv_within(&client, 500).await,
        None,
        "the 1,025th destination is dropped"
    );
    // A fresh association reaches it.
    let (_control, relay) = associate(proxy.socks_addr()).await;
    let fresh = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    fresh
        .send_to(&udp_datagram(echo, b"fresh"), relay)
        .await
        .unwrap();
    assert_eq!(
        recv_within(&fresh, 5000).await,
        Some(udp_datagram(echo, b"fresh"))
    );
}

/// Asks for an association from `from` (a loopback address); the reply code.
async fn try_associate(socks: SocketAddr, from: &str) -> (TcpStream, u8) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut control = socket.connect(socks).await.unwrap();
    greet(&mut control, &[0]).await;
    control
        .write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut reply = [0u8; 10];
    control.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[0], 5);
    (control, reply[1])
}

#[tokio::test]
async fn udp_associations_are_capped_per_client_and_in_all() {
    let limits = portcullis::Limits::default()
        .max_udp_associations(5)
        .max_udp_associations_per_client(3);
    let proxy = proxy_with(allow(&["127.0.0.1"]).build(), &[], |b| b.limits(limits)).await;
    let socks = proxy.socks_addr();
    let mut held = Vec::new();
    for _ in 0..3 {
        let (control, code) = try_associate(socks, "127.0.0.1").await;
        assert_eq!(code, 0);
        held.push(control);
    }
    // A fourth from the same client: general failure (0x01).
    let (_, code) = try_associate(socks, "127.0.0.1").await;
    assert_eq!(code, 1, "past the per-client limit");
    // Another client still has room, up to the total.
    for _ in 0..2 {
        let (control, code) = try_associate(socks, "127.0.0.2").await;
        assert_eq!(code, 0);
        held.push(control);
    }
    let (_, code) = try_associate(socks, "127.0.0.3").await;
    assert_eq!(code, 1, "past the total");
    // Closing an association gives its place back (bounded wait).
    drop(held.remove(0));
    let mut code = 1;
    for _ in 0..250 {
        let (control, answered) = try_associate(socks, "127.0.0.1").await;
        code = answered;
        if code == 0 {
            held.push(control);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(code, 0, "a closed association's place is free again");
}

#[tokio::test]
async fn a_write_dressed_as_a_git_fetch_to_a_unix_socket_is_refused_in_limited_mode() {
    let dir = tempfile::tempdir().unwrap();
    let socket = unix_origin(dir.path()).await;
    let canonical = std::fs::canonicalize(&socket).unwrap();
    let policy = NetworkPolicy::builder()
        .mode(Mode::Limited)
        .allow_unix_socket(&canonical)
        .unwrap()
        .build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    let header = format!("x-unix-socket: {}", socket.display());
    let post = |body: &'static str| {
        let (url, header) = (proxy.http_url(), header.clone());
        async move {
            curl_status(&[
                "-x",
                &url,
                "-H",
                &header,
                "-H",
                "Content-Type: application/x-git-upload-pack-request",
                "--data-binary",
                body,
                "http://localhost/owner/repo.git/git-upload-pack",
            ])
            .await
        }
    };
    // A real fetch request reaches the socket; a paste does not.
    assert_eq!(post("0011command=fetch0000").await, "200");
    assert_eq!(post("content=my+secret+paste").await, "403");
    let last = proxy.ring.snapshot().pop().unwrap();
    assert_eq!(last.blocked.reason, Reason::MethodNotAllowed);
    assert_eq!(last.blocked.protocol, Protocol::UnixSocket);
}

/// An HTTP upstream proxy carries TCP only: while chaining, a datagram for
/// a chained destination is refused (recorded, with the fix), never sent
/// around the upstream; one `no_proxy` exempts goes direct.
#[tokio::test]
async fn udp_is_never_sent_around_an_upstream_proxy() {
    use portcullis::upstream::UpstreamProxies;
    let echo = udp_echo().await;
    // Nothing needs to listen there: no datagram may reach it.
    let upstream = format!("http://127.0.0.1:{}", closed_port().await);
    let chained = proxy_with(allow(&["127.0.0.1"]).build(), &[], |b| {
        b.upstream(Some(UpstreamProxies::fixed(&upstream, "")))
    })
    .await;
    let (_control, relay) = associate(chained.socks_addr()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&udp_datagram(echo, b"around"), relay)
        .await
        .unwrap();
    assert_eq!(recv_within(&client, 500).await, None);
    let last = chained
        .ring
        .snapshot()
        .pop()
        .expect("the refusal is logged");
    assert_eq!(last.blocked.protocol, Protocol::Socks5Udp);
    assert_eq!(last.blocked.reason.as_str(), "udp_through_upstream");
    assert!(last.message.contains("no_proxy"), "{}", last.message);
    // Exempted from chaining: relayed.
    let direct = proxy_with(allow(&["127.0.0.1"]).build(), &[], |b| {
        b.upstream(Some(UpstreamProxies::fixed(&upstream, "127.0.0.1")))
    })
    .await;
    let (_control, relay) = associate(direct.socks_addr()).await;
    client
        .send_to(&udp_datagram(echo, b"direct"), relay)
        .await
        .unwrap();
    assert_eq!(
        recv_within(&client, 5000).await,
        Some(udp_datagram(echo, b"direct"))
    );
}
