//! The bridge's capture: the listener every TCP connection is redirected
//! to, the policy DNS server's UDP socket, the routes and nftables rules
//! that send everything there, and the child's resolv.conf.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixStream};

use crate::capture::{CAPTURE_SOCKET, DNS_SOCKET};

/// The DNS port.
const DNS: u16 = 53;
/// The largest DNS message over UDP taken in.
const MAX_DATAGRAM: usize = 4096;

/// Sets capture up inside the namespace and starts serving it; an error
/// says what this system refused (the bridge ports keep working).
pub(super) async fn start(dir: &Path, http: u16, socks: u16) -> Result<(), String> {
    let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| format!("a capture listener: {e}"))?;
    let port = v4
        .local_addr()
        .map_err(|e| format!("a capture listener: {e}"))?
        .port();
    // IPv6 when loopback has ::1 here; else IPv4 only.
    let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, port)).await.ok();
    let dns_v4 = UdpSocket::bind((Ipv4Addr::LOCALHOST, DNS))
        .await
        .map_err(|e| format!("the DNS server's socket: {e}"))?;
    let dns_v6 = match v6 {
        Some(_) => UdpSocket::bind((Ipv6Addr::LOCALHOST, DNS)).await.ok(),
        None => None,
    };
    let loopback = nix::net::if_::if_nametoindex("lo").map_err(|e| format!("lo: {e}"))?;
    super::netlink::route_everything_locally(loopback, v6.is_some())?;
    super::netlink::redirect_to(port)?;
    let ports = Ports { http, socks };
    for listener in std::iter::once(v4).chain(v6) {
        tokio::spawn(accept(listener, dir.to_owned(), ports));
    }
    for socket in std::iter::once(dns_v4).chain(dns_v6) {
        tokio::spawn(answer_udp(Arc::new(socket), dir.join(DNS_SOCKET)));
    }
    point_resolv_conf_here(dir)
}

#[derive(Debug, Clone, Copy)]
struct Ports {
    http: u16,
    socks: u16,
}

async fn accept(listener: TcpListener, dir: PathBuf, ports: Ports) {
    while let Ok((mut stream, source)) = listener.accept().await {
        let dir = dir.clone();
        tokio::spawn(async move {
            let Ok(destination) = original_destination(&stream) else {
                return;
            };
            let own = destination.ip().is_loopback();
            let (socket, line) = match destination.port() {
                port if own && port == ports.http => ("http.sock", None),
                port if own && port == ports.socks && port != 0 => ("socks.sock", None),
                DNS => (DNS_SOCKET, Some(format!("{source}\n"))),
                _ => (CAPTURE_SOCKET, Some(format!("{source} {destination}\n"))),
            };
            let Ok(mut outside) = UnixStream::connect(dir.join(socket)).await else {
                return;
            };
            if let Some(line) = line {
                if outside.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
            let _ = stream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut outside).await;
        });
    }
}

/// Where the child dialled, before the redirect.
fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = stream.local_addr()?;
    if local.is_ipv4() {
        let original = getsockopt(stream, sockopt::OriginalDst)?;
        Ok(SocketAddr::from((
            Ipv4Addr::from(u32::from_be(original.sin_addr.s_addr)),
            u16::from_be(original.sin_port),
        )))
    } else {
        let original = getsockopt(stream, sockopt::Ip6tOriginalDst)?;
        Ok(SocketAddr::from((
            Ipv6Addr::from(original.sin6_addr.s6_addr),
            u16::from_be(original.sin6_port),
        )))
    }
}

/// Passes each DNS question on to the proxy and its answer back.
async fn answer_udp(socket: Arc<UdpSocket>, dns: PathBuf) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    while let Ok((length, source)) = socket.recv_from(&mut buffer).await {
        let Some(question) = buffer.get(..length).map(<[u8]>::to_vec) else {
            continue;
        };
        let socket = socket.clone();
        let dns = dns.clone();
        tokio::spawn(async move {
            if let Ok(answer) = ask(&dns, source, &question).await {
                let _ = socket.send_to(&answer, source).await;
            }
        });
    }
}

async fn ask(dns: &Path, source: SocketAddr, question: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut outside = UnixStream::connect(dns).await?;
    let length = u16::try_from(question.len()).map_err(std::io::Error::other)?;
    let mut message = format!("{source}\n").into_bytes();
    message.extend_from_slice(&length.to_be_bytes());
    message.extend_from_slice(question);
    outside.write_all(&message).await?;
    let length = outside.read_u16().await?;
    let mut answer = vec![0; usize::from(length)];
    outside.read_exact(&mut answer).await?;
    Ok(answer)
}

/// Bind-mounts a resolv.conf naming our DNS server over the child's
/// `/etc/resolv.conf` (its mounts made private first, so nothing
/// propagates back to the host).
fn point_resolv_conf_here(dir: &Path) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let file = dir.join("resolv.conf");
    std::fs::write(
        &file,
        "# portcullis run --isolate: the policy DNS server\nnameserver 127.0.0.1\noptions edns0\n",
    )
    .map_err(|e| format!("{}: {e}", file.display()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("DNS stays unanswered: a private mount namespace: {e}"))?;
    mount(
        Some(&file),
        "/etc/resolv.conf",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("DNS stays unanswered: binding /etc/resolv.conf: {e}"))
}
