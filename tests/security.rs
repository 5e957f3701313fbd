//! Bypass tricks on every ingress path that can carry them: HTTP/1
//! absolute-form, `CONNECT`, SOCKS5 `CONNECT` with a domain (and, for IP
//! literals, an IPv4 or IPv6 address), and a SOCKS5 UDP datagram. Every
//! path must give the same verdict. Loopback only: refused destinations are
//! never dialled, and the allowed ones are local servers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use common::*;
use portcullis::middleware::{NetworkPolicy, Target};

/// What a path made of one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Refused by policy (403 / SOCKS 0x02 / a dropped datagram with a violation).
    Refused,
    /// Malformed (400 / SOCKS 0x01 / a dropped datagram).
    Malformed,
    /// Let through (the local server answered, or the dial failed after the decision).
    Through,
}

async fn http_verdict(proxy: SocketAddr, request: String) -> Verdict {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    match head.split_whitespace().nth(1) {
        Some("403") => Verdict::Refused,
        Some("400") => Verdict::Malformed,
        _ => Verdict::Through,
    }
}

async fn socks_verdict(proxy: SocketAddr, address: &[u8], port: u16) -> Verdict {
    match socks_reply_code(proxy, address, port).await {
        Some(0x02) => Verdict::Refused,
        Some(0x01) | None => Verdict::Malformed,
        Some(_) => Verdict::Through,
    }
}

fn socks_domain(host: &str) -> Vec<u8> {
    let mut address = vec![3, host.len() as u8];
    address.extend_from_slice(host.as_bytes());
    address
}

fn socks_ip(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => [&[1u8][..], &v4.octets()].concat(),
        IpAddr::V6(v6) => [&[4u8][..], &v6.octets()].concat(),
    }
}

/// A UDP datagram to `address:port` through a fresh association: refused
/// datagrams leave a violation, malformed ones do not.
async fn udp_verdict(proxy: &TestProxy, address: &[u8], port: u16) -> Verdict {
    let mut control = TcpStream::connect(proxy.socks_addr()).await.unwrap();
    control.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    control.read_exact(&mut choice).await.unwrap();
    control
        .write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut reply = [0u8; 10];
    control.read_exact(&mut reply).await.unwrap();
    let relay = SocketAddr::from((
        [reply[4], reply[5], reply[6], reply[7]],
        u16::from_be_bytes([reply[8], reply[9]]),
    ));
    let before = proxy.ring.total();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut datagram = vec![0, 0, 0];
    datagram.extend_from_slice(address);
    datagram.extend_from_slice(&port.to_be_bytes());
    datagram.extend_from_slice(b"probe");
    client.send_to(&datagram, relay).await.unwrap();
    for _ in 0..40 {
        if proxy.ring.total() > before {
            return Verdict::Refused;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Verdict::Malformed
}

/// Runs `authority` through every path that can carry it.
async fn every_path(proxy: &TestProxy, authority: &str) -> Vec<(&'static str, Verdict)> {
    let http = proxy.handle.http_addr();
    let mut verdicts = vec![
        (
            "absolute-form",
            http_verdict(
                http,
                format!("GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"),
            )
            .await,
        ),
        (
            "CONNECT",
            http_verdict(http, format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n")).await,
        ),
    ];
    let (host, port) = authority.rsplit_once(':').unwrap();
    // SOCKS5 carries the port as two bytes: junk ports exist only on HTTP.
    let Ok(port) = port.parse::<u16>() else {
        return verdicts;
    };
    // …and the domain behind a one-byte length.
    if host.len() > 255 {
        return verdicts;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let domain = socks_domain(bare);
    verdicts.push((
        "SOCKS5 domain",
        socks_verdict(proxy.socks_addr(), &domain, port).await,
    ));
    verdicts.push(("SOCKS5 UDP domain", udp_verdict(proxy, &domain, port).await));
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let address = socks_ip(ip);
        let kind = if ip.is_ipv4() {
            "SOCKS5 IPv4"
        } else {
            "SOCKS5 IPv6"
        };
        verdicts.push((
            kind,
            socks_verdict(proxy.socks_addr(), &address, port).await,
        ));
        verdicts.push(("SOCKS5 UDP IP", udp_verdict(proxy, &address, port).await));
    }
    verdicts
}

#[tokio::test]
async fn embedded_ipv4_and_metadata_are_refused_on_every_path() {
    let localhost: IpAddr = "127.0.0.1".parse().unwrap();
    let metadata: IpAddr = "169.254.169.254".parse().unwrap();
    let translated: IpAddr = "::ffff:0:7f00:1".parse().unwrap();
    let hosts = [
        ("meta.test", metadata),
        ("translated.test", translated),
        (
            "mapped-meta.test",
            "::ffff:169.254.169.254".parse().unwrap(),
        ),
        ("loopback.test", localhost),
    ];
    // Everything allowed, local binding on: only metadata must still be refused.
    let open = proxy(
        NetworkPolicy::builder()
            .allow("*")
            .unwrap()
            .allow_local_binding(true),
        &hosts,
    )
    .await;
    // Everything allowed, local binding off: every local spelling refused.
    let strict = proxy(NetworkPolicy::builder().allow("*").unwrap(), &hosts).await;

    let metadata_tricks = [
        "169.254.169.254:80",
        "2852039166:80",
        "0xa9.0xfe.0xa9.0xfe:80",
        "0251.0376.0251.0376:80",
        "169.254.43518:80",
        "[::ffff:169.254.169.254]:80",
        "[::ffff:a9fe:a9fe]:80",
        "[::ffff:0:a9fe:a9fe]:80",
        "[::a9fe:a9fe]:80",
        "[64:ff9b::a9fe:a9fe]:80",
        "[2002:a9fe:a9fe::1]:80",
        "[fd00:ec2::254]:80",
        "100.100.100.200:80",
        "169.254.170.2:80",
        "meta.test:80",
        "mapped-meta.test:80",
    ];
    let local_tricks = [
        "127.0.0.1:80",
        "127.1:80",
        "2130706433:80",
        "0x7f.1:80",
        "[::1]:80",
        "[::ffff:127.0.0.1]:80",
        "[::ffff:0:7f00:1]:80",
        "[::ffff:0:127.0.0.1]:80",
        "[64:ff9b::7f00:1]:80",
        "[64:ff9b:1::7f00:1]:80",
        "[2002:7f00:1::]:80",
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]:80",
        "0.0.0.0:80",
        "[::]:80",
        "loopback.test:80",
        "translated.test:80",
        "LOOPBACK.TEST.:80",
    ];
    let mut cases = 0;
    for (proxy, tricks) in [
        (&open, &metadata_tricks[..]),
        (&strict, &metadata_tricks[..]),
        (&strict, &local_tricks[..]),
    ] {
        for authority in tricks {
            for (path, verdict) in every_path(proxy, authority).await {
                cases += 1;
                assert_eq!(verdict, Verdict::Refused, "{authority} over {path}");
            }
        }
    }
    // The parser sees the same host on every path.
    assert_eq!(
        Target::parse_authority("[::ffff:0:7f00:1]:80", None)
            .unwrap()
            .to_string(),
        "[::ffff:0:7f00:1]:80"
    );
    println!("{cases} trick × path cases refused");
}

#[tokio::test]
async fn metadata_needs_its_exact_address_in_the_allowlist() {
    let narrow = proxy(
        NetworkPolicy::builder()
            .allow("169.254.0.0/16")
            .unwrap()
            .allow_local_binding(true),
        &[],
    )
    .await;
    for (path, verdict) in every_path(&narrow, "169.254.169.254:80").await {
        assert_eq!(
            verdict,
            Verdict::Refused,
            "a range does not unlock metadata ({path})"
        );
    }
    // Naming the exact address unlocks it: asked of the policy, never dialled
    // (this suite sends nothing beyond loopback).
    let exact = NetworkPolicy::builder()
        .allow("169.254.169.254:80")
        .unwrap()
        .build();
    let target = Target::parse_authority("169.254.169.254:80", None).unwrap();
    assert!(matches!(
        exact.decide(&target),
        portcullis::middleware::Decision::Allow { .. }
    ));
    let other_port = Target::parse_authority("169.254.169.254:8080", None).unwrap();
    assert!(!matches!(
        exact.decide(&other_port),
        portcullis::middleware::Decision::Allow { .. }
    ));
}

#[tokio::test]
async fn no_network_byte_forges_a_log_line_at_any_level() {
    let mut child = portcullis()
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--socks",
            "127.0.0.1:0",
            "--allow",
            "ok.test",
        ])
        .env("PORTCULLIS_LOG", "trace,fast_socks5=trace")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut exports = String::new();
    let mut socks = None;
    for _ in 0..20 {
        let mut line = String::new();
        use tokio::io::AsyncBufReadExt;
        if stdout.read_line(&mut line).await.unwrap() == 0 {
            break;
        }
        exports.push_str(&line);
        if let Some(rest) = line
            .strip_prefix("export PORTCULLIS_SOCKS_URL='socks5h://")
            .or_else(|| line.strip_prefix("export ALL_PROXY='socks5h://"))
        {
            socks = rest
                .trim()
                .trim_end_matches('\'')
                .parse::<SocketAddr>()
                .ok();
            break;
        }
    }
    let socks = socks.unwrap_or_else(|| panic!("a SOCKS address in {exports}"));
    let http: SocketAddr = exports
        .lines()
        .find_map(|l| l.strip_prefix("export HTTP_PROXY='http://"))
        .and_then(|r| r.trim_end_matches('\'').parse().ok())
        .unwrap();
    for host in [
        "evil.test\nFORGED line one",
        "evil.test\rFORGED line two",
        "evil\u{1b}[31mFORGED",
    ] {
        let _ = socks_verdict(socks, &socks_domain(host), 80).await;
        let _ = http_verdict(
            http,
            format!(
                "CONNECT {}:80 HTTP/1.1\r\n\r\n",
                host.replace(['\n', '\r'], " ")
            ),
        )
        .await;
    }
    // A well-formed request reaches fast-socks5, which logs its target at
    // debug level: that event must not reach the log either.
    let _ = socks_verdict(socks, &socks_domain("ok.test"), 80).await;
    let (_, stderr) = terminate(&mut child).await;
    for line in stderr.split(['\n', '\r']) {
        assert!(
            !line.starts_with("FORGED"),
            "a forged line: {line:?}\n{stderr}"
        );
    }
    assert!(!stderr.contains('\u{1b}'), "no raw escape reaches the log");
    assert!(
        !stderr.contains("Request target is"),
        "fast-socks5's own events are kept out"
    );
}

#[tokio::test]
async fn no_loop_into_ourselves_on_any_path() {
    // Everything allowed, local addresses too: only the loop guard stands.
    // The metrics listener is one of ours like the others.
    let proxy = proxy_with(
        NetworkPolicy::builder()
            .allow("*")
            .unwrap()
            .allow_local_binding(true)
            .build(),
        &[("self.test", "127.0.0.1".parse().unwrap())],
        |b| b.metrics_addr(Some("127.0.0.1:0".parse().unwrap())),
    )
    .await;
    let http_port = proxy.handle.http_addr().port();
    let socks_port = proxy.socks_addr().port();
    let metrics_port = proxy.handle.metrics_addr().unwrap().port();
    let mut cases = 0;
    for port in [http_port, socks_port, metrics_port] {
        for host in [
            "127.0.0.1",
            "127.0.0.2",
            "0.0.0.0",
            "[::1]",
            "[::ffff:127.0.0.1]",
            "2130706433",
            "self.test",
            "localhost",
        ] {
            let authority = format!("{host}:{port}");
            for (path, verdict) in every_path(&proxy, &authority).await {
                if path.contains("UDP") {
                    continue; // UDP reaches no TCP listener of ours
                }
                cases += 1;
                assert_eq!(verdict, Verdict::Refused, "{authority} over {path}");
            }
        }
    }
    let last = proxy.ring.snapshot().pop().unwrap();
    assert_eq!(last.blocked.reason, portcullis::middleware::Reason::Loop);
    println!("{cases} self-loop cases refused");
}

#[tokio::test]
async fn chaining_never_loops() {
    use portcullis::upstream::UpstreamProxies;
    let origin = origin().await;
    let free = || async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let everything = || {
        NetworkPolicy::builder()
            .allow("*")
            .unwrap()
            .allow_local_binding(true)
            .build()
    };

    // A proxy whose own environment names itself as its upstream.
    let address = free().await;
    let looped = proxy_with(everything(), &[], |b| {
        b.http_addr(address).upstream(Some(UpstreamProxies::fixed(
            &format!("http://{address}"),
            "",
        )))
    })
    .await;
    let out = curl(&[
        "-i",
        "-x",
        &looped.http_url(),
        &format!("http://{}/x", origin.addr),
    ])
    .await;
    let (status, headers, body) = parse_response(&out.stdout);
    assert_eq!(status, 403, "{}", out.stdout);
    assert_eq!(headers["x-proxy-error"], "blocked-by-loop-guard");
    assert!(body.contains("portcullis itself"), "{body}");
    let out = curl(&[
        "-p",
        "-i",
        "-x",
        &looped.http_url(),
        &format!("http://{}/x", origin.addr),
    ])
    .await;
    assert_ne!(
        out.code,
        Some(0),
        "CONNECT through ourselves is refused too"
    );
    assert!(
        out.stdout.starts_with("HTTP/1.1 403") && out.stdout.contains("blocked-by-loop-guard"),
        "{}",
        out.stdout
    );

    // Two proxies chained to each other: the Via guard ends it on the first round.
    let (a_address, b_address) = (free().await, free().await);
    let a = proxy_with(everything(), &[], |b| {
        b.http_addr(a_address).upstream(Some(UpstreamProxies::fixed(
            &format!("http://{b_address}"),
            "",
        )))
    })
    .await;
    let b = proxy_with(everything(), &[], |builder| {
        builder
            .http_addr(b_address)
            .upstream(Some(UpstreamProxies::fixed(
                &format!("http://{a_address}"),
                "",
            )))
    })
    .await;
    let out = curl(&[
        "-i",
        "-x",
        &a.http_url(),
        &format!("http://{}/round", origin.addr),
    ])
    .await;
    let (status, headers, _) = parse_response(&out.stdout);
    assert_eq!(status, 403, "{}", out.stdout);
    assert_eq!(headers["x-proxy-error"], "blocked-by-loop-guard");
    // Names are resolved here, so even plain HTTP goes to the upstream
    // as a CONNECT to the vetted address: it came round to A, and came
    // back refused through B, as a CONNECT does below.
    assert_eq!(
        (a.ring.total(), b.ring.total()),
        (2, 1),
        "A saw its own Via come back, and its refusal come back"
    );
    let out = curl(&[
        "-p",
        "-i",
        "-x",
        &a.http_url(),
        &format!("http://{}/round", origin.addr),
    ])
    .await;
    assert_ne!(out.code, Some(0), "{}", out.stdout);
    // B's answer carries A's loop refusal back to A, which refuses as a loop.
    assert!(
        out.stdout.starts_with("HTTP/1.1 403") && out.stdout.contains("blocked-by-loop-guard"),
        "{}",
        out.stdout
    );
    assert_eq!(
        a.ring.total(),
        4,
        "the CONNECT came round, then came back refused"
    );
    assert_eq!(b.ring.total(), 2, "B passed A's loop refusal on as a loop");
}

#[tokio::test]
async fn past_the_connection_limit_clients_are_refused_clearly() {
    let limits = portcullis::Limits::default().max_connections(2);
    let proxy = proxy_with(
        NetworkPolicy::builder().allow("ok.test").unwrap().build(),
        &[],
        |b| b.limits(limits),
    )
    .await;
    let http = proxy.handle.http_addr();
    let held: Vec<TcpStream> = vec![
        TcpStream::connect(http).await.unwrap(),
        TcpStream::connect(http).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(http).await.unwrap();
    let head = read_head(&mut third).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.contains("x-proxy-error: proxy-busy"), "{head}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        http_verdict(
            http,
            "GET http://other.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n".into()
        )
        .await,
        Verdict::Refused,
        "served again once below the limit"
    );

    let socks = proxy.socks_addr();
    let _held: Vec<TcpStream> = vec![
        TcpStream::connect(socks).await.unwrap(),
        TcpStream::connect(socks).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        socks_verdict(socks, &socks_domain("ok.test"), 80).await,
        Verdict::Malformed,
        "SOCKS5 answers 0x01 past the limit"
    );
}

#[tokio::test]
async fn shutdown_cuts_at_its_deadline_and_says_so_in_the_exit_code() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        "[network]\nproxy_url = \"http://127.0.0.1:0\"\nenable_socks5 = false\nallowed_domains = [\"127.0.0.1\"]\n[limits]\nshutdown_deadline = 1\n",
    )
    .unwrap();
    let mut child = portcullis()
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let address = served_http_address(&mut child).await;
    let authority = origin.addr.to_string();
    let (_tunnel, head) = raw_exchange(
        address,
        &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let started = std::time::Instant::now();
    let (status, stderr) = terminate(&mut child).await;
    assert_eq!(
        status.code(),
        Some(1),
        "an open tunnel was cut: {status:?}\n{stderr}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the deadline was given"
    );
    assert!(
        stderr.contains("1 open connection(s) or tunnel(s) cut"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cut at the shutdown deadline: CONNECT tunnel from 127.0.0.1:"),
        "the cut tunnel is named: {stderr}"
    );
    assert!(stderr.contains(&format!("to {authority}")), "{stderr}");
    // New connections are refused once shutdown starts.
    assert!(TcpStream::connect(address).await.is_err());
}

#[tokio::test]
async fn every_trick_family_gets_the_same_verdict_on_every_path() {
    // Only ok.test (and its subdomains with **.) is allowed; it resolves to a
    // closed loopback port, so "through" means the decision let it pass.
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    let proxy = proxy(
        NetworkPolicy::builder()
            .allow("ok.test")
            .unwrap()
            .allow("*.sub.test")
            .unwrap()
            .allow_local_binding(true),
        &[
            ("ok.test", loopback),
            ("a.sub.test", loopback),
            ("evil.test", loopback),
        ],
    )
    .await;
    let port = closed_port().await;
    let through = [
        format!("ok.test:{port}"),
        format!("OK.TEST:{port}"),
        format!("ok.test.:{port}"),
        format!("a.sub.test:{port}"),
    ];
    let refused = [
        format!("evil.test:{port}"),
        format!("ok.test.evil.test:{port}"),
        format!("evilok.test:{port}"),
        format!("sub.test:{port}"), // *. is not the apex
        format!("a.sub.test.evil.test:{port}"),
        format!("xn--k-0ga.test:{port}"), // punycode is a name like any other
        format!("{}.test:{port}", "a".repeat(63)),
    ];
    let malformed = [
        format!("ok.test@evil.test:{port}"),
        format!("evil.test#ok.test:{port}"),
        format!("evil.test?ok.test:{port}"),
        format!("evil.test\\ok.test:{port}"),
        format!("ok%2etest:{port}"),
        format!("ok.test:{port}0000"),
        "ok.test:0".to_owned(),
        "ok.test:-1".to_owned(),
        "ok.test:".to_owned(),
        format!("[::1%25eth0]:{port}"),
        format!("[fe80::1%eth0]:{port}"),
        format!("{}.test:{port}", "a".repeat(64)),
        format!("{}:{port}", ["abcdefghij"; 26].join(".")),
        format!("ök.test:{port}"),
        format!("ok．test:{port}"),
        format!("ok。test:{port}"),
        format!("ok..test:{port}"),
        format!(".ok.test:{port}"),
    ];
    let mut cases = 0;
    for (authorities, expected) in [
        (&through[..], Verdict::Through),
        (&refused[..], Verdict::Refused),
        (&malformed[..], Verdict::Malformed),
    ] {
        for authority in authorities {
            for (path, verdict) in every_path(&proxy, authority).await {
                // A datagram to an allowed destination leaves no trace to read.
                if expected == Verdict::Through && path.contains("UDP") {
                    continue;
                }
                cases += 1;
                assert_eq!(verdict, expected, "{authority:?} over {path}");
            }
        }
    }
    // Host vs URI: only absolute-form carries both (inside an intercepted
    // tunnel, tests/mitm.rs checks the same against the tunnel's target).
    let http = proxy.handle.http_addr();
    for host_lines in [
        format!("Host: evil.test:{port}\r\n"),
        format!("Host: ok.test:{port}\r\nHost: evil.test:{port}\r\n"),
        format!("Host: ok.test:{port}@evil.test\r\n"),
        "Host: ok.test\r\n".to_owned(), // port 80, not the URI's
    ] {
        let verdict = http_verdict(
            http,
            format!("GET http://ok.test:{port}/ HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(verdict, Verdict::Malformed, "{host_lines:?}");
        cases += 1;
    }
    // Bytes no string can carry: a domain that is not UTF-8 is malformed
    // (0x01), not "connection refused" (fast-socks5's 0x05), and an
    // unknown address type is 0x08.
    let not_utf8 = [3u8, 4, b'o', b'k', 0xff, 0xfe];
    assert_eq!(
        socks_verdict(proxy.socks_addr(), &not_utf8, port).await,
        Verdict::Malformed
    );
    assert_eq!(
        udp_verdict(&proxy, &not_utf8, port).await,
        Verdict::Malformed
    );
    assert_eq!(
        socks_reply_code(proxy.socks_addr(), &[9, 1, 2, 3, 4], port).await,
        Some(0x08)
    );
    cases += 3;
    println!("{cases} family × path cases agreed");
}

/// The reply code a SOCKS5 CONNECT to `address:port` gets.
async fn socks_reply_code(proxy: SocketAddr, address: &[u8], port: u16) -> Option<u8> {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await.unwrap();
    let mut message = vec![5, 1, 0];
    message.extend_from_slice(address);
    message.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&message).await.unwrap();
    let mut head = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    Some(head[1])
}

/// The status line's code and `x-proxy-error` of an HTTP exchange.
async fn http_answer(proxy: SocketAddr, request: String) -> (String, String) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    let status = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let error = head
        .lines()
        .find_map(|l| l.strip_prefix("x-proxy-error: "))
        .unwrap_or("")
        .trim()
        .to_owned();
    (status, error)
}

#[tokio::test]
async fn a_name_that_does_not_resolve_fails_closed_on_every_path() {
    // Allowed by the list, unknown to the resolver: nothing is dialled, and
    // every path says "unreachable", not "allowed" and not "refused".
    let proxy = proxy(
        NetworkPolicy::builder()
            .allow("*.ok.test")
            .unwrap()
            .allow_local_binding(true),
        &[],
    )
    .await;
    let http = proxy.handle.http_addr();
    let authority = "gone.ok.test:8080";
    let absolute = http_answer(
        http,
        format!(
            "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(absolute, ("502".into(), "upstream-unreachable".into()));
    let connect = http_answer(
        http,
        format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    assert_eq!(connect, ("502".into(), "upstream-unreachable".into()));
    let socks = socks_reply_code(proxy.socks_addr(), &socks_domain("gone.ok.test"), 8080).await;
    assert_eq!(socks, Some(0x04), "host unreachable");
    // And a name the list does not allow is refused before it is looked up.
    let refused =
        socks_reply_code(proxy.socks_addr(), &socks_domain("gone.other.test"), 8080).await;
    assert_eq!(refused, Some(0x02));
}

#[tokio::test]
async fn a_session_approval_does_not_leak_to_other_ports_or_protocols() {
    use portcullis::middleware::{ApprovalKey, ApprovalOutcome, ApprovalRequest};
    use std::sync::{Arc, Mutex};
    let asked: Arc<Mutex<Vec<ApprovalKey>>> = Arc::default();
    let recorder = asked.clone();
    let approver = tower::service_fn(move |request: ApprovalRequest| {
        recorder.lock().unwrap().push(request.key);
        async { Ok::<_, std::convert::Infallible>(ApprovalOutcome::AllowForSession) }
    });
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    let proxy = proxy_with(
        NetworkPolicy::builder().allow_local_binding(true).build(),
        &[("asked.test", loopback)],
        |builder| builder.approver(approver, Duration::from_secs(5)),
    )
    .await;
    let (first, second) = (closed_port().await, closed_port().await);
    let http = proxy.handle.http_addr();
    let get = |port: u16| {
        format!("GET http://asked.test:{port}/ HTTP/1.1\r\nHost: asked.test:{port}\r\nConnection: close\r\n\r\n")
    };
    let count = || asked.lock().unwrap().len();
    // Each answer is checked against what went through: a 502 is a dial
    // after an allow; a 403 would be a refusal.
    assert_eq!(http_answer(http, get(first)).await.0, "502");
    assert_eq!(count(), 1, "asked for asked.test:{first} over HTTP");
    assert_eq!(http_answer(http, get(first)).await.0, "502");
    assert_eq!(count(), 1, "the session answer covers the same key");
    assert_eq!(http_answer(http, get(second)).await.0, "502");
    assert_eq!(count(), 2, "another port is another question");
    let connect =
        format!("CONNECT asked.test:{first} HTTP/1.1\r\nHost: asked.test:{first}\r\n\r\n");
    assert_eq!(http_answer(http, connect).await.0, "502");
    assert_eq!(count(), 3, "CONNECT is another protocol");
    let domain = socks_domain("asked.test");
    assert_eq!(
        socks_reply_code(proxy.socks_addr(), &domain, first).await,
        Some(0x05)
    );
    assert_eq!(count(), 4, "SOCKS5 is another protocol");
    assert_eq!(
        socks_reply_code(proxy.socks_addr(), &domain, first).await,
        Some(0x05)
    );
    assert_eq!(count(), 4, "…and its session answer covers it again");
    let keys = asked.lock().unwrap().clone();
    let distinct: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(distinct.len(), 4, "{keys:?}");
}
