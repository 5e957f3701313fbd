//! Request rules end to end on loopback: absolute-form HTTP, SOCKS5, the
//! config's `[[rules]]` and its errors, and `check`. (Intercepted CONNECT,
//! in full and limited mode, is in `tests/mitm.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use portcullis::middleware::request_rules::{RequestRules, RuleBlock, RuleEntry};
use portcullis::middleware::{BlockDecision, Mode, Reason};

#[tokio::test]
async fn absolute_form_http_is_decided_request_by_request() {
    let origin = origin().await;
    let policy = allow(&["127.0.0.1"])
        .request_rules(sample_rules("127.0.0.1"))
        .build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    let base = format!("http://{}", origin.addr);
    let proxy_url = proxy.http_url();
    let via = |args: Vec<String>| {
        let proxy_url = proxy_url.clone();
        async move {
            let mut all: Vec<String> =
                vec!["-i".into(), "--path-as-is".into(), "-x".into(), proxy_url];
            all.extend(args);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            parse_response(&curl(&refs).await.stdout)
        }
    };
    let (status, _, body) = via(vec![format!("{base}/repos/x")]).await;
    assert_eq!((status, body.as_str()), (200, "hello /repos/x"));
    let (status, _, body) = via(vec![
        "-d".into(),
        "x".into(),
        format!("{base}/issues/1/comments"),
    ])
    .await;
    assert_eq!((status, body.as_str()), (200, "hello /issues/1/comments"));

    let (status, headers, body) =
        via(vec!["-d".into(), "x".into(), format!("{base}/pulls/1")]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(headers["x-proxy-error"], "blocked-by-request-rule");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["reason"], "rule_not_matched");
    assert_eq!(json["source"], "request_rules");
    assert!(
        json["rule"]
            .as_str()
            .unwrap()
            .starts_with("rules[0] (127.0.0.1)"),
        "{json}"
    );

    // No spelling of a denied path reaches the origin.
    for path in [
        "/secret/key",
        "/repos/../secret/key",
        "/%2e%2e/secret/key",
        "/repos/%2E%2E/secret/key",
        "//secret//key",
        "/SECRET/key",
        "/%73ecret/key",
        "/secret%2Fkey",
        "/./secret/./key",
    ] {
        let (status, headers, body) = via(vec![format!("{base}{path}")]).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(
            headers["x-proxy-error"], "blocked-by-request-rule",
            "{path}"
        );
        assert!(!body.contains("hello"), "{path} reached the origin");
    }
    let last = proxy.ring.snapshot().pop().unwrap();
    assert_eq!(last.blocked.reason, Reason::RuleDenied);
}

#[tokio::test]
async fn a_ruled_host_is_never_reached_unseen_and_other_hosts_are_untouched() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let other = "localhost";
    let policy = allow(&["127.0.0.1", "localhost"])
        .request_rules(sample_rules("127.0.0.1"))
        .build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    // SOCKS5 cannot show the requests: refused (reply 0x02, curl's 97).
    let url = format!("http://{}/repos/x", origin.addr);
    let out = curl(&["--socks5", &proxy.socks_addr().to_string(), &url]).await;
    assert_eq!(out.code, Some(97), "{}", out.stderr);
    let last = proxy.ring.snapshot().pop().unwrap();
    assert_eq!(last.blocked.reason, Reason::MitmRequired);
    assert!(
        last.blocked.message.contains("rules[0]"),
        "{}",
        last.blocked.message
    );
    // A CONNECT the proxy cannot intercept (no CA): refused, not relayed.
    let (_, head) = raw_exchange(
        proxy.handle.http_addr(),
        &format!("CONNECT {} HTTP/1.1\r\n\r\n", origin.addr),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // A host without rules: every method, every path, every way in.
    let port = origin.addr.port();
    let unruled = format!("http://{other}:{port}/secret/x");
    assert_eq!(
        curl_status(&["-x", &proxy.http_url(), "-X", "DELETE", &unruled]).await,
        "200"
    );
    let out = curl(&[
        "--socks5-hostname",
        &proxy.socks_addr().to_string(),
        &unruled,
    ])
    .await;
    assert_eq!(out.stdout, "hello /secret/x", "{}", out.stderr);
    drop(dir);
}

#[tokio::test]
async fn audit_mode_lets_requests_through_and_records_what_it_would_refuse() {
    let origin = origin().await;
    let audit = RequestRules::new(vec![RuleBlock::new("127.0.0.1", "rules[0]")
        .unwrap()
        .allow(RuleEntry::new().methods(["GET"]).unwrap())
        .deny(RuleEntry::new().paths(["/secret/**"]).unwrap())
        .audit()]);
    let policy = allow(&["127.0.0.1"]).request_rules(audit).build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    let base = format!("http://{}", origin.addr);
    let out = curl(&["-x", &proxy.http_url(), &format!("{base}/secret/x")]).await;
    assert_eq!(out.stdout, "hello /secret/x", "{}", out.stderr);
    let out = curl(&["-x", &proxy.http_url(), "-d", "x", &format!("{base}/write")]).await;
    assert_eq!(out.stdout, "hello /write", "{}", out.stderr);
    let records = proxy.ring.snapshot();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0].blocked.reason, Reason::RuleDenied);
    assert_eq!(records[1].blocked.reason, Reason::RuleNotMatched);
    for record in &records {
        assert_eq!(record.blocked.decision, BlockDecision::Audit);
        assert_eq!(record.to_json()["decision"], "audit");
        assert!(record.message.contains("audit mode"), "{}", record.message);
    }
    // An allowed request is not recorded.
    let out = curl(&["-x", &proxy.http_url(), &format!("{base}/fine")]).await;
    assert_eq!(out.stdout, "hello /fine");
    assert_eq!(proxy.ring.total(), 2);
}

#[tokio::test]
async fn limited_mode_and_rules_compose() {
    let origin = origin().await;
    let policy = allow(&["127.0.0.1"])
        .request_rules(sample_rules("127.0.0.1"))
        .mode(Mode::Limited)
        .build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    let base = format!("http://{}", origin.addr);
    // Rules allow a POST under /issues/; limited mode does not.
    let out = curl(&[
        "-i",
        "-x",
        &proxy.http_url(),
        "-d",
        "x",
        &format!("{base}/issues/1"),
    ])
    .await;
    let (status, headers, _) = parse_response(&out.stdout);
    assert_eq!(
        (status, headers["x-proxy-error"].as_str()),
        (403, "blocked-by-method-policy")
    );
    // Limited mode allows a GET; the rules deny /secret/.
    let out = curl(&["-i", "-x", &proxy.http_url(), &format!("{base}/secret/x")]).await;
    let (status, headers, _) = parse_response(&out.stdout);
    assert_eq!(
        (status, headers["x-proxy-error"].as_str()),
        (403, "blocked-by-request-rule")
    );
}

#[tokio::test]
async fn config_rules_are_checked_naming_key_and_file_and_check_decides_them() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let bad = [
        (
            "[[rules]]\nhost = \"x.test\"\nallow = []\n",
            "rules[0].allow",
        ),
        (
            "[[rules]]\nhost = \"x.test\"\nallow = [{ methods = [\"G T\"] }]\n",
            "rules[0].allow[0].methods",
        ),
        (
            "[[rules]]\nhost = \"x.test\"\nallow = [{ paths = [\"repos\"] }]\n",
            "rules[0].allow[0].paths",
        ),
        (
            "[[rules]]\nhost = \"x.test\"\nallow = [{}]\n",
            "rules[0].allow[0]",
        ),
        (
            "[[rules]]\nhost = \"*.github.io\"\nallow = [{ methods = [\"GET\"] }]\n",
            "rules[0].host",
        ),
        (
            "[[rules]]\nhost = \"*\"\nallow = [{ methods = [\"GET\"] }]\n",
            "rules[0].host",
        ),
        (
            "[[rules]]\nhost = \"x.test\"\nallow = [{ method = [\"GET\"] }]\n",
            "rules[0].allow[0].method",
        ),
        (
            "[[rules]]\nhost = \"x.test\"\nallow = [{ methods = [\"GET\"] }]\nenforced = true\n",
            "rules[0].enforced",
        ),
        (
            "[[rules]]\nhost = \"x.test\"\nallow = [{ methods = [\"GET\"] }]\ndeny = [{ headers = { \"bad name\" = \"*\" } }]\n",
            "rules[0].deny[0].headers",
        ),
        (
            "[[rules]]\nhost = \"x.test\"\nallow = [{ query = {} }]\n",
            "rules[0].allow[0].query",
        ),
    ];
    for (index, (text, key)) in bad.iter().enumerate() {
        let path = write(&format!("bad{index}.toml"), text);
        let (code, _, stderr) = output(
            portcullis()
                .args(["check", "--config"])
                .arg(&path)
                .arg("http://x.test/"),
        )
        .await;
        assert_eq!(code, Some(64), "{text}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(&path.display().to_string()),
            "{text}: {stderr}"
        );
    }
    let config = write(
        "good.toml",
        "[network]\nallowed_domains = [\"x.test\"]\n[[rules]]\nhost = \"x.test\"\nallow = [{ methods = [\"GET\"] }, { methods = [\"GET\"], paths = [\"/search\"], query = { q = \"*\" } }]\ndeny = [{ paths = [\"/admin/**\"] }, { query = { token = \"*\" } }]\n",
    );
    let check = |args: Vec<String>| {
        let config = config.clone();
        async move {
            output(
                portcullis()
                    .args(["check", "--json", "--resolve", "x.test=1.2.3.4", "--config"])
                    .arg(&config)
                    .args(args),
            )
            .await
        }
    };
    let (code, stdout, stderr) = check(vec!["http://x.test/a".into()]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("rules[0].allow[0] (x.test): methods GET"),
        "names the entry: {stdout}"
    );
    let (code, stdout, _) = check(vec![
        "--method".into(),
        "POST".into(),
        "http://x.test/a".into(),
    ])
    .await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("rule_not_matched"), "{stdout}");
    let (code, stdout, _) = check(vec!["http://x.test/x/../admin/y".into()]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("rule_denied") && stdout.contains("rules[0].deny[0]"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&config.display().to_string()),
        "names the file: {stdout}"
    );
    let (code, stdout, _) = check(vec!["http://x.test/a?Token=1".into()]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("rule_denied") && stdout.contains("rules[0].deny[1]"),
        "{stdout}"
    );
    let (code, stdout, _) = check(vec!["http://x.test/search?q=1".into()]).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("rules[0].allow[0]"),
        "the first entry that matches: {stdout}"
    );
}

#[tokio::test]
async fn enforce_rules_false_puts_every_block_in_audit_mode() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("audit.toml");
    let rules = "[[rules]]\nhost = \"x.test\"\nallow = [{ methods = [\"GET\"] }]\n";
    for (network, code, said) in [
        ("", Some(1), "rule_not_matched"),
        (
            "enforce_rules = false\n",
            Some(0),
            "audit only: rules[0] (x.test): no allow entry matches POST /a",
        ),
    ] {
        std::fs::write(
            &config,
            format!("[network]\nallowed_domains = [\"x.test\"]\n{network}\n{rules}"),
        )
        .unwrap();
        let (exit, stdout, stderr) = output(
            portcullis()
                .args([
                    "check",
                    "--resolve",
                    "x.test=1.2.3.4",
                    "--method",
                    "POST",
                    "--config",
                ])
                .arg(&config)
                .arg("http://x.test/a"),
        )
        .await;
        assert_eq!(exit, code, "{network}: {stdout}{stderr}");
        assert!(stdout.contains(said), "{network}: {stdout}");
    }
}

#[tokio::test]
async fn rules_added_by_a_reload_fail_closed_without_a_ca_and_say_so() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    let lists = "[network]\nallowed_domains = [\"svc.test\"]\nallow_local_binding = true\n[dns]\nhosts = { \"svc.test\" = [\"127.0.0.1\"] }\n";
    std::fs::write(&config, lists).unwrap();
    let (mut child, proxy) = serve_config(&config).await;
    let url = format!("http://svc.test:{}/", origin.addr.port());
    assert_eq!(curl_status(&["-p", "-x", &proxy, &url]).await, "200");
    std::fs::write(
        &config,
        format!("{lists}[[rules]]\nhost = \"svc.test\"\nallow = [{{ methods = [\"GET\"] }}]\n"),
    )
    .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    // The reload lands within a poll or the signal (bounded wait).
    let mut status = String::new();
    for _ in 0..50 {
        let tunnel = [
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "-p",
            "-x",
            &proxy,
            &url,
        ];
        status = curl(&tunnel).await.stdout;
        if status == "403" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, "403", "a ruled host is never reached unseen");
    assert_eq!(
        curl_status(&["-x", &proxy, &url]).await,
        "200",
        "plain HTTP is checked directly"
    );
    let (_, stderr) = terminate(&mut child).await;
    assert!(
        stderr.contains("started without interception") && stderr.contains("mitm_required"),
        "{stderr}"
    );
}

/// `query` and `headers` matchers, through curl and python requests: an
/// allow entry's `query` lets only the parameters it names through (a
/// parameter added to carry data is refused), a deny entry finds a
/// parameter by its decoded name ignoring case, and headers are required
/// (allow) or refused (deny) by their values.
#[tokio::test]
async fn query_and_header_matchers_decide_with_real_clients() {
    let origin = origin().await;
    let rules = RequestRules::new(vec![RuleBlock::new("127.0.0.1", "rules[0]")
        .unwrap()
        .allow(
            RuleEntry::new()
                .methods(["GET"])
                .unwrap()
                .paths(["/search"])
                .unwrap()
                .query([("q", "*"), ("page", "*")])
                .unwrap(),
        )
        .allow(
            RuleEntry::new()
                .methods(["POST"])
                .unwrap()
                .headers([("content-type", "application/json*")])
                .unwrap(),
        )
        .deny(RuleEntry::new().query([("access_token", "*")]).unwrap())
        .deny(RuleEntry::new().headers([("x-debug", "*")]).unwrap())]);
    let policy = allow(&["127.0.0.1"]).request_rules(rules).build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    let base = format!("http://{}", origin.addr);
    let proxy_url = proxy.http_url();
    let via = |args: Vec<String>| {
        let proxy_url = proxy_url.clone();
        async move {
            let mut all: Vec<String> = vec!["-i".into(), "-x".into(), proxy_url];
            all.extend(args);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            parse_response(&curl(&refs).await.stdout)
        }
    };
    let (status, _, body) = via(vec![format!("{base}/search?q=rust&page=2")]).await;
    assert_eq!((status, body.as_str()), (200, "hello /search"), "{body}");
    let (status, _, body) = via(vec![format!("{base}/search")]).await;
    assert_eq!(status, 200, "named parameters may be absent: {body}");

    for (url, reason) in [
        // A parameter the entry does not name, carrying data out.
        ("/search?q=rust&leak=AKIA", "rule_not_matched"),
        // Denied by name, however it is spelled.
        ("/search?q=x&access_token=abc", "rule_denied"),
        ("/search?q=x&Access%5FToken=abc", "rule_denied"),
        ("/elsewhere?ACCESS_TOKEN=", "rule_denied"),
    ] {
        let (status, headers, body) = via(vec![format!("{base}{url}")]).await;
        assert_eq!(status, 403, "{url}: {body}");
        assert_eq!(headers["x-proxy-error"], "blocked-by-request-rule", "{url}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["reason"], reason, "{url}: {json}");
        assert!(
            !body.contains("AKIA") && !body.contains("abc"),
            "values never told: {body}"
        );
    }
    let (_, _, body) = via(vec![format!("{base}/search?q=rust&leak=AKIA")]).await;
    assert!(
        body.contains("with query parameters q, leak"),
        "names the parameters: {body}"
    );
    let (status, _, body) = via(vec![
        "-H".into(),
        "X-Debug: on".into(),
        format!("{base}/search?q=x"),
    ])
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("rules[0].deny[1]") && body.contains("headers x-debug: *"),
        "{body}"
    );

    let (status, _, body) = via(vec![
        "-H".into(),
        "Content-Type: application/json; charset=utf-8".into(),
        "-d".into(),
        "{}".into(),
        format!("{base}/items"),
    ])
    .await;
    assert_eq!((status, body.as_str()), (200, "hello /items"), "{body}");
    let (status, _, body) = via(vec!["-d".into(), "a=1".into(), format!("{base}/items")]).await;
    assert_eq!(status, 403, "a form is not JSON: {body}");

    // python requests builds the query itself (`+` for a space).
    let script = format!(
        r#"
import requests
proxies = {{"http": "{proxy_url}"}}
ok = requests.get("{base}/search", params={{"q": "a b", "page": "1"}}, proxies=proxies)
leak = requests.get("{base}/search", params={{"q": "a", "debug": "x"}}, proxies=proxies)
denied = requests.get("{base}/search", params={{"access_token": "t"}}, proxies=proxies)
print(ok.status_code, leak.status_code, denied.status_code)
"#
    );
    let out = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        assert_eq!(stdout.trim(), "200 403 403", "{stdout}");
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var_os("CI").is_none() && stderr.contains("No module named"),
            "python requests: {stderr}"
        );
    }
}

/// The python MCP SDK's server on 127.0.0.1:0, each tool call it receives
/// written to `calls`; `None` (skipped) where the SDK is missing outside CI.
async fn mcp_server(calls: &std::path::Path) -> Option<(tokio::process::Child, u16)> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mcp/server.py");
    let calls = calls.to_str()?;
    python_server(&[script, calls], "mcp").await
}

/// A real MCP session (the python SDK's client and server over streamable
/// HTTP) through `run` with `jsonrpc` rules from a config: initialize and
/// tools/list go, a tool call is allowed by tool and argument, one with an
/// argument outside the allowed glob and one of a denied tool are refused
/// before the server sees them, each recorded naming the call.
#[tokio::test]
async fn mcp_tool_calls_are_decided_by_tool_and_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls.txt");
    let Some((_server, port)) = mcp_server(&calls).await else {
        return;
    };
    let config = dir.path().join("mcp.toml");
    std::fs::write(
        &config,
        format!(
            r#"[network]
allowed_domains = ["127.0.0.1"]
allow_local_binding = true

[[rules]]
host = "127.0.0.1"
allow = [ {{ methods = ["GET", "DELETE"], paths = ["/mcp"] }},
          {{ methods = ["POST"], paths = ["/mcp"], jsonrpc = {{ methods = ["initialize", "notifications/*", "tools/list", "tools/call"], tools = ["read_*"], arguments = {{ "/path" = "/w/*" }} }} }} ]
deny = [ {{ jsonrpc = {{ tools = ["delete_*"] }} }} ]

[log]
violations_file = {:?}
"#,
            dir.path().join("violations.jsonl")
        ),
    )
    .unwrap();
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mcp/client.py");
    let (code, stdout, stderr) = output(
        portcullis()
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "python3", client])
            .arg(format!("http://127.0.0.1:{port}/mcp"))
            .args([
                "read_file=/w/a",
                "read_file=/etc/passwd",
                "delete_file=/w/a",
            ]),
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for wanted in [
        "initialized",
        "tools delete_file,read_file",
        "call read_file /w/a -> contents of /w/a",
        "call read_file /etc/passwd refused",
        "call delete_file /w/a refused",
    ] {
        assert!(
            stdout.lines().any(|line| line.starts_with(wanted)),
            "{wanted:?}\n{stdout}\n{stderr}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap_or_default(),
        "read_file /w/a\n",
        "only the allowed call reached the server"
    );
    let recorded = std::fs::read_to_string(dir.path().join("violations.jsonl")).unwrap();
    assert!(
        recorded.contains(r#""reason":"rule_not_matched""#)
            && recorded.contains("calling tools/call (tool read_file)"),
        "{recorded}"
    );
    assert!(
        recorded.contains(r#""reason":"rule_denied""#)
            && recorded.contains("jsonrpc tools delete_*"),
        "{recorded}"
    );
}

/// JSON-RPC batches are judged call by call, whatever the body's
/// `Content-Type`: every call needs an allow entry, any denied call
/// refuses the batch; a body that is not JSON-RPC matches no `jsonrpc`
/// entry.
#[tokio::test]
async fn json_rpc_batches_are_judged_call_by_call() {
    use portcullis::middleware::request_rules::JsonRpcMatcher;
    let origin = origin().await;
    let rules = RequestRules::new(vec![RuleBlock::new("127.0.0.1", "rules[0]")
        .unwrap()
        .allow(
            RuleEntry::new()
                .jsonrpc(JsonRpcMatcher::new().methods(["tools/*"]).unwrap())
                .methods(["POST"])
                .unwrap(),
        )
        .allow(
            RuleEntry::new()
                .jsonrpc(JsonRpcMatcher::new().methods(["ping"]).unwrap())
                .methods(["POST"])
                .unwrap(),
        )
        .deny(RuleEntry::new().jsonrpc(JsonRpcMatcher::new().tools(["shell"]).unwrap()))]);
    let policy = allow(&["127.0.0.1"]).request_rules(rules).build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    let url = format!("http://{}/rpc", origin.addr);
    let post = |body: &'static str, content_type: &'static str| {
        let (proxy_url, url) = (proxy.http_url(), url.clone());
        async move {
            let args = [
                "-i",
                "-x",
                &proxy_url,
                "-H",
                content_type,
                "--data-binary",
                body,
                &url,
            ];
            parse_response(&curl(&args).await.stdout)
        }
    };
    let json = "Content-Type: application/json";
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let (status, _, body) = post(list, json).await;
    assert_eq!((status, body.as_str()), (200, "hello /rpc"));
    // Each call of a batch by its own entry.
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#;
    let (status, _, body) = post(batch, json).await;
    assert_eq!((status, body.as_str()), (200, "hello /rpc"));
    for (body, reason) in [
        // One call no entry allows.
        (
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"resources/read"}]"#,
            "rule_not_matched",
        ),
        // One denied call, last in the batch.
        (
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"Shell","arguments":{}}}]"#,
            "rule_denied",
        ),
        // Not JSON-RPC: no jsonrpc entry matches.
        ("[]", "rule_not_matched"),
        ("method=tools/list", "rule_not_matched"),
    ] {
        for content_type in [json, "Content-Type: text/plain"] {
            let (status, _, answer) = post(body, content_type).await;
            assert_eq!(status, 403, "{body} as {content_type}: {answer}");
            let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(
                answer["reason"], reason,
                "{body} as {content_type}: {answer}"
            );
        }
    }
    // A body with no content at all makes no call either.
    let (status, _, _) = post("", json).await;
    assert_eq!(status, 403);
}

/// `check --data`/`--data-file`/`--header` judge a request's body and
/// headers as the proxy would before sending, and name the deciding entry.
#[tokio::test]
async fn check_judges_a_body_and_headers_and_names_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mcp.toml");
    std::fs::write(
        &config,
        r#"[network]
allowed_domains = ["mcp.test"]

[[rules]]
host = "mcp.test"
allow = [ { methods = ["POST"], paths = ["/mcp"], jsonrpc = { methods = ["tools/call"], tools = ["read_*"] } },
          { methods = ["PUT"], headers = { content-type = "application/json*" } } ]
deny = [ { jsonrpc = { tools = ["delete_*"] } } ]
"#,
    )
    .unwrap();
    let call = |tool: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}"}}}}"#)
    };
    let check = |args: Vec<String>| {
        let config = config.clone();
        async move {
            output(
                portcullis()
                    .args(["check", "--resolve", "mcp.test=1.2.3.4", "--config"])
                    .arg(&config)
                    .args(args),
            )
            .await
        }
    };
    let url = "http://mcp.test/mcp".to_owned();
    let (code, stdout, stderr) = check(vec!["--data".into(), call("read_file"), url.clone()]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("rules[0].allow[0]") && stdout.contains("jsonrpc methods tools/call"),
        "{stdout}"
    );
    let (code, stdout, _) = check(vec!["--data".into(), call("delete_all"), url.clone()]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("rule_denied") && stdout.contains("rules[0].deny[0]"),
        "{stdout}"
    );
    let file = dir.path().join("batch.json");
    std::fs::write(&file, format!("[{},{}]", call("read_a"), call("write_b"))).unwrap();
    let (code, stdout, _) = check(vec![
        "--data-file".into(),
        file.display().to_string(),
        url.clone(),
    ])
    .await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("calling tools/call (tool write_b)"),
        "{stdout}"
    );
    // Without a body, a jsonrpc entry matches nothing.
    let (code, stdout, _) = check(vec!["--method".into(), "POST".into(), url.clone()]).await;
    assert_eq!(code, Some(1), "{stdout}");
    // Headers.
    let put = |header: &str| {
        vec![
            "--method".to_owned(),
            "PUT".to_owned(),
            "-H".to_owned(),
            header.to_owned(),
            "http://mcp.test/x".to_owned(),
        ]
    };
    let (code, stdout, _) = check(put("Content-Type: application/json")).await;
    assert_eq!(code, Some(0), "{stdout}");
    let (code, stdout, _) = check(put("Content-Type: text/plain")).await;
    assert_eq!(code, Some(1), "{stdout}");
    let (code, _, stderr) = check(put("no colon")).await;
    assert_eq!(code, Some(64), "{stderr}");
}

/// `graphql` entries through curl and python httpx: reads of listed root
/// fields go, a mutation is refused by type, a field outside the list
/// (through a fragment or an alias) is not allowed, a GET's `?query=` is
/// judged like a body, a persisted query goes only by its listed hash,
/// and a document that does not parse is refused.
/// A deny entry on GraphQL mutations behind a broad allow entry sees a
/// mutation however the body carries it: JSON, a multipart upload's
/// `operations` part (the GraphQL multipart request spec), or an
/// `application/graphql` document; other uploads pass.
#[tokio::test]
async fn graphql_mutations_are_seen_in_multipart_uploads_and_raw_documents() {
    use portcullis::middleware::request_rules::GraphqlMatcher;
    let origin = origin().await;
    let rules = RequestRules::new(vec![RuleBlock::new("127.0.0.1", "rules[0]")
        .unwrap()
        .allow(RuleEntry::new().methods(["GET", "POST"]).unwrap())
        .deny(
            RuleEntry::new().graphql(GraphqlMatcher::new().operations(["mutation"]).unwrap()),
        )]);
    let policy = allow(&["127.0.0.1"]).request_rules(rules).build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    let url = format!("http://{}/graphql", origin.addr);
    let proxy_url = proxy.http_url();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.txt");
    std::fs::write(&file, "file contents").unwrap();
    let upload = format!("0=@{}", file.display());
    let mutation = r#"operations={"query":"mutation ($f: Upload!) { upload(file: $f) { id } }","variables":{"f":null}}"#;
    let read = r#"operations={"query":"query { viewer { id } }"}"#;
    let map = r#"map={"0":["variables.f"]}"#;
    for (args, wanted) in [
        (
            vec!["-F", mutation, "-F", map, "-F", &upload],
            "rule_denied",
        ),
        (
            vec!["-F", read, "-F", mutation, "-F", map],
            "rule_not_matched",
        ),
        (
            vec![
                "-H",
                "Content-Type: application/graphql",
                "--data-binary",
                "mutation { deleteRepository(id: 1) { ok } }",
            ],
            "rule_denied",
        ),
        (
            vec![
                "-H",
                "Content-Type: application/graphql",
                "--data-binary",
                "mutation { broken",
            ],
            "rule_denied",
        ),
        (vec!["-F", read, "-F", map, "-F", &upload], "200"),
        (
            vec![
                "-H",
                "Content-Type: Application/GraphQL; charset=utf-8",
                "--data-binary",
                "{ viewer { id } }",
            ],
            "200",
        ),
        (vec!["-F", "note=hello", "-F", &upload], "200"),
    ] {
        let mut all = vec!["-i", "-x", &proxy_url];
        all.extend_from_slice(&args);
        all.push(&url);
        let (status, _, body) = parse_response(&curl(&all).await.stdout);
        if wanted == "200" {
            assert_eq!((status, body.as_str()), (200, "hello /graphql"), "{args:?}");
        } else {
            assert_eq!(status, 403, "{args:?}: {body}");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["reason"], wanted, "{args:?}: {json}");
        }
    }
}

#[tokio::test]
async fn graphql_operations_are_decided_by_type_name_and_fields() {
    use portcullis::middleware::request_rules::GraphqlMatcher;
    let origin = origin().await;
    let trusted = "5a".repeat(32);
    let rules = RequestRules::new(vec![RuleBlock::new("127.0.0.1", "rules[0]")
        .unwrap()
        .allow(
            RuleEntry::new().paths(["/graphql"]).unwrap().graphql(
                GraphqlMatcher::new()
                    .operations(["query"])
                    .unwrap()
                    .fields(["viewer", "repository", "__typename"])
                    .unwrap()
                    .persisted([trusted.as_str()])
                    .unwrap(),
            ),
        )
        .deny(
            RuleEntry::new().graphql(GraphqlMatcher::new().operations(["mutation"]).unwrap()),
        )]);
    let policy = allow(&["127.0.0.1"]).request_rules(rules).build();
    let proxy = proxy_with(policy, &[], |b| b).await;
    let url = format!("http://{}/graphql", origin.addr);
    let proxy_url = proxy.http_url();
    let post = |body: String| {
        let (proxy_url, url) = (proxy_url.clone(), url.clone());
        async move {
            let args = [
                "-i",
                "-x",
                &proxy_url,
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
                &url,
            ];
            parse_response(&curl(&args).await.stdout)
        }
    };
    let q = |document: &str| serde_json::json!({ "query": document }).to_string();
    let (status, _, body) = post(q("query Me { viewer { login } }")).await;
    assert_eq!((status, body.as_str()), (200, "hello /graphql"));
    let (status, _, body) = post(q("{ r: repository(name: \"x\") { id } __typename }")).await;
    assert_eq!(status, 200, "an alias is judged by its field: {body}");
    for (request, reason) in [
        (q("mutation { deleteRepository(id: 1) { ok } }"), "rule_denied"),
        // The mutation hides behind an operationName that picks the read.
        (
            serde_json::json!({"query": "query A { viewer { id } } mutation B { x }", "operationName": "A"})
                .to_string(),
            "rule_denied",
        ),
        (q("{ viewer { id } secrets { value } }"), "rule_not_matched"),
        (
            q("{ ...F } fragment F on Query { secrets { value } }"),
            "rule_not_matched",
        ),
        (q("{ viewer { id "), "rule_denied"),
        (
            serde_json::json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "ab".repeat(32)}}})
                .to_string(),
            "rule_denied",
        ),
        // A batch: one element is enough to refuse.
        (
            format!("[{},{}]", q("{ viewer { id } }"), q("mutation { x }")),
            "rule_denied",
        ),
    ] {
        let (status, _, body) = post(request.clone()).await;
        assert_eq!(status, 403, "{request}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["reason"], reason, "{request}: {json}");
    }
    let (status, _, body) = post(
        serde_json::json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": trusted}}})
            .to_string(),
    )
    .await;
    assert_eq!(status, 200, "the listed hash goes: {body}");
    // A form body carrying the document (some servers accept it).
    let out = curl(&[
        "-i",
        "-x",
        &proxy_url,
        "--data-urlencode",
        "query=mutation { deleteRepository(id: 1) { ok } }",
        &url,
    ])
    .await;
    let (status, _, body) = parse_response(&out.stdout);
    assert_eq!(status, 403, "a form is read too: {body}");
    assert!(body.contains("rule_denied"), "{body}");

    // GET ?query=, as python httpx sends it.
    let script = format!(
        r#"
import httpx
with httpx.Client(proxy="{proxy_url}") as client:
    ok = client.get("{url}", params={{"query": "{{ viewer {{ id }} }}"}})
    bad = client.get("{url}", params={{"query": "mutation {{ x }}"}})
    other = client.get("{url}", params={{"query": "{{ secrets {{ v }} }}"}})
    print(ok.status_code, bad.status_code, bad.json()["reason"], other.status_code)
"#
    );
    let out = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // Without httpx (outside CI) there is no last refusal to read.
        assert!(
            std::env::var_os("CI").is_none() && stderr.contains("No module named"),
            "python httpx: {stderr}"
        );
        return;
    }
    assert_eq!(stdout.trim(), "200 403 rule_denied 403", "{stdout}{stderr}");
    let last = proxy.ring.snapshot().pop().unwrap();
    assert!(
        last.blocked
            .rule
            .as_deref()
            .unwrap_or_default()
            .contains("secrets"),
        "names what was asked: {:?}",
        last.blocked.rule
    );
}
