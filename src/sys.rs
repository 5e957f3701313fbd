//! The crate's only `unsafe` code: two calls into the C library that no
//! maintained crate wraps safely. Each block says why it is sound.
//!
//! - [`trim_heap`]: glibc's `malloc_trim(0)`, to hand freed memory back
//!   after a burst of connections (see `memory`).
//! - [`loopback_up`]: `SIOCGIFFLAGS`/`SIOCSIFFLAGS` on `lo`, to bring up
//!   loopback in the network namespace `run --isolate` makes (nix has no
//!   safe wrapper for interface flags).

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

/// Whether SIGHUP is ignored in this process (as `nohup` leaves it), read
/// from `/proc/self/status` (`SigIgn`, bit 0 for signal 1); no `unsafe`.
pub(crate) fn hangup_ignored() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("SigIgn:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & 1 == 1)
}
