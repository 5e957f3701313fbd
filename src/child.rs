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
