//! The `portcullis` command line: `serve` (default), `run`, `check`.
//!
//! Exit codes: 64 for bad usage or configuration (one line on stderr),
//! 69 when the proxy cannot start; `check` exits 0 allow / 1 deny / 2 ask /
//! 3 allowed but unresolvable (several targets: deny, then ask, then
//! unresolvable wins);
//! `run` exits with the child's status (128 + N when a signal N ended it).

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use http::Request;
use portcullis_middleware::policy::Decision;
use portcullis_middleware::{
    find_blocked, BlockDecision, JsonLinesSink, Mode, PolicyHandle, Protocol, Target,
    ViolationLogLayer, ViolationRing,
};

use crate::body::Body;
use crate::transport::model::RequestModel;

use crate::approvers::rules::RulesFile;
use crate::config::{ApprovalMode, Config, ConfigError};
use crate::mitm::CertificateAuthority;
use crate::resolve::{StaticResolver, SystemResolver};
use crate::runner::{Proxy, ProxyBuilder, ProxyHandle};
use crate::upstream::UpstreamProxies;

/// EX_USAGE.
pub const EXIT_USAGE: u8 = 64;
/// EX_UNAVAILABLE.
pub const EXIT_UNAVAILABLE: u8 = 69;

/// A local network-policy proxy.
#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the proxy (the default) and print the proxy environment.
    Serve(ServeArgs),
    /// Run a command with its network going through the proxy.
    Run(RunArgs),
    /// Print the policy's decision for a URL or host:port.
    Check(CheckArgs),
    /// Print the HTTPS interception CA's path and certificate (creating the
    /// CA if there is none), for clients to trust.
    Ca(CaArgs),
}

/// Options shared by every subcommand; flags win over the config file and
/// the environment, and list flags add to the configured lists.
#[derive(Debug, Clone, Default, Args)]
pub struct Options {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE", env = "PORTCULLIS_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP listener address (IP:PORT; port 0 for an ephemeral port).
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// SOCKS5 listener address (IP:PORT).
    #[arg(long, value_name = "ADDR")]
    socks: Option<String>,
    /// Do not serve SOCKS5.
    #[arg(long, conflicts_with = "socks")]
    no_socks: bool,
    /// Add an allowlist pattern (repeatable).
    #[arg(long = "allow", value_name = "PATTERN")]
    allow: Vec<String>,
    /// Add a denylist pattern (repeatable).
    #[arg(long = "deny", value_name = "PATTERN")]
    deny: Vec<String>,
    /// full, or limited (GET/HEAD/OPTIONS only).
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// Allow local/private addresses for allowlisted hosts.
    #[arg(long)]
    allow_local_binding: bool,
    /// Intercept HTTPS in limited mode (clients must trust `portcullis ca`).
    #[arg(long)]
    mitm: bool,
    /// Do not chain through the proxy named by this process's own
    /// HTTP_PROXY/HTTPS_PROXY/ALL_PROXY (allow_upstream_proxy = false).
    #[arg(long)]
    no_upstream_proxy: bool,
    /// Who answers an allowlist miss: deny (nobody), prompt (this
    /// terminal), command (the `[approval] command` reviewer).
    #[arg(long, value_enum, value_name = "MODE")]
    approve: Option<ApprovalMode>,
    /// The reviewer program `--approve command` runs (implies it):
    /// `[approval] command`. It must exist and be executable.
    #[arg(long, value_name = "PROG")]
    reviewer: Option<String>,
    /// Answer NAME with IP without DNS (repeatable), like curl's --resolve.
    #[arg(long = "resolve", value_name = "NAME=IP")]
    resolve: Vec<String>,
    /// Append every refusal to FILE as one JSON line.
    #[arg(long, value_name = "FILE")]
    violations_log: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Full,
    Limited,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    options: Options,
    /// Do not require the per-run proxy credential (for clients that cannot
    /// send credentials from the proxy URL).
    #[arg(long)]
    no_auth: bool,
    /// Learn the allowlist: allow every public destination, then write the
    /// ones the command reached to FILE as a `[network]` table for
    /// `--config FILE`. Local and private addresses stay refused.
    #[arg(long, value_name = "FILE")]
    learn: Option<PathBuf>,
    /// Run the command in its own network namespace whose only way out is
    /// the proxy: direct connections and DNS fail (Linux; `[run] isolate`).
    #[arg(long)]
    isolate: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    options: Options,
    /// Also write the proxy environment (`export NAME='VALUE'` lines) to
    /// FILE once listening — whole, by rename, mode 0600 — and remove it on
    /// exit: `portcullis serve --env-file env.sh & … . ./env.sh`.
    #[arg(long, value_name = "FILE")]
    env_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CaArgs {
    /// TOML configuration file (for `[mitm] ca_dir`).
    #[arg(long, value_name = "FILE", env = "PORTCULLIS_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    options: Options,
    /// The method of an http:// request (limited mode decides on it);
    /// https:// and host:port targets are CONNECTs.
    #[arg(long, value_name = "METHOD")]
    method: Option<String>,
    /// One object per target, a line each (`target`, `decision`, `reason`,
    /// `rule`, `message`), instead of text.
    #[arg(long)]
    json: bool,
    /// URLs (http://host/…, https://host/…) or host:port, one or more.
    #[arg(required = true, value_name = "TARGET")]
    targets: Vec<String>,
}

/// A configuration merged from every source, with where it came from.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// The file (or "defaults") for messages.
    pub origin: String,
    /// The config file, if one was named: refusals then name their fix as
    /// a key in it; otherwise as a flag.
    pub file: Option<PathBuf>,
}

impl Options {
    /// Says once, at start, what an `--allow '*'` means.
    fn warn_allow_everything(&self) {
        if self.allow.iter().any(|pattern| pattern == "*") {
            tracing::warn!("--allow '*' allows every public destination: the allowlist no longer narrows anything (the denylist, local and metadata addresses still apply)");
        }
    }

    /// The config file named by `--config` or `PORTCULLIS_CONFIG`.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }

    /// Loads the configuration and applies the flags.
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let mut config = Config::load(self.config.as_deref())?;
        let origin = match &self.config {
            Some(path) => path.display().to_string(),
            None => "defaults, environment and flags".to_owned(),
        };
        let network = &mut config.network;
        if let Some(http) = &self.http {
            network.proxy_url = http.clone();
            // An ephemeral HTTP port with no SOCKS address asked for: SOCKS
            // is ephemeral too, so a second instance does not collide on 8081.
            if let (Ok(address), None) = (http.parse::<SocketAddr>(), &self.socks) {
                if address.port() == 0 {
                    network.socks_url = format!("socks5://{}", SocketAddr::new(address.ip(), 0));
                }
            }
        }
        if let Some(socks) = &self.socks {
            network.socks_url = socks.clone();
        }
        if self.no_socks {
            network.enable_socks5 = false;
        }
        network.allowed_domains.extend(self.allow.iter().cloned());
        network.denied_domains.extend(self.deny.iter().cloned());
        if let Some(mode) = self.mode {
            network.mode = match mode {
                ModeArg::Full => Mode::Full,
                ModeArg::Limited => Mode::Limited,
            };
        }
        if self.mitm {
            network.mitm = true;
        }
        if self.no_upstream_proxy {
            network.allow_upstream_proxy = false;
        }
        if let Some(reviewer) = &self.reviewer {
            config.approval.command = vec![reviewer.clone()];
            config.approval.mode = ApprovalMode::Command;
        }
        if let Some(mode) = self.approve {
            config.approval.mode = mode;
        }
        if self.allow_local_binding {
            network.allow_local_binding = true;
        }
        for entry in &self.resolve {
            let invalid = |message: String| ConfigError::Invalid {
                key: "--resolve".into(),
                origin: "the command line".into(),
                message,
            };
            let (name, ip) = entry
                .split_once('=')
                .ok_or_else(|| invalid(format!("{entry:?} is not NAME=IP")))?;
            ip.parse::<IpAddr>().map_err(|_| {
                invalid(format!(
                    "{entry:?}: {ip:?} is not an IP address (NAME=IP, e.g. svc.test=127.0.0.1)"
                ))
            })?;
            portcullis_middleware::Host::parse(name)
                .map_err(|e| invalid(format!("{entry:?}: {name:?} is not a host name: {e}")))?;
            config
                .dns
                .hosts
                .entry(name.to_owned())
                .or_default()
                .push(ip.to_owned());
        }
        if let Some(file) = &self.violations_log {
            config.log.violations_file = Some(file.clone());
        }
        Ok(Loaded {
            config,
            origin,
            file: self.config.clone(),
        })
    }
}

impl Loaded {
    /// A proxy builder for this configuration (listeners from the config).
    pub fn builder(&self) -> Result<Prepared, ConfigError> {
        self.builder_recording(None, None)
    }

    /// The same, also handing every refusal to `tally` (the `run`
    /// summary) and `learned` (`run --learn`).
    fn builder_recording(
        &self,
        tally: Option<crate::summary::Tally>,
        learned: Option<crate::learn::Learned>,
    ) -> Result<Prepared, ConfigError> {
        let config = &self.config;
        let origin = &self.origin;
        let policy = config.policy(origin)?;
        let hosts = config.dns_hosts(origin)?;
        let resolver = StaticResolver::new(hosts, Arc::new(SystemResolver));
        let ring = ViolationRing::default();
        let mut violations = ViolationLogLayer::new(ring.clone());
        if let Some(file) = &config.log.violations_file {
            let sink = JsonLinesSink::open(file).map_err(|e| ConfigError::Invalid {
                key: "log.violations_file".into(),
                origin: origin.clone(),
                message: format!("cannot open {}: {e}", file.display()),
            })?;
            violations = violations.with_sink(sink);
        }
        if let Some(tally) = tally {
            violations = violations.with_sink(tally);
        }
        if let Some(learned) = learned {
            violations = violations.with_sink(learned);
        }
        let socks = if config.network.enable_socks5 {
            Some(config.socks_addr(origin)?)
        } else {
            None
        };
        let upstream = config
            .network
            .allow_upstream_proxy
            .then(UpstreamProxies::from_env);
        if upstream.is_some() {
            announce_upstream();
        }
        let (limits, connect_timeout) = config.limits(origin)?;
        let fixes = match &self.file {
            Some(file) => crate::hints::Fixes::File(file.clone()),
            None => crate::hints::Fixes::Flags,
        };
        let mut builder = Proxy::builder()
            .refusal_fixes(fixes)
            .metrics_addr(config.metrics.address(origin)?)
            .http_addr(config.http_addr(origin)?)
            .socks_addr(socks)
            .socks_udp(config.network.enable_socks5_udp)
            .dangerously_allow_non_loopback(config.network.dangerously_allow_non_loopback_proxy)
            .force_loopback(config.grants_unix_sockets())
            .policy(PolicyHandle::new(policy))
            .resolver(Arc::new(resolver))
            .resolve_timeout(config.dns_timeout(origin)?)
            .upstream(upstream)
            .upstream_roots(config.upstream_roots(origin)?)
            .limits(limits)
            .connect_timeout(connect_timeout)
            .all_proxy_socks(config.network.all_proxy == crate::config::AllProxy::Socks5h)
            .leaf_cache_size(config.mitm.leaf_cache_size)
            .violations(violations);
        if let Some((username, password)) = config.auth.credential(origin)? {
            builder = builder.credentials(username, password);
        }
        let (builder, rules, approver) = match crate::approvers::from_config(config, origin, &ring)?
        {
            None => (builder, None, None),
            Some((approver, name)) => {
                let path = config.rules_file(origin)?;
                let rules = RulesFile::load(&path).map_err(|e| ConfigError::Invalid {
                    key: "approval.rules_file".into(),
                    origin: origin.clone(),
                    message: e.to_string(),
                })?;
                let builder = builder
                    .approver(approver, config.approval_timeout(origin)?)
                    .approval_limits(config.approval.max_pending, config.approval.max_session)
                    .rules(Arc::new(rules.clone()));
                (builder, Some(rules), Some(name))
            }
        };
        Ok(Prepared {
            builder,
            ring,
            rules,
            approver,
        })
    }
}

/// A builder for the configuration, and what the binary keeps beside it.
#[derive(Debug)]
pub struct Prepared {
    /// The proxy, ready to start.
    pub builder: ProxyBuilder,
    /// The violation ring it records into.
    pub ring: ViolationRing,
    /// The persisted rules, when an approver is configured.
    pub rules: Option<RulesFile>,
    /// Who answers allowlist misses, for messages.
    pub approver: Option<String>,
}

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
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    // Under `run`, RUST_LOG belongs to the child: only PORTCULLIS_LOG is ours.
    let (command, default_filter, read_rust_log) = match cli.command {
        Some(Command::Run(args)) => (Command::Run(args), "warn,portcullis::violation=off", false),
        // `check` answers on stdout; its refusal is not news for the log.
        Some(Command::Check(args)) => (Command::Check(args), "error", true),
        Some(command) => (command, "info", true),
        None => (Command::Serve(cli.serve), "info", true),
    };
    init_tracing(default_filter, read_rust_log);
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
        }
    })
}

/// Starts logging to stderr, filtered by `PORTCULLIS_LOG`, else (not under
/// `run`) `RUST_LOG`, else `default_filter`.
fn init_tracing(default_filter: &str, read_rust_log: bool) {
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
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
}

/// 128 random bits as hex, from the operating system's randomness (through
/// the standard library's hasher keys).
fn random_secret() -> String {
    use std::hash::BuildHasher;
    let half = || std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("{:016x}{:016x}", half(), half())
}

/// Says, once at start, which proxy this one chains through: an inherited
/// HTTP_PROXY silently making every refusal somebody else's is how `--allow`
/// "does nothing".
fn announce_upstream() {
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
            let shown = match value.split_once("://") {
                Some((scheme, rest)) => match rest.rsplit_once('@') {
                    Some((_, host)) => format!("{scheme}://…@{host}"),
                    None => value.clone(),
                },
                None => value.clone(),
            };
            tracing::warn!("chaining through {shown} (from {name} in portcullis's own environment); pass --no-upstream-proxy or set allow_upstream_proxy = false to go direct");
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

fn usage_error(error: &dyn std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "portcullis: {error}");
    ExitCode::from(EXIT_USAGE)
}

/// Starts the proxy for `serve` and `run`, and the task that reloads its
/// policy and rules when their files change (and on SIGHUP with `hangup`).
/// `ephemeral` (for `run`): ephemeral ports and, unless `no_auth`, a random
/// credential for this run.
async fn start(
    options: &Options,
    ephemeral: bool,
    hangup: bool,
    no_auth: bool,
    tally: Option<crate::summary::Tally>,
    learn: Option<crate::learn::Learned>,
    isolate: bool,
) -> Result<ProxyHandle, ExitCode> {
    let loaded = options.load().map_err(|e| usage_error(&e))?;
    if !loaded.config.network.enabled {
        return Err(usage_error(&format!(
            "the proxy is disabled (network.enabled = false in {})",
            loaded.origin
        )));
    }
    let Prepared {
        mut builder, rules, ..
    } = loaded
        .builder_recording(tally, learn.clone())
        .map_err(|e| usage_error(&e))?;
    if loaded.config.network.mitm {
        let ca = load_ca(&loaded.config, &loaded.origin)?;
        if loaded.config.network.mode == Mode::Full {
            tracing::info!(
                "mitm is on, but mode is full: nothing is intercepted until mode = \"limited\""
            );
        }
        builder = builder.mitm(Some(Arc::new(ca)));
    }
    if ephemeral {
        // Under `run` the command line is at hand: refusals name flags,
        // even when a config file is also given (flags add to it).
        builder = builder.refusal_fixes(crate::hints::Fixes::Flags);
        // `run` listens on ephemeral loopback ports unless told otherwise.
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        if options.http.is_none() {
            builder = builder.http_addr(loopback);
        }
        if options.socks.is_none() {
            let socks = loaded.config.network.enable_socks5.then_some(loopback);
            builder = builder.socks_addr(socks);
        }
        if isolate {
            // A UDP relay address would be outside the namespace.
            builder = builder.socks_udp(false);
        }
        if !no_auth {
            // Only the child knows it: other local programs cannot use this proxy.
            builder = builder.credentials("portcullis", random_secret());
        }
    }
    let started = match learn {
        Some(learned) => {
            builder
                .inner_layer(crate::learn::LearnLayer(learned))
                .start()
                .await
        }
        None => builder.start().await,
    };
    let proxy = started.map_err(|error| {
        let _ = writeln!(std::io::stderr(), "portcullis: {error}");
        ExitCode::from(EXIT_UNAVAILABLE)
    })?;
    // `run`'s credential is its own per-run secret: only `serve` takes
    // `[auth]` from a reloaded file.
    let credentials = (!ephemeral).then(|| proxy.live_credentials());
    tokio::spawn(crate::reload::watch(
        options.clone(),
        proxy.policy().clone(),
        credentials,
        rules,
        hangup,
    ));
    Ok(proxy)
}

async fn serve(args: ServeArgs) -> ExitCode {
    let options = args.options;
    options.warn_allow_everything();
    let deadline = match options
        .load()
        .and_then(|loaded| loaded.config.shutdown_deadline(&loaded.origin))
    {
        Ok(deadline) => deadline,
        Err(error) => return usage_error(&error),
    };
    // Listening for SIGTERM before anyone learns the address: a client that
    // connects and signals at once must not find the default action.
    let signals = ShutdownSignals::install();
    let usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1());
    let proxy = match start(&options, false, true, false, None, None, false).await {
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
async fn dump_violations_on_usr1(
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
struct ShutdownSignals {
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
enum Stopped {
    /// SIGINT or SIGTERM.
    Asked,
    /// Its terminal hung up.
    TerminalGone,
}

/// Whether this process has a controlling terminal it can open.
fn terminal_present() -> bool {
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

async fn run(args: RunArgs) -> ExitCode {
    // SIGHUP goes to the child under `run`; files are still watched.
    // Each refused destination is said once, as it happens, by the tally;
    // the violation log's own line is not shown under `run`.
    let tally = crate::summary::Tally::live();
    args.options.warn_allow_everything();
    let loaded = args.options.load().ok();
    let isolate = args.isolate
        || loaded
            .as_ref()
            .is_some_and(|loaded| loaded.config.run.isolate);
    // The learn file is checked before anything runs: a path that cannot
    // be written fails now, not after the command did its work.
    if let Some(path) = &args.learn {
        if let Err(error) = crate::learn::Learned::check_writable(path) {
            return usage_error(&format!(
                "--learn {}: cannot write there ({error}); name a file in a folder you can write",
                path.display()
            ));
        }
    }
    let learned = args.learn.as_ref().map(|_| {
        crate::learn::Learned::new(
            loaded
                .as_ref()
                .is_some_and(|loaded| loaded.config.network.allow_local_binding),
        )
    });
    let mut options = args.options.clone();
    if learned.is_some() {
        // Every public destination; local, private and metadata addresses
        // are still refused by the policy, and the denylist still wins.
        options.allow.push("*".to_owned());
    }
    let proxy = match start(
        &options,
        true,
        false,
        args.no_auth,
        Some(tally.clone()),
        learned.clone(),
        isolate,
    )
    .await
    {
        Ok(proxy) => proxy,
        Err(code) => return code,
    };
    let Some((program, arguments)) = args.command.split_first() else {
        return usage_error(&"run needs a command after --");
    };
    // Under --isolate the command runs inside the bridge (this binary, in
    // its own namespace), which the sockets in `bridges` connect to the proxy.
    let (mut command, bridges) = if isolate {
        match isolated_command(&proxy, &args.command) {
            Ok(isolated) => isolated,
            Err(error) => {
                let _ = writeln!(std::io::stderr(), "portcullis: {error}");
                proxy.shutdown(Duration::ZERO).await;
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        }
    } else {
        let mut command = tokio::process::Command::new(program);
        command.args(arguments);
        (command, None)
    };
    command.envs(proxy.child_env());
    if isolate {
        command.env("PORTCULLIS_ISOLATED", "1");
        command.env("PORTCULLIS_SOCKS_UDP", "off");
    }
    // Listening before the child exists, so no signal meant for it is lost.
    let signals = ForwardedSignals::install();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            proxy.shutdown(Duration::ZERO).await;
            return cannot_run(program, &error);
        }
    };
    let status = wait_forwarding_signals(&mut child, signals).await;
    proxy.shutdown(Duration::from_secs(1)).await;
    drop(bridges);
    // Each refused destination once, with the flag that would allow it.
    let mut stderr = std::io::stderr().lock();
    for line in tally.lines() {
        let _ = writeln!(stderr, "{line}");
    }
    drop(stderr);
    if let (Some(path), Some(learned)) = (&args.learn, &learned) {
        let command: Vec<String> = args
            .command
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        match learned.write(path, &command.join(" ")) {
            Ok(()) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "portcullis: wrote the allowlist this command needed ({} destination{}) to {}; run it again with --config {}",
                    learned.len(),
                    if learned.len() == 1 { "" } else { "s" },
                    path.display(),
                    path.display()
                );
            }
            Err(error) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "portcullis: cannot write the learn file {}: {error}",
                    path.display()
                );
                // The command's own failure comes first; a success that
                // could not be recorded is not one.
                return match &status {
                    Ok(status) if !status.success() => ExitCode::from(exit_code(*status)),
                    _ => ExitCode::from(EXIT_UNAVAILABLE),
                };
            }
        }
    }
    match status {
        Ok(status) => ExitCode::from(exit_code(status)),
        Err(error) => {
            let _ = writeln!(
                std::io::stderr(),
                "portcullis: waiting for the command failed: {error}"
            );
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

fn load_ca(config: &Config, origin: &str) -> Result<CertificateAuthority, ExitCode> {
    let directory = config.ca_dir(origin).map_err(|e| usage_error(&e))?;
    CertificateAuthority::load_or_create(&directory).map_err(|error| {
        let _ = writeln!(std::io::stderr(), "{error}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn ca(args: CaArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(error) => return usage_error(&error),
    };
    let origin = match &args.config {
        Some(path) => path.display().to_string(),
        None => "defaults and environment".to_owned(),
    };
    let ca = match load_ca(&config, &origin) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let _ = write!(
        std::io::stdout(),
        "{}\n{}",
        ca.cert_path().display(),
        ca.cert_pem()
    );
    ExitCode::SUCCESS
}

pub(crate) fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from((128 + signal) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}

/// The bridge command that runs `command` isolated, and the sockets it
/// reaches the proxy through.
#[cfg(unix)]
fn isolated_command(
    proxy: &ProxyHandle,
    command: &[OsString],
) -> Result<(tokio::process::Command, Option<crate::isolate::Bridges>), String> {
    if !cfg!(target_os = "linux") {
        return Err("--isolate needs Linux network namespaces; run without --isolate".into());
    }
    let bridges = crate::isolate::Bridges::start(proxy.http_addr(), proxy.socks_addr())
        .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe()
        .map_err(|e| format!("--isolate re-runs portcullis and cannot find it: {e}"))?;
    let mut bridge = tokio::process::Command::new(exe);
    bridge.args(crate::isolate::bridge_arguments(
        bridges.dir(),
        proxy.http_addr(),
        proxy.socks_addr(),
        command,
    ));
    Ok((bridge, Some(bridges)))
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

/// `check`'s answer for one target.
#[derive(Debug, serde::Serialize)]
struct Verdict {
    target: String,
    /// allow, deny, ask, unresolvable (allowed, but the name does not
    /// resolve, so a live request would fail), or error (exit 1).
    decision: &'static str,
    reason: Option<String>,
    rule: Option<String>,
    message: Option<String>,
}

impl Verdict {
    /// The exit code of this verdict alone.
    fn code(&self) -> u8 {
        match self.decision {
            "allow" => CHECK_ALLOW,
            "ask" => CHECK_ASK,
            "unresolvable" => CHECK_UNRESOLVABLE,
            _ => CHECK_DENY,
        }
    }

    fn text(&self) -> String {
        let mut text = format!("{} {}", self.decision, self.target);
        for (name, value) in [
            ("reason", &self.reason),
            ("rule", &self.rule),
            ("message", &self.message),
        ] {
            if let Some(value) = value {
                text.push_str(&format!("\n{name}: {value}"));
            }
        }
        text
    }
}

/// `check`'s exit codes: every target allowed.
const CHECK_ALLOW: u8 = 0;
/// A target is denied.
const CHECK_DENY: u8 = 1;
/// A target would be asked (and none is denied).
const CHECK_ASK: u8 = 2;
/// A target is allowed but its name does not resolve (and none is denied
/// or asked).
const CHECK_UNRESOLVABLE: u8 = 3;

/// Several targets: deny wins, then ask, then unresolvable.
fn combined_code(verdicts: &[Verdict]) -> u8 {
    let codes: Vec<u8> = verdicts.iter().map(Verdict::code).collect();
    [CHECK_DENY, CHECK_ASK, CHECK_UNRESOLVABLE]
        .into_iter()
        .find(|code| codes.contains(code))
        .unwrap_or(CHECK_ALLOW)
}

async fn check(args: CheckArgs) -> ExitCode {
    let loaded = match args.options.load() {
        Ok(loaded) => loaded,
        Err(error) => return usage_error(&error),
    };
    let Prepared {
        builder,
        approver,
        rules,
        ..
    } = match loaded.builder() {
        Ok(prepared) => prepared,
        Err(error) => return usage_error(&error),
    };
    // With interception in limited mode, what an https:// URL asks is the
    // request inside the tunnel, decided as the proxy will decide it.
    let network = &loaded.config.network;
    let intercepted = network.mitm && network.mode == Mode::Limited;
    // Every target is parsed before any is decided: a typo is a usage error.
    let mut requests = Vec::with_capacity(args.targets.len());
    for target in &args.targets {
        match check_request(target, args.method.as_deref(), intercepted) {
            Ok(request) => requests.push(request),
            Err(error) => {
                return usage_error(&format!(
                    "invalid target {target:?}: {error} (use a URL or host:port)"
                ))
            }
        }
    }
    let policy = loaded.config.policy(&loaded.origin).ok();
    let service = builder.decision_service();
    let fixes = builder.fixes().clone();
    let mut verdicts = Vec::with_capacity(requests.len());
    for request in requests {
        let (Some(target), Some(protocol)) = (
            request.extensions().get::<Target>().cloned(),
            request.extensions().get::<Protocol>().copied(),
        ) else {
            return usage_error(&"the target could not be parsed");
        };
        // The decision is the stack's; the allowlist and the rules file are
        // read again only to name the entry that allowed it.
        let decision = crate::transport::call_stack(service.clone(), request).await;
        let verdict = match decision {
            Ok(_) => Verdict {
                decision: "allow",
                rule: Some(allowing_rule(
                    policy.as_ref(),
                    rules.as_ref(),
                    &target,
                    protocol,
                )),
                target: target.to_string(),
                reason: None,
                message: None,
            },
            Err(error) => match find_blocked(error.as_ref()) {
                Some(blocked) if blocked.decision == BlockDecision::Ask => Verdict {
                    target: target.to_string(),
                    decision: "ask",
                    reason: Some(blocked.reason.to_string()),
                    rule: None,
                    message: Some(format!(
                        "no allowlist entry or persisted rule answers; {} would be asked",
                        approver.as_deref().unwrap_or("the approver"),
                    )),
                },
                Some(blocked) => Verdict {
                    target: target.to_string(),
                    decision: "deny",
                    reason: Some(blocked.reason.to_string()),
                    rule: Some(blocked.rule.clone().unwrap_or_else(|| "none".into())),
                    message: Some(fixes.message(blocked)),
                },
                None if !unresolvable(error.as_ref()) => Verdict {
                    target: target.to_string(),
                    decision: "error",
                    reason: None,
                    rule: None,
                    message: Some(error.to_string()),
                },
                None => Verdict {
                    target: target.to_string(),
                    decision: "unresolvable",
                    reason: Some("unresolvable".into()),
                    rule: Some(allowing_rule(
                        policy.as_ref(),
                        rules.as_ref(),
                        &target,
                        protocol,
                    )),
                    message: Some(format!(
                        "the policy allows it, but a live request would fail: {error}"
                    )),
                },
            },
        };
        verdicts.push(verdict);
    }
    let mut stdout = std::io::stdout().lock();
    for (index, verdict) in verdicts.iter().enumerate() {
        let line = if args.json {
            serde_json::to_string(verdict).unwrap_or_default()
        } else if index + 1 < verdicts.len() {
            format!("{}\n", verdict.text())
        } else {
            verdict.text()
        };
        let _ = writeln!(stdout, "{line}");
    }
    ExitCode::from(combined_code(&verdicts))
}

/// Whether a decision failed only because the name does not resolve (or
/// its lookup timed out).
fn unresolvable(error: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        portcullis_middleware::ProxyErrorRef::find(error),
        Some(portcullis_middleware::ProxyErrorRef::Upstream(upstream))
            if matches!(
                upstream.kind,
                portcullis_middleware::UpstreamErrorKind::Unresolved
                    | portcullis_middleware::UpstreamErrorKind::TimedOut
            )
    )
}

/// The entry that let `target` through: an allowlist entry, else the
/// persisted rule (named with its file).
fn allowing_rule(
    policy: Option<&portcullis_middleware::NetworkPolicy>,
    rules: Option<&RulesFile>,
    target: &Target,
    protocol: Protocol,
) -> String {
    if let Some(Decision::Allow { rule }) = policy.map(|p| p.decide(target)) {
        return rule;
    }
    if let (Some(rules), Target::Host { host, port }) = (rules, target) {
        let key = portcullis_middleware::ApprovalKey {
            host: host.clone(),
            protocol,
            port: *port,
        };
        if let Some((portcullis_middleware::RuleDecision::Allow, name)) =
            portcullis_middleware::RuleBook::lookup(rules, &key)
        {
            return name;
        }
    }
    "none named (allowed without a list entry)".to_owned()
}

/// The request a live client would send for `target`: an absolute-form
/// request for an `http://` URL (with `method`, GET by default), a `CONNECT`
/// for `host:port`, and for an `https://` URL a `CONNECT` — or, when the
/// proxy intercepts, the request inside the tunnel (protocol `https_mitm`).
fn check_request(
    target: &str,
    method: Option<&str>,
    intercepted: bool,
) -> Result<Request<Body>, String> {
    let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let (uri, parsed) = if target.contains("://") {
        let uri: http::Uri = target
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        let parsed = Target::from_uri(&uri).map_err(|e| e.to_string())?;
        (Some(uri), parsed)
    } else {
        let parsed = Target::parse_authority(target, None).map_err(|e| e.to_string())?;
        (None, parsed)
    };
    let protocol = match uri.as_ref().and_then(http::Uri::scheme_str) {
        Some("http") => Protocol::Http,
        Some(_) if intercepted => Protocol::HttpsMitm,
        _ => Protocol::HttpsConnect,
    };
    match uri {
        Some(uri) if protocol != Protocol::HttpsConnect => {
            let method = http::Method::from_bytes(method.unwrap_or("GET").as_bytes())
                .map_err(|e| e.to_string())?;
            let mut request = Request::builder()
                .method(method)
                .uri(uri)
                .body(crate::body::empty())
                .map_err(|e| e.to_string())?;
            RequestModel::new(parsed, protocol, client).apply(&mut request);
            Ok(request)
        }
        _ if method.is_some_and(|m| m != "CONNECT") => Err(
            "this target is a CONNECT tunnel whose methods are not seen; --method is for http:// URLs (and https:// ones when the proxy intercepts)"
                .into(),
        ),
        _ => {
            let model = RequestModel::new(parsed, Protocol::HttpsConnect, client);
            let model = if intercepted {
                model.mark(portcullis_middleware::Interceptable)
            } else {
                model
            };
            model.connect().map_err(|e| e.to_string())
        }
    }
}
