//! `run --isolate` (Linux): the command runs in a new user and network
//! namespace whose only interface is loopback, so the proxy is its only way
//! out.
//!
//! ```text
//!  portcullis run (outside)                 portcullis __bridge (inside the namespace)
//!  proxy on 127.0.0.1:H and :S   <-- unix -- listens on 127.0.0.1:H and :S (the same
//!  + forwarders on http.sock,       sockets   ports the exported variables name),
//!    socks.sock in a 0700 dir               then runs CMD and passes on its exit
//! ```
//!
//! A Unix socket is a file, so it reaches across network namespaces; TCP
//! inside the namespace reaches only the bridge. The bridge is this binary
//! re-executed as a hidden subcommand: it calls `unshare(CLONE_NEWUSER |
//! CLONE_NEWNET)` while still single-threaded (before any runtime starts),
//! maps the invoking user and group to themselves, brings up loopback, and
//! only then starts a one-thread runtime. SOCKS5 UDP is not offered under
//! `--isolate`: its relay address would be outside.
//!
//! # Capture
//!
//! The bridge also captures what ignores the proxy variables. With its
//! capabilities inside its own user namespace it routes every address to
//! loopback and redirects every TCP connection to one capture listener
//! ([`netlink`]), and points the child's `/etc/resolv.conf` at a policy DNS
//! server on 127.0.0.1:53 (a bind mount in a new mount namespace). Each
//! captured connection goes to the proxy's `capture.sock` after a line
//! naming its source and original destination (`SO_ORIGINAL_DST`), or,
//! when it was dialled to one of the bridge's own ports, to that port's
//! socket; each DNS question (UDP, or TCP to port 53) goes to `dns.sock`.
//! The proxy decides both ([`crate::capture`]). Other UDP finds nothing
//! listening and is refused (port unreachable), so QUIC falls back to TCP.
//! Where the kernel refuses a part of this (no nftables, no mount
//! namespace), the bridge says so once and the command runs with the
//! bridge ports only: never unisolated.
//!
//! # Without user namespaces
//!
//! Where the namespace cannot be had — `unshare` refused, or made and then
//! its capabilities denied (Ubuntu 24.04's AppArmor) — which the bridge
//! learns from a forked child before touching its own namespaces, the
//! command runs on the machine's network, fenced by [`landlock`] and the
//! seccomp supervisor ([`unix_sockets`], [`host_network`]): TCP only to
//! the run's own loopback listeners (the proxy's among them), no UDP, no
//! listening beyond loopback. No capture and no PID namespace there: said
//! once at start. Without both fences `--isolate` refuses to start unless
//! `--isolate=best-effort`.

#[cfg(target_os = "linux")]
mod capture;
#[cfg(target_os = "linux")]
pub(crate) mod host_network;
#[cfg(target_os = "linux")]
pub(crate) mod landlock;
#[cfg(target_os = "linux")]
mod netlink;
#[cfg(target_os = "linux")]
mod sock_diag;
#[cfg(target_os = "linux")]
pub(crate) mod unix_sockets;

use std::ffi::OsString;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::capture::BridgePeer;

/// The hidden subcommand's name.
pub(crate) const BRIDGE: &str = "__bridge";

/// Why isolation could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IsolateError {
    /// The kernel or the container refused a new user or network namespace.
    #[error("--isolate needs unprivileged user and network namespaces, and this system refused them ({0}); on Linux allow them (sysctl kernel.unprivileged_userns_clone=1, or a container profile that permits unshare), or run without --isolate")]
    Unshare(String),
    /// Something else in the setup failed.
    #[error("--isolate could not set up the namespace: {0}")]
    Setup(String),
}

/// This binary, to run again (the bridge, its init): `/proc/self/exe`
/// rather than its path, which may sit in a directory its user cannot
/// search once its privileges are dropped (the magic link is followed
/// without searching it).
pub(crate) fn own_executable() -> std::io::Result<PathBuf> {
    let magic = Path::new("/proc/self/exe");
    if magic.exists() {
        Ok(magic.to_path_buf())
    } else {
        std::env::current_exe()
    }
}

/// The outside half: Unix sockets in a private directory, each forwarding
/// to one of the proxy's listeners. Removed with the directory on drop.
#[derive(Debug)]
pub(crate) struct Bridges {
    dir: tempfile::TempDir,
    peer: BridgePeer,
}

impl Bridges {
    /// Listens on `http.sock` (and `socks.sock`) for the proxy at `http`
    /// (and `socks`).
    pub(crate) fn start(
        http: SocketAddr,
        socks: Option<SocketAddr>,
    ) -> Result<Bridges, IsolateError> {
        remove_stale_directories();
        let dir = tempfile::Builder::new()
            .prefix(DIRECTORY_PREFIX)
            .tempdir()
            .map_err(|e| IsolateError::Setup(format!("a private directory: {e}")))?;
        // Whose it is, so a later run can tell it was left by a run that died.
        std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .map_err(|e| IsolateError::Setup(format!("{OWNER_FILE}: {e}")))?;
        let peer = BridgePeer::default();
        for (name, target) in
            std::iter::once(("http.sock", http)).chain(socks.map(|s| ("socks.sock", s)))
        {
            let listener = UnixListener::bind(dir.path().join(name))
                .map_err(|e| IsolateError::Setup(format!("{name}: {e}")))?;
            tokio::spawn(forward_unix(listener, target, peer.clone(), name));
        }
        Ok(Bridges { dir, peer })
    }

    /// The directory holding the sockets.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Who may connect to the sockets: say the bridge's pid once started.
    pub(crate) fn peer(&self) -> &BridgePeer {
        &self.peer
    }
}

/// The private directories' name prefix, in the temporary directory.
const DIRECTORY_PREFIX: &str = "portcullis-isolate-";
/// The file in each naming the `run` process it belongs to.
const OWNER_FILE: &str = "owner";

/// Removes the directories a `run --isolate` that died (SIGKILL, a crash)
/// left in the temporary directory: ours (same user), whose owner process
/// is gone — or, with no owner file, older than a minute (one being made
/// right now has none yet).
fn remove_stale_directories() {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(DIRECTORY_PREFIX));
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !ours || !meta.is_dir() || meta.uid() != me {
            continue;
        }
        let stale = match std::fs::read_to_string(path.join(OWNER_FILE)) {
            Ok(owner) => owner.trim().parse::<i32>().is_ok_and(|pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    == Err(nix::errno::Errno::ESRCH)
            }),
            Err(_) => meta
                .modified()
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(60)),
        };
        if stale && std::fs::remove_dir_all(&path).is_ok() {
            tracing::debug!(dir = %path.display(), "removed a directory a run that died left behind");
        }
    }
}

async fn forward_unix(
    listener: UnixListener,
    target: SocketAddr,
    peer: BridgePeer,
    name: &'static str,
) {
    while let Ok((mut inside, _)) = listener.accept().await {
        if !peer.admits(&inside, name) {
            continue;
        }
        tokio::spawn(async move {
            if let Ok(mut proxy) = TcpStream::connect(target).await {
                let _ = proxy.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inside, &mut proxy).await;
            }
        });
    }
}

/// The flag that opens a Unix socket to the command, on `run` and on the
/// bridge alike.
const ALLOW_UNIX_SOCKET: &str = "--allow-unix-socket";
/// The bridge's flag for `--isolate=best-effort`.
const BEST_EFFORT: &str = "--best-effort";

/// The arguments that start the bridge for `command`, with the Unix
/// sockets the user opened to it (`*`: every one).
pub(crate) fn bridge_arguments(
    sockets: &Path,
    http: SocketAddr,
    socks: Option<SocketAddr>,
    unix_sockets: &[PathBuf],
    best_effort: bool,
    command: &[OsString],
) -> Vec<OsString> {
    let mut arguments: Vec<OsString> = vec![
        BRIDGE.into(),
        sockets.as_os_str().to_owned(),
        http.port().to_string().into(),
        socks.map_or(0, |s| s.port()).to_string().into(),
    ];
    for path in unix_sockets {
        arguments.push(ALLOW_UNIX_SOCKET.into());
        arguments.push(path.as_os_str().to_owned());
    }
    if best_effort {
        arguments.push(BEST_EFFORT.into());
    }
    arguments.push("--".into());
    arguments.extend(command.iter().cloned());
    arguments
}

/// The inside half, run as `portcullis __bridge DIR HTTP_PORT SOCKS_PORT --
/// CMD…`: called from `main` before any runtime or thread exists.
pub(crate) fn bridge_main(arguments: &[OsString]) -> ExitCode {
    let fail = |error: IsolateError| {
        let _ = writeln!(std::io::stderr(), "portcullis: {error}");
        ExitCode::from(70)
    };
    let Some(bridge) = parse(arguments) else {
        return fail(IsolateError::Setup("the bridge's arguments".into()));
    };
    let confinement = match namespaces_usable() {
        Ok(()) => {
            if let Err(error) = enter_namespace() {
                return fail(error);
            }
            Confinement::Namespace
        }
        Err(refused) => match fence(&refused, &bridge) {
            Ok(fence) => fence,
            Err(code) => return code,
        },
    };
    // The command may run as the same user (root in the namespace): it
    // must not trace or read the bridge, which decides its connections.
    #[cfg(target_os = "linux")]
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        return fail(IsolateError::Setup(format!(
            "making the bridge non-dumpable: {error}"
        )));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(IsolateError::Setup(format!("a runtime: {error}"))),
    };
    runtime.block_on(async move {
        if !matches!(confinement, Confinement::Namespace) {
            // On the machine's network the proxy's own ports are the way out.
            return run_command(&bridge, confinement).await;
        }
        // The bridge ports first: the capture listener's ephemeral port
        // must not take one of them.
        for (port, name) in [(bridge.http, "http.sock"), (bridge.socks, "socks.sock")] {
            if port == 0 {
                continue;
            }
            let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            match TcpListener::bind(address).await {
                Ok(listener) => {
                    tokio::spawn(forward_tcp(listener, bridge.dir.join(name)));
                }
                Err(error) => {
                    return fail(IsolateError::Setup(format!(
                        "listening on {address}: {error}"
                    )))
                }
            }
        }
        #[cfg(target_os = "linux")]
        if let Err(why) = capture::start(&bridge.dir, bridge.http, bridge.socks).await {
            let _ = writeln!(
                std::io::stderr(),
                "portcullis: --isolate captures only what uses the proxy variables here: {why}"
            );
        }
        run_command(&bridge, confinement).await
    })
}

/// What the bridge was given.
struct BridgeArguments {
    /// The directory of the run's sockets outside.
    dir: PathBuf,
    /// The proxy's HTTP port.
    http: u16,
    /// The proxy's SOCKS5 port (0: none).
    socks: u16,
    /// The Unix sockets opened to the command.
    unix_sockets: Vec<PathBuf>,
    /// `--isolate=best-effort`.
    best_effort: bool,
    /// The command and its arguments.
    command: Vec<OsString>,
}

fn parse(arguments: &[OsString]) -> Option<BridgeArguments> {
    let [dir, http, socks, rest @ ..] = arguments else {
        return None;
    };
    let mut unix_sockets = Vec::new();
    let mut best_effort = false;
    let mut rest = rest;
    loop {
        match rest {
            [flag, path, tail @ ..] if flag == ALLOW_UNIX_SOCKET => {
                unix_sockets.push(PathBuf::from(path));
                rest = tail;
            }
            [flag, tail @ ..] if flag == BEST_EFFORT => {
                best_effort = true;
                rest = tail;
            }
            [separator, command @ ..] if separator == "--" && !command.is_empty() => {
                return Some(BridgeArguments {
                    dir: PathBuf::from(dir),
                    http: http.to_str()?.parse().ok()?,
                    socks: socks.to_str()?.parse().ok()?,
                    unix_sockets,
                    best_effort,
                    command: command.to_vec(),
                });
            }
            _ => return None,
        }
    }
}

/// How the command is kept to the proxy.
enum Confinement {
    /// Its own user, network, mount and PID namespaces (the bridge is in
    /// the first three already).
    Namespace,
    /// The machine's network, where namespaces are refused: Landlock and
    /// the seccomp supervisor, each where the kernel has it (both, unless
    /// `--isolate=best-effort`).
    Fence {
        /// The Landlock ruleset to enter before `exec`.
        #[cfg(target_os = "linux")]
        landlock: Option<std::os::fd::OwnedFd>,
        /// Whether the seccomp supervisor decides the command's sockets.
        seccomp: bool,
    },
}

async fn forward_tcp(listener: TcpListener, socket: PathBuf) {
    while let Ok((mut inside, _)) = listener.accept().await {
        let socket = socket.clone();
        tokio::spawn(async move {
            if let Ok(mut outside) = UnixStream::connect(&socket).await {
                let _ = inside.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
            }
        });
    }
}

/// Runs the command with inherited stdio, passing signals on as plain
/// `run` does, and exits as it did. Its `connect`s are decided here
/// ([`unix_sockets`]) unless every Unix socket was opened (`*`) in its own
/// namespace; on the machine's network, under the fence.
async fn run_command(bridge: &BridgeArguments, confinement: Confinement) -> ExitCode {
    let Some((program, arguments)) = bridge.command.split_first() else {
        return ExitCode::from(64);
    };
    #[cfg(target_os = "linux")]
    let network = match &confinement {
        Confinement::Namespace => Some(unix_sockets::Network::Own),
        Confinement::Fence { seccomp: true, .. } => Some(unix_sockets::Network::Machine {
            proxy_ports: [bridge.http, bridge.socks],
        }),
        Confinement::Fence { seccomp: false, .. } => None,
    };
    // Under the PID namespace's first process (`__init`), where there is
    // one: a new PID namespace needs the user namespace's capabilities.
    let own_init = match (&confinement, own_executable()) {
        (Confinement::Namespace, Ok(exe)) => Some(exe),
        (Confinement::Namespace, Err(error)) => {
            let _ = writeln!(
                std::io::stderr(),
                "portcullis: --isolate: no PID namespace ({error}); what the command leaves running is ended when it exits, but may outlive a killed run"
            );
            None
        }
        (Confinement::Fence { .. }, _) => None,
    };
    let mut spawning = match own_init {
        Some(exe) => {
            let mut init = tokio::process::Command::new(exe);
            init.arg(INIT).arg("--").arg(program).args(arguments);
            #[cfg(target_os = "linux")]
            crate::sys::new_pid_namespace_before_exec(&mut init);
            init
        }
        None => {
            let mut plain = tokio::process::Command::new(program);
            plain.args(arguments);
            plain
        }
    };
    #[cfg(target_os = "linux")]
    if let Confinement::Fence {
        landlock: Some(ruleset),
        ..
    } = confinement
    {
        landlock::restrict_before_exec(&mut spawning, ruleset);
    }
    #[cfg(target_os = "linux")]
    let supervised = match network {
        Some(network) => match confine_sockets(&mut spawning, &bridge.unix_sockets, network) {
            Ok(supervised) => supervised.map(|(channel, opened)| (channel, opened, network)),
            Err(error) => {
                let _ = writeln!(std::io::stderr(), "portcullis: {error}");
                return ExitCode::from(69);
            }
        },
        None => None,
    };
    // The command dies with the bridge, even by SIGKILL.
    #[cfg(target_os = "linux")]
    {
        crate::sys::die_with_parent(&mut spawning);
        crate::child::become_subreaper();
    }
    let signals = crate::child::ForwardedSignals::install();
    let spawned = spawning.spawn();
    // Drops our copy of the child's end of the listener channel.
    drop(spawning);
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => return crate::child::cannot_run(program, &error),
    };
    #[cfg(target_os = "linux")]
    if let Some((channel, opened, network)) = supervised {
        let supervising = crate::sys::seccomp::receive_fd(std::os::fd::AsFd::as_fd(&channel))
            .and_then(|listener| unix_sockets::supervise(listener, opened, network));
        if let Err(error) = supervising {
            let _ = writeln!(
                std::io::stderr(),
                "portcullis: --isolate could not supervise the command's connections ({error}); stopping it"
            );
            let _ = child.start_kill();
            let _ = child.wait().await;
            return ExitCode::from(69);
        }
    }
    let status = crate::child::wait_forwarding_signals(&mut child, signals).await;
    // Nothing the command started outlives it.
    #[cfg(target_os = "linux")]
    crate::child::end_descendants(std::time::Duration::from_secs(1)).await;
    match status {
        Ok(status) => ExitCode::from(crate::child::exit_code(status)),
        Err(_) => ExitCode::from(70),
    }
}

/// Whether this process's children start a PID namespace of their own:
/// `pid_for_children` names another namespace — or none yet, which the
/// kernel says (`ENOENT`) of a namespace no process has entered.
fn in_own_pid_namespace() -> bool {
    let own = std::fs::read_link("/proc/self/ns/pid");
    match (own, std::fs::read_link("/proc/self/ns/pid_for_children")) {
        (Ok(own), Ok(children)) => own != children,
        (Ok(_), Err(error)) => error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Arranges for `command` to run under the [`unix_sockets`] filter — in
/// its own namespace, unless every socket was opened (`*`): the channel
/// its listener will come back on, and what was opened. `Err` when this
/// kernel cannot confine it.
#[cfg(target_os = "linux")]
fn confine_sockets(
    command: &mut tokio::process::Command,
    opened: &[PathBuf],
    network: unix_sockets::Network,
) -> Result<Option<(std::os::fd::OwnedFd, unix_sockets::OpenedSockets)>, String> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let opened = unix_sockets::OpenedSockets::new(opened.iter().cloned());
    if opened.any() {
        let _ = writeln!(
            std::io::stderr(),
            "portcullis: --allow-unix-socket '*': the command may connect to every Unix socket on this machine, a way past the policy (no confinement)"
        );
        if network == unix_sockets::Network::Own {
            return Ok(None);
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return Err("--isolate confines Unix sockets on x86_64 and aarch64 only; pass --allow-unix-socket '*' to run with every Unix socket open".to_owned());
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        crate::sys::seccomp::available().map_err(|missing| {
            format!("--isolate cannot keep the command from this machine's Unix sockets: this kernel lacks {missing}; pass --allow-unix-socket '*' to run with every Unix socket open (printed, never silent)")
        })?;
        let program = unix_sockets::filter(network)
            .map_err(|error| format!("--isolate: its seccomp filter: {error}"))?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("--isolate: a socket pair: {e}"))?;
        crate::sys::seccomp::filter_before_exec(command, std::sync::Arc::from(program), theirs);
        Ok(Some((ours, opened)))
    }
}

/// Whether a user and network namespace can be made and set up here,
/// tried in a child (fork), so that a refusal half-way — Ubuntu's AppArmor
/// lets `unshare` succeed and then denies the namespace's capabilities —
/// leaves this process where it was. `Err` says what was refused.
#[cfg(target_os = "linux")]
fn namespaces_usable() -> Result<(), String> {
    use std::io::Read;
    let (mut read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map(|(read, write)| (std::fs::File::from(read), write))
        .map_err(|e| format!("a pipe: {e}"))?;
    match crate::sys::fork_single_threaded() {
        Ok(None) => {
            // The child: one try, its error (if any) to the parent, and out.
            let code = match enter_namespace() {
                Ok(()) => 0,
                Err(error) => {
                    let text = match error {
                        IsolateError::Unshare(why) | IsolateError::Setup(why) => why,
                    };
                    let _ = std::fs::File::from(write).write_all(text.as_bytes());
                    1
                }
            };
            crate::sys::exit_now(code)
        }
        Ok(Some(child)) => {
            drop(write);
            let mut why = String::new();
            let _ = read.read_to_string(&mut why);
            let status = nix::sys::wait::waitpid(child, None);
            match status {
                Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
                _ if !why.is_empty() => Err(why),
                other => Err(format!("the namespace probe ended with {other:?}")),
            }
        }
        Err(error) => Err(format!("a namespace probe: {error}")),
    }
}

#[cfg(not(target_os = "linux"))]
fn namespaces_usable() -> Result<(), String> {
    Err("network namespaces exist on Linux only".to_owned())
}

/// The fence for a command on the machine's network, where `refused`
/// says why no namespace could be made: Landlock and the seccomp
/// supervisor, said once. Without both, refused (exit 69) unless
/// `--isolate=best-effort`, which takes what there is and says what is
/// missing.
#[cfg(target_os = "linux")]
fn fence(refused: &str, bridge: &BridgeArguments) -> Result<Confinement, ExitCode> {
    let landlock = landlock::ruleset(&[bridge.http, bridge.socks]);
    let seccomp = if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        crate::sys::seccomp::available()
    } else {
        Err("a seccomp filter for this architecture (x86_64 and aarch64 only)".to_owned())
    };
    let say = |line: String| {
        let _ = writeln!(std::io::stderr(), "portcullis: {line}");
    };
    let what = "the command runs on the machine's network: TCP only to the proxy and to servers it starts on loopback, no UDP or raw sockets, listening on loopback only, and only the Unix sockets it creates or you open. Without namespaces, connections and DNS that ignore the proxy variables are refused, not captured (no policy DNS, no transparent capture), and what it starts in the background may outlive a killed run";
    match (landlock, seccomp) {
        (Ok((ruleset, coverage)), Ok(())) => {
            say(format!(
                "--isolate: this system refuses user namespaces ({refused}); fenced with Landlock and seccomp instead, {what}{}",
                if coverage.scopes { "." } else { "; signals to your other processes are not scoped (Landlock ABI 6, Linux 6.12)." }
            ));
            Ok(Confinement::Fence {
                landlock: Some(ruleset),
                seccomp: true,
            })
        }
        (landlock, seccomp) => {
            let missing: Vec<String> = [landlock.as_ref().err(), seccomp.as_ref().err()]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let missing = missing.join("; ");
            if !bridge.best_effort {
                say(format!(
                    "--isolate cannot confine the command: this system refuses user namespaces ({refused}), and the fallback needs Landlock network rules and seccomp user notification: {missing}. Allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04, kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for portcullis), or pass --isolate=best-effort to run with what there is"
                ));
                return Err(ExitCode::from(69));
            }
            let has_seccomp = seccomp.is_ok();
            let ruleset = landlock.ok().map(|(ruleset, _)| ruleset);
            say(match (&ruleset, has_seccomp) {
                (None, true) => format!(
                    "--isolate=best-effort: this system refuses user namespaces ({refused}) and {missing}: fenced with seccomp alone, {what}; without Landlock, the command can trace and signal your other processes"
                ),
                (Some(_), false) => format!(
                    "--isolate=best-effort: this system refuses user namespaces ({refused}) and {missing}: fenced with Landlock alone: TCP only to the proxy's port numbers (on any host), no TCP bind; UDP and the machine's Unix sockets are NOT confined"
                ),
                _ => format!(
                    "--isolate=best-effort: this system refuses user namespaces ({refused}) and {missing}: the command is NOT isolated (as under plain run: it may reach the network directly)"
                ),
            });
            Ok(Confinement::Fence {
                landlock: ruleset,
                seccomp: has_seccomp,
            })
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn fence(refused: &str, _bridge: &BridgeArguments) -> Result<Confinement, ExitCode> {
    let _ = writeln!(std::io::stderr(), "portcullis: --isolate: {refused}");
    Err(ExitCode::from(69))
}

/// A new user namespace (the invoking user and group mapped to themselves)
/// and network namespace, with loopback up.
#[cfg(target_os = "linux")]
fn enter_namespace() -> Result<(), IsolateError> {
    use nix::sched::{unshare, CloneFlags};
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    // A mount namespace too, for the child's resolv.conf; where one is
    // refused, isolation still holds without it (capture says what is lost).
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
        .or_else(|_| unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET))
        .map_err(|e| IsolateError::Unshare(format!("unshare: {e}")))?;
    let write = |path: &str, text: String| {
        std::fs::write(path, text).map_err(|e| IsolateError::Setup(format!("{path}: {e}")))
    };
    write("/proc/self/setgroups", "deny".to_owned())?;
    write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))?;
    write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))?;
    crate::sys::loopback_up().map_err(|e| IsolateError::Setup(format!("bringing up lo: {e}")))
}

/// The hidden subcommand the bridge runs the command under: the first
/// process of the command's PID namespace.
#[cfg(target_os = "linux")]
pub(crate) const INIT: &str = "__init";

/// `portcullis __init -- CMD…`, started by the bridge with its children
/// in a new PID namespace ([`crate::sys::new_pid_namespace_before_exec`]).
/// It forks that namespace's process 1, which starts the command, passes
/// on signals and reaps every orphan the namespace hands it, and exits as
/// the command did — at which the kernel ends whatever else still runs in
/// the namespace, so nothing the command started outlives it. This first
/// process waits for process 1 and passes signals on to it (process 1
/// takes only signals it handles). Both are single-threaded: `sigwait` on
/// blocked signals, `SIGCHLD` included. Where the namespace could not be
/// made, the command runs under this process directly.
#[cfg(target_os = "linux")]
pub(crate) fn init_main(arguments: &[OsString]) -> ExitCode {
    let [separator, program, rest @ ..] = arguments else {
        return ExitCode::from(64);
    };
    if separator != "--" {
        return ExitCode::from(64);
    }
    let signals = match Forwarding::block() {
        Ok(signals) => signals,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "portcullis: --isolate init: {error}");
            return ExitCode::from(70);
        }
    };
    if !in_own_pid_namespace() {
        return signals.run(program, rest);
    }
    // Held open by this process alone: process 1 reads end-of-file once we
    // are gone, whatever its parent id says from inside (0).
    let Ok((alive_read, alive_write)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        return ExitCode::from(70);
    };
    match crate::sys::fork_single_threaded() {
        // Process 1 of the namespace: dies with us (SIGKILL), and with it
        // the whole namespace — also when we died before it armed that.
        Ok(None) => {
            drop(alive_write);
            if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err() {
                return ExitCode::from(70);
            }
            if parent_gone(&alive_read) {
                return ExitCode::from(70);
            }
            drop(alive_read);
            signals.run(program, rest)
        }
        Ok(Some(first)) => {
            drop(alive_read);
            let code = signals.wait_for(first);
            drop(alive_write);
            code
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "portcullis: --isolate init: {error}");
            ExitCode::from(70)
        }
    }
}

/// Whether the write end of `alive` is closed (its holder is gone): a
/// read that does not wait.
#[cfg(target_os = "linux")]
fn parent_gone(alive: &std::os::fd::OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(
        std::os::fd::AsFd::as_fd(alive),
        PollFlags::POLLIN,
    )];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => false,
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|events| events.intersects(PollFlags::POLLHUP | PollFlags::POLLIN)),
        Err(_) => true,
    }
}

/// The signals an init passes on, blocked, and SIGCHLD, waited for with
/// `sigwait` in one thread.
#[cfg(target_os = "linux")]
struct Forwarding {
    set: nix::sys::signal::SigSet,
    /// SIGINT too: not on a terminal, which would send it to the command.
    interrupt: bool,
}

#[cfg(target_os = "linux")]
impl Forwarding {
    fn block() -> nix::Result<Forwarding> {
        use nix::sys::signal::{SigSet, Signal};
        use std::io::IsTerminal;
        let mut set = SigSet::empty();
        for signal in [
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGINT,
            Signal::SIGCHLD,
        ] {
            set.add(signal);
        }
        set.thread_block()?;
        Ok(Forwarding {
            set,
            interrupt: !std::io::stdin().is_terminal(),
        })
    }

    /// Starts the command (with no signal blocked) and waits for it,
    /// reaping orphans and passing signals on; its exit status.
    fn run(&self, program: &OsString, arguments: &[OsString]) -> ExitCode {
        let mut command = std::process::Command::new(program);
        command.args(arguments);
        crate::sys::unblocked_signals_before_exec(&mut command);
        let child = match command.spawn() {
            Ok(child) => child,
            Err(error) => return crate::child::cannot_run(program, &error),
        };
        let command = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        self.wait_for(command)
    }

    /// Waits for `child`, reaping any other child, passing signals on to
    /// it; exits as it did (128 + the signal when one ended it).
    fn wait_for(&self, child: nix::unistd::Pid) -> ExitCode {
        use nix::sys::signal::{kill, Signal};
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        loop {
            // Reap first: a child may have ended before we waited.
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                        return ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1));
                    }
                    Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => {
                        return ExitCode::from(
                            u8::try_from((128 + signal as i32) & 0xff).unwrap_or(1),
                        );
                    }
                    Ok(WaitStatus::StillAlive) => break,
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return ExitCode::from(70),
                }
            }
            match self.set.wait() {
                Ok(Signal::SIGCHLD) => {}
                Ok(Signal::SIGINT) if !self.interrupt => {}
                Ok(signal) => {
                    let _ = kill(child, signal);
                }
                Err(_) => return ExitCode::from(70),
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn enter_namespace() -> Result<(), IsolateError> {
    Err(IsolateError::Unshare(
        "network namespaces exist on Linux only".to_owned(),
    ))
}
