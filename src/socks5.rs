//! The SOCKS5 listener: every `CONNECT` and every new `UDP ASSOCIATE`
//! destination goes through the same stack as HTTP, as a synthesized
//! `CONNECT host:port` request with protocol `socks5_tcp` or `socks5_udp`.
//! No policy logic lives here.
//!
//! Reply codes: refusals 0x02; a malformed address 0x01; dial errors 0x05
//! (refused), 0x04 (host unreachable, name did not resolve), 0x03 (network
//! unreachable), 0x06 (timed out); `BIND` (and UDP when disabled) 0x07; no acceptable auth method
//! `05 FF`.
//!
//! The UDP relay accepts datagrams only from the client's IP (and, after the
//! first datagram, only from that port), drops fragments (FRAG ≠ 0), checks
//! each new destination through the stack once per association, sends
//! replies from remotes back to the client only, drops (and the stack logs)
//! datagrams to refused destinations, and ends with the TCP control
//! connection.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use fast_socks5::server::{
    run_udp_proxy_custom, states, AuthMethodSuccessState, NoAuthentication, PasswordAuthentication,
    Socks5ServerProtocol, SocksServerError, StandardAuthentication, StandardAuthenticationStarted,
};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{new_udp_header, parse_udp_request, ReplyError, Socks5Command};
use http::{Method, Request};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use portcullis_middleware::{BoxError, ClientAddr, Protocol, Target};

use crate::body;
use crate::connector::{UpstreamConnection, VettedAddresses};
use crate::proxy::{accept_loop, DrainGuard, ProxyService, ShutdownSignal};
use crate::rescue;

/// How long a client has to finish the handshake and send its command.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest UDP datagram relayed.
const MAX_DATAGRAM: usize = 65_535;

/// SOCKS5 listener settings.
#[derive(Clone, Default)]
pub(crate) struct Settings {
    /// Whether UDP ASSOCIATE is served.
    pub(crate) udp: bool,
    /// When set, clients must authenticate with this username and password
    /// (RFC 1929) and no-auth is refused.
    pub(crate) credentials: Option<Arc<(String, String)>>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("udp", &self.udp)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Compares without an early exit, so timing does not reveal the prefix.
fn same_secret(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    let mut difference = given.len() ^ expected.len();
    for (index, byte) in expected.iter().enumerate() {
        difference |= usize::from(given.get(index).copied().unwrap_or(0) ^ byte);
    }
    difference == 0
}

/// Accepts SOCKS5 clients until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    stack: ProxyService,
    settings: Settings,
    shutdown: ShutdownSignal,
    drain: DrainGuard,
) {
    let local_ip = listener
        .local_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    accept_loop(
        listener,
        shutdown,
        drain,
        "SOCKS5",
        move |stream, client, drain| {
            let stack = stack.clone();
            let settings = settings.clone();
            async move {
                if let Err(error) = handle(stream, client, local_ip, stack, settings).await {
                    tracing::debug!(%error, %client, "SOCKS5 session ended with an error");
                }
                drop(drain);
            }
        },
    )
    .await;
}

fn reply_for(code: u8) -> ReplyError {
    match code {
        0x02 => ReplyError::ConnectionNotAllowed,
        0x03 => ReplyError::NetworkUnreachable,
        0x04 => ReplyError::HostUnreachable,
        0x05 => ReplyError::ConnectionRefused,
        0x06 => ReplyError::ConnectionTimeout,
        0x07 => ReplyError::CommandNotSupported,
        0x08 => ReplyError::AddressTypeNotSupported,
        _ => ReplyError::GeneralFailure,
    }
}

/// The canonical target of a SOCKS5 address.
pub(crate) fn target_of(
    address: &TargetAddr,
) -> Result<Target, portcullis_middleware::TargetError> {
    match address {
        TargetAddr::Ip(socket) => Target::from_ip(socket.ip(), socket.port()),
        TargetAddr::Domain(domain, port) => Target::from_socks_domain(domain, *port),
    }
}

fn synthesized(
    target: &Target,
    protocol: Protocol,
    client: SocketAddr,
) -> Result<Request<body::Body>, BoxError> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(body::empty())?;
    let extensions = request.extensions_mut();
    extensions.insert(target.clone());
    extensions.insert(protocol);
    extensions.insert(ClientAddr(client));
    Ok(request)
}

async fn handle(
    stream: TcpStream,
    client: SocketAddr,
    local_ip: IpAddr,
    stack: ProxyService,
    settings: Settings,
) -> Result<(), BoxError> {
    let handshake = async {
        let no_auth = [StandardAuthentication::NoAuthentication(NoAuthentication)];
        let password = [StandardAuthentication::PasswordAuthentication(
            PasswordAuthentication,
        )];
        let methods: &[StandardAuthentication] = if settings.credentials.is_some() {
            &password
        } else {
            &no_auth
        };
        let proto = match Socks5ServerProtocol::start(stream)
            .negotiate_auth(methods)
            .await?
        {
            StandardAuthenticationStarted::NoAuthentication(auth) => auth.finish_auth(),
            StandardAuthenticationStarted::PasswordAuthentication(auth) => {
                let (user, pass, auth) = auth.read_username_password().await?;
                let accepted = settings.credentials.as_ref().is_some_and(|expected| {
                    same_secret(&user, &expected.0) & same_secret(&pass, &expected.1)
                });
                if !accepted {
                    auth.reject().await?;
                    return Err(SocksServerError::AuthenticationRejected);
                }
                auth.accept().await?.finish_auth()
            }
        };
        proto.read_command().await
    };
    let (proto, command, address) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| "SOCKS5 handshake timed out")??;
    match command {
        Socks5Command::TCPConnect => match target_of(&address) {
            Ok(target) => connect(proto, target, client, stack).await,
            Err(error) => {
                proto.reply_error(&ReplyError::GeneralFailure).await?;
                Err(format!("invalid SOCKS5 destination: {error}").into())
            }
        },
        // The ASSOCIATE address is the client's own (often 0.0.0.0:0), not a destination.
        Socks5Command::UDPAssociate if settings.udp => {
            associate(proto, &address, client, local_ip, stack).await
        }
        _ => {
            proto.reply_error(&ReplyError::CommandNotSupported).await?;
            Ok(())
        }
    }
}

async fn connect(
    proto: Socks5ServerProtocol<TcpStream, states::CommandRead>,
    target: Target,
    client: SocketAddr,
    stack: ProxyService,
) -> Result<(), BoxError> {
    let request = synthesized(&target, Protocol::Socks5Tcp, client)?;
    let upstream = match crate::proxy::call_stack(stack, request).await {
        Ok(response) => response
            .extensions()
            .get::<UpstreamConnection>()
            .and_then(UpstreamConnection::take),
        Err(error) => {
            proto
                .reply_error(&reply_for(rescue::socks5_reply_code(&error)))
                .await?;
            return Ok(());
        }
    };
    let Some(mut upstream) = upstream else {
        proto.reply_error(&ReplyError::GeneralFailure).await?;
        return Err("the stack answered a SOCKS5 CONNECT without a connection".into());
    };
    let bound = upstream
        .local_addr()
        .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    let mut client_stream = proto.reply_success(bound).await?;
    crate::splice::bidirectional(&mut client_stream, &mut upstream).await;
    Ok(())
}

async fn associate(
    proto: Socks5ServerProtocol<TcpStream, states::CommandRead>,
    address: &TargetAddr,
    client: SocketAddr,
    local_ip: IpAddr,
    stack: ProxyService,
) -> Result<(), BoxError> {
    let result = run_udp_proxy_custom(
        proto,
        address,
        Some(local_ip),
        local_ip,
        move |socket| async move {
            let std_socket: std::net::UdpSocket = socket.into();
            let peer = UdpSocket::from_std(std_socket).map_err(|error| {
                tracing::debug!(%error, "UDP relay socket");
                SocksServerError::Bug("UDP relay socket")
            })?;
            relay(peer, client, stack).await.map_err(|e| {
                tracing::debug!(error = %e, "UDP relay ended");
                SocksServerError::Bug("UDP relay failed")
            })
        },
    )
    .await;
    match result {
        Ok(_) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// The UDP relay of one association.
async fn relay(peer: UdpSocket, client: SocketAddr, stack: ProxyService) -> Result<(), BoxError> {
    let mut outbound_v4: Option<UdpSocket> = None;
    let mut outbound_v6: Option<UdpSocket> = None;
    let mut client_udp: Option<SocketAddr> = None;
    let mut allowed: HashMap<Target, SocketAddr> = HashMap::new();
    let mut remotes: HashSet<SocketAddr> = HashSet::new();
    let mut from_client = vec![0u8; MAX_DATAGRAM];
    let mut from_v4 = vec![0u8; MAX_DATAGRAM];
    let mut from_v6 = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            received = peer.recv_from(&mut from_client) => {
                let (length, source) = received?;
                if source.ip() != client.ip() || client_udp.is_some_and(|known| known != source) {
                    tracing::debug!(%source, "UDP datagram from a stranger ignored");
                    continue;
                }
                let Ok((fragment, address, payload)) = parse_udp_request(&from_client[..length]).await else {
                    continue;
                };
                if fragment != 0 {
                    continue;
                }
                let Ok(target) = target_of(&address) else { continue };
                client_udp = Some(source);
                let destination = match allowed.get(&target) {
                    Some(destination) => *destination,
                    None => {
                        let request = synthesized(&target, Protocol::Socks5Udp, client)?;
                        let vetted = match crate::proxy::call_stack(stack.clone(), request).await {
                            Ok(response) => response.extensions().get::<VettedAddresses>().and_then(|v| v.0.first().copied()),
                            Err(_) => None, // refused: the violation log has it; the association stays up
                        };
                        let Some(destination) = vetted else { continue };
                        allowed.insert(target, destination);
                        destination
                    }
                };
                let socket = match destination {
                    SocketAddr::V4(_) => outbound(&mut outbound_v4, IpAddr::V4(Ipv4Addr::UNSPECIFIED)).await?,
                    SocketAddr::V6(_) => outbound(&mut outbound_v6, IpAddr::V6(Ipv6Addr::UNSPECIFIED)).await?,
                };
                remotes.insert(destination);
                let _ = socket.send_to(payload, destination).await;
            }
            received = recv_optional(outbound_v4.as_ref(), &mut from_v4) => {
                let (length, source) = received?;
                reply(&peer, client_udp, &remotes, source, &from_v4[..length]).await;
            }
            received = recv_optional(outbound_v6.as_ref(), &mut from_v6) => {
                let (length, source) = received?;
                reply(&peer, client_udp, &remotes, source, &from_v6[..length]).await;
            }
        }
    }
}

async fn outbound(
    slot: &mut Option<UdpSocket>,
    unspecified: IpAddr,
) -> Result<&UdpSocket, BoxError> {
    if slot.is_none() {
        *slot = Some(UdpSocket::bind(SocketAddr::new(unspecified, 0)).await?);
    }
    slot.as_ref().ok_or_else(|| "no outbound UDP socket".into())
}

async fn recv_optional(
    socket: Option<&UdpSocket>,
    buffer: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(socket) => socket.recv_from(buffer).await,
        None => std::future::pending().await,
    }
}

/// Sends a remote's datagram back to the client (never anywhere else).
async fn reply(
    peer: &UdpSocket,
    client_udp: Option<SocketAddr>,
    remotes: &HashSet<SocketAddr>,
    source: SocketAddr,
    payload: &[u8],
) {
    let Some(client_udp) = client_udp else { return };
    if !remotes.contains(&source) {
        return;
    }
    if let Ok(mut datagram) = new_udp_header(source) {
        datagram.extend_from_slice(payload);
        let _ = peer.send_to(&datagram, client_udp).await;
    }
}
