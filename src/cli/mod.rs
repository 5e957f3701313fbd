//! The `portcullis` command line: `serve` (default), `run`, `check`.
//!
//! Exit codes: 64 for bad usage or configuration (one line on stderr),
//! 69 when the proxy cannot start (or a credential's secret cannot be read); `check` exits 0 allow / 1 deny / 2 ask /
//! 3 allowed but unresolvable (several targets: deny, then ask, then
//! unresolvable wins);
//! `run` exits with the child's status (128 + N when a signal N ended it).
//!
//! One module per job: `args` (clap types), `load` (flags and files
//! merged into a configuration and a builder), `start` (the proxy for
//! `serve` and `run`), `serve`, `run`, `check`, `ca`, and `reload` (the
//! live policy); the child process is `crate::child`'s.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;

mod args;
mod ca;
mod check;
mod load;
mod reload;
mod run;
mod serve;
mod start;

pub use args::{Cli, Options};
pub use load::{Loaded, Prepared};

use args::Command;
use ca::ca;
use check::check;
use run::run;
use serve::serve;

/// EX_USAGE.
pub const EXIT_USAGE: u8 = 64;
/// EX_UNAVAILABLE.
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Parses the command line and runs; the binary's whole `main`.
pub fn main() -> ExitCode {
    // `run --isolate`'s bridge: before anything starts a thread.
    #[cfg(unix)]
    {
        let arguments: Vec<OsString> = std::env::args_os().skip(1).collect();
        if arguments
            .first()
            .is_some_and(|a| a == crate::isolate::BRIDGE)
        {
            return crate::isolate::bridge_main(&arguments[1..]);
        }
        #[cfg(target_os = "linux")]
        if arguments.first().is_some_and(|a| a == crate::isolate::INIT) {
            return crate::isolate::init_main(&arguments[1..]);
        }
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = error.print();
            if let Some(tip) = usage_tip(&error) {
                let _ = writeln!(std::io::stderr(), "\n{tip}");
            }
            return ExitCode::from(code);
        }
    };
    // Under `run`, RUST_LOG belongs to the child: only PORTCULLIS_LOG is ours.
    let (command, default_filter, read_rust_log) = match cli.command {
        Some(Command::Completions(args)) => return completions(args.shell),
        Some(Command::Man) => return manual(),
        Some(Command::Run(args)) => (Command::Run(args), "warn,portcullis::violation=off", false),
        // `check` answers on stdout; its refusal is not news for the log.
        Some(Command::Check(args)) => (Command::Check(args), "error", true),
        Some(command) => (command, "info", true),
        None => (Command::Serve(cli.serve), "info", true),
    };
    if let Err(error) = init_tracing(default_filter, read_rust_log) {
        return usage_error(&error);
    }
    raise_fd_limit();
    // Before any thread starts: secrets read from our environment leave
    // the block /proc/PID/environ shows (a root child could read it).
    #[cfg(target_os = "linux")]
    if let Err(code) = scrub_secret_variables(&command) {
        return code;
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads(&command) {
        runtime.worker_threads(threads.get());
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    runtime.block_on(async move {
        match command {
            Command::Serve(args) => serve(args).await,
            Command::Run(args) => run(args).await,
            Command::Check(args) => check(args).await,
            Command::Ca(args) => ca(args),
            Command::Completions(args) => completions(args.shell),
            Command::Man => manual(),
        }
    })
}

/// A tip for a usage error clap cannot give: `run` without the `--` that
/// separates the command (`portcullis run curl …`).
fn usage_tip(error: &clap::Error) -> Option<String> {
    use clap::error::ErrorKind;
    if !matches!(
        error.kind(),
        ErrorKind::UnknownArgument | ErrorKind::MissingRequiredArgument
    ) {
        return None;
    }
    let arguments: Vec<OsString> = std::env::args_os().skip(1).collect();
    let run = arguments.iter().position(|a| a == "run")?;
    if arguments.iter().any(|a| a == "--") {
        return None;
    }
    let after: Vec<String> = arguments
        .get(run + 1..)
        .unwrap_or_default()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // The command starts at the argument clap could not place; what comes
    // before it are run's own options.
    let unexpected = match error.get(clap::error::ContextKind::InvalidArg) {
        Some(clap::error::ContextValue::String(argument)) => Some(argument.clone()),
        _ => None,
    };
    let split = unexpected
        .and_then(|argument| after.iter().position(|a| *a == argument))
        .unwrap_or(0);
    let (options, command) = after.split_at(split);
    Some(format!(
        "tip: put -- between run's options and the command: portcullis run {}-- {}",
        if options.is_empty() {
            "[OPTIONS] ".to_owned()
        } else {
            format!("{} ", options.join(" "))
        },
        if command.is_empty() {
            "CMD [ARGS]…".to_owned()
        } else {
            command.join(" ")
        }
    ))
}

/// `portcullis completions SHELL`: the script, generated from the same
/// clap definitions that parse the command line.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "portcullis", &mut script);
    write_stdout(&script)
}

/// `portcullis man`: the manual page, one roff document with a section per
/// subcommand.
fn manual() -> ExitCode {
    let command = <Cli as clap::CommandFactory>::command();
    let mut page = Vec::new();
    if let Err(error) = manual_page(command, &mut page) {
        let _ = writeln!(
            std::io::stderr(),
            "portcullis: cannot write the manual: {error}"
        );
        return ExitCode::from(EXIT_UNAVAILABLE);
    }
    write_stdout(&page)
}

fn manual_page(command: clap::Command, out: &mut Vec<u8>) -> std::io::Result<()> {
    clap_mangen::Man::new(command.clone()).render(out)?;
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("portcullis {}", sub.get_name());
        let _ = writeln!(out, ".SH \"{}\"", name.to_uppercase());
        let sub = sub.clone().display_name(name.clone()).bin_name(name);
        clap_mangen::Man::new(sub.clone()).render_synopsis_section(out)?;
        clap_mangen::Man::new(sub.clone()).render_description_section(out)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            clap_mangen::Man::new(sub).render_options_section(out)?;
        }
    }
    let mut roff = roff::Roff::new();
    for (heading, entries) in MANUAL_SECTIONS {
        roff.control("SH", [*heading]);
        for (term, text) in *entries {
            roff.control("TP", [] as [&str; 0]);
            roff.text([roff::bold(*term)]);
            roff.text([roff::roman(*text)]);
        }
    }
    roff.to_writer(out)
}

/// What the manual says besides the options: (heading, [(term, text)]).
const MANUAL_SECTIONS: &[(&str, &[(&str, &str)])] = &[
    (
        "EXIT STATUS",
        &[
            ("0", "serve stopped by SIGTERM or SIGINT with every open connection finished; check: allowed."),
            ("1", "serve: the shutdown deadline cut open connections; check: denied."),
            ("2", "check: the policy would ask."),
            ("3", "check: allowed but the name does not resolve."),
            ("64", "Bad usage or configuration: one line naming the key and the file."),
            ("69", "The proxy cannot start (a listener address in use, a credential's secret unreadable)."),
            ("129", "serve: its terminal hung up."),
            ("N", "run: the command's own status (128 + N when signal N ended it)."),
        ],
    ),
    (
        "ENVIRONMENT",
        &[
            ("PORTCULLIS_CONFIG", "The TOML configuration file (--config)."),
            ("PORTCULLIS_LOG", "The log filter, in RUST_LOG syntax (default info; warn under run)."),
            ("PORTCULLIS_LOG_FORMAT", "text (the default) or json: one JSON object a line on stderr."),
            ("PORTCULLIS_THREADS", "Worker threads (--threads)."),
            ("PORTCULLIS_<TABLE>__<KEY>", "Any configuration key, e.g. PORTCULLIS_NETWORK__MODE=limited."),
        ],
    ),
    (
        "FILES",
        &[
            ("$XDG_DATA_HOME/portcullis", "The interception CA (ca.pem, ca.key) and rules.toml, the answers remembered from approvals (default ~/.local/share/portcullis)."),
        ],
    ),
    (
        "SIGNALS",
        &[
            ("SIGHUP", "serve: read the configuration again (or stop, when its terminal hung up)."),
            ("SIGTERM, SIGINT", "Stop accepting, wait for open connections up to [limits] shutdown_deadline, then exit."),
            ("SIGUSR1", "serve: write the most recent refusals to the log."),
        ],
    ),
];

fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is the reader's choice, not an error.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "portcullis: cannot write: {error}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// Clears the values of the variables `[[credentials]]` read secrets from
/// (`source.env`) out of this process's original environment block, for
/// `serve` and `run`. Under `run` a failure stops it (exit 69): the child
/// could read the block; `serve` says so and goes on. A configuration
/// that does not load is the command's to report.
#[cfg(target_os = "linux")]
fn scrub_secret_variables(command: &Command) -> Result<(), ExitCode> {
    let (options, under_run) = match command {
        Command::Serve(args) => (&args.options, false),
        Command::Run(args) => (&args.options, true),
        _ => return Ok(()),
    };
    let Ok(loaded) = options.load() else {
        return Ok(());
    };
    let names: Vec<String> = loaded
        .config
        .credentials
        .iter()
        .filter_map(|credential| credential.source.env.clone())
        .collect();
    match crate::secrets::scrub_from_environ_block(&names) {
        Ok(_) => Ok(()),
        Err(error) if under_run => {
            let _ = writeln!(
                std::io::stderr(),
                "portcullis: cannot clear the credential variables ({}) from this process's environment block, which the command could read ({error}); read the secrets from a file or a command (source.file, source.command) instead",
                names.join(", ")
            );
            Err(ExitCode::from(EXIT_UNAVAILABLE))
        }
        Err(error) => {
            tracing::warn!(
                "cannot clear the credential variables ({}) from this process's environment block: {error}; a process allowed to read /proc/{}/environ can read them",
                names.join(", "),
                std::process::id()
            );
            Ok(())
        }
    }
}

/// `--threads`, else `[runtime] threads`; `None`: one per core. A
/// configuration that does not load is the command's to report.
fn worker_threads(command: &Command) -> Option<std::num::NonZeroUsize> {
    let options = match command {
        Command::Serve(args) => &args.options,
        Command::Run(args) => &args.options,
        Command::Check(args) => &args.options,
        Command::Ca(_) | Command::Completions(_) | Command::Man => return None,
    };
    options.threads.or_else(|| {
        options
            .load()
            .ok()
            .and_then(|loaded| loaded.config.runtime.threads)
    })
}

/// Starts logging to stderr, filtered by `PORTCULLIS_LOG`, else (not under
/// `run`) `RUST_LOG`, else `default_filter`.
/// `PORTCULLIS_LOG_FORMAT`: `text` (the default) or `json` (one JSON object
/// a line, for log pipelines).
fn init_tracing(default_filter: &str, read_rust_log: bool) -> Result<(), String> {
    let json = match std::env::var("PORTCULLIS_LOG_FORMAT").ok().as_deref() {
        None | Some("" | "text") => false,
        Some("json") => true,
        Some(other) => {
            return Err(format!(
                "PORTCULLIS_LOG_FORMAT is {other:?}; it is text or json"
            ))
        }
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let directives = std::env::var("PORTCULLIS_LOG")
        .ok()
        .or_else(|| {
            read_rust_log
                .then(|| std::env::var("RUST_LOG").ok())
                .flatten()
        })
        .unwrap_or_else(|| default_filter.to_owned());
    // fast-socks5 logs network-supplied bytes raw (a SOCKS domain, even the
    // password bytes) at debug level: its events never reach our log,
    // whatever the directives say (a directive naming it is dropped, and
    // `fast_socks5=off` is added). Its failures reach us as errors anyway.
    // One global filter, so a disabled callsite costs nothing per request
    // (per-layer filters made the registry build every span).
    let ours: Vec<&str> = directives
        .split(',')
        .filter(|directive| !directive.contains("fast_socks5"))
        .collect();
    let ours = ours.join(",");
    let filter = tracing_subscriber::EnvFilter::try_new(&ours)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let filter = match "fast_socks5=off".parse() {
        Ok(off) => filter.add_directive(off),
        Err(_) => filter,
    };
    let text = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .fmt_fields(crate::logfmt::TextFields)
            .with_timer(crate::logfmt::Clock)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .try_init();
    Ok(())
}

/// Says, once at start, which proxy this one chains through: an inherited
/// HTTP_PROXY silently making every refusal somebody else's is how `--allow`
/// "does nothing".
fn announce_upstream(resolve: crate::upstream::UpstreamResolve) {
    for name in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        if let Some(value) = std::env::var(name).ok().filter(|v| !v.is_empty()) {
            // Never print a password from the URL.
            let shown = crate::upstream::without_credentials(&value);
            tracing::warn!("chaining through {shown} (from {name} in portcullis's own environment); pass --no-upstream-proxy or set allow_upstream_proxy = false to go direct");
            if resolve == crate::upstream::UpstreamResolve::Upstream {
                tracing::warn!("[upstream] resolve = \"upstream\": the upstream proxy resolves names, so a name it resolves to a private or metadata address is reached (only IP literals are vetted here); resolve = \"here\" vets every answer");
            }
            return;
        }
    }
}

/// Raises the soft limit on open files to the hard limit: each tunnel holds
/// two descriptors, and the default soft limit (often 1024) is reached long
/// before the machine is busy.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
                Err(error) => tracing::debug!(%error, "could not raise the open-file limit"),
            }
        }
    }
}

/// A configuration that cannot be used: exit 64, or 69 when it is fine
/// but a secret it names cannot be read.
fn config_error(error: &crate::config::ConfigError) -> ExitCode {
    match error {
        crate::config::ConfigError::Unavailable { .. } => {
            let _ = writeln!(std::io::stderr(), "portcullis: {error}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        _ => usage_error(error),
    }
}

fn usage_error(error: &dyn std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "portcullis: {error}");
    ExitCode::from(EXIT_USAGE)
}
