//! `run --isolate`: inside, the proxy is the only way out. Skipped, with the
//! reason printed, where this system refuses unprivileged user and network
//! namespaces — unless `PORTCULLIS_ISOLATE_REQUIRED=1` (CI sets it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::process::Stdio;

use common::*;

async fn namespaces_available() -> bool {
    let ok = tokio::process::Command::new("unshare")
        .args(["-Urn", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ok {
        let required = std::env::var("PORTCULLIS_ISOLATE_REQUIRED").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "unshare -Urn is refused here, and isolation is required"
        );
        println!("skipped: this system refuses unprivileged user and network namespaces (unshare -Urn true failed)");
    }
    ok
}

async fn isolated(script: &str) -> (Option<i32>, String, String) {
    output(portcullis().args([
        "run",
        "--isolate",
        "--allow",
        "127.0.0.1",
        "--allow",
        "ok.test",
        "--resolve",
        "ok.test=127.0.0.1",
        "--allow-local-binding",
        "--",
        "sh",
        "-c",
        script,
    ]))
    .await
}

#[tokio::test]
async fn inside_only_the_proxy_reaches_out() {
    if !namespaces_available().await {
        return;
    }
    let origin = origin().await;
    let port = origin.addr.port();
    let script = format!(
        r#"
curl -s http://127.0.0.1:{port}/through; echo
curl -s --proxy "$SOCKS_PROXY" http://ok.test:{port}/socks; echo
curl -s -m 5 --noproxy '*' http://127.0.0.1:{port}/direct >/dev/null; echo "noproxy-exit-$?"
python3 -c 'import socket
s = socket.socket(); s.settimeout(5)
try:
    s.connect(("127.0.0.1", {port})); print("raw-connected")
except OSError as e:
    print("raw-failed")'
curl -s -o /dev/null -w "%{{http_code}}\n" http://refused.test/
echo "udp-$PORTCULLIS_SOCKS_UDP"
exit 7
"#
    );
    let (code, stdout, stderr) = isolated(&script).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hello /through"), "{stdout}{stderr}");
    assert_eq!(
        lines.get(1),
        Some(&"hello /socks"),
        "SOCKS5 through the bridge: {stdout}{stderr}"
    );
    let direct = lines.get(2).copied().unwrap_or("");
    assert!(
        direct.starts_with("noproxy-exit-") && direct != "noproxy-exit-0",
        "curl --noproxy '*' must not reach the origin: {stdout}"
    );
    assert_eq!(
        lines.get(3),
        Some(&"raw-failed"),
        "a raw socket must not reach the origin: {stdout}"
    );
    assert_eq!(lines.get(4), Some(&"403"), "{stdout}");
    assert_eq!(lines.get(5), Some(&"udp-off"), "{stdout}");
    assert_eq!(code, Some(7), "the command's exit code: {stderr}");
    assert!(
        stderr.contains("portcullis: refused refused.test:80 ×1"),
        "the refusal summary: {stderr}"
    );
    // Only the two allowed requests reached the origin: direct attempts
    // never connected.
    assert_eq!(
        origin.connections.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[tokio::test]
async fn node_fetch_cannot_go_direct() {
    if !namespaces_available().await {
        return;
    }
    if tokio::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .await
        .is_err()
    {
        println!("skipped: node is not installed");
        return;
    }
    let origin = origin().await;
    let port = origin.addr.port();
    // node before 24 ignores the proxy variables: outside a namespace its
    // fetch would reach the origin; inside it cannot.
    let script = format!(
        "NODE_USE_ENV_PROXY= node -e 'fetch(\"http://127.0.0.1:{port}/node\").then(() => console.log(\"reached\"), () => console.log(\"unreachable\"))'"
    );
    let (_, stdout, stderr) = isolated(&script).await;
    assert_eq!(stdout.trim(), "unreachable", "{stderr}");
    assert_eq!(
        origin.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn run_isolate_in_the_config_isolates_too() {
    if !namespaces_available().await {
        return;
    }
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(&config, "[run]\nisolate = true\n").unwrap();
    let script = format!(
        "curl -s -m 5 --noproxy '*' http://{}/ >/dev/null; echo \"exit-$?\"; echo \"isolated-$PORTCULLIS_ISOLATED\"",
        origin.addr
    );
    let (code, stdout, stderr) = output(
        portcullis()
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_ne!(lines.first(), Some(&"exit-0"), "{stdout}");
    assert_eq!(lines.get(1), Some(&"isolated-1"), "{stdout}");
}

#[tokio::test]
async fn interception_works_inside_unchanged() {
    if !namespaces_available().await {
        return;
    }
    let (origin, pem) = https_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = mitm_config(dir.path(), &pem);
    // curl trusts portcullis's CA through the exported variables; the
    // proxy trusts the origin's.
    let url = format!("https://secure.test:{}/", origin.port());
    let script =
        format!("curl -s {url}; echo; curl -s -o /dev/null -w '%{{http_code}}\\n' -X POST {url}");
    let (code, stdout, stderr) = output(
        portcullis()
            .args([
                "run",
                "--isolate",
                "--mode",
                "limited",
                "--mitm",
                "--config",
            ])
            .arg(&config)
            .args([
                "--allow",
                "secure.test",
                "--resolve",
                "secure.test=127.0.0.1",
                "--allow-local-binding",
                "--",
                "sh",
                "-c",
                &script,
            ]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["secure hello", "403"],
        "a read through, a write refused: {stderr}"
    );
}
