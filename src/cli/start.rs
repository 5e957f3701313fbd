//! Starting the proxy for `serve` and `run`.

use super::args::Options;
use super::ca::load_ca;
use super::load::Prepared;
use super::{usage_error, EXIT_UNAVAILABLE};
use crate::secrets::random_secret;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use portcullis_middleware::Mode;

use crate::runner::ProxyHandle;

/// What the proxy is started for.
pub(super) enum Purpose {
    /// `serve`: the configured listeners; SIGHUP reloads; `[auth]` comes
    /// from the file and is reloaded with it.
    Serve,
    /// `run`: a proxy for one command.
    Run(ForRun),
}

/// How `run` wants its proxy.
pub(super) struct ForRun {
    /// A random credential only the child is given (`--no-auth` turns it
    /// off).
    pub(super) credential: bool,
    /// Under `--isolate`: no SOCKS5 UDP (a relay address would be outside
    /// the child's namespace).
    pub(super) isolated: bool,
    /// Counts refusals for the summary at exit.
    pub(super) tally: crate::summary::Tally,
    /// Under `--learn`: records what the command reached.
    pub(super) learn: Option<crate::learn::Learned>,
}

/// Starts the proxy, and the task that reloads its policy and rules when
/// their files change (and, for `serve`, on SIGHUP). For `run`: ephemeral
/// loopback ports, refusals worded as flags and, unless told otherwise, a
/// random credential for this run.
pub(super) async fn start(options: &Options, purpose: Purpose) -> Result<ProxyHandle, ExitCode> {
    let (tally, learn) = match &purpose {
        Purpose::Serve => (None, None),
        Purpose::Run(run) => (Some(run.tally.clone()), run.learn.clone()),
    };
    let loaded = options.load().map_err(|e| usage_error(&e))?;
    if !loaded.config.network.enabled {
        return Err(usage_error(&format!(
            "the proxy is disabled (network.enabled = false in {})",
            loaded.origin
        )));
    }
    let Prepared {
        mut builder,
        rules,
        secrets,
        ..
    } = loaded
        .builder_recording(tally, learn.clone())
        .map_err(|e| super::config_error(&e))?;
    if loaded.config.holds_secrets() {
        // Holding secrets: no same-user process may read our memory or
        // environment (/proc/PID/environ, ptrace, core dumps).
        #[cfg(target_os = "linux")]
        if let Err(error) = nix::sys::prctl::set_dumpable(false) {
            let _ = writeln!(
                std::io::stderr(),
                "portcullis: cannot make this process non-dumpable ({error}); refusing to hold secrets"
            );
            return Err(ExitCode::from(EXIT_UNAVAILABLE));
        }
    }
    // Hosts with request rules are intercepted in any mode: their rules
    // need the requests inside the tunnel.
    if loaded.config.intercepts() {
        let ca = load_ca(&loaded.config, &loaded.origin)?;
        let learning = learn.as_ref().is_some_and(|l| l.learns_requests());
        let scanning = loaded.config.scan.is_on();
        if scanning {
            let skipped: Vec<String> = loaded
                .config
                .scan
                .skip_hosts
                .iter()
                .map(ToString::to_string)
                .collect();
            tracing::info!(
                "secret scanning is on: every HTTPS tunnel is intercepted to be seen{}",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", except to {} ([scan] skip_hosts), which pass unseen",
                        skipped.join(", ")
                    )
                }
            );
        }
        if loaded.config.network.mode == Mode::Full
            && !loaded.config.has_profiles()
            && loaded.config.rules.is_empty()
            && !learning
            && !scanning
        {
            tracing::info!(
                "mitm is on, but mode is full: nothing is intercepted until mode = \"limited\" or a host has [[rules]]"
            );
        }
        builder = builder.mitm(Some(Arc::new(ca)));
    }
    if let Purpose::Run(run) = &purpose {
        // Under `run` the command line is at hand: refusals name flags,
        // even when a config file is also given (flags add to it) — but
        // request rules live only in that file, so theirs name it.
        builder = builder.refusal_fixes(match options.config_path() {
            Some(file) => crate::hints::Fixes::FlagsWithFile(file.to_path_buf()),
            None => crate::hints::Fixes::Flags,
        });
        // `run` listens on ephemeral loopback ports unless told otherwise.
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        if options.http.is_none() {
            builder = builder.http_addr(loopback);
        }
        if options.socks.is_none() {
            let socks = loaded.config.network.enable_socks5.then_some(loopback);
            builder = builder.socks_addr(socks);
        }
        if run.isolated {
            // A UDP relay address would be outside the namespace.
            builder = builder.socks_udp(false);
        }
        if run.credential {
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
    let serving = matches!(purpose, Purpose::Serve).then(|| proxy.live_credentials());
    tokio::spawn(super::reload::watch(
        options.clone(),
        proxy.policy().clone(),
        rules,
        serving,
        super::reload::Started {
            intercepting: loaded.config.intercepts(),
            credentials: loaded.config.credentials.clone(),
            secrets,
            profiles: proxy.profile_handles(),
            telemetry: loaded.config.telemetry.clone(),
            upstreams: proxy.upstream_handles(),
        },
    ));
    Ok(proxy)
}
