//! The command line's shape: clap types, nothing else.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::ApprovalMode;

/// A local network-policy proxy.
#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about,
    args_conflicts_with_subcommands = true,
    help_template = "{name} {version} (--version)\n{about-with-newline}\n{usage-heading} {usage}\n\n{all-args}{after-help}"
)]
pub struct Cli {
    #[command(subcommand)]
    pub(super) command: Option<Command>,
    #[command(flatten)]
    pub(super) serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub(super) enum Command {
    /// Serve the proxy (the default) and print the proxy environment.
    Serve(ServeArgs),
    /// Run a command with its network going through the proxy.
    Run(RunArgs),
    /// Print the policy's decision for a URL or host:port.
    Check(CheckArgs),
    /// Print the HTTPS interception CA's path and certificate (creating the
    /// CA if there is none), for clients to trust.
    Ca(CaArgs),
    /// Print a completion script for SHELL: `source <(portcullis
    /// completions bash)`, or save it where the shell looks.
    Completions(CompletionsArgs),
    /// Print the manual page (roff): `portcullis man | man -l -`.
    Man,
}

#[derive(Debug, Args)]
pub(super) struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub(super) shell: clap_complete::Shell,
}

/// Options shared by every subcommand; flags win over the config file and
/// the environment, and list flags add to the configured lists.
#[derive(Debug, Clone, Default, Args)]
pub struct Options {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE", env = "PORTCULLIS_CONFIG")]
    pub(super) config: Option<PathBuf>,
    /// HTTP listener address (IP:PORT; port 0 for an ephemeral port).
    #[arg(long, value_name = "ADDR", value_parser = http_listen)]
    pub(super) http: Option<SocketAddr>,
    /// SOCKS5 listener address (IP:PORT).
    #[arg(long, value_name = "ADDR", value_parser = socks_listen)]
    pub(super) socks: Option<SocketAddr>,
    /// Do not serve SOCKS5.
    #[arg(long, conflicts_with = "socks")]
    pub(super) no_socks: bool,
    /// Add an allowlist pattern (repeatable).
    #[arg(long = "allow", value_name = "PATTERN")]
    pub(super) allow: Vec<String>,
    /// Add a denylist pattern (repeatable).
    #[arg(long = "deny", value_name = "PATTERN")]
    pub(super) deny: Vec<String>,
    /// full, or limited (GET/HEAD/OPTIONS only).
    #[arg(long, value_enum)]
    pub(super) mode: Option<ModeArg>,
    /// Allow local/private addresses for allowlisted hosts.
    #[arg(long)]
    pub(super) allow_local_binding: bool,
    /// Intercept HTTPS in limited mode (clients must trust `portcullis ca`).
    #[arg(long)]
    pub(super) mitm: bool,
    /// Do not chain through the proxy named by this process's own
    /// HTTP_PROXY/HTTPS_PROXY/ALL_PROXY (allow_upstream_proxy = false).
    #[arg(long)]
    pub(super) no_upstream_proxy: bool,
    /// Who answers an allowlist miss: deny (nobody), prompt (this
    /// terminal), command (the `[approval] command` reviewer).
    #[arg(long, value_enum, value_name = "MODE")]
    pub(super) approve: Option<ApprovalMode>,
    /// The reviewer program `--approve command` runs (implies it):
    /// `[approval] command`. It must exist and be executable.
    #[arg(long, value_name = "PROG")]
    pub(super) reviewer: Option<String>,
    /// Answer NAME with IP without DNS (repeatable), like curl's --resolve.
    #[arg(long = "resolve", value_name = "NAME=IP")]
    pub(super) resolve: Vec<String>,
    /// Append every refusal to FILE as one JSON line.
    #[arg(long, value_name = "FILE")]
    pub(super) violations_log: Option<PathBuf>,
    /// Append every allowed request and tunnel to FILE as one JSON line.
    #[arg(long, value_name = "FILE")]
    pub(super) access_log: Option<PathBuf>,
    /// Worker threads (`[runtime] threads`; default: one per core).
    #[arg(long, value_name = "N", env = "PORTCULLIS_THREADS")]
    pub(super) threads: Option<std::num::NonZeroUsize>,
    /// Decide as the config's `[profiles.NAME]`: its lists, rules,
    /// credentials and limits added to the top-level ones, for every
    /// request. `run --attach --profile NAME`: as a user of that profile of
    /// the running `serve`.
    #[arg(long, value_name = "NAME")]
    pub(super) profile: Option<String>,
    /// Set by `run`: without --profile, the top-level policy alone (the
    /// file's profiles and users are for `serve`).
    #[arg(skip)]
    pub(super) top_level_only: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum ModeArg {
    Full,
    Limited,
}

#[derive(Debug, Args)]
pub(super) struct RunArgs {
    #[command(flatten)]
    pub(super) options: Options,
    /// Do not require the per-run proxy credential (for clients that cannot
    /// send credentials from the proxy URL).
    #[arg(long)]
    pub(super) no_auth: bool,
    /// Start no proxy: point the command at the running `serve` of the
    /// same config (its network.proxy_url and socks_url, which must name
    /// a port), as the `[[auth.users]]` user of --profile (or with the
    /// `[auth]` credential). That serve decides and records.
    #[arg(long, conflicts_with_all = ["learn", "isolate", "no_auth"])]
    pub(super) attach: bool,
    /// Learn the allowlist: allow every public destination, then write the
    /// ones the command reached to FILE as a `[network]` table for
    /// `--config FILE`. Local and private addresses stay refused. With
    /// --mitm, HTTPS is intercepted and the methods and path prefixes each
    /// host received are written as `[[rules]]` too.
    #[arg(long, value_name = "FILE")]
    pub(super) learn: Option<PathBuf>,
    /// Run the command in its own network namespace whose only way out is
    /// the proxy: direct connections and DNS are captured and decided
    /// (Linux; `[run] isolate`). Where user namespaces are refused, it is
    /// fenced with Landlock and seccomp instead, or refused;
    /// `--isolate=best-effort` runs it with what the system allows.
    #[arg(
        long,
        value_name = "HOW",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "strict"
    )]
    pub(super) isolate: Option<IsolateHow>,
    /// Under --isolate, let the command connect to this Unix socket of the
    /// machine (a Docker or ssh-agent socket; repeatable). Others it did
    /// not create inside the run are refused; '*' opens every one (no
    /// confinement, printed). `[run] unix_sockets` adds to these.
    #[arg(long = "allow-unix-socket", value_name = "PATH")]
    pub(super) allow_unix_socket: Vec<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(super) command: Vec<OsString>,
}

/// How `--isolate` holds where it cannot have all it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum IsolateHow {
    /// Namespaces, else Landlock and seccomp, else refuse to start.
    Strict,
    /// As strict, but where neither can be had, run with what the system
    /// allows and say what is missing.
    BestEffort,
}

#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    #[command(flatten)]
    pub(super) options: Options,
    /// Also write the proxy environment (`export NAME='VALUE'` lines) to
    /// FILE once listening — whole, by rename, mode 0600 — and remove it on
    /// exit: `portcullis serve --env-file env.sh & … . ./env.sh`.
    #[arg(long, value_name = "FILE")]
    pub(super) env_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct CaArgs {
    /// TOML configuration file (for `[mitm] ca_dir`).
    #[arg(long, value_name = "FILE", env = "PORTCULLIS_CONFIG")]
    pub(super) config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct CheckArgs {
    #[command(flatten)]
    pub(super) options: Options,
    /// The method of an http:// request (limited mode decides on it);
    /// https:// and host:port targets are CONNECTs.
    #[arg(long, value_name = "METHOD")]
    pub(super) method: Option<String>,
    /// A request body, judged as the proxy would judge it before sending
    /// (JSON-RPC calls, `_method`, secrets); the method defaults to POST.
    #[arg(long, value_name = "BODY", conflicts_with = "data_file")]
    pub(super) data: Option<String>,
    /// The request body from a file (`-`: standard input).
    #[arg(long, value_name = "FILE")]
    pub(super) data_file: Option<std::path::PathBuf>,
    /// A request header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    pub(super) headers: Vec<String>,
    /// One object per target, a line each (`target`, `decision`, `reason`,
    /// `rule`, `message`), instead of text.
    #[arg(long)]
    pub(super) json: bool,
    /// URLs (http://host/…, https://host/…) or host:port, one or more.
    #[arg(required = true, value_name = "TARGET")]
    pub(super) targets: Vec<String>,
}

/// `--http`: read as `network.proxy_url` is.
fn http_listen(text: &str) -> Result<SocketAddr, String> {
    crate::units::listen_address(text, crate::units::HTTP_SCHEMES)
}

/// `--socks`: read as `network.socks_url` is.
fn socks_listen(text: &str) -> Result<SocketAddr, String> {
    crate::units::listen_address(text, crate::units::SOCKS_SCHEMES)
}
