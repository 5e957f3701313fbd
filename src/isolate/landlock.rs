//! Under `run --isolate` where user namespaces are refused: the Landlock
//! half of the fence ([`super::host_network`] is the seccomp half).
//!
//! The command's Landlock domain handles TCP `bind` and `connect` with one
//! rule: connect to the proxy's ports. So in the kernel, whatever path a
//! connection takes, the command can open TCP only to those ports, and
//! can bind no TCP port. Where the kernel has them, UDP (ABI 10: no bind,
//! no send) and the scopes (ABI 6: abstract Unix sockets and signals stay
//! inside the domain) are handled too. A Landlock domain also keeps the
//! command from tracing any process outside it (`ptrace`,
//! `process_vm_writev`, `/proc/PID/mem`): with no namespace between them,
//! the user's other processes are otherwise within its reach.
//!
//! Landlock rules name ports, not addresses: on its own it would let the
//! command reach the proxy's port numbers on any host. The seccomp
//! supervisor makes every `connect` itself, on a copy of the socket, after
//! checking the address is the proxy's (loopback), so Landlock is the
//! second fence, the one in the kernel: it holds for any call the filter
//! does not see.

use std::os::fd::OwnedFd;

use landlock::{
    Access, AccessNet, CompatLevel, Compatible, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr,
    Scope, ABI,
};
use nix::libc;

/// The ABI the kernel offers, or why there is none.
pub(crate) fn abi() -> Result<i64, String> {
    crate::sys::landlock::abi().map_err(|error| match error.raw_os_error() {
        Some(libc::ENOSYS) => {
            "this kernel has no Landlock (Linux 5.13+, built with CONFIG_SECURITY_LANDLOCK)"
                .to_owned()
        }
        Some(libc::EOPNOTSUPP) => {
            "Landlock is built in but not enabled (add landlock to the lsm= boot parameter)"
                .to_owned()
        }
        _ => format!("Landlock: {error}"),
    })
}

/// What the domain holds beyond TCP, to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Coverage {
    /// UDP bind and send refused in the kernel (ABI 10).
    pub(crate) udp: bool,
    /// Abstract Unix sockets and signals scoped to the domain (ABI 6).
    pub(crate) scopes: bool,
}

/// The ruleset for a command whose only TCP destinations are `ports` (the
/// proxy's): its descriptor, to [`restrict_before_exec`]. `Err` says why
/// Landlock cannot fence it (no Landlock, or no network rules: ABI < 4,
/// Linux < 6.7).
pub(crate) fn ruleset(ports: &[u16]) -> Result<(OwnedFd, Coverage), String> {
    let version = abi()?;
    if version < 4 {
        return Err(format!(
            "Landlock here is ABI {version}; its network rules need ABI 4 (Linux 6.7)"
        ));
    }
    let coverage = Coverage {
        udp: version >= 10,
        scopes: version >= 6,
    };
    let failed = |error: landlock::RulesetError| format!("Landlock: {error}");
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessNet::from_all(ABI::V4))
        .map_err(failed)?;
    if coverage.udp {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(ABI::V10))
            .map_err(failed)?;
    }
    if coverage.scopes {
        ruleset = ruleset.scope(Scope::from_all(ABI::V6)).map_err(failed)?;
    }
    let created = ruleset
        .create()
        .map_err(failed)?
        .add_rules(ports.iter().filter(|&&port| port != 0).map(|&port| {
            Ok::<_, landlock::RulesetError>(NetPort::new(port, AccessNet::ConnectTcp))
        }))
        .map_err(failed)?;
    let fd: Option<OwnedFd> = created.into();
    fd.map(|fd| (fd, coverage))
        .ok_or_else(|| "Landlock: no ruleset was created".to_owned())
}

pub(crate) use crate::sys::landlock::restrict_before_exec;
