//! `portcullis serve`: the configured listeners until a signal ends it.

use super::args::ServeArgs;
use super::start::{start, Purpose};
use super::{usage_error, EXIT_UNAVAILABLE};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

pub(super) async fn serve(args: ServeArgs) -> ExitCode {
    let options = args.options;
    options.warn_allow_everything();
    let deadline = match options
        .load()
        .map(|loaded| loaded.config.limits.shutdown_deadline)
    {
        Ok(deadline) => deadline,
        Err(error) => return usage_error(&error),
    };
    // Listening for SIGTERM before anyone learns the address: a client that
    // connects and signals at once must not find the default action.
    let signals = ShutdownSignals::install();
    let usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1());
    let proxy = match start(&options, Purpose::Serve).await {
        Ok(proxy) => proxy,
        Err(code) => return code,
    };
    let exports = crate::env::export_lines(&proxy.child_env());
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(exports.as_bytes());
    let _ = stdout.flush();
    drop(stdout);
    if let Some(path) = &args.env_file {
        // Whole or not at all: a script that waits for the file reads it complete.
        if let Err(error) =
            crate::transport::mitm::write_atomically(path, exports.as_bytes(), 0o600)
        {
            let _ = writeln!(std::io::stderr(), "{error}");
            proxy.shutdown(Duration::ZERO).await;
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    }
    if let Ok(usr1) = usr1 {
        tokio::spawn(dump_violations_on_usr1(usr1, proxy.violations().clone()));
    }
    let stopped = signals.wait().await;
    if stopped == Stopped::TerminalGone {
        tracing::info!("the terminal hung up: stopping, as a shell job would");
    }
    tracing::info!("shutting down: no new connections; waiting up to {deadline:?} for open ones");
    let cut = proxy.shutdown(deadline).await;
    if let Some(path) = &args.env_file {
        let _ = std::fs::remove_file(path);
    }
    match (stopped, cut) {
        // 128 + SIGHUP, as a shell reports a job its hangup ended.
        (Stopped::TerminalGone, _) => ExitCode::from(129),
        // 0 when everything finished; 1 when the deadline cut something.
        (Stopped::Asked, 0) => ExitCode::SUCCESS,
        (Stopped::Asked, _) => ExitCode::FAILURE,
    }
}

/// On SIGUSR1, writes the recent refusals (the ring, oldest first) to the
/// log, one JSON object a line.
pub(super) async fn dump_violations_on_usr1(
    mut usr1: tokio::signal::unix::Signal,
    ring: portcullis_middleware::ViolationRing,
) {
    while usr1.recv().await.is_some() {
        let recent = ring.snapshot();
        tracing::info!(
            target: "portcullis::violation",
            "SIGUSR1: the {} most recent refusals ({} since start)",
            recent.len(),
            ring.total()
        );
        for violation in recent {
            tracing::info!(target: "portcullis::violation", "{}", violation.to_json());
        }
    }
}

/// SIGINT and SIGTERM, listened for from the moment they are installed;
/// and SIGHUP when it means that `serve`'s terminal hung up.
pub(super) struct ShutdownSignals {
    interrupt: std::io::Result<tokio::signal::unix::Signal>,
    terminate: std::io::Result<tokio::signal::unix::Signal>,
    /// Set when `serve` started with a controlling terminal (and SIGHUP was
    /// not ignored, as under `nohup`): a SIGHUP after which the terminal
    /// cannot be opened any more is the terminal closing, and ends `serve`
    /// as it ends a shell job. Any other SIGHUP reloads (`reload::watch`).
    hangup: Option<tokio::signal::unix::Signal>,
}

/// Why `serve` stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stopped {
    /// SIGINT or SIGTERM.
    Asked,
    /// Its terminal hung up.
    TerminalGone,
}

/// Whether this process has a controlling terminal it can open.
pub(super) fn terminal_present() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .is_ok()
}

impl ShutdownSignals {
    fn install() -> ShutdownSignals {
        use tokio::signal::unix::{signal, SignalKind};
        // Read before any handler is installed: `nohup` leaves SIGHUP ignored.
        let hangup_ends = terminal_present() && !crate::sys::hangup_ignored();
        ShutdownSignals {
            interrupt: signal(SignalKind::interrupt()),
            terminate: signal(SignalKind::terminate()),
            hangup: hangup_ends
                .then(|| signal(SignalKind::hangup()).ok())
                .flatten(),
        }
    }

    async fn wait(self) -> Stopped {
        let mut hangup = self.hangup;
        let terminal_gone = async {
            match hangup.as_mut() {
                Some(hangup) => {
                    while hangup.recv().await.is_some() {
                        if !terminal_present() {
                            return;
                        }
                    }
                    std::future::pending::<()>().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        match (self.interrupt, self.terminate) {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => Stopped::Asked,
                    _ = terminate.recv() => Stopped::Asked,
                    () = terminal_gone => Stopped::TerminalGone,
                }
            }
            _ => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => Stopped::Asked,
                    () = terminal_gone => Stopped::TerminalGone,
                }
            }
        }
    }
}
