//! The crate's only `unsafe` code: two calls into the C library that no
//! maintained crate wraps safely. Each block says why it is sound.
//!
//! - [`trim_heap`]: glibc's `malloc_trim(0)`, to hand freed memory back
//!   after a burst of connections (see `memory`).
//! - [`loopback_up`]: `SIOCGIFFLAGS`/`SIOCSIFFLAGS` on `lo`, to bring up
//!   loopback in the network namespace `run --isolate` makes (nix has no
//!   safe wrapper for interface flags).
//! - [`die_with_parent`]: `PR_SET_PDEATHSIG` in the child between fork and
//!   exec (a pre-exec hook is `unsafe` in std).
//! - [`new_pid_namespace_before_exec`] and [`fork_single_threaded`]:
//!   `run --isolate`'s PID namespace (an unshare between fork and exec, and
//!   the fork that makes its process 1).
//! - [`exit_now`]: `_exit` in the child of a fork (no destructor of the
//!   parent's runs twice).
//! - [`landlock`]: the Landlock ABI probe and `landlock_restrict_self`
//!   between fork and exec (the `landlock` crate builds the ruleset; its
//!   `restrict_self` is not documented as safe between fork and exec).
//! - [`seccomp`]: the seccomp user-notification calls `run --isolate` uses
//!   to decide the child's `connect`s (installing a filter in the child
//!   before `exec`, receiving and answering notifications, `pidfd_open`,
//!   `pidfd_getfd`); neither nix nor a maintained crate wraps user
//!   notification (seccompiler has no notify action; libseccomp's crate
//!   links the C library, which the distroless image does not carry).

#![allow(unsafe_code)]

/// Returns freed heap memory to the system; whether any was returned.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn trim_heap() -> bool {
    // SAFETY: malloc_trim takes a size and touches only the allocator's own
    // state, under the allocator's locks; it is safe to call at any time
    // from any thread.
    unsafe { nix::libc::malloc_trim(0) == 1 }
}

/// Other allocators hand memory back themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn trim_heap() -> bool {
    false
}

/// Sets `IFF_UP` on the loopback interface of the current network
/// namespace.
#[cfg(target_os = "linux")]
pub(crate) fn loopback_up() -> std::io::Result<()> {
    use nix::libc;
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)?;
    // SAFETY: ifreq is plain old data (a name and a union of integers and
    // addresses), so all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: `fd` is an open socket for the duration of the call, and
    // `request` is a valid, writable ifreq naming a NUL-terminated
    // interface, as SIOCGIFFLAGS requires; the kernel writes ifru_flags.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union, so reading
    // and writing it is reading and writing what the kernel set.
    unsafe {
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above, with the flags set; SIOCSIFFLAGS only reads it.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One field of `/proc/<process>/status` (`self`, or a pid), trimmed:
/// `status_field("self", "Threads")`.
pub(crate) fn status_field(process: &str, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).ok()?;
    status.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|value| value.trim().to_owned())
    })
}

/// Whether SIGHUP is ignored in this process (as `nohup` leaves it), read
/// from `/proc/self/status` (`SigIgn`, bit 0 for signal 1); no `unsafe`.
pub(crate) fn hangup_ignored() -> bool {
    status_field("self", "SigIgn")
        .and_then(|mask| u64::from_str_radix(&mask, 16).ok())
        .is_some_and(|mask| mask & 1 == 1)
}

/// Arranges for the child `command` makes to be killed (SIGKILL) when
/// this process dies, even by SIGKILL (`PR_SET_PDEATHSIG`); a child whose
/// parent is already gone by then does not start. The death signal follows
/// the thread that spawns: spawn from a thread that lives as long as the
/// process (the main thread, which runs `block_on`).
#[cfg(target_os = "linux")]
pub(crate) fn die_with_parent(command: &mut tokio::process::Command) {
    use nix::libc;
    let parent = std::process::id();
    let hook = move || -> std::io::Result<()> {
        // SAFETY: prctl with PR_SET_PDEATHSIG reads only its integers.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: getppid has no arguments and cannot fail.
        let now = unsafe { libc::getppid() };
        // 0: the parent is outside this child's PID namespace (the first
        // process of a new one), where it cannot be compared.
        if now != 0 && u32::try_from(now).ok() != Some(parent) {
            // The parent died before the signal was armed.
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook makes two system calls on captured integers — no
    // allocation, no lock — as pre_exec requires.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Arranges for the child `command` makes to start a PID namespace for its
/// own children (`unshare(CLONE_NEWPID)` between fork and exec, while it
/// still holds this process's capabilities): its first child is that
/// namespace's process 1. The bridge cannot do this for itself: a process
/// whose children go to another PID namespace can no longer start threads.
#[cfg(target_os = "linux")]
pub(crate) fn new_pid_namespace_before_exec(command: &mut tokio::process::Command) {
    use nix::libc;
    let hook = || -> std::io::Result<()> {
        // SAFETY: unshare takes one integer.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: one system call, no allocation or lock, as pre_exec requires.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Arranges for the child `command` makes to start with no signal
/// blocked: an init that waits for signals with them blocked must not hand
/// that mask to the command (std leaves it as it is).
#[cfg(target_os = "linux")]
pub(crate) fn unblocked_signals_before_exec(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let hook = || -> std::io::Result<()> {
        nix::sys::signal::SigSet::empty()
            .thread_set_mask()
            .map_err(std::io::Error::from)
    };
    // SAFETY: one pthread_sigmask call on a mask built on the stack — no
    // allocation or lock — as pre_exec requires.
    unsafe {
        command.pre_exec(hook);
    }
}

/// `fork()`, for a process that has exactly one thread (checked): `None`
/// in the child, the child's pid in the parent.
#[cfg(target_os = "linux")]
pub(crate) fn fork_single_threaded() -> std::io::Result<Option<nix::unistd::Pid>> {
    let threads = status_field("self", "Threads").and_then(|n| n.parse::<u32>().ok());
    if threads != Some(1) {
        return Err(std::io::Error::other(
            "fork needs a process with one thread",
        ));
    }
    // SAFETY: with a single thread there is no lock another thread could
    // hold across the fork, so the child may run any code.
    match unsafe { nix::unistd::fork() }.map_err(std::io::Error::from)? {
        nix::unistd::ForkResult::Child => Ok(None),
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child)),
    }
}

/// Ends this process at once with `code` (`_exit`): for the child of a
/// fork, which must not run the parent's destructors or `atexit` handlers.
#[cfg(target_os = "linux")]
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes an integer and does not return.
    unsafe { nix::libc::_exit(code) }
}

/// Landlock, beside the `landlock` crate: the ABI probe and entering a
/// ruleset between fork and exec.
#[cfg(target_os = "linux")]
pub(crate) mod landlock {
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::libc;

    /// The Landlock ABI version this kernel offers; `Err` with the errno
    /// where none (`ENOSYS`: not built in; `EOPNOTSUPP`: not enabled).
    pub(crate) fn abi() -> io::Result<i64> {
        const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
        // SAFETY: with a null attribute, size 0 and the VERSION flag the
        // call reads nothing and returns the ABI version.
        let version = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                LANDLOCK_CREATE_RULESET_VERSION,
            )
        };
        if version < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(version)
    }

    /// Arranges for the child `command` makes to enter the domain of
    /// `ruleset` just before `exec` (`no_new_privs`, then
    /// `landlock_restrict_self`); a failure stops the spawn.
    pub(crate) fn restrict_before_exec(command: &mut tokio::process::Command, ruleset: OwnedFd) {
        let hook = move || -> io::Result<()> {
            // SAFETY: prctl with PR_SET_NO_NEW_PRIVS reads only its integers.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: landlock_restrict_self takes a ruleset descriptor
            // (open for the closure's life) and flags.
            let entered = unsafe {
                libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32)
            };
            if entered != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the hook makes two system calls on a descriptor opened
        // before the fork — no allocation, no lock — as pre_exec requires.
        unsafe {
            command.pre_exec(hook);
        }
    }
}

/// Seccomp user notification: the child's `connect`s go to a supervisor.
#[cfg(target_os = "linux")]
pub(crate) mod seccomp {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::Arc;

    use nix::libc;

    /// One BPF instruction of a seccomp filter.
    pub(crate) type Instruction = libc::sock_filter;

    /// An instruction that loads or returns (`jt`, `jf` unused).
    pub(crate) fn statement(code: u16, k: u32) -> Instruction {
        libc::sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }

    /// A conditional jump: `jt` and `jf` instructions ahead.
    pub(crate) fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Instruction {
        libc::sock_filter { code, jt, jf, k }
    }

    /// Arranges for the child `command` makes to install `program` (with a
    /// listener) just before `exec`, send the listener over `channel`
    /// (`SCM_RIGHTS`) and close its own copy, so the program it runs never
    /// holds it. `no_new_privs` is set first, as an unprivileged filter
    /// needs. A failure stops the spawn with that error.
    pub(crate) fn filter_before_exec(
        command: &mut tokio::process::Command,
        program: Arc<[Instruction]>,
        channel: OwnedFd,
    ) {
        let hook = move || -> io::Result<()> {
            // Only system calls below, on memory allocated before the fork:
            // this runs between fork and exec, where only async-signal-safe
            // work is allowed.
            let listener = install(&program)?;
            let sent = send_fd(channel.as_raw_fd(), listener);
            // SAFETY: `listener` is the descriptor seccomp just returned,
            // owned by nothing else in this process.
            unsafe { libc::close(listener) };
            sent
        };
        // SAFETY: the hook only makes system calls (prctl, seccomp,
        // sendmsg, close) on data prepared before the fork — no allocation,
        // no lock — which is what pre_exec requires.
        unsafe {
            command.pre_exec(hook);
        }
    }

    /// `no_new_privs`, then the filter with a listener; the listener's
    /// descriptor. Waits for the supervisor ignoring non-fatal signals
    /// where the kernel can (5.19+).
    fn install(program: &[Instruction]) -> io::Result<RawFd> {
        let length = u16::try_from(program.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let fprog = libc::sock_fprog {
            len: length,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: prctl with PR_SET_NO_NEW_PRIVS reads only its integer
        // arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut flags =
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
        loop {
            // SAFETY: `fprog` points at `program`, which outlives the call;
            // the kernel copies the filter before returning.
            let result = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    flags,
                    &fprog as *const libc::sock_fprog,
                )
            };
            if result >= 0 {
                return RawFd::try_from(result)
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidData));
            }
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINVAL)
                && flags & libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV != 0
            {
                flags &= !libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
                continue;
            }
            return Err(error);
        }
    }

    /// Sends `fd` over the Unix socket `channel` with `SCM_RIGHTS`, using
    /// only the stack (async-signal-safe).
    fn send_fd(channel: RawFd, fd: RawFd) -> io::Result<()> {
        const SPACE: usize = 32;
        #[repr(C, align(8))]
        struct Control([u8; SPACE]);
        let mut control = Control([0; SPACE]);
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: msghdr is plain old data; zeroes are a valid value.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE computes a size from a constant.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        if space > SPACE {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        message.msg_controllen = space as _;
        // SAFETY: `message` has a control buffer of `space` bytes, aligned
        // for cmsghdr, so CMSG_FIRSTHDR returns a header inside it, and
        // CMSG_DATA a place for one descriptor after that header.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&message);
            if header.is_null() {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
        }
        // SAFETY: every pointer in `message` points at live stack memory of
        // the lengths it states.
        if unsafe { libc::sendmsg(channel, &message, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one descriptor sent with `SCM_RIGHTS` over `channel`.
    pub(crate) fn receive_fd(channel: BorrowedFd<'_>) -> io::Result<OwnedFd> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut byte = [0u8; 1];
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let message = recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        for control in message.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = control {
                if let Some(&fd) = fds.first() {
                    // SAFETY: SCM_RIGHTS just installed `fd` in this
                    // process; nothing else owns it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "no descriptor came",
        ))
    }

    /// Whether this kernel has what the supervisor needs: seccomp user
    /// notification (5.0) and `pidfd_getfd` (5.6). `Err` names what is
    /// missing.
    pub(crate) fn available() -> Result<(), String> {
        let action: u32 = libc::SECCOMP_RET_USER_NOTIF;
        // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32.
        let result = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_GET_ACTION_AVAIL,
                0,
                &action as *const u32,
            )
        };
        if result != 0 {
            return Err(format!(
                "seccomp user notification: {}",
                io::Error::last_os_error()
            ));
        }
        let probe = std::fs::File::open("/proc/self/stat")
            .map_err(|error| format!("/proc/self/stat: {error}"))?;
        copy_descriptor(std::process::id(), probe.as_raw_fd())
            .map(drop)
            .map_err(|error| format!("pidfd_getfd: {error}"))
    }

    /// One notification: the calling task and its system call.
    pub(crate) fn receive(listener: BorrowedFd<'_>) -> io::Result<libc::seccomp_notif> {
        // SAFETY: seccomp_notif is plain old data; the kernel requires it
        // zeroed before SECCOMP_IOCTL_NOTIF_RECV.
        let mut notification: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: `notification` is a writable seccomp_notif, as this
        // ioctl fills.
        let result = unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                &mut notification as *mut libc::seccomp_notif,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(notification)
    }

    /// Answers notification `id`: the call returns `value`, or fails with
    /// `errno` when it is not 0.
    pub(crate) fn respond(
        listener: BorrowedFd<'_>,
        id: u64,
        value: i64,
        errno: i32,
    ) -> io::Result<()> {
        send_response(
            listener,
            libc::seccomp_notif_resp {
                id,
                val: value,
                error: if errno == 0 { 0 } else { -errno },
                flags: 0,
            },
        )
    }

    /// Lets notification `id`'s call go on in the kernel as the caller
    /// made it (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`): only for calls whose
    /// arguments no longer matter once checked, or that something else
    /// (Landlock) still checks in the kernel.
    pub(crate) fn respond_continue(listener: BorrowedFd<'_>, id: u64) -> io::Result<()> {
        send_response(
            listener,
            libc::seccomp_notif_resp {
                id,
                val: 0,
                error: 0,
                flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
            },
        )
    }

    fn send_response(
        listener: BorrowedFd<'_>,
        mut response: libc::seccomp_notif_resp,
    ) -> io::Result<()> {
        // SAFETY: `response` is a seccomp_notif_resp, as this ioctl reads.
        let result = unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &mut response as *mut libc::seccomp_notif_resp,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `bind(fd, address)` with the address as raw bytes.
    pub(crate) fn bind_raw(fd: BorrowedFd<'_>, address: &[u8]) -> io::Result<()> {
        let length = libc::socklen_t::try_from(address.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the kernel copies `length` bytes from `address`, which
        // is that long.
        let result = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                address.as_ptr().cast::<libc::sockaddr>(),
                length,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether notification `id` still waits (its task did not die, so a
    /// pid read from it still names that task).
    pub(crate) fn still_waiting(listener: BorrowedFd<'_>, id: u64) -> bool {
        let mut id = id;
        // SAFETY: the ioctl reads one u64.
        unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
                &mut id as *mut u64,
            ) == 0
        }
    }

    /// `connect(fd, address)` with the address as raw bytes (a
    /// `sockaddr` of any family, as read from the caller).
    pub(crate) fn connect_raw(fd: BorrowedFd<'_>, address: &[u8]) -> io::Result<()> {
        let length = libc::socklen_t::try_from(address.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the kernel copies `length` bytes from `address`, which
        // is that long; a sockaddr needs no alignment for the copy.
        let result = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                address.as_ptr().cast::<libc::sockaddr>(),
                length,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `PIDFD_THREAD` (Linux 6.9): a pidfd for one thread, not its group.
    const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

    /// A copy, in this process, of descriptor `fd` of task `pid` (a
    /// thread id, as a notification names the caller): the thread's own
    /// table where the kernel can open a thread (6.9+), else its thread
    /// group's.
    pub(crate) fn copy_descriptor(pid: u32, fd: RawFd) -> io::Result<OwnedFd> {
        let open = |pid: u32, flags: libc::c_uint| {
            // SAFETY: pidfd_open takes a pid and flags, returns a new
            // descriptor or -1.
            unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, flags) }
        };
        let mut pidfd = open(pid, PIDFD_THREAD);
        if pidfd < 0 {
            let group = super::status_field(&pid.to_string(), "Tgid")
                .and_then(|tgid| tgid.parse::<u32>().ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
            pidfd = open(group, 0);
        }
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `pidfd` is a descriptor the kernel just returned, owned
        // by nothing else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags,
        // and returns a new descriptor or -1.
        let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above: a new descriptor, ours alone.
        Ok(unsafe { OwnedFd::from_raw_fd(copy as RawFd) })
    }
}
