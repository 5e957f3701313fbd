//! The second security review's bypasses of request rules, each end to end
//! on loopback with the client that showed it: upgrades past the rules
//! (curl, a raw client after the 101), path spellings origins read another
//! way (curl `--path-as-is`), method overrides in a body or a renamed query
//! parameter (python requests), and the start of a push in limited mode.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

mod common;

use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use portcullis::middleware::request_rules::{RequestRules, RuleBlock, RuleEntry};
use portcullis::middleware::{Mode, Reason};

/// `allow GET /public/**`, `allow POST /public/**`, `deny DELETE`,
/// `deny /public/secret/**`: the review's rules.
fn review_rules(host: &str) -> RequestRules {
    RequestRules::new(vec![RuleBlock::new(host, "rules[0]")
        .unwrap()
        .allow(
            RuleEntry::new()
                .methods(["GET"])
                .unwrap()
                .paths(["/public/**", "/ws", "/ws-switches-to-h2c", "/ws-bad-accept"])
                .unwrap(),
        )
        .allow(
            RuleEntry::new()
                .methods(["POST"])
                .unwrap()
                .paths(["/public/**"])
                .unwrap(),
        )
        .deny(RuleEntry::new().methods(["DELETE"]).unwrap())
        .deny(RuleEntry::new().paths(["/public/secret/**"]).unwrap())])
}

async fn ruled_proxy() -> (Origin, TestProxy) {
    let origin = origin().await;
    let policy = allow(&["127.0.0.1"])
        .request_rules(review_rules("127.0.0.1"))
        .build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    (origin, proxy)
}

/// `curl -i --path-as-is -x PROXY ARGS…`: status, headers, body.
async fn via_curl(
    proxy: &TestProxy,
    args: &[&str],
) -> (u16, std::collections::HashMap<String, String>, String) {
    let proxy_url = proxy.http_url();
    let mut all = vec!["-i", "--path-as-is", "-x", proxy_url.as_str()];
    all.extend_from_slice(args);
    parse_response(&curl(&all).await.stdout)
}

fn reason_of(body: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    json["reason"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn only_websocket_upgrades_pass_a_ruled_host() {
    let (origin, proxy) = ruled_proxy().await;
    let base = format!("http://{}", origin.addr);
    // curl asking for a made-up protocol on an allowed path.
    for token in ["foo", "foo, h2c"] {
        let (status, headers, body) = via_curl(
            &proxy,
            &[
                "-H",
                "Connection: Upgrade",
                "-H",
                &format!("Upgrade: {token}"),
                &format!("{base}/public/up"),
            ],
        )
        .await;
        assert_eq!(status, 403, "{token}: {body}");
        assert_eq!(headers["x-proxy-error"], "blocked-by-request-rule");
        assert_eq!(reason_of(&body), "rule_not_matched", "{body}");
        assert!(body.contains("other than Upgrade: websocket"), "{body}");
    }
    // curl --http2 over plain HTTP offers h2c: the offer is declined (the
    // proxy could not read an h2c connection), and the request is answered
    // over HTTP/1.1 as one without it; so is a bare `Upgrade: h2c`.
    let (status, _, body) = via_curl(&proxy, &["--http2", &format!("{base}/public/up")]).await;
    assert_eq!((status, body.as_str()), (200, "hello /public/up"));
    let (status, _, body) = via_curl(
        &proxy,
        &[
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: h2c",
            &format!("{base}/public/up"),
        ],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "hello /public/up"));
    // The same request without the upgrade passes.
    let (status, _, body) = via_curl(&proxy, &[&format!("{base}/public/up")]).await;
    assert_eq!((status, body.as_str()), (200, "hello /public/up"));
}

/// A WebSocket handshake for `path` through the proxy: the response head
/// and the stream.
async fn websocket(
    proxy: &TestProxy,
    origin: &Origin,
    path: &str,
) -> (tokio::net::TcpStream, String) {
    let request = format!(
        "GET http://{0}{path} HTTP/1.1\r\nHost: {0}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        origin.addr
    );
    raw_exchange(proxy.handle.http_addr(), &request).await
}

/// Reads until the peer closes (or 5 s pass); what came.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut all),
    )
    .await;
    all
}

#[tokio::test]
async fn an_origin_s_101_must_answer_what_was_asked() {
    let (origin, proxy) = ruled_proxy().await;
    // Switching to another protocol, or with an accept key that does not
    // answer the client's: 502, and the client's connection closes.
    for path in ["/ws-switches-to-h2c", "/ws-bad-accept"] {
        let (mut stream, head) = websocket(&proxy, &origin, path).await;
        assert!(head.starts_with("HTTP/1.1 502"), "{path}: {head}");
        assert!(
            head.to_ascii_lowercase().contains("connection: close"),
            "{path}: {head}"
        );
        let rest = until_closed(&mut stream).await;
        assert!(
            !String::from_utf8_lossy(&rest).contains("HTTP/1.1 101"),
            "{path}"
        );
    }
    // The same on a host without rules: the check is not the rules'.
    let open = proxy_with(allow(&["127.0.0.1"]).build(), &[], |b| b).await;
    let (_, head) = websocket(&open, &origin, "/ws-switches-to-h2c").await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let (_, head) = websocket(&open, &origin, "/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// One masked WebSocket frame, as a client sends it.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn after_a_101_to_a_ruled_host_only_websocket_frames_pass() {
    let (origin, proxy) = ruled_proxy().await;
    // Frames go both ways (the origin echoes bytes: an echoed client frame
    // is masked, which no origin may send, so a second exchange shows the
    // origin-side check too).
    let (mut stream, head) = websocket(&proxy, &origin, "/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let frame = client_frame(1, b"hello");
    stream.write_all(&frame).await.unwrap();
    // The client's frame reached the origin and came back, where the
    // origin-side check closes it: a masked frame from the origin.
    let echoed = until_closed(&mut stream).await;
    assert!(echoed.is_empty() || echoed == frame, "{echoed:?}");

    // The review's bypass: after the 101, a plain request on the same
    // socket. It never reaches the origin: the connection closes.
    let (mut stream, head) = websocket(&proxy, &origin, "/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let smuggled = format!(
        "DELETE http://{0}/public/secret/x HTTP/1.1\r\nHost: {0}\r\n\r\n",
        origin.addr
    );
    stream.write_all(smuggled.as_bytes()).await.unwrap();
    let answer = until_closed(&mut stream).await;
    assert!(
        answer.is_empty(),
        "bytes came back after a non-frame: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // On a host without rules the upgraded stream stays a plain relay.
    let open = proxy_with(allow(&["127.0.0.1"]).build(), &[], |b| b).await;
    let (mut stream, head) = websocket(&open, &origin, "/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
}

#[tokio::test]
async fn path_parameters_are_stripped_and_ambiguous_spellings_refused() {
    let (origin, proxy) = ruled_proxy().await;
    let base = format!("http://{}", origin.addr);
    // `;` parameters are dropped for matching: these are /public/secret/x.
    for path in [
        "/public/secret;jsessionid=1/x",
        "/public/..;/public/secret/x",
        "/public/x/..;/secret/x",
    ] {
        let (status, _, body) = via_curl(&proxy, &[&format!("{base}{path}")]).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(reason_of(&body), "rule_denied", "{path}: {body}");
    }
    // `/public/..;/private/x` is `/private/x`: no allow entry.
    let (status, _, body) = via_curl(&proxy, &[&format!("{base}/public/..;/private/x")]).await;
    assert_eq!(
        (status, reason_of(&body).as_str()),
        (403, "rule_not_matched"),
        "{body}"
    );
    // Spellings some origin reads another way: refused with their reason.
    for path in [
        "/public/%252e%252e/secret/x",
        "/public/%c0%ae%c0%ae/secret/x",
        "/public/%u002e%u002e/secret/x",
        "/public/secret./x",
        "/public/secret%20/x",
        "/public/secret%09/x",
        "/public/a%3bb/x",
        "/public/a%zz",
        "/public/a%2Fb",
    ] {
        let (status, headers, body) = via_curl(&proxy, &[&format!("{base}{path}")]).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(
            headers["x-proxy-error"], "blocked-by-request-rule",
            "{path}"
        );
        assert_eq!(reason_of(&body), "ambiguous_path", "{path}: {body}");
        assert!(!body.contains("hello"), "{path} reached the origin");
    }
    let last = proxy.ring.snapshot().pop().unwrap();
    assert_eq!(last.blocked.reason, Reason::AmbiguousPath);
    // Plain spellings still pass.
    for path in [
        "/public/a;v=1/b",
        "/public/caf%C3%A9",
        "/public/100%25",
        "/public/a.b/c",
    ] {
        let (status, _, body) = via_curl(&proxy, &[&format!("{base}{path}")]).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

/// Runs a python script with requests; `None` (and the skip printed) when
/// python or requests is missing and CI does not require them.
async fn python(script: &str) -> Option<String> {
    let has = tokio::process::Command::new("python3")
        .args(["-c", "import requests"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !has {
        assert!(
            std::env::var("PORTCULLIS_CLIENTS_REQUIRED").is_err(),
            "python3 with requests is required here"
        );
        eprintln!("skipped: python3 with requests is not installed");
        return None;
    }
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .args(["-c", script])
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test]
async fn method_overrides_in_bodies_and_renamed_parameters_are_decided() {
    let (origin, proxy) = ruled_proxy().await;
    let script = format!(
        r#"
import requests, json
proxies = {{"http": "{proxy}"}}
url = "http://{origin}/public/form"
def show(name, response):
    reason = ""
    if response.status_code == 403:
        reason = response.json()["reason"]
    print(name, response.status_code, reason)
show("plain-form", requests.post(url, data={{"title": "x"}}, proxies=proxies))
show("form", requests.post(url, data={{"title": "x", "_method": "DELETE"}}, proxies=proxies))
show("form-case", requests.post(url, data={{"_METHOD": "delete"}}, proxies=proxies))
show("multipart", requests.post(url, files={{"f": ("a.txt", b"data")}}, data={{"_method": "DELETE"}}, proxies=proxies))
show("plain-multipart", requests.post(url, files={{"f": ("a.txt", b"data")}}, proxies=proxies))
show("json", requests.post(url, json={{"_method": "DELETE"}}, proxies=proxies))
show("plain-json", requests.post(url, json={{"method": "DELETE"}}, proxies=proxies))
show("dot-query", requests.post(url + "?.method=DELETE", data="x", proxies=proxies))
show("array-query", requests.post(url + "?_method[]=DELETE", data="x", proxies=proxies))
show("space-query", requests.post(url + "?%20_method=DELETE", data="x", proxies=proxies))
show("override-to-get", requests.post(url, data={{"_method": "GET"}}, proxies=proxies))
"#,
        proxy = proxy.http_url(),
        origin = origin.addr
    );
    let Some(out) = python(&script).await else {
        return;
    };
    let seen: std::collections::HashMap<&str, (&str, &str)> = out
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            Some((parts.next()?, (parts.next()?, parts.next().unwrap_or(""))))
        })
        .collect();
    for passes in ["plain-form", "plain-multipart", "plain-json"] {
        assert_eq!(seen[passes].0, "200", "{passes}: {out}");
    }
    for refused in [
        "form",
        "form-case",
        "multipart",
        "json",
        "dot-query",
        "array-query",
        "space-query",
    ] {
        assert_eq!(seen[refused], ("403", "rule_denied"), "{refused}: {out}");
    }
    // A POST that says it is a GET is judged as both, like an override
    // header: one allow entry must hold both methods, and none does.
    assert_eq!(
        seen["override-to-get"],
        ("403", "rule_not_matched"),
        "{out}"
    );
}

#[tokio::test]
async fn a_body_too_large_to_judge_is_refused_on_a_host_whose_rules_name_methods() {
    let (origin, proxy) = ruled_proxy().await;
    let big = std::env::temp_dir().join(format!("portcullis-big-form-{}", std::process::id()));
    // 17 MiB of form body: over the 16 MiB bound.
    std::fs::write(&big, vec![b'a'; 17 << 20]).unwrap();
    let (status, _, body) = via_curl(
        &proxy,
        &[
            "-H",
            "Expect:",
            "-H",
            "Content-Type: application/x-www-form-urlencoded",
            "--data-binary",
            &format!("@{}", big.display()),
            &format!("http://{}/public/form", origin.addr),
        ],
    )
    .await;
    let _ = std::fs::remove_file(&big);
    assert_eq!(status, 403, "{body}");
    assert_eq!(reason_of(&body), "rule_not_matched", "{body}");
    assert!(body.contains("over 16 MiB"), "{body}");
    // The fix is the body's, not a rules entry's.
    assert!(
        body.contains("send a body of at most 16 MiB") && !body.contains("add an allow entry"),
        "{body}"
    );
}

#[tokio::test]
async fn limited_mode_sees_every_spelling_of_a_push_start() {
    let origin = origin().await;
    let proxy = proxy(allow(&["127.0.0.1"]).mode(Mode::Limited), &[]).await;
    let base = format!("http://{}/repo.git", origin.addr);
    for path in [
        "/info/refs?service=git-receive-pack",
        "/info/refs/?service=git-receive-pack",
        "/info/%72efs?service=git-receive-pack",
        "/info/refs;x?service=git-receive-pack",
        "/info/refs?service=GIT-RECEIVE-PACK",
        "/info/refs?service=git%2Dreceive%2Dpack",
    ] {
        let (status, headers, body) = via_curl(&proxy, &[&format!("{base}{path}")]).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(
            headers["x-proxy-error"], "blocked-by-method-policy",
            "{path}"
        );
    }
    // A fetch's first request passes.
    let (status, _, _) = via_curl(
        &proxy,
        &[&format!("{base}/info/refs?service=git-upload-pack")],
    )
    .await;
    assert_eq!(status, 200);
}
