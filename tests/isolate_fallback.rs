//! `run --isolate` where user namespaces are refused: the command is fenced
//! on the machine's network with Landlock and seccomp, says so once, and
//! still reaches only the proxy; where the fence cannot be had either, it
//! refuses to start unless `--isolate=best-effort`.
//!
//! The refusals are simulated with a seccomp filter on `portcullis` itself
//! ([`refusing`]): `unshare` failing with `EPERM` (a kernel or container
//! that refuses user namespaces), `SIOCSIFFLAGS` failing (Ubuntu 24.04's
//! AppArmor: the namespace is made, its capabilities denied),
//! `landlock_create_ruleset` failing with `ENOSYS` (a kernel without
//! Landlock), `SECCOMP_GET_ACTION_AVAIL` failing (no user notification).
//! A real python client inside tries every way out. Skipped, saying why,
//! where this kernel has no Landlock network rules (ABI 4, Linux 6.7).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::path::Path;

use common::*;
use nix::libc;

/// `unshare` refused, as a kernel or container without user namespaces.
const NO_USER_NAMESPACES: Refusal = (libc::SYS_unshare, None, libc::EPERM);
/// Bringing loopback up refused: the namespace is made but holds no
/// capability (Ubuntu's `apparmor_restrict_unprivileged_userns`).
const NO_CAPABILITIES: Refusal = (
    libc::SYS_ioctl,
    Some((1, libc::SIOCSIFFLAGS as u32)),
    libc::EPERM,
);
/// A kernel without Landlock.
const NO_LANDLOCK: Refusal = (libc::SYS_landlock_create_ruleset, None, libc::ENOSYS);
/// A kernel without seccomp user notification.
const NO_USER_NOTIFICATION: Refusal = (
    libc::SYS_seccomp,
    Some((0, libc::SECCOMP_GET_ACTION_AVAIL)),
    libc::EOPNOTSUPP,
);

/// This kernel's Landlock ABI where it has network rules (ABI 4+), asked
/// independently of portcullis (python's ctypes); says why not.
async fn landlock_network_rules() -> Option<i64> {
    let (_, stdout, _) = output(tokio::process::Command::new("python3").args([
        "-c",
        "import ctypes; print(ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1))",
    ]))
    .await;
    let abi: i64 = stdout.trim().parse().unwrap_or(-1);
    if abi < 4 {
        println!("skipped: this kernel has no Landlock network rules (ABI {abi}, needs 4)");
        return None;
    }
    Some(abi)
}

/// Tries every way out and prints one line each: `NAME ok` or `NAME
/// errno`. argv: origin port, host Unix socket, host abstract name, a pid
/// outside the run.
const PROBE: &str = r#"
import os, socket, sys, threading, urllib.request
port, host_unix, host_abstract, outside = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def t(name, f):
    try:
        f(); print(name, "ok", flush=True)
    except OSError as e:
        print(name, e.errno, flush=True)
    except Exception as e:
        print(name, "error", repr(e), flush=True)
def proxied():
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/through", timeout=10) as r:
        assert r.read().startswith(b"hello"), "origin"
t("proxied", proxied)
t("direct", lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
t("remote", lambda: socket.create_connection(("192.0.2.1", 80), timeout=5))
t("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
t("udp6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
t("sctp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132))
t("fastopen", lambda: socket.socket().sendto(b"x", 0x20000000, ("127.0.0.1", port)))
def bind_any():
    socket.socket().bind(("0.0.0.0", 0))
t("bind-any", bind_any)
def listen_unbound():
    socket.socket().listen()
t("listen-unbound", listen_unbound)
def own_server():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
    threading.Thread(target=lambda: s.accept()[0].sendall(b"own"), daemon=True).start()
    c = socket.create_connection(s.getsockname(), timeout=5)
    assert c.recv(3) == b"own"
t("own-server", own_server)
def unix(address):
    def go():
        c = socket.socket(socket.AF_UNIX); c.settimeout(5); c.connect(address)
        assert c.recv(4) == b"host"
    return go
t("host-unix", unix(host_unix))
t("host-abstract", unix("\0" + host_abstract))
def own_abstract():
    name = "\0portcullis-fallback-own-%d" % os.getpid()
    s = socket.socket(socket.AF_UNIX); s.bind(name); s.listen()
    threading.Thread(target=lambda: s.accept()[0].sendall(b"own"), daemon=True).start()
    c = socket.socket(socket.AF_UNIX); c.connect(name)
    assert c.recv(3) == b"own"
t("own-abstract", own_abstract)
def trace():
    open(f"/proc/{outside}/environ", "rb").read(1)
t("trace", trace)
t("signal", lambda: os.kill(int(outside), 0))
"#;

/// A host listener at the Unix `address` (a path, or `\0name`) that
/// answers `host` to each connection; stopped when the task is aborted.
fn host_listener(address: &str) -> tokio::task::JoinHandle<()> {
    use std::os::linux::net::SocketAddrExt;
    let address = match address.strip_prefix('\0') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap(),
        None => std::os::unix::net::SocketAddr::from_pathname(address).unwrap(),
    };
    let listener = std::os::unix::net::UnixListener::bind_addr(&address).unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::UnixListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, b"host").await;
        }
    })
}

/// `portcullis run ISOLATE EXTRA -- python3 PROBE …` with `refused`
/// system calls failing: its exit code, the probe's lines as (name,
/// outcome), stderr.
async fn probe(
    refused: &[Refusal],
    isolate: &str,
    extra: &[&str],
    dir: &Path,
) -> (Option<i32>, Vec<(String, String)>, String) {
    let origin = origin().await;
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let host_unix = dir.join("host.sock");
    let _ = std::fs::remove_file(&host_unix);
    let name = format!("portcullis-fallback-host-{}-{n}", std::process::id());
    let unix_task = host_listener(host_unix.to_str().unwrap());
    let abstract_task = host_listener(&format!("\0{name}"));
    let script = dir.join("probe.py");
    std::fs::write(&script, PROBE).unwrap();
    let mut command = portcullis();
    command
        .args([
            "run",
            isolate,
            "--allow",
            "127.0.0.1",
            "--allow-local-binding",
        ])
        .args(extra)
        .args(["--", "python3"])
        .arg(&script)
        .arg(origin.addr.port().to_string())
        .arg(&host_unix)
        .arg(&name)
        .arg(std::process::id().to_string());
    refusing(&mut command, refused);
    let (code, stdout, stderr) = output(&mut command).await;
    unix_task.abort();
    abstract_task.abort();
    let lines = stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(name, outcome)| (name.to_owned(), outcome.to_owned()))
        .collect();
    (code, lines, stderr)
}

fn outcome<'a>(lines: &'a [(String, String)], name: &str) -> &'a str {
    lines
        .iter()
        .find(|(n, _)| n == name)
        .map_or("missing", |(_, outcome)| outcome.as_str())
}

const EACCES: &str = "13";

#[tokio::test]
async fn without_user_namespaces_the_command_is_fenced_and_reaches_only_the_proxy() {
    let Some(abi) = landlock_network_rules().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (code, lines, stderr) = probe(&[NO_USER_NAMESPACES], "--isolate", &[], dir.path()).await;
    assert_eq!(code, Some(0), "{lines:?} {stderr}");
    let expected = [
        ("proxied", "ok"),
        ("direct", EACCES),
        ("remote", EACCES),
        ("udp", EACCES),
        ("udp6", EACCES),
        ("sctp", EACCES),
        ("fastopen", EACCES),
        ("bind-any", EACCES),
        ("listen-unbound", EACCES),
        ("own-server", "ok"),
        ("host-unix", EACCES),
        ("host-abstract", EACCES),
        ("own-abstract", "ok"),
    ];
    for (name, wanted) in expected {
        assert_eq!(outcome(&lines, name), wanted, "{name}: {lines:?}\n{stderr}");
    }
    // Landlock's scopes (ABI 6): no signal to a process outside the run;
    // its ptrace scope holds for users without CAP_SYS_PTRACE (not root).
    if abi >= 6 {
        assert_eq!(outcome(&lines, "signal"), "1", "{lines:?}");
    }
    if !nix::unistd::Uid::effective().is_root() {
        assert_eq!(outcome(&lines, "trace"), EACCES, "{lines:?}");
    }
    // Said once, at the start, with what is not covered.
    assert_eq!(
        stderr
            .matches("fenced with Landlock and seccomp instead")
            .count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("refuses user namespaces (unshare: EPERM"),
        "{stderr}"
    );
    assert!(
        stderr.contains("no policy DNS, no transparent capture"),
        "{stderr}"
    );
    // Each refusal names what was refused and why.
    assert!(
        stderr.contains("refused a direct connection to 192.0.2.1:80"),
        "{stderr}"
    );
    assert!(stderr.contains("refused binding 0.0.0.0:0"), "{stderr}");
    assert!(stderr.contains("pass --allow-unix-socket"), "{stderr}");

    // A socket opened by name is reached.
    let opened = dir.path().join("host.sock");
    let (code, lines, stderr) = probe(
        &[NO_USER_NAMESPACES],
        "--isolate",
        &["--allow-unix-socket", opened.to_str().unwrap()],
        dir.path(),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(outcome(&lines, "host-unix"), "ok", "{lines:?} {stderr}");
    assert_eq!(outcome(&lines, "host-abstract"), EACCES, "{lines:?}");
}

#[tokio::test]
async fn a_namespace_without_capabilities_falls_back_too() {
    if landlock_network_rules().await.is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, lines, stderr) = probe(&[NO_CAPABILITIES], "--isolate", &[], dir.path()).await;
    assert_eq!(code, Some(0), "{lines:?} {stderr}");
    assert!(stderr.contains("bringing up lo"), "{stderr}");
    assert!(
        stderr.contains("fenced with Landlock and seccomp"),
        "{stderr}"
    );
    assert_eq!(outcome(&lines, "proxied"), "ok", "{lines:?}");
    assert_eq!(outcome(&lines, "direct"), EACCES, "{lines:?}");
}

#[tokio::test]
async fn without_landlock_isolate_refuses_to_start_unless_best_effort() {
    let dir = tempfile::tempdir().unwrap();
    let (code, lines, stderr) = probe(
        &[NO_USER_NAMESPACES, NO_LANDLOCK],
        "--isolate",
        &[],
        dir.path(),
    )
    .await;
    assert_eq!(code, Some(69), "{lines:?} {stderr}");
    assert!(lines.is_empty(), "the command must not run: {lines:?}");
    assert!(stderr.contains("this kernel has no Landlock"), "{stderr}");
    assert!(stderr.contains("--isolate=best-effort"), "{stderr}");

    // Best effort: seccomp alone, said; the supervisor still decides.
    let (code, lines, stderr) = probe(
        &[NO_USER_NAMESPACES, NO_LANDLOCK],
        "--isolate=best-effort",
        &[],
        dir.path(),
    )
    .await;
    assert_eq!(code, Some(0), "{lines:?} {stderr}");
    assert!(stderr.contains("fenced with seccomp alone"), "{stderr}");
    assert!(stderr.contains("can trace and signal"), "{stderr}");
    assert_eq!(outcome(&lines, "proxied"), "ok", "{lines:?}");
    assert_eq!(outcome(&lines, "direct"), EACCES, "{lines:?}");
    assert_eq!(outcome(&lines, "udp"), EACCES, "{lines:?}");
    assert_eq!(outcome(&lines, "host-unix"), EACCES, "{lines:?}");

    // Neither: best effort runs it unisolated, and says so.
    let (code, lines, stderr) = probe(
        &[NO_USER_NAMESPACES, NO_LANDLOCK, NO_USER_NOTIFICATION],
        "--isolate=best-effort",
        &[],
        dir.path(),
    )
    .await;
    assert_eq!(code, Some(0), "{lines:?} {stderr}");
    assert!(stderr.contains("the command is NOT isolated"), "{stderr}");
    assert_eq!(outcome(&lines, "direct"), "ok", "{lines:?}");
}
