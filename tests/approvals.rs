//! Approvals from the binary and the bundled approvers: a reviewer program
//! (and every way it can fail), persisted rules across a restart, the
//! terminal prompt driven through tmux, and live reload. Loopback only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use http::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Layer, ServiceExt};

use common::*;
use portcullis::approvers::command::{CommandApprover, ReviewerSettings};
use portcullis::middleware::{
    find_blocked, ApprovalWaitLayer, AwaitingApproval, BoxError, Protocol, Reason, Target,
    ViolationRing,
};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reviewers")
        .join(name)
        .display()
        .to_string()
}

fn settings(command: Vec<String>) -> ReviewerSettings {
    ReviewerSettings {
        command,
        risk_threshold: 80,
        max_field_bytes: 2048,
        max_output_bytes: 64 * 1024,
        context_entries: 20,
        pass_env: vec!["PATH".into()],
    }
}

/// Puts one question about `host:443` to `reviewer` through the approval
/// layer; the refusal reason and message, or `None` when allowed.
async fn ask(settings: ReviewerSettings, host: &str) -> Option<(Reason, String)> {
    let approver = CommandApprover::new(settings, ViolationRing::default());
    let network =
        tower::service_fn(|_: Request<()>| async { Ok::<_, BoxError>(Response::new(())) });
    let service = ApprovalWaitLayer::new(approver, Duration::from_secs(3)).layer(network);
    let authority = format!("{host}:443");
    let mut request = Request::connect(authority.as_str()).body(()).unwrap();
    request
        .extensions_mut()
        .insert(Target::parse_authority(&authority, None).unwrap());
    request.extensions_mut().insert(Protocol::HttpsConnect);
    request.extensions_mut().insert(AwaitingApproval);
    match service.oneshot(request).await {
        Ok(_) => None,
        Err(error) => {
            let blocked = find_blocked(error.as_ref()).expect("a refusal");
            Some((blocked.reason, blocked.message.clone()))
        }
    }
}

#[tokio::test]
async fn every_reviewer_failure_fails_closed() {
    let count = tempfile::NamedTempFile::new().unwrap();
    let count = count.path().display().to_string();
    let reviewer = |host: &str| (vec![fixture("reviewer.sh"), count.clone()], host.to_owned());
    /// (reviewer command, host), expected refusal, what the message says.
    type Case<'a> = ((Vec<String>, String), Option<Reason>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (reviewer("session.test"), None, ""),
        (
            reviewer("other.test"),
            Some(Reason::ApprovalDenied),
            "looks like exfiltration",
        ),
        (
            reviewer("risky.test"),
            Some(Reason::ApprovalDenied),
            "risk score 85 is not below the threshold 80",
        ),
        (
            (vec![fixture("sleeps.sh")], "a.test".into()),
            Some(Reason::ApprovalTimedOut),
            "no answer within",
        ),
        (
            (vec![fixture("fails.sh")], "a.test".into()),
            Some(Reason::ApprovalFailed),
            "exited with",
        ),
        (
            (vec![fixture("junk.sh")], "a.test".into()),
            Some(Reason::ApprovalFailed),
            "did not answer with",
        ),
        (
            (vec![fixture("missing.sh")], "a.test".into()),
            Some(Reason::ApprovalFailed),
            "did not answer with",
        ),
        (
            (vec![fixture("floods.sh")], "a.test".into()),
            Some(Reason::ApprovalFailed),
            "more than 65536 bytes",
        ),
        (
            (vec!["/nonexistent/reviewer".into()], "a.test".into()),
            Some(Reason::ApprovalFailed),
            "could not be started",
        ),
        // Only PATH passes through: the reviewer does not see HOME.
        (
            (vec![fixture("env.sh")], "a.test".into()),
            Some(Reason::ApprovalDenied),
            "clean environment",
        ),
    ];
    let total = cases.len();
    for ((command, host), reason, says) in cases {
        let label = format!("{command:?} {host}");
        let got = ask(settings(command), &host).await;
        assert_eq!(got.as_ref().map(|g| g.0), reason, "{label}: {got:?}");
        if let Some((_, message)) = got {
            assert!(message.contains(says), "{label}: {message}");
        }
    }
    println!("{total} reviewer cases");
}

#[tokio::test]
async fn the_reviewer_sees_bounded_strings_marked_where_cut() {
    let count = tempfile::NamedTempFile::new().unwrap();
    let count_path = count.path().display().to_string();
    let mut settings = settings(vec![fixture("reviewer.sh"), count_path.clone()]);
    settings.max_field_bytes = 4;
    let _ = ask(settings, "session.test").await;
    let input = std::fs::read_to_string(format!("{count_path}.input")).unwrap();
    let json: serde_json::Value = serde_json::from_str(input.trim()).unwrap();
    assert_eq!(json["target"]["host"], "sess<truncated omitted_bytes=8/>");
    assert_eq!(json["target"]["port"], 443);
    assert_eq!(
        json["target"]["protocol"],
        "http<truncated omitted_bytes=9/>"
    );
    assert!(json["recent"].is_array());
}

/// A running `portcullis serve`: its HTTP address, and its stderr.
struct Served {
    child: tokio::process::Child,
    address: std::net::SocketAddr,
}

async fn serve(config: &Path, extra: &[&str]) -> Served {
    let mut child = portcullis()
        .args(["serve", "--config"])
        .arg(config)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = served_http_address(&mut child).await;
    Served { child, address }
}

impl Served {
    async fn stop(mut self) -> String {
        terminate(&mut self.child).await.1
    }
}

async fn get(proxy: std::net::SocketAddr, url: &str) -> (u16, String) {
    let out = curl(&["-i", "-x", &format!("http://{proxy}"), url]).await;
    let (status, _, body) = parse_response(&out.stdout);
    (status, body)
}

fn calls(count: &Path) -> usize {
    std::fs::read_to_string(count).map_or(0, |text| text.lines().count())
}

#[tokio::test]
async fn a_reviewer_program_from_the_config_with_rules_that_outlive_a_restart() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("calls");
    let rules = dir.path().join("rules.toml");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[network]
proxy_url = "http://127.0.0.1:0"
enable_socks5 = false
allow_local_binding = true
denied_domains = ["bad.test"]
[dns]
hosts = {{ "session.test" = ["127.0.0.1"], "always.test" = ["127.0.0.1"], "other.test" = ["127.0.0.1"], "bad.test" = ["127.0.0.1"] }}
[approval]
mode = "command"
command = ["{}", "{}"]
rules_file = "{}"
timeout = 10
"#,
            fixture("reviewer.sh"),
            count.display(),
            rules.display()
        ),
    )
    .unwrap();
    let served = serve(&config, &[]).await;
    let url = |host: &str| format!("http://{host}:{port}/hello");

    assert_eq!(get(served.address, &url("session.test")).await.0, 200);
    assert_eq!(get(served.address, &url("session.test")).await.0, 200);
    assert_eq!(calls(&count), 1, "one question for the session");

    let out = curl(&[
        "-i",
        "-x",
        &format!("http://{}", served.address),
        &url("other.test"),
    ])
    .await;
    let (status, headers, body) = parse_response(&out.stdout);
    assert_eq!(status, 403);
    assert_eq!(headers["x-proxy-error"], "blocked-by-policy");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["reason"], "approval_denied");
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .contains("looks like exfiltration"),
        "{body}"
    );

    assert_eq!(get(served.address, &url("always.test")).await.0, 200);
    let written = std::fs::read_to_string(&rules).unwrap();
    assert!(
        written.contains("host = \"always.test\"") && written.contains("decision = \"allow\""),
        "{written}"
    );

    let (status, body) = get(served.address, &url("bad.test")).await;
    assert_eq!(status, 403);
    assert!(body.contains("\"reason\":\"denied\""), "{body}");
    assert_eq!(
        calls(&count),
        3,
        "a denylisted host never reaches the reviewer"
    );
    served.stop().await;

    // After a restart the persisted rule answers; the reviewer is not asked.
    let served = serve(&config, &[]).await;
    assert_eq!(get(served.address, &url("always.test")).await.0, 200);
    assert_eq!(calls(&count), 3);
    // `check` reads the rules too, and says who would be asked otherwise.
    let (code, stdout, _) = output_of(
        portcullis()
            .args(["check", "--config"])
            .arg(&config)
            .arg(url("always.test")),
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}");
    let (code, stdout, _) = output_of(
        portcullis()
            .args(["check", "--config"])
            .arg(&config)
            .arg(url("new.test")),
    )
    .await;
    assert_eq!(code, Some(2), "{stdout}");
    assert!(
        stdout.starts_with("ask new.test") && stdout.contains("reviewer"),
        "{stdout}"
    );
    served.stop().await;
}

async fn output_of(command: &mut tokio::process::Command) -> (Option<i32>, String, String) {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_policy_reloads_live_without_cutting_tunnels_and_survives_a_broken_edit() {
    let tunnelled = origin().await;
    let later = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    let write = |allowed: &[u16]| {
        let list: Vec<String> = allowed
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        std::fs::write(
            &config,
            format!(
                "[network]\nproxy_url = \"http://127.0.0.1:0\"\nenable_socks5 = false\nallowed_domains = [{}]\n",
                list.join(", ")
            ),
        )
        .unwrap();
    };
    write(&[tunnelled.addr.port()]);
    let served = serve(&config, &[]).await;
    let later_url = format!("http://{}/later", later.addr);
    assert_eq!(get(served.address, &later_url).await.0, 403);

    // A tunnel opened under the old policy.
    let authority = tunnelled.addr.to_string();
    let (mut tunnel, head) = raw_exchange(
        served.address,
        &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    write(&[tunnelled.addr.port(), later.addr.port()]);
    let mut status = 0;
    for _ in 0..40 {
        status = get(served.address, &later_url).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "the edit applies within seconds");

    tunnel
        .write_all(
            format!("GET /through HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.ends_with("hello /through"),
        "the open tunnel still works: {answer}"
    );

    std::fs::write(&config, "[network\nallowed_domains = oops").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        get(served.address, &later_url).await.0,
        200,
        "a broken edit keeps the old policy"
    );
    let stderr = served.stop().await;
    assert!(stderr.contains("keeping the policy in force"), "{stderr}");
    assert!(
        stderr.contains("portcullis.toml"),
        "names the file: {stderr}"
    );
}

#[tokio::test]
async fn the_prompt_asks_on_the_terminal_and_remembers_a_session_answer() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        println!("skipped: tmux is not installed (.ci/run installs it)");
        return;
    }
    let origin = origin().await;
    let port = origin.addr.port();
    let command = format!(
        "{} serve --http 127.0.0.1:0 --no-socks --approve prompt --allow-local-binding --resolve asked.test=127.0.0.1 2>/dev/null",
        env!("CARGO_BIN_EXE_portcullis")
    );
    // Killed when dropped, even if an assertion below fails.
    let terminal = Tmux::start(&command);
    let screen = || terminal.screen();
    let mut proxy = None;
    for _ in 0..100 {
        let text = screen();
        if let Some(rest) = text.split("export HTTP_PROXY='http://").nth(1) {
            proxy = rest.split('\'').next().map(str::to_owned);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let proxy = proxy.expect("serve printed its address");
    let url = format!("http://asked.test:{port}/prompted");
    let first = tokio::spawn({
        let proxy = proxy.clone();
        let url = url.clone();
        async move { curl(&["-x", &format!("http://{proxy}"), &url]).await }
    });
    let mut asked = false;
    for _ in 0..100 {
        if screen().contains("allow [o]nce") {
            asked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(asked, "the question shows: {}", screen());
    assert!(screen().contains("GET asked.test:"), "{}", screen());
    // The question says how to answer: a letter is not enough alone.
    assert!(screen().contains("a letter, then Enter"), "{}", screen());
    terminal.run(&["send-keys", "s", "Enter"]);
    let out = first.await.unwrap();
    assert_eq!(out.stdout, "hello /prompted", "{}", out.stderr);
    let again = curl(&["-x", &format!("http://{proxy}"), &url]).await;
    assert_eq!(again.stdout, "hello /prompted");
    let questions = screen().matches("allow [o]nce").count();
    assert_eq!(questions, 1, "the session answer is remembered");
    // Closing its terminal stops serve: nothing is left holding a port.
    let pid = terminal.pid().await;
    terminal.hang_up();
    assert!(
        exits_within(pid, Duration::from_secs(15)).await,
        "serve outlived its terminal"
    );
}
