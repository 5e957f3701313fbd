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
use std::sync::Arc;

use nix::libc;

use super::host_network::{self, Answer, Memory};
use super::sock_diag;
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

/// Where the command's network is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Network {
    /// The run's own network namespace: TCP, abstract sockets and the
    /// namespace's listeners are the run's alone.
    Own,
    /// The machine's, where no namespace could be made: the supervisor
    /// decides TCP, `bind`, `listen` and abstract sockets too
    /// ([`super::host_network`]); `proxy_ports` are the proxy's.
    Machine {
        /// The proxy's HTTP and SOCKS5 ports (0: none).
        proxy_ports: [u16; 2],
    },
}

/// One step of a filter being written: an instruction, a jump to labels,
/// or a label (`None`: the next instruction).
enum Step {
    Do(Instruction),
    If {
        code: u16,
        k: u32,
        then: Option<&'static str>,
        otherwise: Option<&'static str>,
    },
    Label(&'static str),
}

/// The program `steps` spell, jumps resolved (forward only, as BPF has).
fn assemble(steps: &[Step]) -> Result<Vec<Instruction>, String> {
    let mut labels = std::collections::HashMap::new();
    let mut at = 0usize;
    for step in steps {
        match step {
            Step::Label(name) => {
                labels.insert(*name, at);
            }
            _ => at += 1,
        }
    }
    let mut program = Vec::with_capacity(at);
    for step in steps {
        match step {
            Step::Label(_) => {}
            Step::Do(instruction) => program.push(*instruction),
            Step::If {
                code,
                k,
                then,
                otherwise,
            } => {
                let here = program.len() + 1;
                let offset = |label: &Option<&'static str>| -> Result<u8, String> {
                    let Some(name) = label else { return Ok(0) };
                    let target = labels
                        .get(name)
                        .ok_or_else(|| format!("the filter has no label {name}"))?;
                    target
                        .checked_sub(here)
                        .and_then(|offset| u8::try_from(offset).ok())
                        .ok_or_else(|| format!("the filter cannot jump to {name}"))
                };
                program.push(seccomp::jump(*code, *k, offset(then)?, offset(otherwise)?));
            }
        }
    }
    Ok(program)
}

/// The filter the command runs under; see the [module docs](self) and,
/// on the machine's network, [`super::host_network`].
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) fn filter(network: Network) -> Result<Vec<Instruction>, String> {
    use seccomp::statement;
    use Step::{Do, If, Label};
    let number = |n: libc::c_long| n as u32;
    let when = |code: u16, k: u32, then: &'static str| If {
        code,
        k,
        then: Some(then),
        otherwise: None,
    };
    let unless = |code: u16, k: u32, otherwise: &'static str| If {
        code,
        k,
        then: None,
        otherwise: Some(otherwise),
    };
    let machine = matches!(network, Network::Machine { .. });
    let mut steps = vec![
        // Another ABI (i386 through int 0x80) is refused outright.
        Do(statement(LOAD_WORD, ARCH)),
        when(JUMP_EQUAL, AUDIT_ARCH, "native"),
        Do(statement(RETURN, libc::SECCOMP_RET_KILL_PROCESS)),
        Label("native"),
        // x32 numbers on x86_64 (none on aarch64: never matches).
        Do(statement(LOAD_WORD, NR)),
        unless(JUMP_AT_LEAST, X32_SYSCALL_BIT, "not x32"),
        Do(statement(RETURN, errno(libc::ENOSYS))),
        Label("not x32"),
        // connect goes to the bridge.
        when(JUMP_EQUAL, number(libc::SYS_connect), "notify"),
        // io_uring would bypass this filter.
        unless(JUMP_EQUAL, number(libc::SYS_io_uring_setup), "not io_uring"),
        Do(statement(RETURN, errno(libc::ENOSYS))),
        Label("not io_uring"),
    ];
    if machine {
        steps.extend([
            // bind and listen go to the bridge too.
            when(JUMP_EQUAL, number(libc::SYS_bind), "notify"),
            when(JUMP_EQUAL, number(libc::SYS_listen), "notify"),
        ]);
        // TCP Fast Open connects from a send, past connect: each send call
        // with MSG_FASTOPEN in its flags argument is refused.
        for (call, flags, next) in [
            (libc::SYS_sendto, 3, "not sendto"),
            (libc::SYS_sendmsg, 2, "not sendmsg"),
            (libc::SYS_sendmmsg, 3, "not sendmmsg"),
        ] {
            steps.extend([
                unless(JUMP_EQUAL, number(call), next),
                Do(statement(LOAD_WORD, argument(flags))),
                Do(statement(AND, libc::MSG_FASTOPEN as u32)),
                when(JUMP_EQUAL, 0, "allow"),
                Do(statement(RETURN, errno(libc::EACCES))),
                Label(next),
            ]);
        }
    }
    steps.extend([
        // socket and socketpair are judged by family and type.
        when(JUMP_EQUAL, number(libc::SYS_socket), "socket"),
        when(JUMP_EQUAL, number(libc::SYS_socketpair), "socket"),
        Do(statement(RETURN, libc::SECCOMP_RET_ALLOW)),
        Label("socket"),
        Do(statement(LOAD_WORD, argument(0))),
        when(JUMP_EQUAL, libc::AF_UNIX as u32, "unix"),
        when(JUMP_EQUAL, libc::AF_NETLINK as u32, "allow"),
        when(JUMP_EQUAL, libc::AF_INET as u32, "inet"),
        when(JUMP_EQUAL, libc::AF_INET6 as u32, "inet"),
        Do(statement(RETURN, errno(libc::EAFNOSUPPORT))),
        Label("inet"),
    ]);
    if machine {
        // On the machine's network: TCP only (no UDP, raw, SCTP or MPTCP).
        steps.extend([
            Do(statement(LOAD_WORD, argument(1))),
            Do(statement(AND, SOCK_TYPE_MASK)),
            unless(JUMP_EQUAL, libc::SOCK_STREAM as u32, "refuse"),
            Do(statement(LOAD_WORD, argument(2))),
            when(JUMP_EQUAL, 0, "allow"),
            when(JUMP_EQUAL, libc::IPPROTO_TCP as u32, "allow"),
            Label("refuse"),
            Do(statement(RETURN, errno(libc::EACCES))),
        ]);
    } else {
        steps.push(Do(statement(RETURN, libc::SECCOMP_RET_ALLOW)));
    }
    steps.extend([
        // Unix: no datagrams.
        Label("unix"),
        Do(statement(LOAD_WORD, argument(1))),
        Do(statement(AND, SOCK_TYPE_MASK)),
        unless(JUMP_EQUAL, libc::SOCK_DGRAM as u32, "allow"),
        Do(statement(RETURN, errno(libc::EACCES))),
        Label("allow"),
        Do(statement(RETURN, libc::SECCOMP_RET_ALLOW)),
        Label("notify"),
        Do(statement(RETURN, libc::SECCOMP_RET_USER_NOTIF)),
    ]);
    assemble(&steps)
}

/// Decides every `connect` of the command (and, on the machine's network,
/// every `bind` and `listen`) until no process under the filter is left:
/// a thread of the bridge's own, one short thread per call (a blocking
/// connect must not hold up the others).
pub(crate) fn supervise(
    listener: OwnedFd,
    opened: OpenedSockets,
    network: Network,
) -> io::Result<()> {
    let listener = Arc::new(listener);
    let memory = Arc::new(Memory::default());
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
            let (shared, opened, memory) = (listener.clone(), opened.clone(), memory.clone());
            let spawned = std::thread::Builder::new()
                .name("unix-socket-connect".into())
                .spawn(move || {
                    let answer = decide(shared.as_fd(), &notification, &opened, network, &memory);
                    // The caller may have gone meanwhile: nothing to answer.
                    let _ = match answer {
                        Answer::Done(value, errno) => {
                            seccomp::respond(shared.as_fd(), notification.id, value, errno)
                        }
                        Answer::Continue => {
                            seccomp::respond_continue(shared.as_fd(), notification.id)
                        }
                    };
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

/// The answer to one `connect(fd, address, length)`, `bind(fd, address,
/// length)` or `listen(fd, backlog)`: made here on a copy of the caller's
/// socket (`Done(0, 0)` when it succeeded), refused, or let go on.
fn decide(
    listener: BorrowedFd<'_>,
    notification: &libc::seccomp_notif,
    opened: &OpenedSockets,
    network: Network,
    memory: &Memory,
) -> Answer {
    let pid = notification.pid;
    let call = libc::c_long::from(notification.data.nr);
    let args = notification.data.args;
    let Ok(fd) = i32::try_from(args[0]) else {
        return Answer::failed(libc::EBADF);
    };
    if call == libc::SYS_listen {
        let socket = match seccomp::copy_descriptor(pid, fd) {
            Ok(socket) => socket,
            Err(error) => return Answer::from_result(Err(error)),
        };
        if !seccomp::still_waiting(listener, notification.id) {
            return Answer::failed(libc::EINTR);
        }
        // The kernel reads the backlog as an int.
        return host_network::listen(&socket, args[1] as i32, memory);
    }
    let length = (args[2] & 0xffff_ffff) as usize;
    // What the kernel itself would refuse before looking.
    if !(2..=std::mem::size_of::<libc::sockaddr_storage>()).contains(&length) {
        return Answer::failed(libc::EINVAL);
    }
    let mut address = vec![0u8; length];
    let read = std::fs::File::open(format!("/proc/{pid}/mem"))
        .and_then(|memory| memory.read_exact_at(&mut address, args[1]));
    if read.is_err() {
        return Answer::failed(libc::EFAULT);
    }
    let socket = match seccomp::copy_descriptor(pid, fd) {
        Ok(socket) => socket,
        Err(error) => return Answer::failed(error.raw_os_error().unwrap_or(libc::EBADF)),
    };
    // The pid still names the caller (it did not die and get reused).
    if !seccomp::still_waiting(listener, notification.id) {
        return Answer::failed(libc::EINTR);
    }
    if call == libc::SYS_bind {
        return match network {
            Network::Machine { .. } => host_network::bind(&socket, &address, memory),
            Network::Own => Answer::Continue,
        };
    }
    let family = u16::from_ne_bytes([address[0], address[1]]);
    let unix = family == libc::AF_UNIX as u16;
    match (network, address.get(2)) {
        // A pathname.
        (_, Some(&first)) if unix && first != 0 => {
            let raw = &address[2..];
            let path = raw.split(|&b| b == 0).next().unwrap_or_default();
            let result = connect_pathname(
                &socket,
                pid,
                OsStr::from_bytes(path),
                opened,
                network,
                memory,
            );
            Answer::from_result(result.map_err(|error| {
                io::Error::from_raw_os_error(error.raw_os_error().unwrap_or(libc::ECONNREFUSED))
            }))
        }
        // An abstract name: the machine's, without a namespace.
        (Network::Machine { .. }, Some(_)) if unix && !opened.any() => {
            host_network::connect_abstract(&socket, &address, &address[3..], memory)
        }
        (Network::Machine { proxy_ports }, _)
            if family == libc::AF_INET as u16 || family == libc::AF_INET6 as u16 =>
        {
            host_network::connect_tcp(&socket, &address, &proxy_ports, memory)
        }
        _ => Answer::from_result(seccomp::connect_raw(socket.as_fd(), &address)),
    }
}

/// Opens `path` as the caller sees it, checks the inode, and connects the
/// caller's socket to exactly that inode.
fn connect_pathname(
    socket: &OwnedFd,
    pid: u32,
    path: &OsStr,
    opened: &OpenedSockets,
    network: Network,
    memory: &Memory,
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
    let ours = opened.any()
        || opened.names(device, inode)
        || match network {
            Network::Own => bound_inside(device, inode),
            Network::Machine { .. } => host_network::file_listened_by_run(device, inode, memory),
        };
    if !ours {
        let path = PathBuf::from(path);
        memory.say_once(&path.display().to_string(), || format!(
            "refused a connection to the Unix socket {}: it was not created inside this run (--isolate); pass --allow-unix-socket {} (or add it to [run] unix_sockets) to open it",
            path.display(),
            path.display()
        ));
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
    match sock_diag::unix_listeners() {
        Ok(listeners) => listeners.iter().any(|listener| {
            listener
                .file
                .is_some_and(|file| sock_diag::same_file(file, device, inode))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_assemble() {
        let own = filter(Network::Own).unwrap();
        let machine = filter(Network::Machine {
            proxy_ports: [1, 2],
        })
        .unwrap();
        assert!(machine.len() > own.len());
        assert!(assemble(&[Step::If {
            code: JUMP_EQUAL,
            k: 0,
            then: Some("nowhere"),
            otherwise: None,
        }])
        .is_err());
    }
}
