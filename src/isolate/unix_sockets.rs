//! Under `run --isolate`: the Unix sockets the command may connect to.
//!
//! A pathname Unix socket is a file, so it reaches across network
//! namespaces: a host process listening on `/tmp/x.sock` (a `socat` to the
//! network, a Docker or ssh-agent socket) would be a way out past the
//! policy. The bridge therefore confines the command with a seccomp filter
//! whose `connect` calls it decides itself (user notification):
//!
//! - **a pathname socket** is reached only when a process inside the run
//!   listens on it — a socket bound in the run's network namespace, found by
//!   its inode with `sock_diag` — or when the user opened that path
//!   (`--allow-unix-socket PATH`, `[run] unix_sockets`); otherwise the call
//!   fails with `EACCES`, and the bridge says once which path and how to
//!   open it;
//! - **no time-of-check/time-of-use window**: the bridge reads the address
//!   from the caller's memory once, opens that path once (`O_PATH`, from the
//!   caller's root and working directory), checks the inode it opened, and
//!   connects a copy of the caller's socket (`pidfd_getfd`) to exactly that
//!   inode (`/proc/self/fd/N`). Changing the address in memory or swapping
//!   the path from another thread changes nothing already decided. Every
//!   other `connect` (TCP, abstract sockets, which the network namespace
//!   already confines) is made the same way, by the bridge, on the copy;
//! - **datagram Unix sockets cannot be created** (`socket` and `socketpair`
//!   with `SOCK_DGRAM` fail with `EACCES`): `sendto` names an address on
//!   each datagram, which no `connect` check sees;
//! - **address families** other than Unix, IPv4, IPv6 and netlink fail with
//!   `EAFNOSUPPORT` (a `vsock` reaches the hypervisor, past any network
//!   namespace); `io_uring_setup` fails with `ENOSYS` (its requests bypass
//!   seccomp); system calls of another ABI (x32, i386) fail with `ENOSYS`.
//!
//! Why seccomp user notification: Landlock confines abstract sockets
//! (ABI 6) but not a `connect` to a pathname socket on the kernels we run
//! on, and a mount-namespace view cannot hide every path a socket may sit
//! at (home directories, `/run/user`, `/tmp`) without hiding the files the
//! command needs. A supervisor that makes the call itself, on a copy of the
//! descriptor, is exact and leaves no window; its cost is a round trip to
//! the bridge per `connect` (tens of microseconds), paid only under
//! `--isolate`. sandbox-runtime refuses `socket(AF_UNIX)` outright (a test
//! suite's own socket breaks); codex's filter lets Unix sockets through.
//!
//! `socketpair`, and sockets the command binds and connects to itself, work
//! as before. A connection the bridge made carries the bridge's process id
//! in the listener's `SO_PEERCRED`, not the caller's (same user and group).
//! Where the kernel has no seccomp user notification (before 5.0, or
//! without `pidfd_getfd`, 5.6), `--isolate` refuses to start unless
//! `--allow-unix-socket '*'` says every Unix socket may be reached.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::libc;

use crate::sys::seccomp::{self, Instruction};

/// What the user opened: paths (each compared by the inode it names at
/// the time of the call), or every socket (`*`).
#[derive(Debug, Clone, Default)]
pub(crate) struct OpenedSockets {
    any: bool,
    paths: Vec<PathBuf>,
}

impl OpenedSockets {
    /// From `--allow-unix-socket` / `[run] unix_sockets` entries; `*` opens
    /// every socket.
    pub(crate) fn new(entries: impl IntoIterator<Item = PathBuf>) -> OpenedSockets {
        let mut opened = OpenedSockets::default();
        for entry in entries {
            if entry.as_os_str() == "*" {
                opened.any = true;
            } else {
                opened.paths.push(entry);
            }
        }
        opened
    }

    /// Whether every Unix socket is open (no confinement).
    pub(crate) fn any(&self) -> bool {
        self.any
    }

    /// Whether the socket file `(device, inode)` is one the user opened.
    fn names(&self, device: u64, inode: u64) -> bool {
        self.paths.iter().any(|path| {
            std::fs::metadata(path).is_ok_and(|meta| meta.dev() == device && meta.ino() == inode)
        })
    }
}

// BPF opcodes (linux/bpf_common.h) and `struct seccomp_data` offsets.
const LOAD_WORD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JUMP_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JUMP_AT_LEAST: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const AND: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RETURN: u16 = 0x06; // BPF_RET | BPF_K
const NR: u32 = 0;
const ARCH: u32 = 4;
/// The low 32 bits of argument `n` (little-endian targets).
const fn argument(n: u32) -> u32 {
    16 + 8 * n
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;
/// x32 system calls on x86_64 have this bit set.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `SOCK_TYPE_MASK`: the type without `SOCK_NONBLOCK`/`SOCK_CLOEXEC`.
const SOCK_TYPE_MASK: u32 = 0xf;

fn errno(code: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (code as u32 & libc::SECCOMP_RET_DATA)
}

/// The filter the command runs under; see the [module docs](self).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) fn filter() -> Vec<Instruction> {
    use seccomp::{jump, statement};
    let number = |n: libc::c_long| n as u32;
    vec![
        // 0: another ABI (i386 through int 0x80) is refused outright.
        statement(LOAD_WORD, ARCH),
        jump(JUMP_EQUAL, AUDIT_ARCH, 1, 0),
        statement(RETURN, libc::SECCOMP_RET_KILL_PROCESS),
        // 3: x32 numbers on x86_64 (none on aarch64: never matches).
        statement(LOAD_WORD, NR),
        jump(JUMP_AT_LEAST, X32_SYSCALL_BIT, 0, 1),
        statement(RETURN, errno(libc::ENOSYS)),
        // 6: connect goes to the bridge.
        jump(JUMP_EQUAL, number(libc::SYS_connect), 0, 1),
        statement(RETURN, libc::SECCOMP_RET_USER_NOTIF),
        // 8: io_uring would bypass this filter.
        jump(JUMP_EQUAL, number(libc::SYS_io_uring_setup), 0, 1),
        statement(RETURN, errno(libc::ENOSYS)),
        // 10: socket and socketpair are judged by family and type.
        jump(JUMP_EQUAL, number(libc::SYS_socket), 2, 0),
        jump(JUMP_EQUAL, number(libc::SYS_socketpair), 1, 0),
        statement(RETURN, libc::SECCOMP_RET_ALLOW),
        // 13: the family.
        statement(LOAD_WORD, argument(0)),
        jump(JUMP_EQUAL, libc::AF_UNIX as u32, 5, 0),
        jump(JUMP_EQUAL, libc::AF_INET as u32, 3, 0),
        jump(JUMP_EQUAL, libc::AF_INET6 as u32, 2, 0),
        jump(JUMP_EQUAL, libc::AF_NETLINK as u32, 1, 0),
        statement(RETURN, errno(libc::EAFNOSUPPORT)),
        // 19: IPv4, IPv6, netlink.
        statement(RETURN, libc::SECCOMP_RET_ALLOW),
        // 20: Unix: no datagrams.
        statement(LOAD_WORD, argument(1)),
        statement(AND, SOCK_TYPE_MASK),
        jump(JUMP_EQUAL, libc::SOCK_DGRAM as u32, 0, 1),
        statement(RETURN, errno(libc::EACCES)),
        statement(RETURN, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Decides every `connect` of the command until no process under the
/// filter is left: a thread of the bridge's own, one short thread per call
/// (a blocking connect must not hold up the others).
pub(crate) fn supervise(listener: OwnedFd, opened: OpenedSockets) -> io::Result<()> {
    let listener = Arc::new(listener);
    let said = Arc::new(Mutex::new(Vec::<PathBuf>::new()));
    std::thread::Builder::new()
        .name("unix-socket-supervisor".into())
        .spawn(move || loop {
            let notification = match seccomp::receive(listener.as_fd()) {
                Ok(notification) => notification,
                // The caller was interrupted before we read it.
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                    if no_task_left(listener.as_fd()) {
                        return;
                    }
                    continue;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let (shared, opened, said) = (listener.clone(), opened.clone(), said.clone());
            let spawned = std::thread::Builder::new()
                .name("unix-socket-connect".into())
                .spawn(move || {
                    let (value, errno) = decide(shared.as_fd(), &notification, &opened, &said);
                    // The caller may have gone meanwhile: nothing to answer.
                    let _ = seccomp::respond(shared.as_fd(), notification.id, value, errno);
                });
            if spawned.is_err() {
                let _ = seccomp::respond(listener.as_fd(), notification.id, -1, libc::EAGAIN);
            }
        })
        .map(|_| ())
}

/// Whether the listener has hung up (every filtered process is gone).
fn no_task_left(listener: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(listener, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|events| events.contains(PollFlags::POLLHUP)),
        Err(_) => true,
    }
}

/// The answer to one `connect(fd, address, length)`: `(0, 0)` when the
/// bridge connected the caller's socket, `(-1, errno)` otherwise.
fn decide(
    listener: BorrowedFd<'_>,
    notification: &libc::seccomp_notif,
    opened: &OpenedSockets,
    said: &Mutex<Vec<PathBuf>>,
) -> (i64, i32) {
    let failed = |errno: i32| (-1, errno);
    let pid = notification.pid;
    let args = notification.data.args;
    let Ok(fd) = i32::try_from(args[0]) else {
        return failed(libc::EBADF);
    };
    let length = (args[2] & 0xffff_ffff) as usize;
    // What the kernel itself would refuse before looking.
    if !(2..=std::mem::size_of::<libc::sockaddr_storage>()).contains(&length) {
        return failed(libc::EINVAL);
    }
    let mut address = vec![0u8; length];
    let read = std::fs::File::open(format!("/proc/{pid}/mem"))
        .and_then(|memory| memory.read_exact_at(&mut address, args[1]));
    if read.is_err() {
        return failed(libc::EFAULT);
    }
    let socket = match seccomp::copy_descriptor(pid, fd) {
        Ok(socket) => socket,
        Err(error) => return failed(error.raw_os_error().unwrap_or(libc::EBADF)),
    };
    // The pid still names the caller (it did not die and get reused).
    if !seccomp::still_waiting(listener, notification.id) {
        return failed(libc::EINTR);
    }
    let family = u16::from_ne_bytes([address[0], address[1]]);
    let pathname = family == libc::AF_UNIX as u16 && address.get(2).is_some_and(|&b| b != 0);
    let result = if pathname {
        let raw = &address[2..];
        let path = raw.split(|&b| b == 0).next().unwrap_or_default();
        connect_pathname(&socket, pid, OsStr::from_bytes(path), opened, said)
    } else {
        seccomp::connect_raw(socket.as_fd(), &address)
    };
    match result {
        Ok(()) => (0, 0),
        Err(error) => failed(error.raw_os_error().unwrap_or(libc::ECONNREFUSED)),
    }
}

/// Opens `path` as the caller sees it, checks the inode, and connects the
/// caller's socket to exactly that inode.
fn connect_pathname(
    socket: &OwnedFd,
    pid: u32,
    path: &OsStr,
    opened: &OpenedSockets,
    said: &Mutex<Vec<PathBuf>>,
) -> io::Result<()> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    let seen = as_seen_by(pid, Path::new(path));
    let file =
        open(&seen, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).map_err(io::Error::from)?;
    let meta = nix::sys::stat::fstat(&file).map_err(io::Error::from)?;
    if meta.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
    }
    let (device, inode) = (meta.st_dev, meta.st_ino);
    if !(opened.names(device, inode) || bound_inside(device, inode)) {
        let path = PathBuf::from(path);
        let mut said = said
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !said.contains(&path) {
            // The bridge has no log of its own: its stderr is the user's.
            let _ = writeln!(
                io::stderr(),
                "portcullis: refused a connection to the Unix socket {}: it was not created inside this run (--isolate); pass --allow-unix-socket {} (or add it to [run] unix_sockets) to open it",
                path.display(),
                path.display()
            );
            said.push(path);
        }
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    let target =
        nix::sys::socket::UnixAddr::new(format!("/proc/self/fd/{}", file.as_raw_fd()).as_str())
            .map_err(io::Error::from)?;
    nix::sys::socket::connect(socket.as_raw_fd(), &target).map_err(io::Error::from)
}

/// `path` as task `pid` resolves it: from its root, or its working
/// directory when relative; its own `/proc/self` is its, not ours.
fn as_seen_by(pid: u32, path: &Path) -> PathBuf {
    let own = |rest: &Path| PathBuf::from(format!("/proc/{pid}")).join(rest);
    if let Some(rest) = path
        .strip_prefix("/proc/self")
        .ok()
        .or_else(|| path.strip_prefix("/proc/thread-self").ok())
    {
        return PathBuf::from(format!("/proc/{pid}/root"))
            .join(own(rest).strip_prefix("/").unwrap_or(path));
    }
    match path.strip_prefix("/") {
        Ok(absolute) => PathBuf::from(format!("/proc/{pid}/root")).join(absolute),
        Err(_) => PathBuf::from(format!("/proc/{pid}/cwd")).join(path),
    }
}

/// Whether a socket listening in this network namespace — the run's — is
/// bound to the file `(device, inode)` (`sock_diag`, `UNIX_DIAG_VFS`).
fn bound_inside(device: u64, inode: u64) -> bool {
    match listening_files() {
        Ok(files) => files.iter().any(|&(kernel_device, bound_inode)| {
            // UNIX_DIAG_VFS holds the kernel's dev_t (major << 20 | minor)
            // and the inode's low 32 bits.
            let (major, minor) = (kernel_device >> 20, kernel_device & 0xf_ffff);
            u64::from(major) == nix::sys::stat::major(device)
                && u64::from(minor) == nix::sys::stat::minor(device)
                && u64::from(bound_inode) == inode & 0xffff_ffff
        }),
        Err(error) => {
            let _ = writeln!(
                io::stderr(),
                "portcullis: cannot list the run's own Unix sockets ({error}); refusing the connection"
            );
            false
        }
    }
}

/// `(device, inode)` of the file of every listening Unix socket in this
/// network namespace.
fn listening_files() -> Result<Vec<(u32, u32)>, String> {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
    use netlink_packet_sock_diag::constants::TCP_LISTEN;
    use netlink_packet_sock_diag::unix::{nlas::Nla, ShowFlags, StateFlags, UnixRequest};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(|e| e.to_string())?;
    socket.bind_auto().map_err(|e| e.to_string())?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| e.to_string())?;
    let mut request = NetlinkMessage::from(SockDiagMessage::UnixRequest(UnixRequest {
        state_flags: StateFlags::LISTEN,
        inode: 0,
        show_flags: ShowFlags::VFS,
        cookie: [0xff; 8],
    }));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.finalize();
    let mut buffer = vec![0u8; request.header.length as usize];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0).map_err(|e| e.to_string())?;
    let mut files = Vec::new();
    let mut received = Vec::with_capacity(1 << 16);
    loop {
        received.clear();
        socket.recv(&mut received, 0).map_err(|e| e.to_string())?;
        let mut offset = 0;
        while offset < received.len() {
            let bytes = received.get(offset..).unwrap_or_default();
            let message =
                NetlinkMessage::<SockDiagMessage>::deserialize(bytes).map_err(|e| e.to_string())?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(files),
                NetlinkPayload::Error(error) => return Err(format!("sock_diag: {error:?}")),
                NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(response))
                    if response.header.state == TCP_LISTEN =>
                {
                    for nla in &response.nlas {
                        if let Nla::Vfs(vfs) = nla {
                            // Vfs keeps its fields private: read them back
                            // from its wire form (inode, then device).
                            let mut raw = [0u8; 8];
                            netlink_packet_core::Emitable::emit(vfs, &mut raw);
                            let inode = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                            let device = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
                            files.push((device, inode));
                        }
                    }
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}
