//! The runner: upstream chaining, listener clamping, graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use portcullis::middleware::NetworkPolicy;
use portcullis::upstream::{UpstreamProxies, UpstreamResolve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn chains_through_an_upstream_proxy() {
    let origin = origin().await;
    let localhost = "127.0.0.1".parse().unwrap();
    // The upstream knows the name; the downstream does not resolve it at
    // all: the opt-in that lets the upstream resolve (tests/upstream.rs
    // chains with names resolved here, the default).
    let upstream = proxy(
        allow(&["svc.test", "127.0.0.1"]),
        &[("svc.test", localhost)],
    )
    .await;
    let upstream_url = upstream.http_url();
    let downstream = proxy_with(
        NetworkPolicy::builder().allow("svc.test").unwrap().build(),
        &[],
        |b| {
            b.upstream(Some(
                UpstreamProxies::fixed(&upstream_url, "").resolving(UpstreamResolve::Upstream),
            ))
        },
    )
    .await;
    let url = format!("http://svc.test:{}/chained", origin.addr.port());
    let out = curl(&["-x", &downstream.http_url(), &url]).await;
    assert_eq!(out.stdout, "hello /chained", "{}", out.stderr);
    let out = curl(&["-p", "-x", &downstream.http_url(), &url]).await;
    assert_eq!(
        out.stdout, "hello /chained",
        "CONNECT through the upstream: {}",
        out.stderr
    );
    // The downstream still decides first.
    let out = curl(&["-i", "-x", &downstream.http_url(), "http://other.test/"]).await;
    assert_eq!(parse_response(&out.stdout).0, 403);
    assert_eq!(
        upstream.ring.total(),
        0,
        "the refused request never reached the upstream"
    );
    // A refusal by the upstream says it came from there: allowed here
    // (blocked.test), refused by the upstream.
    let downstream = proxy_with(
        NetworkPolicy::builder()
            .allow("blocked.test")
            .unwrap()
            .build(),
        &[],
        |b| {
            b.upstream(Some(
                UpstreamProxies::fixed(&upstream_url, "").resolving(UpstreamResolve::Upstream),
            ))
        },
    )
    .await;
    let out = curl(&["-i", "-x", &downstream.http_url(), "http://blocked.test/"]).await;
    let (status, headers, _) = parse_response(&out.stdout);
    assert_eq!(status, 403, "{}", out.stdout);
    assert_eq!(
        headers.get("x-proxy-upstream").map(String::as_str),
        Some(upstream_url.as_str()),
        "{headers:?}"
    );
    let (mut stream, head) = raw_exchange(
        downstream.handle.http_addr(),
        "CONNECT blocked.test:443 HTTP/1.1\r\nHost: blocked.test:443\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let mut buffer = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buffer))
        .await
        .unwrap()
        .unwrap();
    let body = String::from_utf8_lossy(&buffer[..n]);
    assert!(
        body.contains(&format!(
            "the upstream proxy {upstream_url} did not open the tunnel"
        )),
        "{body}"
    );
}

/// What an upstream proxy is asked for is the target the policy checked, in
/// canonical form: lower case, no trailing dot, the port always written.
#[tokio::test]
async fn an_upstream_proxy_is_asked_for_the_canonical_target() {
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_url = format!("http://{}", fake.local_addr().unwrap());
    let seen = tokio::spawn(async move {
        let (mut stream, _) = fake.accept().await.unwrap();
        let head = read_head(&mut stream).await;
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .await
            .unwrap();
        head.lines().next().unwrap_or_default().to_owned()
    });
    let downstream = proxy_with(
        NetworkPolicy::builder().allow("svc.test").unwrap().build(),
        &[],
        |b| {
            b.upstream(Some(
                UpstreamProxies::fixed(&fake_url, "").resolving(UpstreamResolve::Upstream),
            ))
        },
    )
    .await;
    let (_, head) = raw_exchange(
        downstream.handle.http_addr(),
        "GET http://SVC.Test./path?q=1 HTTP/1.1\r\nHost: SVC.Test.\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        seen.await.unwrap(),
        "GET http://svc.test:80/path?q=1 HTTP/1.1"
    );
}

#[tokio::test]
async fn non_loopback_listeners_are_clamped() {
    let proxy = proxy_with(NetworkPolicy::default(), &[], |b| {
        b.http_addr("0.0.0.0:0".parse().unwrap())
    })
    .await;
    assert!(proxy.handle.http_addr().ip().is_loopback());
    assert!(proxy.socks_addr().ip().is_loopback());
    let proxy = proxy_with(NetworkPolicy::default(), &[], |b| {
        b.http_addr("0.0.0.0:0".parse().unwrap())
            .dangerously_allow_non_loopback(true)
            .force_loopback(true)
    })
    .await;
    assert!(
        proxy.handle.http_addr().ip().is_loopback(),
        "a unix socket permission forces loopback"
    );
}

#[tokio::test]
async fn shutdown_lets_open_tunnels_finish_and_stops_accepting() {
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]), &[]).await;
    let http = proxy.handle.http_addr();
    let request = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", origin.addr);
    let (mut tunnel, head) = raw_exchange(http, &request).await;
    assert!(head.starts_with("HTTP/1.1 200"));
    // A keep-alive request in flight when shutdown starts completes.
    let mut keep_alive = tokio::net::TcpStream::connect(http).await.unwrap();
    keep_alive
        .write_all(
            format!(
                "GET http://{0}/slow HTTP/1.1\r\nHost: {0}\r\n\r\n",
                origin.addr
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let shutdown = tokio::spawn(proxy.handle.shutdown(Duration::from_secs(10)));
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        keep_alive.read_to_string(&mut answer),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("hello /slow"),
        "completed, then closed: {answer}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(http).await.is_err(),
        "the listener is closed"
    );
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the open tunnel"
    );

    tunnel
        .write_all(b"GET /late HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tunnel.read_to_string(&mut response).await.unwrap();
    assert!(response.ends_with("hello /late"), "{response}");
    drop(tunnel);
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn two_proxies_in_one_process_count_apart() {
    let origin = origin().await;
    let with_metrics =
        |b: portcullis::ProxyBuilder| b.metrics_addr(Some("127.0.0.1:0".parse().unwrap()));
    let one = proxy_with(allow(&["127.0.0.1"]).build(), &[], with_metrics).await;
    let two = proxy_with(allow(&["127.0.0.1"]).build(), &[], with_metrics).await;
    for _ in 0..3 {
        let out = curl(&[
            "-x",
            &one.http_url(),
            &format!("http://{}/counted", origin.addr),
        ])
        .await;
        assert_eq!(out.stdout, "hello /counted");
    }
    let out = curl(&["-x", &one.http_url(), "http://refused.test/"]).await;
    assert!(out.stdout.contains("not_allowed"), "{}", out.stdout);
    let scrape = |proxy: &common::TestProxy| {
        let url = format!("http://{}/metrics", proxy.handle.metrics_addr().unwrap());
        async move { curl(&[&url]).await.stdout }
    };
    let counted = |text: &str, metric: &str| -> u64 {
        text.lines()
            .filter(|line| line.starts_with(metric))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let first = scrape(&one).await;
    let second = scrape(&two).await;
    assert_eq!(
        counted(&first, "portcullis_requests_allowed_total"),
        3,
        "{first}"
    );
    assert_eq!(
        counted(&first, "portcullis_requests_refused_total"),
        1,
        "{first}"
    );
    assert_eq!(
        counted(&second, "portcullis_requests_allowed_total"),
        0,
        "{second}"
    );
    assert_eq!(
        counted(&second, "portcullis_requests_refused_total"),
        0,
        "{second}"
    );
}

#[tokio::test]
async fn refusals_can_be_subscribed_to_and_the_policy_updated_live() {
    let origin = origin().await;
    let proxy = proxy_with(NetworkPolicy::builder().build(), &[], |b| b).await;
    let mut refusals = proxy.handle.subscribe();
    let url = format!("http://{}/live", origin.addr);
    let out = curl(&["-x", &proxy.http_url(), &url]).await;
    assert!(out.stdout.contains("not_allowed_local"), "{}", out.stdout);
    let seen = tokio::time::timeout(Duration::from_secs(5), refusals.recv())
        .await
        .expect("a refusal arrives")
        .unwrap();
    assert_eq!(seen.blocked.target.to_string(), origin.addr.to_string());
    // Changed from what it is now; the next request sees it.
    proxy
        .handle
        .policy()
        .update(|policy| policy.allow("127.0.0.1"))
        .unwrap();
    let out = curl(&["-x", &proxy.http_url(), &url]).await;
    assert_eq!(out.stdout, "hello /live");
    assert!(refusals.try_recv().is_err(), "nothing more was refused");
}

#[tokio::test]
async fn the_authenticated_user_reaches_the_layers_on_every_path() {
    use portcullis::middleware::ProxyUser;
    use std::sync::{Arc, Mutex};
    let origin = origin().await;
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let record = {
        let seen = seen.clone();
        tower::util::MapRequestLayer::new(move |request: http::Request<portcullis::body::Body>| {
            let user = request.extensions().get::<ProxyUser>().map(|u| u.0.clone());
            seen.lock().unwrap().push(user);
            request
        })
    };
    let handle = portcullis::Proxy::builder()
        .socks_addr(Some("127.0.0.1:0".parse().unwrap()))
        .policy(portcullis::middleware::PolicyHandle::new(
            allow(&["127.0.0.1"]).build(),
        ))
        .credentials("alice", "pw")
        .inner_layer(record)
        .start()
        .await
        .unwrap();
    let proxy = TestProxy {
        handle,
        ring: Default::default(),
    };
    let with_user = format!("http://alice:pw@{}", proxy.handle.http_addr());
    let url = format!("http://{}/who", origin.addr);
    assert_eq!(curl(&["-x", &with_user, &url]).await.stdout, "hello /who");
    assert_eq!(
        curl(&["-p", "-x", &with_user, &url]).await.stdout,
        "hello /who"
    );
    let socks = format!("alice:pw@{}", proxy.socks_addr());
    assert_eq!(
        curl(&["--socks5-hostname", &socks, &url]).await.stdout,
        "hello /who"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().all(|user| user.as_deref() == Some("alice")),
        "{seen:?}"
    );
}

/// A proxy built in code words its refusals by the library's API, not by
/// config keys; a wording hook of the integrator's reaches the HTTP answer
/// and the violation log alike, and its `None` keeps the API wording.
#[tokio::test]
async fn refusals_of_a_proxy_built_in_code_name_the_api_or_the_integrator_s_words() {
    let proxy = proxy_with(
        NetworkPolicy::builder().allow("ok.test").unwrap().build(),
        &[],
        |b| b,
    )
    .await;
    let out = curl(&["-x", &proxy.http_url(), "http://elsewhere.test/"]).await;
    assert!(
        out.stdout
            .contains(r#"allow it with NetworkPolicyBuilder::allow(\"elsewhere.test\")"#),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("allowed_domains"), "{}", out.stdout);

    let proxy = proxy_with(
        NetworkPolicy::builder()
            .allow("ok.test")
            .unwrap()
            .deny("bad.test")
            .unwrap()
            .build(),
        &[],
        |b| {
            b.refusal_fixes(portcullis::hints::Fixes::custom(|blocked| {
                (blocked.reason == portcullis::middleware::Reason::NotAllowed)
                    .then(|| format!("{} is not on the team list; ask #platform", blocked.target))
            }))
        },
    )
    .await;
    let out = curl(&["-x", &proxy.http_url(), "http://elsewhere.test/"]).await;
    assert!(
        out.stdout
            .contains("elsewhere.test:80 is not on the team list; ask #platform"),
        "{}",
        out.stdout
    );
    let logged = proxy.ring.snapshot().pop().unwrap();
    assert_eq!(
        logged.message,
        "elsewhere.test:80 is not on the team list; ask #platform"
    );
    // The hook's None: the library's own words.
    let out = curl(&["-x", &proxy.http_url(), "http://bad.test/"]).await;
    assert!(
        out.stdout.contains("NetworkPolicyBuilder::remove_denied"),
        "{}",
        out.stdout
    );
}
