//! The SOCKS5 listener: every `CONNECT` and every new `UDP ASSOCIATE`
//! destination goes through the same stack as HTTP, as a synthesized
//! `CONNECT host:port` request with protocol `socks5_tcp` or `socks5_udp`.
//! The stack's errors become reply codes in [`rescue`] only, and a
//! malformed request is answered in `request`, which reads it before
//! fast-socks5 does. A `UDP ASSOCIATE` goes through the stack first as a
//! request marked [`UdpAssociation`] (limited mode refuses it whole); the
//! association limits of `[limits]` are a resource bound like the
//! connection limit, answered 0x01 by [`rescue::busy`]. `BIND` (and UDP
//! when it is off) is answered 0x07; no acceptable authentication method
//! `05 FF`. The UDP relay is in [`udp`].

mod request;
pub(crate) mod rescue;
mod udp;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use fast_socks5::server::{
    states, AuthMethodSuccessState, NoAuthentication, PasswordAuthentication, Socks5ServerProtocol,
    SocksServerError, StandardAuthentication, StandardAuthenticationStarted,
};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::ReplyError;
use tokio::net::{TcpListener, TcpStream};

use portcullis_middleware::{
    BoxError, Host, PolicyGeneration, Protocol, ProxyUser, Target, UdpAssociation,
};

use crate::connector::Tunnel;
use crate::transport::model::RequestModel;
use crate::transport::replay::Replay;
use crate::transport::{
    accept_loop, call_stack, splice, DrainGuard, Limits, Listening, LiveCredentials, Peer,
    ProxyService, ShutdownSignal,
};
use request::Command;

/// How long a client has to finish the handshake and send its command.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// SOCKS5 listener settings.
#[derive(Clone)]
pub(crate) struct Settings {
    /// Whether UDP ASSOCIATE is served.
    pub(crate) udp: bool,
    /// The policy's generation: the UDP relay drops a cached
    /// per-destination decision when the policy changes.
    pub(crate) policy_generation: PolicyGeneration,
    /// The tunnel idle timeout.
    pub(crate) limits: Limits,
    /// When set, clients must authenticate with this username and password
    /// (RFC 1929) and no-auth is refused.
    pub(crate) credentials: LiveCredentials,
    /// The UDP associations open, against `[limits]`.
    pub(crate) udp_budget: Arc<udp::UdpBudget>,
    /// This proxy's counters.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("udp", &self.udp)
            .field("credentials", &self.credentials)
            .finish()
    }
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
    let max_connections = settings.limits.max_connections;
    accept_loop(
        listener,
        shutdown,
        drain,
        Listening {
            what: "SOCKS5",
            max_connections,
            metrics: settings.metrics.clone(),
        },
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
        refuse_busy,
    )
    .await;
}

/// Past the connection limit: read the greeting, choose no authentication,
/// read the request, answer general failure (0x01), close.
async fn refuse_busy(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = [0u8; 2];
    if stream.read_exact(&mut head).await.is_err() || head[0] != 5 {
        return;
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    if stream.read_exact(&mut methods).await.is_err() || stream.write_all(&[5, 0]).await.is_err() {
        return;
    }
    let mut request = [0u8; 64];
    let _ = stream.read(&mut request).await;
    let _ = stream.write_all(&rescue::busy_reply_bytes()).await;
}

/// The fuzz target `socks5_request`: our request reader, then fast-socks5
/// reading again what it accepted. Anything we accept, fast-socks5 must read
/// whole, to the byte, or a request could mean one thing to us and another
/// to it.
#[cfg(fuzzing)]
pub(crate) async fn fuzz_request(data: &[u8]) -> Result<(), &'static str> {
    let mut reader = data;
    let Ok(Ok(request)) = request::read(&mut reader).await else {
        return Ok(());
    };
    let io = tokio::io::join(tokio::io::empty(), tokio::io::sink());
    let replay = Replay::new(request.bytes, io);
    let Ok((proto, _, _)) = Socks5ServerProtocol::skip_auth_this_is_not_rfc_compliant(replay)
        .read_command()
        .await
    else {
        return Err("fast-socks5 refused a request we accepted");
    };
    let Ok(replay) = proto
        .reply_success(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1))
        .await
    else {
        return Ok(());
    };
    match replay.into_inner() {
        Some(_) => Ok(()),
        None => Err("fast-socks5 read less of the request than we did"),
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
        // Proxy users may name themselves: a client offering a password
        // is asked for it first; one that offers none goes on unnamed.
        let either = [
            StandardAuthentication::PasswordAuthentication(PasswordAuthentication),
            StandardAuthentication::NoAuthentication(NoAuthentication),
        ];
        // The accounts in force when this client connected.
        let credentials = settings.credentials.current();
        let methods: &[StandardAuthentication] = match &credentials {
            Some(accounts) if accounts.required() => &password,
            Some(_) => &either,
            None => &no_auth,
        };
        let (mut stream, user) = match Socks5ServerProtocol::start(stream)
            .negotiate_auth(methods)
            .await?
        {
            StandardAuthenticationStarted::NoAuthentication(auth) => (auth.into_inner(), None),
            StandardAuthenticationStarted::PasswordAuthentication(auth) => {
                let (user, pass, auth) = auth.read_username_password().await?;
                let accepted = credentials
                    .as_ref()
                    .is_some_and(|expected| expected.accept(&user, &pass));
                if !accepted {
                    auth.reject().await?;
                    return Err(SocksServerError::AuthenticationRejected);
                }
                (auth.accept().await?.into_inner(), Some(ProxyUser(user)))
            }
        };
        let request = match request::read(&mut stream).await {
            Ok(Ok(request)) => request,
            Ok(Err(malformed)) => {
                if let Some(code) = malformed.reply_code() {
                    request::reply(&mut stream, code).await.ok();
                }
                return Ok(Err(malformed));
            }
            Err(error) => {
                return Err(SocksServerError::Io {
                    source: error,
                    context: "reading the request",
                })
            }
        };
        let command = request.command;
        Socks5ServerProtocol::skip_auth_this_is_not_rfc_compliant(Replay::new(
            request.bytes,
            stream,
        ))
        .read_command()
        .await
        .map(|(proto, _, address)| Ok((proto, command, address, user)))
    };
    let (proto, command, address, user) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| "SOCKS5 handshake timed out")???;
    match command {
        Command::Connect(target) => {
            let idle = settings.limits.tunnel_idle_timeout;
            let peer = Peer { addr: client, user };
            connect(proto, target, peer, stack, idle, &settings.metrics).await
        }
        Command::UdpAssociate if settings.udp => {
            // The ASSOCIATE address is the client's own (often 0.0.0.0:0),
            // not a destination: the stack sees the association itself
            // (limited mode refuses it), then each datagram's destination.
            let target = Target::host(Host::Ip(client.ip()), client.port());
            let request = RequestModel::new(target, Protocol::Socks5Udp, client)
                .user(user.clone())
                .mark(UdpAssociation)
                .connect()?;
            if let Err(error) = call_stack(stack.clone(), request).await {
                proto.reply_error(&rescue::reply(&error)).await?;
                return Ok(());
            }
            let Some(ticket) = settings.udp_budget.take(client.ip(), &settings.limits) else {
                proto.reply_error(&rescue::busy()).await?;
                return Ok(());
            };
            udp::associate(
                proto,
                &address,
                Peer { addr: client, user },
                local_ip,
                stack,
                settings.policy_generation,
                ticket,
            )
            .await
        }
        Command::UdpAssociate => {
            proto.reply_error(&ReplyError::CommandNotSupported).await?;
            Err("UDP ASSOCIATE while UDP is off: replied 0x07".into())
        }
        Command::Bind => {
            proto.reply_error(&ReplyError::CommandNotSupported).await?;
            Err("SOCKS5 BIND is not served: replied 0x07".into())
        }
    }
}

async fn connect(
    proto: Socks5ServerProtocol<Replay<TcpStream>, states::CommandRead>,
    target: Target,
    peer: Peer,
    stack: ProxyService,
    idle: Duration,
    metrics: &crate::metrics::Metrics,
) -> Result<(), BoxError> {
    let client = peer.addr;
    let request = RequestModel::new(target.clone(), Protocol::Socks5Tcp, client)
        .user(peer.user)
        .connect()?;
    // A place under a concurrency cap is kept while the tunnel is open.
    let (upstream, _held) = match call_stack(stack, request).await {
        Ok(mut response) => (
            response.extensions().get::<Tunnel>().and_then(Tunnel::take),
            response
                .extensions_mut()
                .remove::<portcullis_middleware::HeldWhileOpen>(),
        ),
        Err(error) => {
            proto.reply_error(&rescue::reply(&error)).await?;
            return Ok(());
        }
    };
    let Some(upstream) = upstream else {
        proto.reply_error(&ReplyError::GeneralFailure).await?;
        return Err("the stack answered a SOCKS5 CONNECT without a connection".into());
    };
    let bound = upstream
        .local_addr()
        .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    let Some(client_stream) = proto.reply_success(bound).await?.into_inner() else {
        return Err("fast-socks5 read less of the request than was checked".into());
    };
    splice::tcp(&client_stream, &upstream, idle, metrics)
        .await
        .log(client, &target);
    Ok(())
}
