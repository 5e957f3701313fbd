//! `run --isolate` and the machine's Unix sockets: a host listener is out of
//! reach unless opened by name, sockets the command makes itself work, a
//! racing thread cannot swap its way past the check, and one run's sockets
//! take no connection from anyone but its own bridge. Real processes: a
//! python listener on the host, python clients inside (as root and, with
//! `setpriv`, as an unprivileged user). Skipped, saying why, where user
//! namespaces are refused — unless `PORTCULLIS_ISOLATE_REQUIRED=1` (CI).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;

/// A listener on the host at `path` that answers each connection with a
/// line and counts them; stopped when the returned task is aborted.
fn host_listener(path: &Path) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            // The client's first bytes, then a line: a client that polls
            // its connect (curl) must not see the close before it looked.
            let mut first = [0u8; 256];
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio::io::AsyncReadExt::read(&mut stream, &mut first),
            )
            .await;
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, b"host\n").await;
        }
    });
    (accepted, task)
}

/// A directory every user can reach (the unprivileged runs need it).
fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// `portcullis run --isolate EXTRA -- sh -c SCRIPT`, as root or (when
/// `unprivileged` and we are root) as nobody through setpriv. The client
/// inside is curl (a system binary nobody may run, unlike a python under
/// root's home).
async fn isolated_shell(
    extra: &[&str],
    script: &str,
    unprivileged: bool,
    home: &Path,
) -> (Option<i32>, String, String) {
    let mut command = if unprivileged {
        portcullis_unprivileged()
    } else {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
    };
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home)
        .env("XDG_DATA_HOME", home)
        .args(["run", "--isolate"])
        .args(extra)
        .args(["--", "sh", "-c", script]);
    output(&mut command).await
}

/// What a curl client inside made of the host socket: `connected` (it
/// read the listener's line) or `refused` (curl's "could not connect").
fn outcome(stdout: &str) -> &'static str {
    if stdout.contains("host") {
        "connected"
    } else if stdout.contains("exit-7") {
        "refused"
    } else {
        "other"
    }
}

#[tokio::test]
async fn a_host_socket_is_out_of_reach_unless_opened_by_name() {
    if !namespaces_available().await {
        return;
    }
    let dir = shared_dir();
    let path = dir.path().join("host.sock");
    let (accepted, task) = host_listener(&path);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let script = format!(
        "curl -s --http0.9 --max-time 5 --unix-socket {} http://socket/; echo \" exit-$?\"",
        path.display()
    );
    for unprivileged in [false, true] {
        let (code, stdout, stderr) = isolated_shell(&[], &script, unprivileged, dir.path()).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(
            outcome(&stdout),
            "refused",
            "unprivileged {unprivileged}: {stdout}{stderr}"
        );
        assert!(
            stderr.contains("not created inside this run")
                && stderr.contains(&format!("--allow-unix-socket {}", path.display())),
            "{stderr}"
        );
        let (code, stdout, stderr) = isolated_shell(
            &["--allow-unix-socket", &path.display().to_string()],
            &script,
            unprivileged,
            dir.path(),
        )
        .await;
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(
            outcome(&stdout),
            "connected",
            "unprivileged {unprivileged}: {stdout}{stderr}"
        );
    }
    // Opened by the config's [run] unix_sockets too, and '*' opens all,
    // saying so.
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("[run]\nunix_sockets = [{:?}]\n", path.display().to_string()),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (_, stdout, stderr) = isolated_shell(
        &["--config", &config.display().to_string()],
        &script,
        false,
        dir.path(),
    )
    .await;
    assert_eq!(outcome(&stdout), "connected", "{stdout}{stderr}");
    let (_, stdout, stderr) =
        isolated_shell(&["--allow-unix-socket", "*"], &script, false, dir.path()).await;
    assert_eq!(outcome(&stdout), "connected", "{stdout}{stderr}");
    assert!(
        stderr.contains("every Unix socket on this machine"),
        "{stderr}"
    );
    // Exactly the connections that were let through reached it.
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    task.abort();
}

#[tokio::test]
async fn the_command_s_own_sockets_work_and_datagrams_and_odd_families_do_not() {
    if !namespaces_available().await {
        return;
    }
    let dir = shared_dir();
    // A test suite's own server on a path, a relative path, a socketpair,
    // an abstract socket: all the command's own.
    let script = r#"
import socket, os, threading
def serve(server):
    c, _ = server.accept(); c.sendall(b"inner"); c.close()
for path in ("/tmp/portcullis-test-%d.sock" % os.getpid(), "rel-%d.sock" % os.getpid(), "\0abstract-%d" % os.getpid()):
    server = socket.socket(socket.AF_UNIX); server.bind(path); server.listen(1)
    threading.Thread(target=serve, args=(server,)).start()
    client = socket.socket(socket.AF_UNIX); client.connect(path)
    print("own", client.recv(8).decode())
    if not path.startswith("\0"):
        os.unlink(path)
a, b = socket.socketpair(); a.sendall(b"pair"); print("pair", b.recv(4).decode())
for kind, family, label in ((socket.SOCK_DGRAM, socket.AF_UNIX, "unix-dgram"), (socket.SOCK_STREAM, 40, "vsock")):
    try:
        socket.socket(family, kind); print(label, "created")
    except OSError as e:
        print(label, "refused", e.errno)
try:
    socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM); print("dgram-pair created")
except OSError as e:
    print("dgram-pair refused", e.errno)
"#;
    let (code, stdout, stderr) = output(portcullis().current_dir(dir.path()).args([
        "run",
        "--isolate",
        "--",
        "python3",
        "-c",
        script,
    ]))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "own inner",
            "own inner",
            "own inner",
            "pair pair",
            "unix-dgram refused 13",
            "vsock refused 97",
            "dgram-pair refused 13",
        ],
        "{stderr}"
    );
}

#[tokio::test]
async fn a_racing_thread_cannot_swap_its_way_to_a_host_socket() {
    if !namespaces_available().await {
        return;
    }
    let dir = shared_dir();
    let host = dir.path().join("h.sock");
    let (accepted, task) = host_listener(&host);
    // Inside: its own listener at a path of the same length; one thread
    // connects in a loop through a sockaddr in shared memory while another
    // flips the path in that memory between the two, and a third swaps a
    // symlink's target between them. Bounded: 400 connects, 20 s.
    let script = format!(
        r#"
import ctypes, os, socket, threading, time
libc = ctypes.CDLL(None, use_errno=True)
host = {host:?}
inner = host[:-6] + "i.sock"
assert len(inner) == len(host)
server = socket.socket(socket.AF_UNIX); server.bind(inner); server.listen(512)
inner_count = [0]
def serve():
    while True:
        try:
            c, _ = server.accept()
        except OSError:
            return
        inner_count[0] += 1; c.close()
threading.Thread(target=serve, daemon=True).start()
class Addr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("path", ctypes.c_char * 108)]
addr = Addr(socket.AF_UNIX, inner.encode())
link = inner[:-6] + "l.sock"
os.symlink(inner, link)
stop = [False]
def flip_memory():
    names = [host.encode(), inner.encode()]
    i = 0
    while not stop[0]:
        ctypes.memmove(ctypes.addressof(addr) + 2, names[i % 2], len(names[0])); i += 1
def flip_link():
    i = 0
    while not stop[0]:
        tmp = link + ".new"; os.symlink([host, inner][i % 2], tmp); os.replace(tmp, link); i += 1
threading.Thread(target=flip_memory, daemon=True).start()
threading.Thread(target=flip_link, daemon=True).start()
deadline = time.time() + 20
refused = connected = 0
for n in range(400):
    if time.time() > deadline:
        break
    for target in (None, link):
        s = socket.socket(socket.AF_UNIX)
        if target is None:
            result = libc.connect(s.fileno(), ctypes.byref(addr), ctypes.sizeof(addr))
        else:
            try:
                s.connect(target); result = 0
            except OSError:
                result = -1
        if result == 0:
            connected += 1
        else:
            refused += 1
        s.close()
stop[0] = True
time.sleep(0.2)
print("connected", connected > 0, "refused", refused > 0, "inner", inner_count[0] > 0)
"#,
        host = host.display().to_string()
    );
    let (code, stdout, stderr) =
        output(portcullis().args(["run", "--isolate", "--", "python3", "-c", &script])).await;
    assert_eq!(code, Some(0), "{stderr}");
    // Both outcomes happened (the race was real), and the host socket
    // never took a connection.
    assert_eq!(
        stdout.trim(),
        "connected True refused True inner True",
        "{stderr}"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a swapped path reached the host socket"
    );
    task.abort();
}

/// The private directory of a run started by `child`: the newest
/// `portcullis-isolate-*` that appeared after `before`.
fn new_isolate_dir(before: &[PathBuf]) -> Option<PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("portcullis-isolate-"))
                && !before.contains(path)
                && path.join("capture.sock").exists()
        })
        .max_by_key(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
}

#[tokio::test]
async fn a_run_s_sockets_take_connections_from_its_bridge_alone() {
    if !namespaces_available().await {
        return;
    }
    let before: Vec<PathBuf> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    let run = portcullis()
        .args(["run", "--isolate", "--", "sleep", "20"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut dir = None;
    for _ in 0..100 {
        dir = new_isolate_dir(&before);
        if dir.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let dir = dir.expect("the run's directory appeared");
    // From outside the run (this test process, root here): each socket
    // closes without a byte, and nothing is decided for us.
    for socket in ["capture.sock", "dns.sock", "http.sock"] {
        let mut stream = tokio::net::UnixStream::connect(dir.join(socket))
            .await
            .unwrap();
        let _ = tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"127.0.0.1:1 127.0.0.1:9\nGET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
        )
        .await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer),
        )
        .await
        .expect("closed in time");
        assert!(
            read.is_err() || answer.is_empty(),
            "{socket} answered: {answer:?}"
        );
    }
    // SIGTERM: run passes it on, so the bridge and the command end too.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let finished = tokio::time::timeout(std::time::Duration::from_secs(10), run.wait_with_output())
        .await
        .expect("run ended on SIGTERM")
        .unwrap();
    let stderr = String::from_utf8_lossy(&finished.stderr);
    assert!(
        stderr.matches("not its bridge").count() >= 3,
        "each refusal is said: {stderr}"
    );
}
