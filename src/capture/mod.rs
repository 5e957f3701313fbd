//! The proxy's half of capture under `run --isolate`: two Unix sockets in
//! the run's private directory, beside the bridge's `http.sock` and
//! `socks.sock`. The bridge inside the namespace sends every TCP
//! connection the child opens to `capture.sock` ([`tcp`]) and every DNS
//! question to `dns.sock` ([`dns`]); both are decided here, through the
//! proxy's own stack, with the one map between names and synthetic
//! addresses ([`names`]) they share.

pub(crate) mod dns;
pub(crate) mod names;
pub(crate) mod tcp;

use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;

use crate::runner::ProxyHandle;

/// The socket captured TCP connections arrive on.
pub(crate) const CAPTURE_SOCKET: &str = "capture.sock";
/// The socket DNS questions arrive on.
pub(crate) const DNS_SOCKET: &str = "dns.sock";

/// The longest first line the bridge sends (addresses).
const MAX_LINE: usize = 128;

/// The bridge's first line on either socket, read a byte at a time so that
/// none of the child's bytes after it are taken.
async fn read_line(stream: &mut tokio::net::UnixStream) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await.map_err(|e| e.to_string())?;
        if byte == b'\n' {
            return String::from_utf8(line).map_err(|_| "a bad first line".to_owned());
        }
        if line.len() >= MAX_LINE {
            return Err("a first line too long".to_owned());
        }
        line.push(byte);
    }
}

/// The one process the outside sockets (`http.sock`, `socks.sock`,
/// `capture.sock`, `dns.sock`) take connections from: this run's bridge,
/// known by its process id once it is started and checked on each
/// connection with `SO_PEERCRED`. Any other process — a root program
/// outside, another run's command or bridge — is refused, so no one can
/// borrow this run's policy, and nothing is accepted before the bridge
/// exists.
#[derive(Debug, Clone, Default)]
pub(crate) struct BridgePeer(std::sync::Arc<std::sync::OnceLock<u32>>);

impl BridgePeer {
    /// The bridge has started as process `pid`.
    pub(crate) fn started(&self, pid: u32) {
        let _ = self.0.set(pid);
    }

    /// Whether `stream` comes from the bridge; says why not when not.
    pub(crate) fn admits(&self, stream: &tokio::net::UnixStream, socket: &str) -> bool {
        let peer = stream.peer_cred().ok().and_then(|cred| cred.pid());
        let admitted = match (self.0.get(), peer) {
            (Some(&bridge), Some(pid)) => u32::try_from(pid).is_ok_and(|pid| pid == bridge),
            _ => false,
        };
        if !admitted {
            tracing::warn!(
                peer = ?peer,
                "refused a connection to this run's {socket} from a process that is not its bridge: only the isolated command's own bridge may use it"
            );
        }
        admitted
    }
}

/// Accepts on `listener` until the proxy stops, handling each connection
/// on its own task.
async fn accept_each<F, Fut>(
    listener: UnixListener,
    ingress: crate::kit::Ingress,
    peer: BridgePeer,
    socket: &'static str,
    handle: F,
) where
    F: Fn(tokio::net::UnixStream, crate::kit::Ingress) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = ingress.stopping() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        // Only this run's bridge: no other process borrows its policy.
        if !peer.admits(&stream, socket) {
            continue;
        }
        tokio::spawn(handle(stream, ingress.clone()));
    }
}

/// Listens on `capture.sock` and `dns.sock` in `dir` for `proxy`, taking
/// connections from `peer` (the run's bridge) only.
pub(crate) fn start(proxy: &ProxyHandle, dir: &Path, peer: &BridgePeer) -> std::io::Result<()> {
    let names = Arc::new(names::SyntheticNames::default());
    let capture = UnixListener::bind(dir.join(CAPTURE_SOCKET))?;
    let dns = UnixListener::bind(dir.join(DNS_SOCKET))?;
    let settings = tcp::Settings {
        names: names.clone(),
        interceptor: proxy.interceptor(),
        answers: proxy.answers(),
        metrics: proxy.metrics(),
    };
    tokio::spawn(tcp::serve(capture, proxy.ingress(), peer.clone(), settings));
    tokio::spawn(dns::serve(dns, proxy.ingress(), peer.clone(), names));
    Ok(())
}
