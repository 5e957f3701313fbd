//! `portcullis run -- COMMAND`: a proxy for one command.

use super::args::RunArgs;
use super::start::{start, ForRun, Purpose};
use super::{usage_error, EXIT_UNAVAILABLE};
use crate::child::{cannot_run, exit_code, wait_forwarding_signals, ForwardedSignals};
use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use crate::runner::ProxyHandle;

pub(super) async fn run(mut args: RunArgs) -> ExitCode {
    if args.attach {
        return run_attached(&args).await;
    }
    // The file's profiles and users are `serve`'s; `run` decides by the
    // top-level policy, or by the one profile --profile names.
    args.options.top_level_only = true;
    // SIGHUP goes to the child under `run`; files are still watched.
    // Each refused destination is said once, as it happens, by the tally;
    // the violation log's own line is not shown under `run`.
    let tally = crate::summary::Tally::live();
    args.options.warn_allow_everything();
    let loaded = args.options.load().ok();
    // The flag, else the config: `--isolate` is strict even where the
    // file says best-effort.
    let isolation = match args.isolate {
        Some(super::args::IsolateHow::Strict) => crate::config::Isolation::On,
        Some(super::args::IsolateHow::BestEffort) => crate::config::Isolation::BestEffort,
        None => loaded
            .as_ref()
            .map_or(crate::config::Isolation::Off, |loaded| {
                loaded.config.run.isolate
            }),
    };
    let isolate = isolation.enabled();
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
        let learned = crate::learn::Learned::new(
            loaded
                .as_ref()
                .is_some_and(|loaded| loaded.config.network.allow_local_binding),
        );
        // With interception, the requests too: `[[rules]]` per host.
        let intercepting = loaded
            .as_ref()
            .is_some_and(|loaded| loaded.config.network.mitm);
        if intercepting {
            learned.with_requests()
        } else {
            learned
        }
    });
    let mut options = args.options.clone();
    if learned.is_some() {
        // Every public destination; local, private and metadata addresses
        // are still refused by the policy, and the denylist still wins.
        options.allow.push("*".to_owned());
    }
    let for_run = ForRun {
        credential: !args.no_auth,
        isolated: isolate,
        tally: tally.clone(),
        learn: learned.clone(),
    };
    let proxy = match start(&options, Purpose::Run(for_run)).await {
        Ok(proxy) => proxy,
        Err(code) => return code,
    };
    let holds_secrets = loaded
        .as_ref()
        .is_some_and(|loaded| !loaded.config.credentials.is_empty());
    #[cfg(unix)]
    if holds_secrets && !isolate && nix::unistd::geteuid().is_root() {
        let _ = writeln!(
            std::io::stderr(),
            "portcullis: warning: the command runs as root without --isolate, so it can read this process's memory, credential secrets included; run it with --isolate, or as an unprivileged user"
        );
    }
    let Some((program, arguments)) = args.command.split_first() else {
        return usage_error(&"run needs a command after --");
    };
    // Under --isolate the command runs inside the bridge (this binary, in
    // its own namespace), which the sockets in `bridges` connect to the proxy.
    let (mut command, bridges) = if isolate {
        let mut unix_sockets: Vec<std::path::PathBuf> = loaded
            .as_ref()
            .map(|loaded| loaded.config.run.unix_sockets.clone())
            .unwrap_or_default();
        unix_sockets.extend(args.allow_unix_socket.iter().cloned());
        // Named from here: the bridge and the command may be elsewhere.
        let unix_sockets: Vec<std::path::PathBuf> = unix_sockets
            .into_iter()
            .map(|path| {
                if path.as_os_str() == "*" {
                    path
                } else {
                    std::path::absolute(&path).unwrap_or(path)
                }
            })
            .collect();
        let best_effort = isolation == crate::config::Isolation::BestEffort;
        match isolated_command(&proxy, &unix_sockets, best_effort, &args.command) {
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
    for name in proxy.child_env_removed() {
        command.env_remove(name);
    }
    command.envs(proxy.child_env());
    if isolate {
        command.env("PORTCULLIS_ISOLATED", "1");
        command.env("PORTCULLIS_SOCKS_UDP", "off");
    }
    // The command (or the bridge) dies with us, even by SIGKILL; what it
    // leaves running is ours to end (see below).
    #[cfg(target_os = "linux")]
    {
        crate::sys::die_with_parent(&mut command);
        crate::child::become_subreaper();
    }
    // Listening before the child exists, so no signal meant for it is lost.
    let signals = ForwardedSignals::install();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) if bridges.is_some() => {
            proxy.shutdown(Duration::ZERO).await;
            let _ = writeln!(
                std::io::stderr(),
                "portcullis: --isolate cannot start its bridge (this binary, re-run): {error}"
            );
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
        Err(error) => {
            proxy.shutdown(Duration::ZERO).await;
            return cannot_run(program, &error);
        }
    };
    // The bridge's sockets take connections from the bridge alone.
    if let (Some(bridges), Some(pid)) = (&bridges, child.id()) {
        bridges.peer().started(pid);
    }
    let status = wait_forwarding_signals(&mut child, signals).await;
    // Nothing the command started outlives it (`sh -c 'server &'`).
    #[cfg(target_os = "linux")]
    {
        let ended = crate::child::end_descendants(Duration::from_secs(1)).await;
        if ended > 0 {
            tracing::info!("ended {ended} process(es) the command left running");
        }
    }
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
                let local = learned.local_len();
                let _ = writeln!(
                    std::io::stderr(),
                    "portcullis: wrote the allowlist this command needed ({} destination{}{}{}) to {}; run it again with --config {}",
                    learned.len(),
                    if learned.len() == 1 { "" } else { "s" },
                    match local {
                        0 => String::new(),
                        1 => ", and 1 local address it was refused".to_owned(),
                        n => format!(", and {n} local addresses it was refused"),
                    },
                    match learned.ruled_hosts() {
                        None => String::new(),
                        Some(1) => ", request rules for 1 host".to_owned(),
                        Some(hosts) => format!(", request rules for {hosts} hosts"),
                    },
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
    finished(status)
}

/// `run`'s exit code: the command's, or 69 when it could not be waited for.
fn finished(status: std::io::Result<std::process::ExitStatus>) -> ExitCode {
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

/// `run --attach`: the command, pointed at the running `serve` of the
/// config, as the user of `--profile` (or with `[auth]`'s credential).
async fn run_attached(args: &RunArgs) -> ExitCode {
    let mut options = args.options.clone();
    let profile = options.profile.take();
    if options.config_path().is_none() {
        return usage_error(
            &"run --attach needs the serve's --config FILE: its listeners and users are read from it",
        );
    }
    let loaded = match options.load() {
        Ok(loaded) => loaded,
        Err(error) => return usage_error(&error),
    };
    let config = &loaded.config;
    let origin = &loaded.origin;
    let http = config.network.proxy_url;
    if http.port() == 0 {
        return usage_error(&format!(
            "run --attach: network.proxy_url in {origin} has port 0, so the serve's port cannot be known; give it a port"
        ));
    }
    let socks = (config.network.enable_socks5 && config.network.socks_url.port() != 0)
        .then_some(config.network.socks_url);
    // Who to be: the first user of the profile; a profile chosen by
    // address alone needs none.
    let credential = match &profile {
        Some(name) => {
            if !config.profiles.contains_key(name) {
                let known: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
                return usage_error(&format!(
                    "--profile {name}: {origin} has no [profiles.{name}] (its profiles: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ));
            }
            let users = match crate::secrets::user_passwords(&config.auth, origin, true) {
                Ok(users) => users,
                Err(error) => return usage_error(&error),
            };
            let named = config
                .auth
                .users
                .iter()
                .position(|user| user.profile.as_deref() == Some(name.as_str()));
            match named.and_then(|index| users.get(index).cloned()) {
                Some(user) => Some(user),
                None if config
                    .profiles
                    .get(name)
                    .is_some_and(|profile| !profile.sources.is_empty()) =>
                {
                    None
                }
                None => {
                    return usage_error(&format!(
                        "--profile {name}: no [[auth.users]] entry in {origin} has profile = \"{name}\", and the profile has no sources; add a user for it"
                    ))
                }
            }
        }
        None => match config.auth.credential(origin) {
            Ok(credential) => credential,
            Err(error) => return usage_error(&error),
        },
    };
    let ca = if config.intercepts() {
        let ca = match super::ca::load_ca(config, origin) {
            Ok(ca) => ca,
            Err(code) => return code,
        };
        match crate::transport::mitm::trust_files(&ca) {
            Ok(files) => Some(files),
            Err(error) => {
                let _ = writeln!(std::io::stderr(), "portcullis: {error}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        }
    } else {
        None
    };
    let env = crate::env::proxy_env(&crate::env::ProxyEnv {
        http,
        socks,
        ca: ca.as_ref(),
        credentials: credential
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str())),
        all_proxy_socks: config.network.all_proxy == crate::config::AllProxy::Socks5h,
    });
    let Some((program, arguments)) = args.command.split_first() else {
        return usage_error(&"run needs a command after --");
    };
    let mut command = tokio::process::Command::new(program);
    command.args(arguments).envs(env);
    #[cfg(target_os = "linux")]
    crate::sys::die_with_parent(&mut command);
    let signals = ForwardedSignals::install();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return cannot_run(program, &error),
    };
    finished(wait_forwarding_signals(&mut child, signals).await)
}

/// The bridge command that runs `command` isolated, and the sockets it
/// reaches the proxy through.
#[cfg(unix)]
pub(super) fn isolated_command(
    proxy: &ProxyHandle,
    unix_sockets: &[std::path::PathBuf],
    best_effort: bool,
    command: &[OsString],
) -> Result<(tokio::process::Command, Option<crate::isolate::Bridges>), String> {
    if !cfg!(target_os = "linux") {
        return Err("--isolate needs Linux network namespaces; run without --isolate".into());
    }
    let bridges = crate::isolate::Bridges::start(proxy.http_addr(), proxy.socks_addr())
        .map_err(|e| e.to_string())?;
    // Connections and DNS questions the bridge captures come here.
    crate::capture::start(proxy, bridges.dir(), bridges.peer())
        .map_err(|e| format!("--isolate could not listen for captured connections: {e}"))?;
    let exe = crate::isolate::own_executable()
        .map_err(|e| format!("--isolate re-runs portcullis and cannot find it: {e}"))?;
    let mut bridge = tokio::process::Command::new(exe);
    bridge.args(crate::isolate::bridge_arguments(
        bridges.dir(),
        proxy.http_addr(),
        proxy.socks_addr(),
        unix_sockets,
        best_effort,
        command,
    ));
    Ok((bridge, Some(bridges)))
}
