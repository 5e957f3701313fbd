//! `[[rate_limits]]`: requests to the hosts a pattern covers get a rate
//! and a burst; past it they are refused `rate_limited` — a 429 with
//! `Retry-After` over HTTP, reply 0x02 over SOCKS5 — and recorded, while
//! other destinations are served as before. Real clients (curl, python
//! requests) through `run`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

/// `run --config` with `*.test` allowed, `limit` as the one
/// `[[rate_limits]]` entry for `**.slow.test`, the violations in `dir`,
/// and `a.slow.test`, `b.slow.test` and `fast.test` resolving to
/// loopback, running `script`: exit code, stdout, stderr.
async fn run_limited(
    dir: &std::path::Path,
    limit: &str,
    script: &str,
) -> (Option<i32>, String, String) {
    let config = dir.join("limits.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\nallowed_domains = [\"*.test\"]\nallow_local_binding = true\n\n[[rate_limits]]\nhost = \"**.slow.test\"\n{limit}\n\n[log]\nviolations_file = {:?}\n",
            dir.join("violations.jsonl")
        ),
    )
    .unwrap();
    let mut command = portcullis();
    command.args(["run", "--config"]).arg(&config);
    for name in ["a.slow.test", "b.slow.test", "fast.test"] {
        command.args(["--resolve", &format!("{name}=127.0.0.1")]);
    }
    output(command.args(["--", "sh", "-c", script])).await
}

#[tokio::test]
async fn past_its_burst_a_limited_destination_gets_429_and_others_do_not() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let violations = dir.path().join("violations.jsonl");
    let script = format!(
        r#"for i in 1 2 3 4; do curl -s -o /dev/null -w "slow %{{http_code}}\n" http://a.slow.test:{port}/; done
curl -s -D - -o /dev/null http://b.slow.test:{port}/ | tr -d '\r' | grep -i -E '^(retry-after|x-proxy-error):'
for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w "fast %{{http_code}}\n" http://fast.test:{port}/; done
curl -s -o /dev/null --proxy "$PORTCULLIS_SOCKS_URL" http://a.slow.test:{port}/; echo "socks $?"
python3 -c 'import requests
r = requests.get("http://a.slow.test:{port}/")
print("python", r.status_code, r.headers.get("Retry-After"), r.json()["reason"])'
"#
    );
    // One request an hour after a burst of 3: the fourth is refused.
    let (code, stdout, stderr) = run_limited(
        dir.path(),
        "requests_per_second = 0.0002778\nburst = 3",
        &script,
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.get(..4),
        Some(&["slow 200", "slow 200", "slow 200", "slow 429"][..]),
        "{stdout}\n{stderr}"
    );
    // Another host under the same pattern shares its budget; the wait is
    // about the hour a token takes, in whole seconds (less what has
    // refilled since: the machine may be slow).
    let about_an_hour = |value: &str| {
        value
            .trim()
            .parse::<u64>()
            .is_ok_and(|seconds| (3000..=3600).contains(&seconds))
    };
    let header = lines
        .iter()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .unwrap_or_else(|| panic!("no Retry-After: {stdout}"));
    assert!(about_an_hour(header), "{stdout}");
    assert!(
        stdout.contains("x-proxy-error: blocked-by-rate-limit"),
        "{stdout}"
    );
    assert_eq!(
        lines.iter().filter(|l| **l == "fast 200").count(),
        6,
        "{stdout}"
    );
    // SOCKS5: reply 0x02 (curl: 97, the proxy refused the connection).
    assert!(stdout.contains("socks 97"), "{stdout}\n{stderr}");
    let python = lines.iter().find(|l| l.starts_with("python"));
    if let Some(python) = python {
        let words: Vec<&str> = python.split(' ').collect();
        assert_eq!(words.len(), 4, "{stdout}");
        assert_eq!((words[1], words[3]), ("429", "rate_limited"), "{stdout}");
        assert!(about_an_hour(words[2]), "{stdout}");
    } else {
        assert!(
            std::env::var_os("CI").is_none() && stderr.contains("No module named"),
            "{stdout}\n{stderr}"
        );
    }
    assert!(
        stderr.contains("rate limit was reached"),
        "the refusal is said: {stderr}"
    );
    let recorded = std::fs::read_to_string(&violations).unwrap();
    let limited = recorded
        .lines()
        .filter(|l| l.contains(r#""reason":"rate_limited""#))
        .count();
    assert!(limited >= 3, "{recorded}");
    assert!(
        recorded.contains("[[rate_limits]] **.slow.test"),
        "{recorded}"
    );
}

#[tokio::test]
async fn a_bad_limit_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (entry, key, says) in [
        (
            "host = \"a.test\"\nrequests_per_second = 0",
            "rate_limits[0].requests_per_second",
            "above 0",
        ),
        (
            "host = \"a.test\"\nrequests_per_second = 1\nburst = 0",
            "rate_limits[0].burst",
            "at least 1",
        ),
        (
            "host = \"a.test\"",
            "rate_limits[0].requests_per_second",
            "concurrent, or both",
        ),
        (
            "host = \"a.test\"\nconcurrent = 0",
            "rate_limits[0].concurrent",
            "at least 1",
        ),
        (
            "host = \"a.test\"\nconcurrent = 2\nburst = 4",
            "rate_limits[0].burst",
            "needs requests_per_second",
        ),
        (
            "host = \"a..test\"\nrequests_per_second = 1",
            "rate_limits[0].host",
            "not a host pattern",
        ),
        (
            "host = \"a.test\"\nrequests_per_second = 1\n[[rate_limits]]\nhost = \"A.TEST\"\nrequests_per_second = 2",
            "rate_limits[1].host",
            "limited twice",
        ),
    ] {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, format!("[[rate_limits]]\n{entry}\n")).unwrap();
        let (code, _, stderr) = output(
            portcullis()
                .args(["check", "--config"])
                .arg(&config)
                .arg("http://a.test/"),
        )
        .await;
        assert_eq!(code, Some(64), "{entry}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(says),
            "{entry}: {stderr}"
        );
    }
}

/// `serve` takes new limits from an edit of its config at once (a changed
/// rate starts afresh), and keeps the old ones through a broken edit,
/// naming the key.
#[tokio::test]
async fn a_reload_changes_the_limits_and_a_bad_one_keeps_them() {
    let origin = origin().await;
    let url = format!("http://{}/", origin.addr);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    let write = |limit: &str| {
        std::fs::write(
            &config,
            format!(
                "[network]\nallowed_domains = [\"127.0.0.1\"]\nallow_local_binding = true\n\n[[rate_limits]]\nhost = \"127.0.0.1\"\n{limit}\n"
            ),
        )
        .unwrap();
    };
    write("requests_per_second = 0.001\nburst = 1");
    let (mut child, proxy) = serve_config(&config).await;
    let status = |url: String, proxy: String| async move {
        let out = curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            &proxy,
            &url,
        ])
        .await;
        out.stdout
    };
    assert_eq!(status(url.clone(), proxy.clone()).await, "200");
    assert_eq!(status(url.clone(), proxy.clone()).await, "429");
    write("requests_per_second = 1000\nburst = 1000");
    let mut now = String::new();
    for _ in 0..50 {
        now = status(url.clone(), proxy.clone()).await;
        if now == "200" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(now, "200", "the raised limit applies within seconds");
    write("requests_per_second = -1");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    for _ in 0..5 {
        assert_eq!(
            status(url.clone(), proxy.clone()).await,
            "200",
            "a broken edit keeps the limits in force"
        );
    }
    let (_, stderr) = terminate(&mut child).await;
    assert!(
        stderr.contains("rate_limits[0].requests_per_second"),
        "names the key: {stderr}"
    );
}

/// `check` names the limit a destination counts against.
#[tokio::test]
async fn check_names_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("limits.toml");
    std::fs::write(
        &config,
        "[network]\nallowed_domains = [\"127.0.0.1\"]\nallow_local_binding = true\n\n[[rate_limits]]\nhost = \"127.0.0.1\"\nrequests_per_second = 2\n",
    )
    .unwrap();
    let (code, stdout, stderr) = output(
        portcullis()
            .args(["check", "--config"])
            .arg(&config)
            .arg("http://127.0.0.1:9/"),
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("rate limited: [[rate_limits]] 127.0.0.1: 2 requests a second, burst 2"),
        "{stdout}"
    );
}

/// `concurrent` caps the tunnels open (and requests in flight) to a
/// pattern's hosts: the third `CONNECT` while two are open is refused
/// `concurrency_limited` (429, `Retry-After: 1`), as is a SOCKS5
/// connection (0x02); once one closes, a new one opens. Plain requests
/// give their place back when answered.
#[tokio::test]
async fn past_its_cap_a_tunnel_is_refused_until_one_closes() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let violations = dir.path().join("violations.jsonl");
    let script = format!(
        r#"for i in 1 2 3 4; do curl -s -o /dev/null -w "plain %{{http_code}}\n" http://a.slow.test:{port}/; done
python3 - <<'PY'
import base64, os, socket, subprocess, time, urllib.parse
proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
auth = ""
if proxy.username:
    token = base64.b64encode(f"{{urllib.parse.unquote(proxy.username)}}:{{urllib.parse.unquote(proxy.password or '')}}".encode()).decode()
    auth = f"Proxy-Authorization: Basic {{token}}\r\n"
def connect(name):
    s = socket.create_connection((proxy.hostname, proxy.port), timeout=10)
    s.sendall(f"CONNECT {{name}}:{port} HTTP/1.1\r\nHost: {{name}}:{port}\r\n{{auth}}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head.decode(errors="replace")
one, head1 = connect("a.slow.test")
two, head2 = connect("b.slow.test")
three, head3 = connect("a.slow.test")
print("first", head1.split("\r\n")[0])
print("second", head2.split("\r\n")[0])
print("third", head3.split("\r\n")[0])
print("retry", [l for l in head3.split("\r\n") if l.lower().startswith("retry-after")])
print("other", connect("fast.test")[1].split("\r\n")[0])
socks = subprocess.run(["curl", "-s", "-o", "/dev/null", "--proxy", os.environ["PORTCULLIS_SOCKS_URL"], "http://a.slow.test:{port}/"])
print("socks", socks.returncode)
one.close()
for _ in range(50):
    again, head = connect("a.slow.test")
    if head.startswith("HTTP/1.1 200"):
        break
    again.close()
    time.sleep(0.1)
print("after close", head.split("\r\n")[0])
PY
"#
    );
    let (code, stdout, stderr) = run_limited(dir.path(), "concurrent = 2", &script).await;
    assert_eq!(code, Some(0), "{stderr}");
    let plain = stdout.lines().filter(|l| *l == "plain 200").count();
    assert_eq!(
        plain, 4,
        "answered requests give their place back: {stdout}"
    );
    for wanted in [
        "first HTTP/1.1 200 OK",
        "second HTTP/1.1 200 OK",
        "third HTTP/1.1 429 Too Many Requests",
        "retry ['retry-after: 1']",
        "other HTTP/1.1 200 OK",
        "socks 97",
        "after close HTTP/1.1 200 OK",
    ] {
        assert!(
            stdout.lines().any(|l| l == wanted),
            "{wanted:?} missing:\n{stdout}\n{stderr}"
        );
    }
    let recorded = std::fs::read_to_string(&violations).unwrap();
    assert!(
        recorded.contains(r#""reason":"concurrency_limited""#),
        "{recorded}"
    );
}
