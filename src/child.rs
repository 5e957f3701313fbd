//! The child process of `run` (and of `run --isolate`'s namespace): its
//! exit status as ours, signals forwarded to it, and a clear word when it
//! cannot be started.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

pub(crate) fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from((128 + signal) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}

/// Says why the command could not be started; 127 when it was not found,
/// 126 otherwise (as shells do).
pub(crate) fn cannot_run(program: &std::ffi::OsStr, error: &std::io::Error) -> ExitCode {
    let _ = writeln!(
        std::io::stderr(),
        "portcullis: cannot run {}: {error}",
        program.to_string_lossy()
    );
    ExitCode::from(if error.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// SIGTERM, SIGHUP, SIGQUIT and SIGINT, listened for under `run`.
pub(crate) struct ForwardedSignals(
    Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
);

impl ForwardedSignals {
    pub(crate) fn install() -> ForwardedSignals {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
            signal(SignalKind::quit()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(a), Ok(b), Ok(c), Ok(d)) => ForwardedSignals(Some((a, b, c, d))),
            _ => ForwardedSignals(None),
        }
    }
}

/// Waits for the child, passing SIGTERM, SIGHUP and SIGQUIT on (and SIGINT
/// when not on a terminal, where the terminal already sent it to the child).
pub(crate) async fn wait_forwarding_signals(
    child: &mut tokio::process::Child,
    signals: ForwardedSignals,
) -> std::io::Result<std::process::ExitStatus> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let forward_interrupt = !std::io::stdin().is_terminal();
    let Some((mut term, mut hup, mut quit, mut int)) = signals.0 else {
        return child.wait().await;
    };
    loop {
        let forward = tokio::select! {
            status = child.wait() => return status,
            _ = term.recv() => Some(Signal::SIGTERM),
            _ = hup.recv() => Some(Signal::SIGHUP),
            _ = quit.recv() => Some(Signal::SIGQUIT),
            _ = int.recv() => forward_interrupt.then_some(Signal::SIGINT),
        };
        if let (Some(signal), Some(pid)) = (forward, pid) {
            let _ = kill(pid, signal);
        }
    }
}

/// Makes this process the reaper of its orphaned descendants
/// (`PR_SET_CHILD_SUBREAPER`), so a process the command left running
/// (`sh -c 'server &'`) stays findable as ours; [`end_descendants`] ends
/// them when the command is done.
#[cfg(target_os = "linux")]
pub(crate) fn become_subreaper() {
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::debug!(%error, "cannot become a subreaper: processes the command leaves behind may outlive it");
    }
}

/// Ends every process still running below this one (what the command left
/// behind): SIGTERM, up to `grace` to go, then SIGKILL; each reaped.
/// Returns how many there were.
#[cfg(target_os = "linux")]
pub(crate) async fn end_descendants(grace: std::time::Duration) -> usize {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let first = descendants();
    for pid in &first {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        reap(&first);
        if descendants().is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Those that ignored SIGTERM, and any they started meanwhile.
    for _ in 0..3 {
        let left = descendants();
        if left.is_empty() {
            break;
        }
        for pid in &left {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        reap(&left);
    }
    first.len()
}

/// Reaps those of `pids` that are our children and have exited.
#[cfg(target_os = "linux")]
fn reap(pids: &[i32]) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    use nix::unistd::Pid;
    for pid in pids {
        let _ = waitpid(Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG));
    }
}

/// Every live (not zombie) process whose parent chain reaches this one.
/// None when this process has no children at all: as a subreaper it holds
/// every orphan below it, so that one system call answers the common case
/// (the command exited and left nothing) without reading every process's
/// parent from `/proc`.
#[cfg(target_os = "linux")]
fn descendants() -> Vec<i32> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    // WNOWAIT: only asks; a child that has exited stays to be reaped.
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    if waitid(Id::All, flags) == Err(nix::errno::Errno::ECHILD) {
        return Vec::new();
    }
    let mut parents: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Some((state, ppid)) = state_and_parent(pid) else {
                continue;
            };
            if state != "Z" && state != "X" {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found = vec![me];
    let mut index = 0;
    while let Some(&parent) = found.get(index) {
        found.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        index += 1;
    }
    found.retain(|pid| *pid != me);
    found
}

/// State and parent of `pid`, from `/proc/PID/stat`.
#[cfg(target_os = "linux")]
fn state_and_parent(pid: i32) -> Option<(String, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses): state, then ppid.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.to_string();
    Some((state, fields.next()?.parse().ok()?))
}
