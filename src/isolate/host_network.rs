//! Under `run --isolate` where user namespaces are refused: the command
//! shares the machine's network, so the seccomp supervisor
//! ([`super::unix_sockets`]) decides TCP and abstract Unix sockets too.
//!
//! - **`connect` over TCP** reaches only a loopback address whose listening
//!   socket belongs to this run: the proxy (held by `portcullis run`, the
//!   bridge's parent) or a server the command started. Anything else —
//!   another host, a service of the machine on loopback (a database, an
//!   SSH forward, another proxy) — fails with `EACCES`, said once.
//! - **`bind` over TCP** takes loopback addresses only, and **`listen`**
//!   only on a socket so bound: nothing outside the machine can connect in.
//!   A Unix socket binds as it would (the call goes on in the kernel, where
//!   Landlock refuses a TCP bind that was swapped in meanwhile).
//! - **abstract Unix sockets** (the machine's, without a namespace) reach
//!   only a listener of this run, or every one under `--allow-unix-socket
//!   '*'`.
//!
//! Whose a listener is: `sock_diag` gives the inode of the socket
//! listening at that address or name; the run's processes are the bridge's
//! descendants (it is their subreaper), and a process holds the socket when
//! one of its `/proc/PID/fd` links names `socket:[INODE]`. A process whose
//! descriptors cannot be read (it made itself non-dumpable) holds nothing,
//! so the call is refused.

use std::collections::HashSet;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;

use nix::libc;
use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};

use super::sock_diag;
use crate::sys::seccomp;

/// What the supervisor answers a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The call returns this value, or fails with this errno when not 0.
    Done(i64, i32),
    /// The call goes on in the kernel as made.
    Continue,
}

impl Answer {
    pub(crate) fn from_result(result: io::Result<()>) -> Answer {
        match result {
            Ok(()) => Answer::Done(0, 0),
            Err(error) => Answer::Done(-1, error.raw_os_error().unwrap_or(libc::EACCES)),
        }
    }

    pub(crate) fn failed(errno: i32) -> Answer {
        Answer::Done(-1, errno)
    }
}

/// What the supervisor remembers across calls: what it said (each once),
/// and the sockets it found to be the command's.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    said: Mutex<Vec<String>>,
    ours: Mutex<HashSet<u32>>,
}

/// How many different refusals are said; after that, silence.
const SAY_AT_MOST: usize = 64;

impl Memory {
    /// Writes `line` to stderr (the user's: the bridge has no log of its
    /// own) the first time `subject` is refused.
    pub(crate) fn say_once(&self, subject: &str, line: impl FnOnce() -> String) {
        let mut said = self
            .said
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if said.len() < SAY_AT_MOST && !said.iter().any(|s| s == subject) {
            said.push(subject.to_owned());
            let _ = writeln!(io::stderr(), "portcullis: {}", line());
        }
    }

    /// Whether one of `sockets` (inodes) is held by a process of the
    /// command. A socket found to be the run's stays known: inode numbers
    /// are not reused while the socket lives.
    fn held_by_command(&self, sockets: &[u32]) -> bool {
        let mut ours = self
            .ours
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if sockets.iter().any(|socket| ours.contains(socket)) {
            return true;
        }
        match held_by(sockets, descendants(std::process::id())) {
            Some(socket) => {
                ours.insert(socket);
                true
            }
            None => false,
        }
    }

    /// Whether one of `sockets` is held by `portcullis run` (the proxy,
    /// the bridge's parent).
    fn held_by_proxy(&self, sockets: &[u32]) -> bool {
        held_by(
            sockets,
            vec![nix::unistd::getppid().as_raw().unsigned_abs()],
        )
        .is_some()
    }
}

/// The first of `sockets` one of `processes` holds.
fn held_by(sockets: &[u32], processes: Vec<u32>) -> Option<u32> {
    if sockets.is_empty() {
        return None;
    }
    processes
        .into_iter()
        .find_map(|pid| sockets.iter().copied().find(|&socket| holds(pid, socket)))
}

/// `connect` of a TCP socket to `address` (raw, as the caller passed it).
/// `proxy_ports` are the proxy's: reached only where `portcullis run`
/// itself listens (not its other listeners, nor another process's).
pub(crate) fn connect_tcp(
    socket: &OwnedFd,
    address: &[u8],
    proxy_ports: &[u16],
    memory: &Memory,
) -> Answer {
    let Some(destination) = inet_address(address) else {
        // Not an IP address (AF_UNSPEC dissolves a connection): no
        // destination to reach.
        return Answer::from_result(seccomp::connect_raw(socket.as_fd(), address));
    };
    let ours = is_loopback(destination.ip())
        && sock_diag::tcp_listeners(destination).is_ok_and(|sockets| {
            memory.held_by_command(&sockets)
                || (proxy_ports.contains(&destination.port()) && memory.held_by_proxy(&sockets))
        });
    if !ours {
        memory.say_once(&destination.to_string(), || format!(
            "refused a direct connection to {destination}: under --isolate without namespaces the command reaches the network only through the proxy its variables name (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY); connections that ignore them are refused, not captured"
        ));
        return Answer::failed(libc::EACCES);
    }
    Answer::from_result(seccomp::connect_raw(socket.as_fd(), address))
}

/// `connect` of a Unix socket to the abstract `name`: a listener of the
/// run's only.
pub(crate) fn connect_abstract(
    socket: &OwnedFd,
    address: &[u8],
    name: &[u8],
    memory: &Memory,
) -> Answer {
    let sockets: Vec<u32> = sock_diag::unix_listeners()
        .unwrap_or_default()
        .into_iter()
        .filter(|listener| listener.abstract_name.as_deref() == Some(name))
        .map(|listener| listener.socket)
        .collect();
    if !memory.held_by_command(&sockets) {
        let shown = String::from_utf8_lossy(name).into_owned();
        memory.say_once(&format!("@{shown}"), || format!(
            "refused a connection to the abstract Unix socket @{shown}: it was not created inside this run, and without namespaces abstract sockets are the machine's; pass --allow-unix-socket '*' to open every Unix socket"
        ));
        return Answer::failed(libc::EACCES);
    }
    Answer::from_result(seccomp::connect_raw(socket.as_fd(), address))
}

/// Whether a listener of the command's is bound to the file `(device, inode)`.
pub(crate) fn file_listened_by_run(device: u64, inode: u64, memory: &Memory) -> bool {
    match sock_diag::unix_listeners() {
        Ok(listeners) => {
            let sockets: Vec<u32> = listeners
                .into_iter()
                .filter(|listener| {
                    listener
                        .file
                        .is_some_and(|file| sock_diag::same_file(file, device, inode))
                })
                .map(|listener| listener.socket)
                .collect();
            memory.held_by_command(&sockets)
        }
        Err(error) => {
            let _ = writeln!(
                io::stderr(),
                "portcullis: cannot list the machine's Unix sockets ({error}); refusing the connection"
            );
            false
        }
    }
}

/// `bind(socket, address)`: TCP on loopback only, done here on the copy;
/// anything else goes on in the kernel.
pub(crate) fn bind(socket: &OwnedFd, address: &[u8], memory: &Memory) -> Answer {
    if !is_inet(socket) {
        return Answer::Continue;
    }
    match inet_address(address) {
        Some(local) if is_loopback(local.ip()) => {
            Answer::from_result(seccomp::bind_raw(socket.as_fd(), address))
        }
        local => {
            let shown =
                local.map_or_else(|| "an unspecified address".to_owned(), |a| a.to_string());
            memory.say_once(&format!("bind {shown}"), || format!(
                "refused binding {shown}: under --isolate without namespaces the command may listen on loopback only (127.0.0.1, ::1)"
            ));
            Answer::failed(libc::EACCES)
        }
    }
}

/// `listen(socket, backlog)`: a TCP socket only once bound to loopback
/// (not the kernel's bind to every address on `listen`), on the copy.
pub(crate) fn listen(socket: &OwnedFd, backlog: i32, memory: &Memory) -> Answer {
    if is_inet(socket) {
        let local = getsockname::<SockaddrStorage>(socket.as_raw_fd())
            .ok()
            .and_then(|storage| {
                storage
                    .as_sockaddr_in()
                    .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
                    .or_else(|| {
                        storage
                            .as_sockaddr_in6()
                            .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
                    })
            });
        let bound = local.is_some_and(|local| is_loopback(local.ip()) && local.port() != 0);
        if !bound {
            memory.say_once("listen", || {
                "refused listening on a TCP socket not bound to loopback: under --isolate without namespaces the command may listen on loopback only (bind 127.0.0.1 or ::1 first)".to_owned()
            });
            return Answer::failed(libc::EACCES);
        }
    }
    // The kernel caps what it is given at its own maximum; nix refuses
    // beyond libc's SOMAXCONN, so anything above (or negative) asks for
    // the kernel's maximum.
    let backlog =
        nix::sys::socket::Backlog::new(backlog).unwrap_or(nix::sys::socket::Backlog::MAXALLOWABLE);
    Answer::from_result(nix::sys::socket::listen(socket, backlog).map_err(io::Error::from))
}

/// Whether `socket` is an IPv4 or IPv6 socket.
fn is_inet(socket: &OwnedFd) -> bool {
    getsockname::<SockaddrStorage>(socket.as_raw_fd())
        .ok()
        .and_then(|storage| storage.family())
        .is_some_and(|family| matches!(family, AddressFamily::Inet | AddressFamily::Inet6))
}

/// A raw `sockaddr_in` or `sockaddr_in6` as an address (`None` for any
/// other family or a short one).
pub(crate) fn inet_address(raw: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*raw.first()?, *raw.get(1)?]);
    let port = u16::from_be_bytes([*raw.get(2)?, *raw.get(3)?]);
    if family == libc::AF_INET as u16 && raw.len() >= 16 {
        let ip: [u8; 4] = raw.get(4..8)?.try_into().ok()?;
        return Some(SocketAddr::from((Ipv4Addr::from(ip), port)));
    }
    // SIN6_LEN_RFC2133: the kernel takes a sockaddr_in6 without its scope.
    if family == libc::AF_INET6 as u16 && raw.len() >= 24 {
        let ip: [u8; 16] = raw.get(8..24)?.try_into().ok()?;
        return Some(SocketAddr::from((Ipv6Addr::from(ip), port)));
    }
    None
}

/// 127.0.0.0/8, `::1`, or an IPv4-mapped 127.0.0.0/8.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Every descendant of `root` (the run's processes: the bridge is their
/// subreaper, so an orphan stays one).
fn descendants(root: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![root];
    let mut seen = HashSet::new();
    while let Some(pid) = queue.pop() {
        if !seen.insert(pid) {
            continue;
        }
        if pid != root {
            found.push(pid);
        }
        queue.extend(children(pid));
    }
    found
}

/// The children of `pid`, from each of its threads' `children` file.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|child| child.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether process `pid` has a descriptor open on socket `inode`.
fn holds(pid: u32, inode: u32) -> bool {
    let wanted = format!("socket:[{inode}]");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inet_addresses_are_read_from_their_raw_form() {
        let mut v4 = vec![0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(inet_address(&v4), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(inet_address(&v4[..15]), None, "short");
        let mut v6 = vec![0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        v6[8..24].copy_from_slice(&"::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap().octets());
        let mapped = inet_address(&v6).unwrap();
        assert_eq!(mapped.port(), 443);
        assert!(is_loopback(mapped.ip()));
        v6[8..24].copy_from_slice(&"::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets());
        assert!(!is_loopback(inet_address(&v6).unwrap().ip()));
        let mut unix = vec![0u8; 16];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(inet_address(&unix), None);
    }
}
