//! Real clients through `portcullis run`, on loopback: curl (plain HTTP,
//! HTTPS through `CONNECT`, `socks5h`), git cloning over HTTP, python
//! `requests` and `httpx` (without `socksio`), pip from a local PEP 503
//! index, and node's `fetch` where node ≥ 24 honours the proxy variables.
//! Every destination is a name (`*.test`) that resolves only inside the
//! proxy (`--resolve`), so an answer proves the client went through it.
//!
//! A client that is not installed is skipped with the reason printed,
//! unless `PORTCULLIS_CLIENTS_REQUIRED=1` (CI sets it and installs them;
//! node stays optional: below 24 there is nothing to show).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::*;

async fn which(program: &str) -> Option<()> {
    tokio::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .await
        .ok()
        .filter(|s| s.success())
        .map(drop)
}

fn required() -> bool {
    std::env::var("PORTCULLIS_CLIENTS_REQUIRED").is_ok_and(|v| v == "1")
}

/// Whether `check` (a shell command) succeeds; when it does not, the skip
/// is printed (or, when clients are required, the test fails).
async fn available(what: &str, check: &str) -> bool {
    let ok = tokio::process::Command::new("sh")
        .args(["-c", check])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !required(),
            "{what} is required here (PORTCULLIS_CLIENTS_REQUIRED=1)"
        );
        println!("skipped: {what} is not installed");
    }
    ok
}

/// Runs `script` under `portcullis run` with the names resolving to
/// loopback; returns stdout and stderr.
async fn run(script: &str, extra: &[&str]) -> (String, String) {
    let (_, stdout, stderr) = output(
        portcullis()
            .args([
                "run",
                "--allow",
                "*.test",
                "--allow-local-binding",
                "--resolve",
                "files.test=127.0.0.1",
                "--resolve",
                "secure.test=127.0.0.1",
            ])
            .args(extra)
            .args(["--", "sh", "-c", script]),
    )
    .await;
    (stdout, stderr)
}

#[tokio::test]
async fn curl_over_http_connect_and_socks5h() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "plain hello").unwrap();
    let plain = files(dir.path().to_owned()).await.port();
    let (secure, pem) = https_origin().await;
    let ca = dir.path().join("origin.pem");
    std::fs::write(&ca, pem).unwrap();
    let script = format!(
        r#"
curl -sS http://files.test:{plain}/hello.txt; echo
curl -sS --cacert {ca} https://secure.test:{port}/; echo
curl -sS --proxy "$PORTCULLIS_SOCKS_URL" http://files.test:{plain}/hello.txt; echo
curl -sS --proxy "$PORTCULLIS_SOCKS_URL" --cacert {ca} https://secure.test:{port}/; echo
"#,
        ca = ca.display(),
        port = secure.port()
    );
    let (stdout, stderr) = run(&script, &[]).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["plain hello", "secure hello", "plain hello", "secure hello"],
        "{stderr}"
    );
}

#[tokio::test]
async fn git_clones_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&root).unwrap();
    dumb_git_repo(&root, &work, "through the proxy").await;
    let port = files(root).await.port();
    let clone = dir.path().join("clone");
    let script = format!(
        "git clone -q http://files.test:{port}/repo.git {clone} && git -C {clone} log --format=%s",
        clone = clone.display()
    );
    let (stdout, stderr) = run(&script, &[]).await;
    assert_eq!(stdout.trim(), "through the proxy", "{stderr}");
}

#[tokio::test]
async fn python_requests_and_httpx_without_socksio() {
    if !available(
        "python requests and httpx",
        "python3 -c 'import requests, httpx'",
    )
    .await
    {
        return;
    }
    // httpx reads ALL_PROXY; with a SOCKS URL there and no socksio it fails
    // on every request. Ours names the HTTP listener.
    let socksio = tokio::process::Command::new("python3")
        .args(["-c", "import socksio"])
        .stderr(Stdio::null())
        .status()
        .await
        .unwrap();
    if socksio.success() {
        println!("note: socksio is installed here; the test still checks ALL_PROXY is HTTP");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "plain hello").unwrap();
    let port = files(dir.path().to_owned()).await.port();
    let url = format!("http://files.test:{port}/hello.txt");
    let script = format!(
        r#"
case "$ALL_PROXY" in http://*) echo all-proxy-is-http;; *) echo "ALL_PROXY=$ALL_PROXY";; esac
python3 -c 'import requests; print(requests.get("{url}").text)'
python3 -c 'import httpx; print(httpx.get("{url}").text)'
python3 -c 'import httpx; print(httpx.Client().get("{url}").text)'
"#
    );
    let (stdout, stderr) = run(&script, &[]).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "all-proxy-is-http",
            "plain hello",
            "plain hello",
            "plain hello"
        ],
        "{stderr}"
    );
}

/// A WebSocket echo server on loopback (tokio-tungstenite), for clients to
/// reach through the proxy.
async fn websocket_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if (message.is_text() || message.is_binary())
                        && socket.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn python_websockets_and_aiohttp_work_without_extra_packages() {
    if !available(
        "python websockets (14+) and aiohttp",
        "python3 -c 'import websockets, aiohttp; assert int(websockets.__version__.split(\".\")[0]) >= 14'",
    )
    .await
    {
        return;
    }
    // websockets prefers any *_proxy variable naming a SOCKS proxy and then
    // needs python-socks; none is exported, so it takes HTTPS_PROXY (a
    // CONNECT). The names resolve only at the proxy (--resolve), so an
    // answer proves the request went through it.
    let python_socks = tokio::process::Command::new("python3")
        .args(["-c", "import python_socks"])
        .stderr(Stdio::null())
        .status()
        .await
        .unwrap();
    if python_socks.success() {
        println!("note: python-socks is installed here; the test still checks no *_proxy is SOCKS");
    }
    let echo = websocket_echo().await.port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "plain hello").unwrap();
    let port = files(dir.path().to_owned()).await.port();
    let script = format!(
        r#"
env | grep -i '_proxy=socks' || echo no-socks-proxy-variable
python3 -c '
import asyncio
from websockets.asyncio.client import connect
async def main():
    async with connect("ws://files.test:{echo}/") as ws:
        await ws.send("through the proxy"); print(await ws.recv())
asyncio.run(main())'
python3 -c '
import asyncio, aiohttp
async def main():
    async with aiohttp.ClientSession(trust_env=True) as session:
        async with session.get("http://files.test:{port}/hello.txt") as response:
            print(await response.text())
asyncio.run(main())'
"#
    );
    let (stdout, stderr) = run(&script, &[]).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "no-socks-proxy-variable",
            "through the proxy",
            "plain hello"
        ],
        "{stderr}"
    );
}

#[tokio::test]
async fn pip_downloads_from_a_local_index() {
    if !available("pip", "python3 -m pip --version").await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("index");
    let wheel = pip_index(&root).await;
    let port = files(root).await.port();
    let target = dir.path().join("downloaded");
    let script = format!(
        "python3 -m pip download --no-deps --disable-pip-version-check --no-cache-dir -q --trusted-host files.test --index-url http://files.test:{port}/simple/ -d {target} demo-pkg && ls {target}",
        target = target.display()
    );
    let (stdout, stderr) = run(&script, &[]).await;
    assert_eq!(stdout.trim(), wheel, "{stderr}");
}

#[tokio::test]
async fn node_fetch_honours_the_proxy_from_node_24() {
    // node is optional even in CI: below 24 the test has nothing to show.
    if which("node").await.is_none() {
        println!("skipped: node is not installed");
        return;
    }
    let version = tokio::process::Command::new("node")
        .arg("--version")
        .output()
        .await
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 24 {
        // Before 24, fetch ignores the proxy variables: under `run` it
        // would go direct (see the README; `run --isolate` is the answer).
        println!(
            "skipped: node {version} is older than 24, whose fetch honours NODE_USE_ENV_PROXY"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "plain hello").unwrap();
    let port = files(dir.path().to_owned()).await.port();
    let script = format!(
        "node -e 'fetch(\"http://files.test:{port}/hello.txt\").then(r => r.text()).then(console.log)'"
    );
    let (stdout, stderr) = run(&script, &[]).await;
    assert_eq!(stdout.trim(), "plain hello", "{stderr}");
}

/// With `[scan] action = "deny"`, what developers do every day goes through
/// untouched: git clone and push (smart HTTP: packs both ways), pip
/// download, npm install and publish (a base64'd tarball in JSON), cargo
/// from a sparse registry, a tarball uploaded with curl and a PNG with a
/// multipart form from python `requests` — their files mentioning secrets'
/// names, documentation keys and UUIDs. Nothing is recorded as a finding.
#[tokio::test]
async fn ordinary_downloads_and_uploads_pass_with_scanning_on() {
    if !available("pip", "python3 -m pip --version").await
        || !available("python requests", "python3 -c 'import requests'").await
    {
        return;
    }
    let npm = which("npm").await.is_some();
    if !npm {
        println!("note: npm is not installed; its install and publish are not tried");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    pip_index(&root).await;
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/registry.py");
    let Some((_registry, port)) =
        python_server(&[fixture, root.to_str().unwrap()], "http.server").await
    else {
        return;
    };
    let setup = format!(
        r#"set -e
cd {dir}
git init -q -b main work
cat > work/deploy.sh <<'X'
#!/bin/sh
# Needs AWS_SECRET_ACCESS_KEY and GITHUB_TOKEN from the environment.
export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE
curl -H "Authorization: Bearer $GITHUB_TOKEN" https://api.example.test/items/8c6f1f0e-6a0f-4b8e-9a39-3b0f3c1d2e4f
X
head -c 65536 /dev/urandom > work/blob.bin
git -C work add . && git -C work -c user.name=t -c user.email=t@t commit -q -m "deploy script"
mkdir -p root/git && git clone -q --bare work root/git/repo.git
cargo new -q --lib --vcs none crate-demo --name demo
cargo package -q --offline --no-verify --allow-dirty --manifest-path crate-demo/Cargo.toml
python3 - <<'X'
import hashlib, json, os
crate = open("crate-demo/target/package/demo-0.1.0.crate", "rb").read()
os.makedirs("root/index/de/mo", exist_ok=True)
os.makedirs("root/crates/demo/0.1.0", exist_ok=True)
open("root/crates/demo/0.1.0/download", "wb").write(crate)
json.dump({{"dl": "http://files.test:{port}/crates/{{crate}}/{{version}}/download"}}, open("root/index/config.json", "w"))
entry = {{"name": "demo", "vers": "0.1.0", "deps": [], "cksum": hashlib.sha256(crate).hexdigest(), "features": {{}}, "yanked": False}}
open("root/index/de/mo/demo", "w").write(json.dumps(entry) + "\n")
X
mkdir -p use-crate/src cargo-home
touch use-crate/src/lib.rs
printf '[package]\nname = "use-demo"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\ndemo = {{ version = "0.1", registry = "local" }}\n' > use-crate/Cargo.toml
printf '[registries.local]\nindex = "sparse+http://files.test:{port}/index/"\n' > cargo-home/config.toml
if [ {npm} = true ]; then
  mkdir npm-pkg
  printf '{{"name":"demo-npm","version":"1.0.0","main":"index.js"}}' > npm-pkg/package.json
  echo "module.exports = 'hello from npm';" > npm-pkg/index.js
  printf '//files.test:{port}/:_authToken=local-test-token\n' > npm-pkg/.npmrc
  (cd npm-pkg && npm pack --silent --pack-destination .. >/dev/null \
    && npm version --silent --no-git-tag-version 1.0.1 >/dev/null)
  python3 - <<'X'
import base64, hashlib, json, os
tgz = open("demo-npm-1.0.0.tgz", "rb").read()
os.makedirs("root/demo-npm/-", exist_ok=True)
open("root/demo-npm/-/demo-npm-1.0.0.tgz", "wb").write(tgz)
integrity = "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()
version = {{"name": "demo-npm", "version": "1.0.0", "main": "index.js", "dist": {{"tarball": "http://files.test:{port}/demo-npm/-/demo-npm-1.0.0.tgz", "integrity": integrity, "shasum": hashlib.sha1(tgz).hexdigest()}}}}
json.dump({{"name": "demo-npm", "dist-tags": {{"latest": "1.0.0"}}, "versions": {{"1.0.0": version}}}}, open("root/demo-npm/index.json", "w"))
X
fi
python3 -c 'import base64, zlib, struct
def chunk(kind, data): return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
pixels = b"".join(b"\0" + bytes(range(i, i + 96)) for i in range(32))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")
open("image.png", "wb").write(png)'
"#,
        dir = dir.path().display(),
    );
    let status = tokio::process::Command::new("sh")
        .args(["-c", &setup])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "the setup failed");
    let config = dir.path().join("scan.toml");
    let violations = dir.path().join("violations.jsonl");
    std::fs::write(
        &config,
        format!("[scan]\naction = \"deny\"\nsecret_env = [\"MY_SECRET\"]\n\n[log]\nviolations_file = {violations:?}\n"),
    )
    .unwrap();
    let url = format!("http://files.test:{port}");
    let script = format!(
        r#"cd {dir}
git clone -q {url}/git/repo.git clone && echo "more" >> clone/deploy.sh \
  && git -C clone -c user.name=t -c user.email=t@t commit -qam "through the proxy" \
  && git -C clone push -q origin main && echo "git pushed: $(git -C root/git/repo.git log -1 --format=%s)"
python3 -m pip download --no-deps --disable-pip-version-check --no-cache-dir -q --trusted-host files.test --index-url {url}/simple/ -d pip-out demo-pkg && echo "pip: $(ls pip-out)"
CARGO_HOME={dir}/cargo-home cargo fetch -q --manifest-path use-crate/Cargo.toml && echo "cargo fetched: $(ls cargo-home/registry/cache/*/)"
if [ {npm} = true ]; then
  npm install --silent --no-audit --no-fund --cache {dir}/npm-cache --registry {url}/ --prefix npm-use demo-npm \
    && echo "npm: $(node -p "require('./npm-use/node_modules/demo-npm')")"
  (cd npm-pkg && npm publish --loglevel=warn --cache {dir}/npm-cache --registry {url}/) && echo "npm published: $(ls root/uploads)"
fi
curl -sf -o /dev/null -T demo-0.1.0.crate {url}/upload/crate 2>/dev/null || curl -sf -o /dev/null -T crate-demo/target/package/demo-0.1.0.crate {url}/upload/crate && echo "curl uploaded"
python3 -c 'import requests
r = requests.post("{url}/upload/form", files={{"image": open("image.png", "rb"), "script": open("work/deploy.sh", "rb")}}, data={{"note": "AWS_SECRET_ACCESS_KEY is read from the environment"}})
print("form uploaded", r.status_code)'
"#,
        dir = dir.path().display(),
    );
    let (_, stdout, stderr) = output(
        portcullis()
            .env("MY_SECRET", "hunter2-very-secret-value")
            .args(["run", "--config"])
            .arg(&config)
            .args([
                "--allow",
                "files.test",
                "--allow-local-binding",
                "--resolve",
                "files.test=127.0.0.1",
                "--",
                "sh",
                "-c",
                &script,
            ]),
    )
    .await;
    let mut wanted = vec![
        "git pushed: through the proxy".to_owned(),
        "pip: demo_pkg-0.1.0-py3-none-any.whl".to_owned(),
        "cargo fetched: demo-0.1.0.crate".to_owned(),
        "curl uploaded".to_owned(),
        "form uploaded 201".to_owned(),
    ];
    if npm {
        wanted.push("npm: hello from npm".to_owned());
        wanted.push("npm published: demo-npm".to_owned());
    }
    for line in &wanted {
        assert!(
            stdout.lines().any(|l| l.starts_with(line.as_str())),
            "{line:?} missing:\n{stdout}\n{stderr}"
        );
    }
    let recorded = std::fs::read_to_string(&violations).unwrap_or_default();
    assert_eq!(recorded, "", "false positives:\n{recorded}\n{stderr}");
}
