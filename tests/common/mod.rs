//! Shared harness: a loopback origin server, a proxy started from the
//! library, and a curl runner. Everything binds 127.0.0.1:0.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use portcullis::middleware::{
    NetworkPolicy, NetworkPolicyBuilder, PolicyHandle, ViolationLogLayer, ViolationRing,
};
use portcullis::resolve::{StaticResolver, SystemResolver};
use portcullis::{Proxy, ProxyHandle};

/// An HTTP/1 origin on loopback that counts TCP connections, answers
/// `hello <path>` with the request header names in `x-seen-headers`, and
/// answers `Upgrade: websocket` with 101 and then echoes bytes. `/slow`
/// answers after 600 ms.
pub struct Origin {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
}

pub async fn origin() -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(answer);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Origin { addr, connections }
}

async fn answer(mut request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut names: Vec<String> = request
        .headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .collect();
    names.sort();
    if request.uri().path() == "/slow" {
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    }
    if request
        .headers()
        .get("upgrade")
        .is_some_and(|v| v == "websocket")
    {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buffer = [0u8; 1024];
                while let Ok(n) = io.read(&mut buffer).await {
                    if n == 0 || io.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        // `/ws-switches-to-h2c` and `/ws-bad-accept` answer as a broken or
        // hostile origin would: another protocol, a wrong accept key.
        let key = request
            .headers()
            .get("sec-websocket-key")
            .map(|key| tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
            .unwrap_or_default();
        let (upgrade, accept) = match request.uri().path() {
            "/ws-switches-to-h2c" => ("h2c", key),
            "/ws-bad-accept" => ("websocket", "c29tZXRoaW5nIGVsc2U=".to_owned()),
            _ => ("websocket", key),
        };
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", upgrade)
            .header("sec-websocket-accept", accept)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    Ok(Response::builder()
        .header("x-seen-headers", names.join(","))
        .header(
            "x-seen-host",
            request
                .headers()
                .get("host")
                .cloned()
                .unwrap_or_else(|| "".parse().unwrap()),
        )
        .body(Full::new(Bytes::from(format!(
            "hello {}",
            request.uri().path()
        ))))
        .unwrap())
}

pub struct TestProxy {
    pub handle: ProxyHandle,
    pub ring: ViolationRing,
}

impl TestProxy {
    pub fn http_url(&self) -> String {
        format!("http://{}", self.handle.http_addr())
    }

    pub fn socks_addr(&self) -> SocketAddr {
        self.handle.socks_addr().expect("SOCKS5 is on")
    }
}

/// Starts a proxy (HTTP and SOCKS5 on ephemeral loopback ports) with this
/// policy and static DNS answers; no upstream proxy.
pub async fn proxy(policy: NetworkPolicyBuilder, hosts: &[(&str, IpAddr)]) -> TestProxy {
    proxy_with(policy.build(), hosts, |b| b).await
}

pub async fn proxy_with(
    policy: NetworkPolicy,
    hosts: &[(&str, IpAddr)],
    configure: impl FnOnce(portcullis::ProxyBuilder) -> portcullis::ProxyBuilder,
) -> TestProxy {
    let mut table: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for (name, ip) in hosts {
        table.entry((*name).to_owned()).or_default().push(*ip);
    }
    let ring = ViolationRing::default();
    let builder = Proxy::builder()
        .socks_addr(Some("127.0.0.1:0".parse().unwrap()))
        .policy(PolicyHandle::new(policy))
        .resolver(Arc::new(StaticResolver::new(
            table,
            Arc::new(SystemResolver),
        )))
        .resolve_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
        .violations(ViolationLogLayer::new(ring.clone()));
    let handle = configure(builder).start().await.unwrap();
    TestProxy { handle, ring }
}

pub fn allow(patterns: &[&str]) -> NetworkPolicyBuilder {
    NetworkPolicy::builder()
        .allow_all(patterns.iter().copied())
        .unwrap()
}

pub struct CurlOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs curl (with every proxy variable cleared) and returns its output.
pub async fn curl(args: &[&str]) -> CurlOutput {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "20"])
            .args(args)
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output(),
    )
    .await
    .expect("curl finished in time")
    .expect("curl is installed");
    CurlOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The status code curl gets for `args` (its output is dropped): `"200"`,
/// `"407"`, …
pub async fn curl_status(args: &[&str]) -> String {
    let mut all = vec!["-s", "-o", "/dev/null", "-w", "%{http_code}"];
    all.extend_from_slice(args);
    curl(&all).await.stdout
}

/// Splits `curl -i` output into status, headers and body.
pub fn parse_response(text: &str) -> (u16, HashMap<String, String>, String) {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// Writes `request` on a fresh connection and reads the response head.
pub async fn raw_exchange(addr: SocketAddr, request: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    (stream, head)
}

pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
    })
    .await
    .expect("response head in time");
    String::from_utf8_lossy(&head).into_owned()
}

/// The body after `head` on `stream`, as long as its `Content-Length` says
/// (empty without one).
pub async fn read_body<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, head: &str) -> Vec<u8> {
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    body
}

/// A loopback port that refuses connections for the rest of the test run:
/// a socket is bound to it and never listens (so a connect gets RST), and it
/// is kept, so neither another test nor the kernel (as an ephemeral source
/// port, which could make a connect to it a self-connection) reuses it.
pub async fn closed_port() -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    std::mem::forget(socket);
    port
}

/// The `portcullis` binary with every proxy variable cleared.
pub fn portcullis() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    for name in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "PORTCULLIS_CONFIG",
        "PORTCULLIS_LOG",
        "PORTCULLIS_LOG_FORMAT",
    ] {
        command.env_remove(name);
    }
    command.kill_on_drop(true);
    command
}

/// The HTTP listener of a `serve` child, from the first line it prints.
pub async fn served_http_address(child: &mut tokio::process::Child) -> std::net::SocketAddr {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    first
        .strip_prefix("export HTTP_PROXY='http://")
        .and_then(|r| r.strip_suffix('\''))
        .expect(&first)
        .parse()
        .unwrap()
}

/// `serve --config CONFIG` on an ephemeral HTTP port, no SOCKS5, its
/// stderr piped (for [`terminate`]): the child and its proxy URL.
pub async fn serve_config(config: &std::path::Path) -> (tokio::process::Child, String) {
    let mut child = portcullis()
        .args(["serve", "--config"])
        .arg(config)
        .args(["--http", "127.0.0.1:0", "--no-socks"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let proxy = format!("http://{}", served_http_address(&mut child).await);
    (child, proxy)
}

/// Sends SIGTERM to a `serve` child and waits (bounded) for it: its exit
/// status and whatever it wrote to a piped stderr.
pub async fn terminate(child: &mut tokio::process::Child) -> (std::process::ExitStatus, String) {
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ =
            tokio::time::timeout(Duration::from_secs(20), pipe.read_to_string(&mut stderr)).await;
    }
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exited in time")
        .unwrap();
    (status, stderr)
}

/// Runs `command` to the end (within 60 s): its exit code, stdout, stderr.
pub async fn output(command: &mut tokio::process::Command) -> (Option<i32>, String, String) {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("finished in time")
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A config file in `dir` with only a `[mitm]` table: the CA in `dir/ca`,
/// and `pem` (an origin's certificate, as [`https_origin`] gives it)
/// trusted for upstreams.
pub fn mitm_config(dir: &std::path::Path, pem: &str) -> std::path::PathBuf {
    let origin_ca = dir.join("origin.pem");
    std::fs::write(&origin_ca, pem).unwrap();
    let config = dir.join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[mitm]\nca_dir = {:?}\nupstream_ca_files = [{:?}]\n",
            dir.join("ca").display().to_string(),
            origin_ca.display().to_string()
        ),
    )
    .unwrap();
    config
}

/// An HTTPS origin for `secure.test` with a self-signed certificate; the
/// PEM is what clients trust.
pub async fn https_origin() -> (SocketAddr, String) {
    let (pem, acceptor) = self_signed_acceptor("secure.test", &[]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                // `/whoami` answers the Authorization header it got.
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let body = if request.uri().path() == "/whoami" {
                            let auth = request
                                .headers()
                                .get("authorization")
                                .map_or("none", |v| v.to_str().unwrap_or("?"));
                            Bytes::from(format!("auth {auth}"))
                        } else {
                            Bytes::from_static(b"secure hello")
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(body)))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, pem)
}

/// A tmux server of the test's own (its own socket), killed when dropped,
/// with the process it started, even when the test fails.
pub struct Tmux {
    socket: String,
    pid_file: tempfile::NamedTempFile,
}

impl Tmux {
    /// Starts `command` in a detached session of a new tmux server; the
    /// command runs through `exec`, so its pid is the one recorded.
    pub fn start(command: &str) -> Tmux {
        let pid_file = tempfile::NamedTempFile::new().unwrap();
        let socket = format!(
            "portcullis-test-{}-{}",
            std::process::id(),
            NEXT_TMUX.fetch_add(1, Ordering::SeqCst)
        );
        let tmux = Tmux { socket, pid_file };
        let wrapped = format!(
            "echo $$ > {}; exec {command}",
            tmux.pid_file.path().display()
        );
        tmux.run(&["new-session", "-d", "-x", "220", "-y", "50", &wrapped]);
        tmux
    }

    /// Runs a tmux command on this server; its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The pane's text.
    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-J"])
    }

    /// The started command's pid, once it has written it (bounded wait).
    pub async fn pid(&self) -> i32 {
        for _ in 0..100 {
            if let Ok(pid) = std::fs::read_to_string(self.pid_file.path())
                .unwrap()
                .trim()
                .parse()
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the command in tmux did not start");
    }

    /// Closes the terminal: the whole tmux server goes, as when a terminal
    /// window is closed.
    pub fn hang_up(&self) {
        self.run(&["kill-server"]);
    }
}

static NEXT_TMUX: AtomicUsize = AtomicUsize::new(0);

impl Drop for Tmux {
    fn drop(&mut self) {
        self.hang_up();
        let pid = std::fs::read_to_string(self.pid_file.path())
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether process `pid` is gone (or a zombie nobody reaped), within
/// `wait`.
pub async fn exits_within(pid: i32, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie (state Z after the command name).
        if status.is_empty()
            || status
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Request rules for `host`: any GET or HEAD, POST only under /issues/,
/// never /secret/ (shared by the request-rules and interception tests).
pub fn sample_rules(host: &str) -> portcullis::middleware::request_rules::RequestRules {
    use portcullis::middleware::request_rules::{RequestRules, RuleBlock, RuleEntry};
    RequestRules::new(vec![RuleBlock::new(host, "rules[0]")
        .unwrap()
        .allow(RuleEntry::new().methods(["GET", "HEAD"]).unwrap())
        .allow(
            RuleEntry::new()
                .methods(["POST"])
                .unwrap()
                .paths(["/issues/**"])
                .unwrap(),
        )
        .deny(RuleEntry::new().paths(["/secret/**"]).unwrap())])
}

/// Whether unprivileged user and network namespaces work here (`unshare
/// -Urn true`): `run --isolate` needs them. When they do not, the test is
/// skipped saying why — unless `PORTCULLIS_ISOLATE_REQUIRED=1` (CI sets it),
/// where that fails the test.
#[allow(clippy::print_stdout, dead_code)]
pub async fn namespaces_available() -> bool {
    let ok = tokio::process::Command::new("unshare")
        .args(["-Urn", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
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

/// This build's `portcullis`, run as nobody (uid and gid 65534, through
/// `setpriv`) when the tests run as root — as a user would run it — and as
/// the current user otherwise. The environment is the caller's to set.
#[allow(dead_code)]
pub fn portcullis_unprivileged() -> tokio::process::Command {
    let binary = env!("CARGO_BIN_EXE_portcullis");
    if nix::unistd::Uid::effective().is_root() {
        let mut command = tokio::process::Command::new("setpriv");
        command.args(["--reuid=65534", "--regid=65534", "--clear-groups", binary]);
        command
    } else {
        tokio::process::Command::new(binary)
    }
}

/// A system call a simulated kernel or container refuses: its number, an
/// argument that must hold a value for the refusal (`(index, value)`, low
/// 32 bits), and the errno it fails with.
#[allow(dead_code)]
pub type Refusal = (i64, Option<(u32, u32)>, i32);

/// Arranges for `command`'s process, and everything it starts, to see the
/// `refused` system calls fail — as a kernel without them, or a container
/// or LSM that denies them, would — through a seccomp filter installed
/// just before `exec` (`no_new_privs` first).
#[allow(dead_code, unsafe_code)]
pub fn refusing(command: &mut tokio::process::Command, refused: &[Refusal]) {
    use nix::libc;
    let statement = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: 0x15, // BPF_JMP | BPF_JEQ | BPF_K
        jt,
        jf,
        k,
    };
    const LOAD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const RETURN: u16 = 0x06;
    let mut program = Vec::new();
    for &(number, argument, errno) in refused {
        program.push(statement(LOAD, 0));
        let fail = statement(RETURN, libc::SECCOMP_RET_ERRNO | errno as u32);
        match argument {
            None => {
                program.push(jump(number as u32, 0, 1));
                program.push(fail);
            }
            Some((index, value)) => {
                program.push(jump(number as u32, 0, 3));
                program.push(statement(LOAD, 16 + 8 * index));
                program.push(jump(value, 0, 1));
                program.push(fail);
            }
        }
    }
    program.push(statement(RETURN, libc::SECCOMP_RET_ALLOW));
    let hook = move || -> std::io::Result<()> {
        let fprog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: prctl and seccomp read their integers and the program,
        // which outlives the call; nothing is allocated between fork and
        // exec.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &fprog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook makes two system calls on memory prepared before
    // the fork, as pre_exec requires.
    unsafe {
        command.pre_exec(hook);
    }
}

/// A python3 server started with `args` that prints its port (bound on
/// `127.0.0.1:0`) as its first line, stopped when dropped; `None` (said,
/// and the test skipped) where the `module` it needs is missing — an
/// error under CI, which installs it (`.ci/run`).
#[allow(clippy::print_stdout, dead_code)]
pub async fn python_server(args: &[&str], module: &str) -> Option<(tokio::process::Child, u16)> {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new("python3")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let stdout = child.stdout.take()?;
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await;
    match line.trim().parse::<u16>() {
        Ok(port) if matches!(read, Ok(Ok(_))) => Some((child, port)),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "python3 with {module} is required under CI (.ci/run installs it)"
            );
            println!("note: python3 {module} missing; skipped");
            None
        }
    }
}

/// A static file server for `root` (git's dumb HTTP and a PEP 503 index).
pub async fn files(root: PathBuf) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let root = root.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let root = root.clone();
                    async move { Ok::<_, Infallible>(serve_file(&root, request.uri().path())) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

pub fn serve_file(root: &Path, path: &str) -> Response<Full<Bytes>> {
    let relative = path.trim_start_matches('/');
    let mut file = root.join(relative);
    if relative.split('/').any(|part| part == "..") {
        file = root.join("missing");
    }
    if file.is_dir() {
        file = file.join("index.html");
    }
    let content_type = if file.extension().is_some_and(|e| e == "html") {
        "text/html"
    } else {
        "application/octet-stream"
    };
    match std::fs::read(&file) {
        Ok(bytes) => Response::builder()
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(bytes)))
            .unwrap(),
        Err(_) => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"not found")))
            .unwrap(),
    }
}

/// A PEP 503 index under `root` (`simple/`, `packages/`) holding one
/// wheel, `demo-pkg` 0.1.0; returns the wheel's file name.
pub async fn pip_index(root: &Path) -> &'static str {
    let wheel = "demo_pkg-0.1.0-py3-none-any.whl";
    let make_wheel = format!(
        r#"
import zipfile, base64, hashlib
files = {{
    "demo_pkg/__init__.py": b"VERSION = '0.1.0'\n",
    "demo_pkg-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 0.1.0\n",
    "demo_pkg-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}}
record = ""
for name, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record += f"{{name}},sha256={{digest}},{{len(data)}}\n"
record += "demo_pkg-0.1.0.dist-info/RECORD,,\n"
with zipfile.ZipFile("{root}/packages/{wheel}", "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
    z.writestr("demo_pkg-0.1.0.dist-info/RECORD", record)
"#,
        root = root.display()
    );
    std::fs::create_dir_all(root.join("packages")).unwrap();
    std::fs::create_dir_all(root.join("simple/demo-pkg")).unwrap();
    let status = tokio::process::Command::new("python3")
        .args(["-c", &make_wheel])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    std::fs::write(
        root.join("simple/index.html"),
        "<!DOCTYPE html><html><body><a href=\"demo-pkg/\">demo-pkg</a></body></html>",
    )
    .unwrap();
    std::fs::write(
        root.join("simple/demo-pkg/index.html"),
        format!("<!DOCTYPE html><html><body><a href=\"../../packages/{wheel}\">{wheel}</a></body></html>"),
    )
    .unwrap();
    wheel
}

/// A TLS acceptor with a self-signed certificate for `name` (a host name
/// or an IP address) offering `alpn`; the certificate's PEM is what
/// clients trust.
pub fn self_signed_acceptor(name: &str, alpn: &[&[u8]]) -> (String, tokio_rustls::TlsAcceptor) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (
        certified.cert.pem(),
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    )
}

/// A bare repository `root/repo.git` with one commit (`message`), made in
/// `work`, ready for git's dumb HTTP.
pub async fn dumb_git_repo(root: &Path, work: &Path, message: &str) {
    let setup = format!(
        r#"set -e
git init -q -b main {work}
git -C {work} -c user.name=t -c user.email=t@t commit -q --allow-empty -m "{message}"
git clone -q --bare {work} {root}/repo.git
git -C {root}/repo.git update-server-info
"#,
        work = work.display(),
        root = root.display()
    );
    let status = tokio::process::Command::new("sh")
        .args(["-c", &setup])
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

/// A policy for the record tests: loopback allowed, `rules.test` ruled
/// (GET only, enforced), `audit.test` ruled in audit mode, both on
/// loopback; the rest of the file is the caller's.
pub const RULED_AND_AUDITED: &str = r#"
[network]
allowed_domains = ["127.0.0.1", "rules.test", "audit.test"]
allow_local_binding = true

[dns.hosts]
"rules.test" = ["127.0.0.1"]
"audit.test" = ["127.0.0.1"]

[[rules]]
host = "rules.test"
allow = [ { methods = ["GET"] } ]

[[rules]]
host = "audit.test"
enforce = false
allow = [ { methods = ["GET"] } ]
"#;
