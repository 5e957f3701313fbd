//! The SOCKS5 `UDP ASSOCIATE` relay.
//!
//! - Datagrams are accepted only from the client's IP (and, after the first
//!   datagram, only from that port); fragments (FRAG ≠ 0) are dropped.
//! - Each new destination is decided through the stack as a `socks5_udp`
//!   request, **off the relay loop**: while a destination's decision is
//!   pending (an approval can take a minute), its datagrams wait in a small
//!   bounded queue and every other destination keeps flowing.
//! - A decision is cached per destination with the policy's generation, so a
//!   reload or a persisted rule applies to the next datagram. An *allow
//!   once* approval covers the datagrams that waited for it, nothing later.
//!   A refusal is cached like an allow (one violation per destination and
//!   policy generation), except an approver's, which is asked again.
//! - Replies are sent to the client only, and only from remotes the client
//!   sent to. The relay ends with the TCP control connection.
//! - An association belongs to the sender its `UDP ASSOCIATE` declared (an
//!   address and port, or a port on the client's address); only when it
//!   declared none, to the first datagram's sender from the client's
//!   address. Another local program cannot take it over.
//! - Bounded: 16 datagrams wait per pending destination, 1,024
//!   destinations per association.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fast_socks5::server::{run_udp_proxy_custom, states, Socks5ServerProtocol, SocksServerError};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{new_udp_header, parse_udp_request};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

use portcullis_middleware::{
    find_blocked, ApprovedOnce, BoxError, PolicyGeneration, Protocol, ProxyUser, Source, Target,
};

use super::target_of;
use crate::connector::VettedAddresses;
use crate::transport::model::RequestModel;
use crate::transport::{call_stack, Limits, Peer, ProxyService};

/// Largest UDP datagram relayed.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams kept per destination while its decision is pending; later
/// ones are dropped (UDP may lose datagrams; memory may not grow).
const MAX_QUEUED: usize = 16;
/// Destinations one association may use; datagrams to further new ones are
/// dropped (said once in the log).
const MAX_DESTINATIONS: usize = 1024;

/// The UDP associations open, in all and per client address, against
/// `[limits] max_udp_associations` and `max_udp_associations_per_client`.
#[derive(Debug, Default)]
pub(crate) struct UdpBudget {
    open: Mutex<OpenAssociations>,
}

#[derive(Debug, Default)]
struct OpenAssociations {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
    /// When a refusal was last logged: at most one line a second.
    last_said: Option<Instant>,
}

/// One open association; dropping it gives the place back.
#[derive(Debug)]
pub(crate) struct UdpTicket {
    budget: Arc<UdpBudget>,
    client: IpAddr,
}

impl UdpBudget {
    /// A place for one more association of `client`, or `None` (said in
    /// the log, at most once a second) when a limit is reached.
    pub(crate) fn take(self: &Arc<Self>, client: IpAddr, limits: &Limits) -> Option<UdpTicket> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = open.by_client.get(&client).copied().unwrap_or(0);
        let refused = if open.total >= limits.max_udp_associations {
            Some(("max_udp_associations", limits.max_udp_associations))
        } else if mine >= limits.max_udp_associations_per_client {
            Some((
                "max_udp_associations_per_client",
                limits.max_udp_associations_per_client,
            ))
        } else {
            None
        };
        if let Some((key, max)) = refused {
            let now = Instant::now();
            if open
                .last_said
                .is_none_or(|said| now.duration_since(said) >= Duration::from_secs(1))
            {
                open.last_said = Some(now);
                tracing::warn!(%client, open = open.total, of_client = mine, "UDP ASSOCIATE refused (reply 0x01): {max} associations are open, the limit ([limits] {key}); close some or raise it");
            }
            return None;
        }
        open.total += 1;
        *open.by_client.entry(client).or_insert(0) += 1;
        Some(UdpTicket {
            budget: self.clone(),
            client,
        })
    }
}

impl Drop for UdpTicket {
    fn drop(&mut self) {
        let mut open = self
            .budget
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let std::collections::hash_map::Entry::Occupied(mut entry) =
            open.by_client.entry(self.client)
        {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

/// Runs the relay of one association until the control connection closes;
/// `ticket` holds its place in the budget until then.
pub(super) async fn associate(
    proto: Socks5ServerProtocol<super::Replay<TcpStream>, states::CommandRead>,
    address: &TargetAddr,
    peer: Peer,
    local_ip: IpAddr,
    stack: ProxyService,
    policy: PolicyGeneration,
    ticket: UdpTicket,
) -> Result<(), BoxError> {
    let _ticket = ticket;
    let client = peer.addr;
    // The ASSOCIATE address is the client's own (often 0.0.0.0:0), not a
    // destination. When it names a port (and an address), the association
    // belongs to exactly that sender; otherwise to the first datagram's.
    let declared = declared_sender(address, client);
    run_udp_proxy_custom(
        proto,
        address,
        Some(local_ip),
        local_ip,
        move |socket| async move {
            let std_socket: std::net::UdpSocket = socket.into();
            let peer_socket = UdpSocket::from_std(std_socket).map_err(|error| {
                tracing::debug!(%error, "UDP relay socket");
                SocksServerError::Bug("UDP relay socket")
            })?;
            Relay::new(peer_socket, peer, declared, stack, policy)
                .run()
                .await
                .map_err(|error| {
                    tracing::debug!(%error, "UDP relay ended");
                    SocksServerError::Bug("UDP relay failed")
                })
        },
    )
    .await?;
    Ok(())
}

/// The sender an `UDP ASSOCIATE` declared: its address and port when both
/// are given, the control connection's address with the port when only the
/// port is; `None` (the first datagram's sender, from the client's address)
/// when neither is.
fn declared_sender(address: &TargetAddr, client: SocketAddr) -> Option<SocketAddr> {
    let TargetAddr::Ip(declared) = address else {
        return None;
    };
    if declared.port() == 0 {
        return None;
    }
    if declared.ip().is_unspecified() {
        return Some(SocketAddr::new(client.ip(), declared.port()));
    }
    Some(*declared)
}

/// What the relay knows about one destination.
#[derive(Debug)]
enum Destination {
    /// The stack is deciding; these payloads wait for the answer.
    Pending(VecDeque<Vec<u8>>),
    /// Allowed under this policy generation: send here.
    Allowed {
        address: SocketAddr,
        generation: u64,
    },
    /// Refused under this policy generation: drop.
    Refused { generation: u64 },
}

/// The stack's answer about one destination, sent back to the relay loop.
#[derive(Debug)]
struct Decided {
    target: Target,
    generation: u64,
    outcome: Outcome,
}

#[derive(Debug)]
enum Outcome {
    Allowed { address: SocketAddr, once: bool },
    Refused { cache: bool },
}

struct Relay {
    peer: UdpSocket,
    client: SocketAddr,
    /// The proxy user the client authenticated as, put on each decision.
    user: Option<ProxyUser>,
    stack: ProxyService,
    policy: PolicyGeneration,
    client_udp: Option<SocketAddr>,
    destinations: HashMap<Target, Destination>,
    remotes: HashSet<SocketAddr>,
    outbound_v4: Option<UdpSocket>,
    outbound_v6: Option<UdpSocket>,
    decided_tx: mpsc::UnboundedSender<Decided>,
    decided_rx: mpsc::UnboundedReceiver<Decided>,
    dropped: u64,
    said_full: bool,
}

impl Relay {
    fn new(
        peer: UdpSocket,
        who: Peer,
        declared: Option<SocketAddr>,
        stack: ProxyService,
        policy: PolicyGeneration,
    ) -> Relay {
        let (decided_tx, decided_rx) = mpsc::unbounded_channel();
        Relay {
            peer,
            client: who.addr,
            user: who.user,
            stack,
            policy,
            client_udp: declared,
            destinations: HashMap::new(),
            remotes: HashSet::new(),
            outbound_v4: None,
            outbound_v6: None,
            decided_tx,
            decided_rx,
            dropped: 0,
            said_full: false,
        }
    }

    async fn run(mut self) -> Result<(), BoxError> {
        // One receive buffer for the three sockets, filled without being
        // zeroed first: a small datagram touches one page of it, not 64 KiB
        // (three zeroed buffers made an association cost ~43 KiB).
        let mut buffer: Vec<u8> = Vec::with_capacity(MAX_DATAGRAM);
        loop {
            let from = tokio::select! {
                ready = self.peer.readable() => { ready?; Arrival::Client }
                Some(decided) = self.decided_rx.recv() => {
                    self.decided(decided).await?;
                    continue;
                }
                ready = readable_optional(self.outbound_v4.as_ref()) => { ready?; Arrival::V4 }
                ready = readable_optional(self.outbound_v6.as_ref()) => { ready?; Arrival::V6 }
            };
            let socket = match from {
                Arrival::Client => Some(&self.peer),
                Arrival::V4 => self.outbound_v4.as_ref(),
                Arrival::V6 => self.outbound_v6.as_ref(),
            };
            let Some(socket) = socket else { continue };
            buffer.clear();
            let source = match socket.try_recv_buf_from(&mut buffer) {
                Ok((_, source)) => source,
                // Readiness can be spurious.
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error.into()),
            };
            match from {
                Arrival::Client => self.on_datagram(source, &buffer).await?,
                Arrival::V4 | Arrival::V6 => self.reply(source, &buffer).await,
            }
        }
    }

    /// One datagram from the client: send it, queue it, or start a decision.
    async fn on_datagram(&mut self, source: SocketAddr, datagram: &[u8]) -> Result<(), BoxError> {
        if source.ip() != self.client.ip() || self.client_udp.is_some_and(|known| known != source) {
            tracing::debug!(%source, "UDP datagram from a stranger ignored");
            return Ok(());
        }
        let Ok((fragment, address, payload)) = parse_udp_request(datagram).await else {
            return Ok(());
        };
        if fragment != 0 {
            return Ok(());
        }
        let Ok(target) = target_of(&address) else {
            return Ok(());
        };
        self.client_udp = Some(source);
        let generation = self.policy.get();
        let full = self.destinations.len() >= MAX_DESTINATIONS;
        match self.destinations.get_mut(&target) {
            Some(Destination::Allowed {
                address,
                generation: decided,
            }) if *decided == generation => {
                let address = *address;
                self.send(address, payload).await
            }
            Some(Destination::Refused {
                generation: decided,
            }) if *decided == generation => {
                self.dropped += 1;
                Ok(())
            }
            Some(Destination::Pending(queue)) => {
                if queue.len() < MAX_QUEUED {
                    queue.push_back(payload.to_vec());
                } else {
                    self.dropped += 1;
                    tracing::debug!(
                        dropped = self.dropped,
                        "UDP datagram dropped: its destination's decision is still pending"
                    );
                }
                Ok(())
            }
            None if full => {
                self.dropped += 1;
                if !self.said_full {
                    self.said_full = true;
                    tracing::warn!(client = %self.client, max = MAX_DESTINATIONS, "UDP association reached its destination limit; datagrams to new destinations are dropped");
                }
                Ok(())
            }
            // New, or decided under an older policy: decide (again).
            _ => {
                self.destinations.insert(
                    target.clone(),
                    Destination::Pending(VecDeque::from([payload.to_vec()])),
                );
                self.decide(target, generation);
                Ok(())
            }
        }
    }

    /// Asks the stack about `target` on a task of its own.
    fn decide(&self, target: Target, generation: u64) {
        let stack = self.stack.clone();
        let client = self.client;
        let user = self.user.clone();
        let decided = self.decided_tx.clone();
        tokio::spawn(async move {
            let model = RequestModel::new(target.clone(), Protocol::Socks5Udp, client).user(user);
            let outcome = match model.connect() {
                Ok(request) => {
                    match call_stack(stack, request).await {
                        Ok(response) => {
                            let address = response
                                .extensions()
                                .get::<VettedAddresses>()
                                .and_then(|vetted| vetted.0.first().copied());
                            let once = response.extensions().get::<ApprovedOnce>().is_some();
                            match address {
                                Some(address) => Outcome::Allowed { address, once },
                                None => Outcome::Refused { cache: false },
                            }
                        }
                        // Refused: the violation log has it. An approver's no is
                        // for the datagrams that waited; it may be asked again.
                        Err(error) => Outcome::Refused {
                            cache: find_blocked(error.as_ref())
                                .is_some_and(|blocked| blocked.source != Source::Approval),
                        },
                    }
                }
                Err(_) => Outcome::Refused { cache: true },
            };
            // The association may be gone; then nobody is waiting.
            let _ = decided.send(Decided {
                target,
                generation,
                outcome,
            });
        });
    }

    /// Applies a decision: flushes or drops the queued datagrams, and caches
    /// what may be cached.
    async fn decided(&mut self, decided: Decided) -> Result<(), BoxError> {
        // One decision is asked per pending destination, so this is its queue.
        let queued = match self.destinations.remove(&decided.target) {
            Some(Destination::Pending(queue)) => queue,
            _ => VecDeque::new(),
        };
        match decided.outcome {
            Outcome::Allowed { address, once } => {
                for payload in &queued {
                    self.send(address, payload).await?;
                }
                if !once {
                    self.destinations.insert(
                        decided.target,
                        Destination::Allowed {
                            address,
                            generation: decided.generation,
                        },
                    );
                }
            }
            Outcome::Refused { cache } => {
                self.dropped += queued.len() as u64;
                if cache {
                    self.destinations.insert(
                        decided.target,
                        Destination::Refused {
                            generation: decided.generation,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    async fn send(&mut self, destination: SocketAddr, payload: &[u8]) -> Result<(), BoxError> {
        let (slot, unspecified) = match destination {
            SocketAddr::V4(_) => (&mut self.outbound_v4, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            SocketAddr::V6(_) => (&mut self.outbound_v6, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        if slot.is_none() {
            *slot = Some(UdpSocket::bind(SocketAddr::new(unspecified, 0)).await?);
        }
        if let Some(socket) = slot.as_ref() {
            self.remotes.insert(destination);
            let _ = socket.send_to(payload, destination).await;
        }
        Ok(())
    }

    /// Sends a remote's datagram back to the client (never anywhere else).
    async fn reply(&mut self, source: SocketAddr, payload: &[u8]) {
        let Some(client_udp) = self.client_udp else {
            return;
        };
        if !self.remotes.contains(&source) {
            return;
        }
        if let Ok(mut datagram) = new_udp_header(source) {
            datagram.extend_from_slice(payload);
            let _ = self.peer.send_to(&datagram, client_udp).await;
        }
    }
}

/// Which socket a datagram is waiting on.
#[derive(Debug, Clone, Copy)]
enum Arrival {
    Client,
    V4,
    V6,
}

async fn readable_optional(socket: Option<&UdpSocket>) -> std::io::Result<()> {
    match socket {
        Some(socket) => socket.readable().await,
        None => std::future::pending().await,
    }
}
