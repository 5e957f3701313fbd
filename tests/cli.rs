//! The `portcullis` binary: serve, run, check, and bad usage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::process::Command;

#[tokio::test]
async fn run_passes_the_environment_and_returns_the_exit_code() {
    let origin = origin().await;
    let script = format!("curl -s -w ' %{{http_code}}' http://{}/from-run; echo; curl -s -o /dev/null -w '%{{http_code}}' http://example.com/; exit 7", origin.addr);
    let (code, stdout, stderr) =
        output(portcullis().args(["run", "--allow", "127.0.0.1", "--", "sh", "-c", &script])).await;
    assert_eq!(code, Some(7), "the child's exit code: {stderr}");
    assert_eq!(stdout, "hello /from-run 200\n403", "{stderr}");
    assert!(
        stderr.contains("portcullis: refused GET example.com:80 (http) — the host is not in the allowlist; add --allow example.com"),
        "refusals are said on stderr as they happen: {stderr}"
    );
    let (_, stdout, _) = output(portcullis().args([
        "run",
        "--",
        "sh",
        "-c",
        "echo $ALL_PROXY; echo $PORTCULLIS_SOCKS_URL",
    ]))
    .await;
    let mut lines = stdout.lines();
    let all = lines.next().unwrap_or_default();
    assert!(
        all.starts_with("http://portcullis:"),
        "ALL_PROXY is the HTTP URL: {stdout}"
    );
    assert!(
        lines
            .next()
            .unwrap_or_default()
            .starts_with("socks5h://portcullis:"),
        "{stdout}"
    );
    let (_, stdout, _) =
        output(portcullis().args(["run", "--no-socks", "--", "sh", "-c", "echo $ALL_PROXY"])).await;
    assert!(stdout.starts_with("http://portcullis:"), "{stdout}");
    let (code, _, _) = output(portcullis().args(["run", "--", "/nonexistent/program"])).await;
    assert_eq!(code, Some(127));
}

#[tokio::test]
async fn serve_prints_the_environment_then_stops_on_sigterm() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let violations = dir.path().join("violations.jsonl");
    let mut child = portcullis()
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--socks",
            "127.0.0.1:0",
            "--allow",
            "127.0.0.1",
            "--violations-log",
        ])
        .arg(&violations)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://{}", served_http_address(&mut child).await);
    let out = curl(&["-x", &url, &format!("http://{}/served", origin.addr)]).await;
    assert_eq!(out.stdout, "hello /served");
    let out = curl(&["-x", &url, "http://blocked.test/"]).await;
    assert!(
        out.stdout.contains("blocked-by") || out.stdout.contains("not_allowed"),
        "{}",
        out.stdout
    );
    // Written off the request path: wait for it (bounded).
    let mut logged = String::new();
    for _ in 0..100 {
        logged = std::fs::read_to_string(&violations).unwrap_or_default();
        if logged.ends_with('\n') {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line: serde_json::Value = serde_json::from_str(logged.lines().next().unwrap()).unwrap();
    assert_eq!(line["host"], "blocked.test");
    assert_eq!(line["reason"], "not_allowed");
    let (status, _) = terminate(&mut child).await;
    assert!(status.success());
}

#[tokio::test]
async fn check_prints_decision_and_rule() {
    // `check` resolves an allowed name like the proxy would (never dials):
    // a static answer keeps the lookup off the network.
    let (code, stdout, _) = output(portcullis().args([
        "check",
        "--allow",
        "*.example.com",
        "--resolve",
        "api.example.com=1.2.3.4",
        "https://api.example.com/v1",
    ]))
    .await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("allow api.example.com:443")
            && stdout.contains("allowed_domains: *.example.com"),
        "{stdout}"
    );
    let (code, stdout, _) = output(portcullis().args([
        "check",
        "--allow",
        "*",
        "--deny",
        "evil.test",
        "evil.test:22",
    ]))
    .await;
    assert_eq!(code, Some(1));
    assert!(
        stdout.contains("reason: denied") && stdout.contains("denied_domains: evil.test"),
        "{stdout}"
    );
    let (code, stdout, _) =
        output(portcullis().args(["check", "--allow", "*", "http://2130706433/"])).await;
    assert_eq!(code, Some(1));
    assert!(
        stdout.contains("deny 127.0.0.1:80") && stdout.contains("not_allowed_local"),
        "{stdout}"
    );
}

#[tokio::test]
async fn bad_usage_and_bad_config_exit_64_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(&config, "[network]\nallowed_domain = [\"x\"]\n").unwrap();
    let (code, _, stderr) = output(
        portcullis()
            .arg("check")
            .arg("--config")
            .arg(&config)
            .arg("x.test:1"),
    )
    .await;
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("allowed_domain") && stderr.contains("portcullis.toml"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    std::fs::write(&config, "[network]\ndenied_domains = [\"*\"]\n").unwrap();
    let (code, _, stderr) = output(portcullis().arg("serve").arg("--config").arg(&config)).await;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("network.denied_domains[0]"), "{stderr}");

    let (code, _, stderr) =
        output(portcullis().args(["serve", "--http", "127.0.0.1:0", "--allow", "a.*.b"])).await;
    assert_eq!(code, Some(64), "{stderr}");
    let (code, _, _) = output(portcullis().args(["--no-such-flag"])).await;
    assert_eq!(code, Some(64));
    let (code, _, stderr) =
        output(portcullis().args(["check", "--allow", "x", "not a target"])).await;
    assert_eq!(code, Some(64), "{stderr}");
    let (code, _, stderr) = output(
        portcullis()
            .args(["serve", "--http", "127.0.0.1:0"])
            .env("PORTCULLIS_NETWORK__MODE", "readonly"),
    )
    .await;
    assert_eq!(code, Some(64));
    assert!(
        stderr.to_ascii_lowercase().contains("network.mode"),
        "{stderr}"
    );
    // Usage mistakes get the fix, not a parser's complaint.
    for (args, says) in [
        (
            &[
                "check",
                "--allow",
                "http://example.com/x",
                "example.com:443",
            ][..],
            "did you mean example.com?",
        ),
        (
            &[
                "check",
                "--allow",
                "/var/run/docker.sock",
                "example.com:443",
            ][..],
            "allow_unix_sockets",
        ),
        (
            &["check", "--resolve", "x.test=notip", "x.test:443"][..],
            "is not an IP address",
        ),
    ] {
        let (code, _, stderr) = output(portcullis().args(args)).await;
        assert_eq!(code, Some(64), "{args:?}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    // `run --http` is honoured; an ephemeral HTTP port makes SOCKS ephemeral.
    let (_, stdout, _) = output(portcullis().args([
        "run",
        "--no-auth",
        "--http",
        "127.0.0.1:0",
        "--",
        "sh",
        "-c",
        "echo $HTTP_PROXY $PORTCULLIS_SOCKS_URL",
    ]))
    .await;
    assert!(stdout.starts_with("http://127.0.0.1:"), "{stdout}");
    assert!(!stdout.contains(":8081"), "{stdout}");
    let (code, stdout, _) = output(portcullis().arg("--help")).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("run"));
}

/// The first word of `check`'s answer and its `reason:` line.
#[tokio::test]
async fn what_a_new_user_gets_wrong_is_said_not_swallowed() {
    // `run curl …` without `--`: clap's error, and how to write it.
    let (code, _, stderr) = output(portcullis().args(["run", "curl", "http://x.test/"])).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("tip: put -- between run's options and the command: portcullis run [OPTIONS] -- curl http://x.test/"),
        "{stderr}"
    );
    // With options first, they stay before the `--`.
    let (code, _, stderr) = output(portcullis().args([
        "run",
        "--isolate",
        "--allow",
        "x.test",
        "curl",
        "-s",
        "http://x.test/",
    ]))
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("portcullis run --isolate --allow x.test -- curl -s http://x.test/"),
        "{stderr}"
    );
    // `--isolate=` takes a named strictness only.
    let (code, _, stderr) = output(portcullis().args(["run", "--isolate=yes", "--", "true"])).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("[possible values: strict, best-effort]"),
        "{stderr}"
    );
    // A wildcard over a public suffix allows everyone's domains: said.
    let (code, _, stderr) = output(portcullis().args([
        "run",
        "--allow",
        "*.com",
        "--allow",
        "**.github.io",
        "--allow",
        "*.example.com",
        "--",
        "true",
    ]))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains(r#"--allow "*.com" allows every domain anyone can register under the public suffix "com""#), "{stderr}");
    assert!(
        stderr.contains(r#"the public suffix "github.io""#),
        "{stderr}"
    );
    assert!(
        !stderr.contains("example.com"),
        "a registrable domain is not warned about: {stderr}"
    );
    // Globs with alternatives or classes never matched: refused, naming the key.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[[rules]]\nhost = \"api.test\"\nallow = [ { paths = [\"/repos/{a,b}/**\"] } ]\n",
    )
    .unwrap();
    let (code, _, stderr) = output(
        portcullis()
            .args(["check", "--config"])
            .arg(&config)
            .arg("http://api.test/"),
    )
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("rules[0]") && stderr.contains("c.toml") && stderr.contains("{a,b}"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_told_once_what_to_give_it() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\nmode = \"limited\"\nmitm = true\nallowed_domains = [\"secure.test\"]\nallow_local_binding = true\n[mitm]\nca_dir = {:?}\n[dns]\nhosts = {{ \"secure.test\" = [\"127.0.0.1\"] }}\n",
            dir.path().join("ca").display().to_string()
        ),
    )
    .unwrap();
    let (mut child, proxy) = serve_config(&config).await;
    // curl with only the system's roots: it rejects our leaf (unknown CA),
    // twice; the proxy says so once, with the file to give it.
    for _ in 0..2 {
        let out = curl(&[
            "-x",
            &proxy,
            &format!("https://secure.test:{}/", origin.addr.port()),
        ])
        .await;
        assert_eq!(out.code, Some(60), "{}", out.stderr);
    }
    let (_, stderr) = terminate(&mut child).await;
    assert_eq!(
        stderr
            .matches("rejected portcullis's interception certificate")
            .count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("does not trust the portcullis CA"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&dir.path().join("ca").join("ca.pem").display().to_string()),
        "{stderr}"
    );
}

fn check_verdict(stdout: &str) -> (String, String) {
    let verdict = stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let reason = stdout
        .lines()
        .find_map(|line| line.strip_prefix("reason: "))
        .unwrap_or("")
        .to_owned();
    (verdict, reason)
}

/// What a live proxy started with `flags` answers `request`: `allow` for a
/// 2xx, else `deny` with the JSON body's reason.
async fn live_verdict(flags: &[&str], request: &str) -> (String, String) {
    let mut child = portcullis()
        .arg("serve")
        .args(flags)
        .args(["--http", "127.0.0.1:0", "--no-socks"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let address = served_http_address(&mut child).await;
    let (mut stream, head) = raw_exchange(address, request).await;
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    if (200..300).contains(&status) {
        return ("allow".into(), String::new());
    }
    let body = read_body(&mut stream, &head).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (
        "deny".into(),
        json["reason"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test]
async fn check_and_a_live_request_agree() {
    let origin = origin().await;
    let port = origin.addr.port();
    let svc = "svc.test=127.0.0.1";
    let get = |authority: String| {
        format!(
            "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        )
    };
    let post = |authority: String| {
        format!("POST http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    };
    let connect =
        |authority: String| format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let svc_url = format!("http://svc.test:{port}/");
    let svc_authority = format!("svc.test:{port}");
    let ip_url = format!("http://127.0.0.1:{port}/");
    let ip_authority = format!("127.0.0.1:{port}");
    /// Flags, `check` target, `check --method`, live request, expected reason ("" = allow).
    type Case<'a> = (Vec<&'a str>, &'a str, Option<&'a str>, String, &'a str);
    #[rustfmt::skip]
    let table: Vec<Case<'_>> = vec![
        (vec!["--allow", "svc.test", "--resolve", svc], &svc_url, None, get(svc_authority.clone()), "not_allowed_local"),
        (vec!["--allow", "svc.test", "--resolve", svc, "--allow-local-binding"], &svc_url, None, get(svc_authority.clone()), ""),
        (vec!["--allow", "svc.test", "--resolve", svc], &svc_authority, None, connect(svc_authority.clone()), "not_allowed_local"),
        (vec!["--allow", "*", "--resolve", svc], &svc_authority, None, connect(svc_authority.clone()), "not_allowed_local"),
        (vec!["--allow", "*", "--deny", "svc.test", "--resolve", svc], &svc_url, None, get(svc_authority.clone()), "denied"),
        (vec!["--allow", "other.test", "--resolve", svc], &svc_url, None, get(svc_authority.clone()), "not_allowed"),
        (vec!["--allow", "127.0.0.1"], &ip_authority, None, connect(ip_authority.clone()), ""),
        (vec!["--allow", "127.0.0.1", "--mode", "limited"], &ip_authority, None, connect(ip_authority.clone()), "mitm_required"),
        (vec!["--allow", "127.0.0.1", "--mode", "limited"], &ip_url, None, get(ip_authority.clone()), ""),
        (vec!["--allow", "127.0.0.1", "--mode", "limited"], &ip_url, Some("POST"), post(ip_authority.clone()), "method_not_allowed"),
    ];
    let cases = table.len();
    for (flags, target, method, request, expected) in table {
        let mut check = portcullis();
        check.arg("check").args(&flags);
        if let Some(method) = method {
            check.args(["--method", method]);
        }
        let (code, stdout, stderr) = output(check.arg(target)).await;
        let checked = check_verdict(&stdout);
        let live = live_verdict(&flags, &request).await;
        let want = if expected.is_empty() {
            ("allow".to_owned(), String::new())
        } else {
            ("deny".to_owned(), expected.to_owned())
        };
        assert_eq!(checked, want, "check {flags:?} {target}: {stdout}{stderr}");
        assert_eq!(live, want, "live {flags:?} {request:?}");
        assert_eq!(code, Some(if expected.is_empty() { 0 } else { 1 }));
    }
    println!("check and the live proxy agreed on {cases} cases");
}

#[tokio::test]
async fn ca_is_made_once_by_concurrent_processes_and_an_open_key_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let start = || {
        let mut command = portcullis();
        command
            .arg("ca")
            .env("XDG_DATA_HOME", data.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command.spawn().unwrap()
    };
    let children: Vec<_> = (0..4).map(|_| start()).collect();
    let mut printed = Vec::new();
    for child in children {
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        printed.push(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let ca_dir = data.path().join("portcullis");
    let first_line = format!("{}\n", ca_dir.join("ca.pem").display());
    assert!(printed[0].starts_with(&first_line), "{}", printed[0]);
    assert!(printed[0].contains("-----BEGIN CERTIFICATE-----"));
    assert!(
        printed.iter().all(|p| p == &printed[0]),
        "every process ends with the one CA"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&ca_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    use std::os::unix::fs::PermissionsExt;
    let key = ca_dir.join("ca-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stdout, stderr) =
        output(portcullis().arg("ca").env("XDG_DATA_HOME", data.path())).await;
    assert_eq!(code, Some(64), "{stdout}");
    assert!(
        stderr.contains("chmod 600") && stderr.contains("ca-key.pem"),
        "{stderr}"
    );

    // `run` with interception exports the CA bundle to the child.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stdout, stderr) = output(
        portcullis()
            .args(["run", "--mode", "limited", "--mitm", "--", "sh", "-c"])
            .arg("echo $SSL_CERT_FILE $NODE_EXTRA_CA_CERTS $GIT_SSL_CAINFO; grep -c 'BEGIN CERTIFICATE' $SSL_CERT_FILE")
            .env("XDG_DATA_HOME", data.path()),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let bundle = ca_dir.join("bundle.pem").display().to_string();
    let ca = ca_dir.join("ca.pem").display().to_string();
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!("{bundle} {ca} {bundle}"),
        "{stdout}"
    );
    let count: usize = lines.next().unwrap().trim().parse().unwrap();
    assert!(
        count >= 1,
        "the bundle holds our CA (and the system's roots)"
    );
    let bundle_text = std::fs::read_to_string(&bundle).unwrap();
    assert!(bundle_text.ends_with(&std::fs::read_to_string(&ca).unwrap()));
}

#[tokio::test]
async fn check_decides_https_as_the_intercepting_proxy_would() {
    let base = [
        "check",
        "--mode",
        "limited",
        "--allow",
        "x.test",
        "--resolve",
        "x.test=1.2.3.4",
    ];
    let cases: [(&[&str], &str, i32, &str); 4] = [
        (
            &["--mitm", "--method", "POST"],
            "https://x.test/",
            1,
            "method_not_allowed",
        ),
        (&["--mitm"], "https://x.test/", 0, ""),
        (&["--mitm"], "x.test:443", 0, ""),
        (&[], "https://x.test/", 1, "mitm_required"),
    ];
    for (flags, target, code, reason) in cases {
        let (got, stdout, stderr) = output(portcullis().args(base).args(flags).arg(target)).await;
        assert_eq!(got, Some(code), "{flags:?} {target}: {stdout}{stderr}");
        assert_eq!(check_verdict(&stdout).1, reason, "{flags:?} {target}");
    }
}

#[tokio::test]
async fn run_guards_its_proxy_with_a_credential_that_clients_send() {
    let origin = origin().await;
    let url = format!("http://{}/guarded", origin.addr);
    // Every client reads the credential from the proxy URL; a request
    // without it (the proxy address alone) gets 407, on HTTP and SOCKS5.
    let script = format!(
        r#"
curl -s "{url}"; echo
curl -s --socks5-hostname "${{PORTCULLIS_SOCKS_URL#socks5h://}}" "{url}" >/dev/null && echo socks-with-credential-ok
python3 -c 'import urllib.request; print(urllib.request.urlopen("{url}").read().decode())'
python3 -c 'import requests; print(requests.get("{url}").text)' 2>/dev/null || echo "requests: not installed"
python3 -c 'import httpx; print(httpx.get("{url}").text)' 2>/dev/null || echo "httpx: not installed"
bare="http://${{HTTP_PROXY##*@}}"
curl -s -o /dev/null -w "%{{http_code}}\n" -x "$bare" "{url}"
curl -s --socks5-hostname "${{PORTCULLIS_SOCKS_URL##*@}}" "{url}" >/dev/null; echo "socks-without-credential-exit-$?"
"#
    );
    let (code, stdout, stderr) =
        output(portcullis().args(["run", "--allow", "127.0.0.1", "--", "sh", "-c", &script])).await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "hello /guarded", "{stdout}");
    assert_eq!(lines[1], "socks-with-credential-ok", "{stdout}");
    assert_eq!(lines[2], "hello /guarded", "urllib: {stdout}");
    assert!(
        lines[3] == "hello /guarded" || lines[3] == "requests: not installed",
        "{stdout}"
    );
    // httpx takes the exported ALL_PROXY (the HTTP URL) without socksio.
    assert!(
        lines[4] == "hello /guarded" || lines[4] == "httpx: not installed",
        "{stdout}"
    );
    assert_eq!(lines[5], "407", "no credential, no proxy: {stdout}");
    assert!(
        lines[6].starts_with("socks-without-credential-exit-")
            && lines[6] != "socks-without-credential-exit-0",
        "{stdout}"
    );
    // And --no-auth exports bare URLs.
    let (_, stdout, _) =
        output(portcullis().args(["run", "--no-auth", "--", "sh", "-c", "echo $HTTP_PROXY"])).await;
    assert!(stdout.starts_with("http://127.0.0.1:"), "{stdout}");
}

/// A registry on loopback that answers cargo's sparse index and search
/// API and npm's packument, by path.
async fn registry() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let port = addr.port();
                let body = if path.ends_with("/config.json") {
                    format!(
                        r#"{{"dl":"http://registry.test:{port}/dl","api":"http://registry.test:{port}"}}"#
                    )
                } else if path.starts_with("/api/v1/crates") {
                    r#"{"crates":[{"name":"servedthrough","max_version":"1.2.3","description":"via the proxy"}],"meta":{"total":1}}"#.to_owned()
                } else if path == "/is-number" {
                    format!(
                        r#"{{"name":"is-number","dist-tags":{{"latest":"7.0.0"}},"versions":{{"7.0.0":{{"name":"is-number","version":"7.0.0","dist":{{"tarball":"http://registry.test:{port}/x.tgz","shasum":"0"}}}}}}}}"#
                    )
                } else {
                    let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                    return;
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let mut rest = [0u8; 64];
                let _ = stream.read(&mut rest).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn package_managers_send_the_credential_from_the_url() {
    // registry.test resolves only inside the proxy, so an answer proves the
    // request went through it, and the proxy refuses requests without the
    // run's credential (407).
    let registry = registry().await;
    let port = registry.port();
    let cargo_home = tempfile::tempdir().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let script = format!(
        r#"
CARGO_HOME="{home}" "{cargo}" search servedthrough --index "sparse+http://registry.test:{port}/" 2>&1 | grep -c 'servedthrough = "1.2.3"'
if command -v npm >/dev/null; then npm view is-number version --registry "http://registry.test:{port}/" 2>&1 | tail -1; else echo "npm: not installed"; fi
"#,
        home = cargo_home.path().display()
    );
    let (code, stdout, stderr) = output(portcullis().args([
        "run",
        "--allow",
        "registry.test",
        "--resolve",
        "registry.test=127.0.0.1",
        "--allow-local-binding",
        "--",
        "sh",
        "-c",
        &script,
    ]))
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"1"), "cargo: {stdout}{stderr}");
    assert!(
        lines.get(1) == Some(&"7.0.0") || lines.get(1) == Some(&"npm: not installed"),
        "npm: {stdout}{stderr}"
    );
}

#[tokio::test]
async fn serve_writes_an_env_file_a_script_can_source() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("portcullis.env");
    let mut child = portcullis()
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--socks",
            "127.0.0.1:0",
            "--allow",
            "127.0.0.1",
            "--env-file",
        ])
        .arg(&env_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if env_file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let script = format!(
        ". '{}'; curl -s http://{}/sourced",
        env_file.display(),
        origin.addr
    );
    let (code, stdout, _) = output(Command::new("sh").args(["-c", &script])).await;
    assert_eq!((code, stdout.as_str()), (Some(0), "hello /sourced"));
    let (status, _) = terminate(&mut child).await;
    assert!(status.success());
    assert!(!env_file.exists(), "removed on exit");
}

#[tokio::test]
async fn chaining_is_announced_and_the_child_keeps_its_rust_log() {
    let (code, stdout, stderr) = output(
        portcullis()
            .args(["run", "--no-auth", "--", "sh", "-c", "echo $RUST_LOG"])
            .env("HTTPS_PROXY", "http://someone:hunter2@127.0.0.1:9")
            .env("RUST_LOG", "trace"),
    )
    .await;
    assert_eq!(code, Some(0));
    assert_eq!(
        stdout.trim(),
        "trace",
        "the child's RUST_LOG is the child's"
    );
    assert!(
        stderr.contains("chaining through http://…@127.0.0.1:9"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "no password in the log: {stderr}"
    );
    assert!(
        !stderr.contains("TRACE"),
        "RUST_LOG does not drive portcullis under run: {stderr}"
    );
    let (_, _, stderr) = output(
        portcullis()
            .args(["run", "--no-auth", "--no-upstream-proxy", "--", "true"])
            .env("HTTPS_PROXY", "http://127.0.0.1:9"),
    )
    .await;
    assert!(!stderr.contains("chaining"), "{stderr}");
}

#[tokio::test]
async fn run_ends_with_a_summary_of_what_it_refused() {
    let (code, _, stderr) = output(portcullis().args([
        "run",
        "--no-auth",
        "--allow",
        "svc.test",
        "--resolve",
        "svc.test=127.0.0.1",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3; do curl -s -o /dev/null http://blocked.test/; done; curl -s -o /dev/null http://other.test:8080/; curl -s -o /dev/null http://svc.test:9/",
    ]))
    .await;
    assert_eq!(code, Some(0));
    // Each destination once as it is first refused, then the summary:
    // nothing else (no timestamped log line), and no escaped quotes.
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "portcullis: refused GET blocked.test:80 (http) — the host is not in the allowlist; add --allow blocked.test",
            "portcullis: refused GET other.test:8080 (http) — the host is not in the allowlist; add --allow other.test",
            "portcullis: refused GET svc.test:9 (http) — it resolves to the local or private address 127.0.0.1; allow that address with --allow 127.0.0.1:9, or pass --allow-local-binding",
            "portcullis: refused blocked.test:80 ×3 — the host is not in the allowlist; add --allow blocked.test",
            "portcullis: refused other.test:8080 ×1 — the host is not in the allowlist; add --allow other.test",
            // The name is allowed; the address it resolved to is named.
            "portcullis: refused svc.test:9 ×1 — it resolves to the local or private address 127.0.0.1; allow that address with --allow 127.0.0.1:9, or pass --allow-local-binding",
        ],
        "{stderr}"
    );
    assert!(!stderr.contains("\\\""), "no escaped quotes: {stderr}");
    let (_, _, stderr) = output(portcullis().args(["run", "--no-auth", "--", "true"])).await;
    assert!(
        !stderr.contains("portcullis: refused"),
        "nothing refused, nothing said: {stderr}"
    );
}

#[tokio::test]
async fn refusals_name_the_fix_where_the_user_is() {
    // Under run: the flag. With --config (serve, check): the key and the file.
    let (_, stdout, _) =
        output(portcullis().args(["run", "--", "curl", "-s", "http://refused.test/"])).await;
    assert!(
        stdout.contains("the host is not in the allowlist; add --allow refused.test"),
        "{stdout}"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("team.toml");
    std::fs::write(&config, "[network]\nallowed_domains = [\"ok.test\"]\n").unwrap();
    let (code, stdout, _) = output(
        portcullis()
            .args(["check", "--config"])
            .arg(&config)
            .arg("http://refused.test/"),
    )
    .await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "add \"refused.test\" to allowed_domains in {}",
            config.display()
        )),
        "{stdout}"
    );
    let (_, stdout, _) = output(portcullis().args(["check", "http://127.0.0.1:9/"])).await;
    assert!(
        stdout.contains("--allow 127.0.0.1:9, or pass --allow-local-binding"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("approve"),
        "no approver, no approval hint: {stdout}"
    );
    // Under run with --config: flags for the lists, but request rules live
    // only in the file, so their refusals name it.
    let origin = origin().await;
    let ruled = dir.path().join("rules.toml");
    std::fs::write(
        &ruled,
        "[network]\nallowed_domains = [\"127.0.0.1\"]\nallow_local_binding = true\n[[rules]]\nhost = \"127.0.0.1\"\nallow = [ { methods = [\"GET\"] } ]\n",
    )
    .unwrap();
    let (_, _, stderr) = output(
        portcullis()
            .args(["run", "--config"])
            .arg(&ruled)
            .args(["--", "curl", "-s", "-d", "x"])
            .arg(format!("http://{}/", origin.addr)),
    )
    .await;
    assert!(
        stderr.contains(&format!(
            "add an allow entry to that block in {}",
            ruled.display()
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn serve_writes_an_access_log_and_run_does_not_unless_asked() {
    let origin = origin().await;
    let mut child = portcullis()
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--no-socks",
            "--allow",
            "127.0.0.1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let proxy = served_http_address(&mut child).await;
    let authority = origin.addr.to_string();
    let (_, head) = raw_exchange(
        proxy,
        &format!("GET http://{authority}/logged HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (mut tunnel, head) = raw_exchange(
        proxy,
        &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tunnel
        .write_all(b"GET /tunnelled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tunnel.read_to_end(&mut answer).await.unwrap();
    drop(tunnel);
    let closed = closed_port().await;
    let (_, head) = raw_exchange(
        proxy,
        &format!("GET http://127.0.0.1:{closed}/ HTTP/1.1\r\nHost: 127.0.0.1:{closed}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, stderr) = terminate(&mut child).await;
    let line = |needle: &str| {
        stderr
            .lines()
            .find(|l| l.contains("portcullis::access") && l.contains(needle))
            .unwrap_or_else(|| panic!("no access line with {needle:?} in\n{stderr}"))
            .to_owned()
    };
    let get = line("dst.port=");
    assert!(
        get.contains("method=\"GET\"") && get.contains("status=200"),
        "{get}"
    );
    assert!(get.contains("bytes=13"), "hello /logged is 13 bytes: {get}");
    assert!(line("tunnel opened").contains("method=\"CONNECT\""));
    let closed_line = line("tunnel closed");
    assert!(
        closed_line.contains("bytes.up=55") && closed_line.contains(&format!("dst={authority} ")),
        "{closed_line}"
    );
    let failed = line("failed");
    assert!(
        failed.contains("cause=") && failed.contains("onnect"),
        "the cause: {failed}"
    );

    // Under run the access log is off by default…
    let script = format!("curl -s http://{authority}/quiet >/dev/null");
    let (_, _, stderr) =
        output(portcullis().args(["run", "--allow", "127.0.0.1", "--", "sh", "-c", &script])).await;
    assert!(!stderr.contains("portcullis::access"), "{stderr}");
    // …and on when asked.
    let (_, _, stderr) = output(
        portcullis()
            .env("PORTCULLIS_LOG", "warn,portcullis::access=info")
            .args(["run", "--allow", "127.0.0.1", "--", "sh", "-c", &script]),
    )
    .await;
    assert!(stderr.contains("portcullis::access: allowed"), "{stderr}");
}

#[tokio::test]
async fn metrics_are_served_on_loopback_and_sigusr1_dumps_the_refusals() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        "[network]\nproxy_url = \"http://127.0.0.1:0\"\nenable_socks5 = false\nallowed_domains = [\"127.0.0.1\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n[scan]\naction = \"deny\"\n",
    )
    .unwrap();
    let mut child = portcullis()
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let proxy = served_http_address(&mut child).await;
    // The listening line names the metrics address.
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let (metrics, logged) = logged_metrics_address(&mut stderr).await;
    let metrics = metrics.unwrap_or_else(|| panic!("the metrics address is logged: {logged}"));
    let authority = origin.addr.to_string();
    for _ in 0..2 {
        let (_, head) = raw_exchange(
            proxy,
            &format!("GET http://{authority}/m HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let (_, head) = raw_exchange(
        proxy,
        "GET http://refused.test/ HTTP/1.1\r\nHost: refused.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (_, head) = raw_exchange(
        proxy,
        &format!("GET http://{authority}/?t=ghp_R2d2C3poR2d2C3poR2d2C3poR2d2C3po1234 HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (mut stream, head) = raw_exchange(
        metrics,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut text = String::new();
    use tokio::io::AsyncReadExt;
    stream.read_to_string(&mut text).await.unwrap();
    assert!(
        text.contains("portcullis_requests_allowed_total{protocol=\"http\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("portcullis_requests_refused_total{reason=\"not_allowed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("portcullis_bytes_total{direction=\"down\"} 16"),
        "{text}"
    );
    assert!(
        text.contains(
            "portcullis_secrets_found_total{detector=\"github_token\",decision=\"deny\"} 1"
        ),
        "by detector, never the value: {text}"
    );
    assert!(!text.contains("R2d2C3po"), "{text}");
    assert!(text.contains("portcullis_approvals_pending 0"), "{text}");
    let (_, head) = raw_exchange(metrics, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // SIGUSR1 writes the ring to the log; the proxy keeps serving.
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
    let mut dumped = String::new();
    for _ in 0..50 {
        let mut line = String::new();
        use tokio::io::AsyncBufReadExt;
        let read = tokio::time::timeout(Duration::from_secs(5), stderr.read_line(&mut line)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            break;
        }
        dumped.push_str(&line);
        if line.contains("\"host\":\"refused.test\"") {
            break;
        }
    }
    assert!(
        dumped.contains("SIGUSR1: the 2 most recent refusals"),
        "{dumped}"
    );
    assert!(dumped.contains("\"host\":\"refused.test\""), "{dumped}");
    child.stderr = None;
    let _ = terminate(&mut child).await;
}

#[tokio::test]
async fn run_learn_writes_the_allowlist_the_command_needed() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let learned = dir.path().join("learned.toml");
    let script = format!(
        "curl -sf http://a.test:{port}/one >/dev/null && curl -sf http://a.test:{port}/two >/dev/null && curl -sf -p http://b.test:{port}/three >/dev/null && echo fine"
    );
    let names = [
        "--resolve",
        "a.test=127.0.0.1",
        "--resolve",
        "b.test=127.0.0.1",
        "--resolve",
        "c.test=127.0.0.1",
        "--allow-local-binding",
    ];
    let (code, stdout, stderr) = output(
        portcullis()
            .args(["run", "--learn"])
            .arg(&learned)
            .args(names)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "fine", "{stderr}");
    assert!(stderr.contains("(2 destinations)"), "{stderr}");
    let written = std::fs::read_to_string(&learned).unwrap();
    assert!(
        written.contains(&format!("\"a.test:{port}\",")),
        "{written}"
    );
    assert!(
        written.contains(&format!("\"b.test:{port}\",")),
        "{written}"
    );
    assert!(
        !written.contains('*'),
        "exact hosts, no wildcard: {written}"
    );

    // The same command under the learned file: no refusal.
    let (code, stdout, stderr) = output(
        portcullis()
            .args(["run", "--config"])
            .arg(&learned)
            .args(names)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "fine");
    assert!(!stderr.contains("refused"), "{stderr}");
    // …and nothing more: another host is refused.
    let (_, _, stderr) = output(
        portcullis()
            .args(["run", "--config"])
            .arg(&learned)
            .args(names)
            .args(["--", "curl", "-s", &format!("http://c.test:{port}/")]),
    )
    .await;
    assert!(stderr.contains("refused c.test"), "{stderr}");
}

#[tokio::test]
async fn the_learn_summary_counts_every_entry_it_wrote() {
    // A local address is refused while learning but written as an entry:
    // the summary counts it, so "2 destinations" never hides a third line.
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let learned = dir.path().join("learned.toml");
    let script = format!("curl -s http://127.0.0.1:{port}/ >/dev/null; true");
    let (code, _, stderr) = output(
        portcullis()
            .args(["run", "--learn"])
            .arg(&learned)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let written = std::fs::read_to_string(&learned).unwrap();
    assert!(
        written.contains(&format!("\"127.0.0.1:{port}\",")),
        "{written}"
    );
    assert!(
        stderr.contains("(0 destinations, and 1 local address it was refused)"),
        "{stderr}\n{written}"
    );
}

#[tokio::test]
async fn portcullis_variables_without_a_table_are_not_configuration() {
    // PORTCULLIS_LOG is the log filter, PORTCULLIS_ISOLATED is exported by
    // `run --isolate`: neither is a config key (those are TABLE__KEY).
    let (code, stdout, stderr) = output(
        portcullis()
            .env("PORTCULLIS_LOG", "error")
            .env("PORTCULLIS_ISOLATED", "1")
            .args(["check", "http://x.test/"]),
    )
    .await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let (code, _, stderr) = output(
        portcullis()
            .env("PORTCULLIS_NETWORK__MODEE", "limited")
            .args(["check", "http://x.test/"]),
    )
    .await;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("did you mean network.mode?"), "{stderr}");
}

#[tokio::test]
async fn check_takes_several_targets_speaks_json_and_names_persisted_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nhost = \"**.example.org\"\nprotocol = \"https_connect\"\nport = 443\ndecision = \"allow\"\n",
    )
    .unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[dns]\nhosts = {{ \"gone.test\" = [], \"api.example.org\" = [\"1.2.3.4\"], \"ok.test\" = [\"1.2.3.5\"] }}\n[approval]\nmode = \"prompt\"\nrules_file = {:?}\n",
            rules.display().to_string()
        ),
    )
    .unwrap();
    let base = ["check", "--config", config.to_str().unwrap()];
    // A persisted rule is named with its file, not as allow_local_binding.
    let (code, stdout, stderr) = output(portcullis().args(base).arg("api.example.org:443")).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("rule: ")
            && stdout.contains("rules.toml")
            && stdout.contains("**.example.org"),
        "{stdout}"
    );
    // Allowed but unresolvable has its own exit code.
    let (code, stdout, _) =
        output(
            portcullis()
                .args(base)
                .args(["--allow", "gone.test", "gone.test:443"]),
        )
        .await;
    assert_eq!(code, Some(3), "{stdout}");
    assert!(stdout.starts_with("unresolvable gone.test:443"), "{stdout}");
    // Several targets, one JSON object each; deny wins the exit code.
    let (code, stdout, _) = output(portcullis().args(base).args([
        "--json",
        "--allow",
        "gone.test",
        "--allow",
        "ok.test",
        "--deny",
        "bad.test",
        "ok.test:443",
        "gone.test:443",
        "bad.test:80",
        "ask.test:443",
    ]))
    .await;
    assert_eq!(code, Some(1), "{stdout}");
    let verdicts: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let decisions: Vec<&str> = verdicts
        .iter()
        .map(|v| v["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        ["allow", "unresolvable", "deny", "ask"],
        "{stdout}"
    );
    assert_eq!(verdicts[0]["rule"], "allowed_domains: ok.test");
    assert_eq!(verdicts[2]["reason"], "denied");
    assert_eq!(verdicts[2]["rule"], "denied_domains: bad.test");
    assert!(verdicts[2]["message"]
        .as_str()
        .unwrap()
        .contains("bad.test"));
    assert_eq!(verdicts[3]["reason"], "not_allowed");
    // Without a deny, ask wins over unresolvable; all allowed is 0.
    let (code, _, _) = output(portcullis().args(base).args([
        "--allow",
        "gone.test",
        "gone.test:443",
        "ask.test:443",
    ]))
    .await;
    assert_eq!(code, Some(2));
    let (code, _, _) = output(portcullis().args(base).args([
        "--allow",
        "ok.test",
        "ok.test:443",
        "api.example.org:443",
    ]))
    .await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn serve_reloads_on_sighup_but_stops_when_its_terminal_hangs_up() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("env.sh");
    let command = format!(
        "{} serve --http 127.0.0.1:0 --no-socks --env-file {} 2>/dev/null",
        env!("CARGO_BIN_EXE_portcullis"),
        env_file.display()
    );
    let terminal = Tmux::start(&command);
    let pid = terminal.pid().await;
    for _ in 0..200 {
        if env_file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(env_file.exists(), "serve started: {}", terminal.screen());
    // A SIGHUP while the terminal is there is a reload: serve stays.
    let process = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(process, nix::sys::signal::Signal::SIGHUP).unwrap();
    assert!(
        !exits_within(pid, Duration::from_millis(800)).await,
        "a SIGHUP with the terminal present reloads"
    );
    // The terminal closing ends it, as it ends a shell job; the env file goes.
    terminal.hang_up();
    assert!(
        exits_within(pid, Duration::from_secs(15)).await,
        "serve outlived its terminal"
    );
    assert!(
        !env_file.exists(),
        "serve removed its env file on the way out"
    );
}

#[tokio::test]
async fn a_busy_port_names_its_listener_and_the_fix() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let (code, _, stderr) =
        output(portcullis().args(["serve", "--no-socks", "--http", &address])).await;
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains("the HTTP listener") && stderr.contains("--http 127.0.0.1:0"),
        "{stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("m.toml");
    std::fs::write(&config, format!("[metrics]\nlisten = \"{address}\"\n")).unwrap();
    let (code, _, stderr) = output(
        portcullis()
            .args(["serve", "--no-socks", "--http", "127.0.0.1:0", "--config"])
            .arg(&config),
    )
    .await;
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains("the metrics listener") && stderr.contains("[metrics] listen"),
        "{stderr}"
    );
    drop(taken);
}

#[tokio::test]
async fn run_learn_checks_its_file_first_and_writes_what_the_next_run_needs() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    // A path that cannot be written: refused before the command runs.
    let marker = dir.path().join("ran");
    let (code, _, stderr) = output(
        portcullis()
            .args(["run", "--learn", "/proc/nope/l.toml", "--", "touch"])
            .arg(&marker),
    )
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("/proc/nope/l.toml") && !stderr.contains("CA"),
        "{stderr}"
    );
    assert!(!marker.exists(), "the command did not run");

    // Without --allow-local-binding: a local address and a name that
    // resolves to one are refused while learning, and written as the
    // exact entries that allow them; metadata only as a comment; a name
    // that does not resolve as a comment.
    let config = dir.path().join("dns.toml");
    std::fs::write(&config, "[dns]\nhosts = { \"gone.test\" = [] }\n").unwrap();
    let learned = dir.path().join("learned.toml");
    let script = format!(
        "curl -s http://127.0.0.1:{port}/a; curl -s http://svc.test:{port}/b; curl -s -m 5 http://169.254.169.254/latest; curl -s http://gone.test:{port}/; true"
    );
    let (code, _, stderr) = output(
        portcullis()
            .args(["run", "--config"])
            .arg(&config)
            .args(["--resolve", "svc.test=127.0.0.1", "--learn"])
            .arg(&learned)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let written = std::fs::read_to_string(&learned).unwrap();
    assert!(
        written.contains(&format!("\"127.0.0.1:{port}\",")),
        "{written}"
    );
    assert!(
        written.contains(&format!("\"svc.test:{port}\",")),
        "{written}"
    );
    assert!(written.contains("svc.test resolved to it"), "{written}");
    assert!(!written.contains("allow_local_binding"), "{written}");
    assert!(
        written.contains("#   \"169.254.169.254:80\""),
        "metadata as a comment: {written}"
    );
    assert!(
        written.contains(&format!("#   \"gone.test:{port}\"")),
        "{written}"
    );
    let parsed: toml::Value = toml::from_str(&written).unwrap();
    let allowed: Vec<&str> = parsed["network"]["allowed_domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        !allowed.iter().any(|e| e.contains("169.254")),
        "{allowed:?}"
    );

    // The next run under that file reaches both, with no flag.
    let replay = format!("curl -sf http://127.0.0.1:{port}/a && curl -sf http://svc.test:{port}/b");
    let (code, stdout, stderr) =
        output(portcullis().args(["run", "--config"]).arg(&learned).args([
            "--resolve",
            "svc.test=127.0.0.1",
            "--",
            "sh",
            "-c",
            &replay,
        ]))
        .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "hello /ahello /b");

    // With --allow-local-binding, the file keeps it.
    let (code, _, stderr) = output(
        portcullis()
            .args([
                "run",
                "--allow-local-binding",
                "--resolve",
                "svc.test=127.0.0.1",
                "--learn",
            ])
            .arg(&learned)
            .args(["--", "curl", "-sf", &format!("http://svc.test:{port}/c")]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let written = std::fs::read_to_string(&learned).unwrap();
    assert!(written.contains("allow_local_binding = true"), "{written}");
    let (code, stdout, stderr) =
        output(portcullis().args(["run", "--config"]).arg(&learned).args([
            "--resolve",
            "svc.test=127.0.0.1",
            "--",
            "curl",
            "-sf",
            &format!("http://svc.test:{port}/c"),
        ]))
        .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
}

#[tokio::test]
async fn flags_that_conflict_or_cannot_work_fail_at_start() {
    let (code, _, stderr) =
        output(portcullis().args(["serve", "--no-socks", "--socks", "127.0.0.1:0"])).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--no-socks") && stderr.contains("--socks"),
        "{stderr}"
    );
    // A reviewer that is not there, or not executable, fails at start.
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("review.sh");
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    for reviewer in [
        "/nonexistent/review.sh",
        not_executable.to_str().unwrap(),
        "no-such-reviewer-on-path",
    ] {
        let (code, _, stderr) =
            output(portcullis().args(["run", "--reviewer", reviewer, "--", "true"])).await;
        assert_eq!(code, Some(64), "{reviewer}: {stderr}");
        assert!(
            stderr.contains(reviewer) && stderr.contains("approval.command"),
            "{stderr}"
        );
    }
    // --reviewer names the program and implies --approve command.
    let reviewer = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/reviewers/reviewer.sh"
    );
    let origin = origin().await;
    let (code, stdout, stderr) = output(portcullis().env("XDG_DATA_HOME", dir.path()).args([
        "run",
        "--allow-local-binding",
        "--resolve",
        "session.test=127.0.0.1",
        "--reviewer",
        reviewer,
        "--",
        "curl",
        "-s",
        &format!("http://session.test:{}/reviewed", origin.addr.port()),
    ]))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "hello /reviewed", "{stderr}");
    // A reviewer's refusal under run names the flag, with why it refused.
    let (_, _, stderr) = output(portcullis().env("XDG_DATA_HOME", dir.path()).args([
        "run",
        "--allow-local-binding",
        "--resolve",
        "other.test=127.0.0.1",
        "--reviewer",
        reviewer,
        "--",
        "curl",
        "-s",
        &format!("http://other.test:{}/reviewed", origin.addr.port()),
    ]))
    .await;
    assert!(
        stderr.contains("add --allow other.test if it should be reachable (denied by"),
        "{stderr}"
    );
    assert!(!stderr.contains("allowed_domains"), "{stderr}");
    // `--allow '*'` says once what it means.
    let (code, _, stderr) = output(portcullis().args(["run", "--allow", "*", "--", "true"])).await;
    assert_eq!(code, Some(0));
    assert_eq!(
        stderr
            .matches("--allow '*' allows every public destination")
            .count(),
        1,
        "{stderr}"
    );
    let (_, _, stderr) = output(
        portcullis()
            .args(["run", "--learn"])
            .arg(dir.path().join("l.toml"))
            .args(["--", "true"]),
    )
    .await;
    assert!(
        !stderr.contains("--allow '*'"),
        "--learn's own * is not the user's: {stderr}"
    );
}

#[tokio::test]
async fn log_lines_are_json_when_asked_and_a_bad_format_is_a_usage_error() {
    let (code, _, stderr) = output(
        portcullis()
            .env("PORTCULLIS_LOG_FORMAT", "json")
            .env("PORTCULLIS_LOG", "portcullis::violation=warn")
            .args([
                "run",
                "--",
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "http://refused.test/",
            ]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let line = stderr
        .lines()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line: {stderr}"));
    let event: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(event["target"], "portcullis::violation");
    assert_eq!(event["fields"]["reason"], "not_allowed");
    assert_eq!(event["fields"]["dst.host"], "refused.test");
    let (code, _, stderr) = output(
        portcullis()
            .env("PORTCULLIS_LOG_FORMAT", "xml")
            .args(["check", "http://x.test/"]),
    )
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("PORTCULLIS_LOG_FORMAT"), "{stderr}");
}

#[tokio::test]
async fn learning_with_interception_writes_request_rules_the_next_run_enforces() {
    let (origin, pem) = https_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = mitm_config(dir.path(), &pem);
    let learned = dir.path().join("learned.toml");
    let base = format!("https://secure.test:{}", origin.port());
    // A GET deep under /repos/acme, a GET of the root, a POST to /issues.
    let script = format!(
        "curl -sf {base}/repos/acme/widgets/issues/1?token=x >/dev/null && curl -sf {base}/ >/dev/null && curl -sf -X POST {base}/issues >/dev/null"
    );
    let run = |config: std::path::PathBuf, extra: Vec<String>, script: String| async move {
        output(
            portcullis()
                .args(["run", "--config"])
                .arg(&config)
                .args([
                    "--resolve",
                    "secure.test=127.0.0.1",
                    "--allow-local-binding",
                ])
                .args(extra)
                .args(["--", "sh", "-c", &script]),
        )
        .await
    };
    let (code, _, stderr) = run(
        config.clone(),
        vec![
            "--mitm".into(),
            "--learn".into(),
            learned.display().to_string(),
        ],
        script.clone(),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("request rules for 1 host"), "{stderr}");
    let written = std::fs::read_to_string(&learned).unwrap();
    let parsed: toml::Value = toml::from_str(&written).unwrap();
    let rules = parsed["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{written}");
    assert_eq!(rules[0]["host"].as_str(), Some("secure.test"), "{written}");
    let allow: Vec<(String, Vec<String>)> = rules[0]["allow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let strings = |key: &str| -> Vec<String> {
                entry[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect()
            };
            (strings("methods").join(","), strings("paths"))
        })
        .collect();
    assert_eq!(
        allow,
        [
            (
                "GET".to_owned(),
                vec!["/".to_owned(), "/repos/acme/**".to_owned()]
            ),
            ("POST".to_owned(), vec!["/issues".to_owned()]),
        ],
        "{written}"
    );
    assert!(
        !written.contains("\"/repos/acme/widgets/issues/1?token"),
        "paths without queries: {written}"
    );

    // The learned file, replayed: the same requests pass (the ruled host
    // is intercepted with no --mitm), another is refused by its rules.
    // (Its [mitm] table is the test's: where the CA is, the origin's CA.)
    let replay = dir.path().join("replay.toml");
    std::fs::write(
        &replay,
        written + "\n" + &std::fs::read_to_string(&config).unwrap(),
    )
    .unwrap();
    let (code, _, stderr) = run(replay.clone(), vec![], script).await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) = run(
        replay,
        vec![],
        format!("curl -s -o /dev/null -w '%{{http_code}}' -X DELETE {base}/repos/acme/widgets"),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "403", "{stderr}");
}

/// The runtime's threads (tokio names them `tokio-rt-worker`) of a `serve`
/// that has served nothing yet: its workers (the blocking pool, which
/// shares the name, starts no thread before the first lookup).
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|task| {
            let comm = task.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|name| name.starts_with("tokio-rt-worker"))
        })
        .count()
}

#[tokio::test]
async fn threads_come_from_the_flag_then_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(&config, "[runtime]\nthreads = 3\n").unwrap();
    let (mut child, _) = serve_config(&config).await;
    assert_eq!(worker_threads(child.id().unwrap()), 3);
    terminate(&mut child).await;

    let mut child = portcullis()
        .args(["serve", "--threads", "1", "--config"])
        .arg(&config)
        .args(["--http", "127.0.0.1:0", "--no-socks"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    served_http_address(&mut child).await;
    assert_eq!(worker_threads(child.id().unwrap()), 1);
    terminate(&mut child).await;

    // Zero is bad usage, from either place.
    let (code, _, stderr) = output(portcullis().args(["serve", "--threads", "0"])).await;
    assert_eq!(code, Some(64), "{stderr}");
    std::fs::write(&config, "[runtime]\nthreads = 0\n").unwrap();
    let (code, _, stderr) = output(portcullis().arg("serve").arg("--config").arg(&config)).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("runtime.threads"), "{stderr}");
}

/// Beyond loopback (a scraper outside the pod) only with the opt-in and a
/// bearer token, which every scrape must then send.
#[tokio::test]
async fn metrics_beyond_loopback_need_the_opt_in_and_a_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "scr4pe-t0ken\n").unwrap();
    let config = dir.path().join("p.toml");
    let base = "[network]\nproxy_url = \"http://127.0.0.1:0\"\nenable_socks5 = false\n[metrics]\nlisten = \"0.0.0.0:0\"\n";
    for (extra, expected) in [
        ("", "dangerously_allow_non_loopback"),
        ("dangerously_allow_non_loopback = true\n", "bearer_token"),
    ] {
        std::fs::write(&config, format!("{base}{extra}")).unwrap();
        let (code, _, stderr) = output(portcullis().args(["serve", "--config"]).arg(&config)).await;
        assert_eq!(code, Some(64), "{stderr}");
        assert!(
            stderr.contains("metrics.listen") && stderr.contains(expected),
            "{stderr}"
        );
    }
    std::fs::write(
        &config,
        format!(
            "{base}dangerously_allow_non_loopback = true\nbearer_token = {{ file = {token:?} }}\n"
        ),
    )
    .unwrap();
    let mut child = portcullis()
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    served_http_address(&mut child).await;
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let (metrics, logged) = logged_metrics_address(&mut stderr).await;
    let metrics = metrics.unwrap_or_else(|| panic!("the metrics address is logged: {logged}"));
    assert!(
        logged.contains("beyond loopback"),
        "said at start: {logged}"
    );
    // Scraped over loopback here: no traffic leaves the machine.
    let url = format!("http://127.0.0.1:{}/metrics", metrics.port());
    let without = curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", &url]).await;
    assert_eq!(without.stdout, "401");
    let wrong = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Authorization: Bearer nope",
        &url,
    ])
    .await;
    assert_eq!(wrong.stdout, "401");
    let with = curl(&["-s", "-H", "Authorization: Bearer scr4pe-t0ken", &url]).await;
    assert!(
        with.stdout.contains("portcullis_connections_open"),
        "{}",
        with.stdout
    );
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
}

/// The metrics address a `serve` child's listening line names, read from
/// its stderr, and what it wrote up to that line.
async fn logged_metrics_address(
    stderr: &mut tokio::io::BufReader<tokio::process::ChildStderr>,
) -> (Option<std::net::SocketAddr>, String) {
    use tokio::io::AsyncBufReadExt;
    let mut logged = String::new();
    for _ in 0..20 {
        let mut line = String::new();
        if stderr.read_line(&mut line).await.unwrap() == 0 {
            break;
        }
        logged.push_str(&line);
        let address = line
            .split("metrics=Some(")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
        if address.is_some() {
            return (address, logged);
        }
    }
    (None, logged)
}
