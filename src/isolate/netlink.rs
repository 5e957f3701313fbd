//! The namespace's routing and capture rules, set up through netlink by the
//! bridge while it holds `CAP_NET_ADMIN` in its own user namespace (no
//! root on the host, no external binary):
//!
//! - a local route for every address (`local 0.0.0.0/0` and `local ::/0`
//!   in table `local` on `lo`): any destination the child dials is this
//!   namespace, so nothing has anywhere else to go;
//! - an nftables table `inet portcullis` with a `nat` chain on the
//!   `output` hook: every TCP connection is redirected to the capture
//!   listener's port (the original destination stays readable with
//!   `SO_ORIGINAL_DST`), and every UDP datagram to port 53 to the policy
//!   DNS server.
//!
//! Messages are built with the `netlink-packet-*` crates and sent with
//! `netlink-sys`; each request asks for an acknowledgement, and an error
//! the kernel returns is the setup's error.

use std::net::{Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DefaultNla, NetlinkBuffer, NetlinkDeserializable, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, Parseable, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Hook, Immediate, InetHookNumber,
    Meta, MetaKey, NfTablesMessage, Operator, Payload, Register, RuleAttribute, RuleMessage,
    TableAttribute, TableMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols, Socket, SocketAddr};

/// The routing table holding local routes.
const RT_TABLE_LOCAL: u8 = 255;
/// `nfgenmsg.res_id` of a batch: the nftables subsystem.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFTA_REDIR_REG_PROTO_MIN`: the register holding the port to redirect to.
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
/// `NF_IP_PRI_NAT_DST`: where a destination NAT chain hooks in.
const NAT_DST_PRIORITY: i32 = -100;
/// `NFT_PAYLOAD_TRANSPORT_HEADER`.
const TRANSPORT_HEADER: u32 = 2;

/// Routes every IPv4 address (and every IPv6 address, when `v6`) to this
/// namespace's loopback.
pub(super) fn route_everything_locally(loopback: u32, v6: bool) -> Result<(), String> {
    let mut socket = open(protocols::NETLINK_ROUTE)?;
    let families: &[AddressFamily] = if v6 {
        &[AddressFamily::Inet, AddressFamily::Inet6]
    } else {
        &[AddressFamily::Inet]
    };
    for (sequence, family) in (1u32..).zip(families) {
        let mut message = RouteMessage::default();
        message.header = RouteHeader {
            address_family: *family,
            destination_prefix_length: 0,
            table: RT_TABLE_LOCAL,
            protocol: RouteProtocol::Static,
            scope: RouteScope::Host,
            kind: RouteType::Local,
            ..RouteHeader::default()
        };
        let any = match family {
            AddressFamily::Inet6 => RouteAddress::Inet6(Ipv6Addr::UNSPECIFIED),
            _ => RouteAddress::Inet(Ipv4Addr::UNSPECIFIED),
        };
        message.attributes = vec![
            RouteAttribute::Destination(any),
            RouteAttribute::Oif(loopback),
            RouteAttribute::Table(u32::from(RT_TABLE_LOCAL)),
        ];
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewRoute(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        request.header.sequence_number = sequence;
        send(&mut socket, &[request])?;
        receive_acks::<RouteNetlinkMessage>(&mut socket, 1)
            .map_err(|e| format!("a local route for every {family:?} address: {e}"))?;
    }
    Ok(())
}

/// Redirects every TCP connection to `capture_port` and every UDP datagram
/// to port 53 to port 53 on loopback (the policy DNS server).
pub(super) fn redirect_to(capture_port: u16) -> Result<(), String> {
    const TABLE: &str = "portcullis";
    const CHAIN: &str = "capture";
    let inet = || NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0);
    let batch = |message: ControlMessage| {
        let mut request = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
            message,
        ));
        request.header.flags = NLM_F_REQUEST;
        request
    };
    let l4proto_is = |protocol: u8| -> Vec<Expressions> {
        vec![
            Expressions::Meta(vec![
                Meta::Key(MetaKey::L4Proto),
                Meta::DestinationRegister(Register::Reg1),
            ]),
            Expressions::Cmp(vec![
                Cmp::SourceRegister(Register::Reg1),
                Cmp::Op(Operator::Equal),
                Cmp::Data(DataAttribute::Value(vec![protocol])),
            ]),
        ]
    };
    let redirect_to_port = |port: u16| -> Vec<Expressions> {
        vec![
            Expressions::Immediate(vec![
                Immediate::DestinationRegister(Register::Reg1),
                Immediate::Data(DataAttribute::Value(port.to_be_bytes().to_vec())),
            ]),
            Expressions::Other {
                expression_type: "redir".to_owned(),
                attributes: vec![DefaultNla::new(
                    NFTA_REDIR_REG_PROTO_MIN,
                    register_1().to_vec(),
                )],
            },
        ]
    };
    let mut tcp = l4proto_is(6);
    tcp.extend(redirect_to_port(capture_port));
    let mut dns = l4proto_is(17);
    dns.extend([
        Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(TRANSPORT_HEADER),
            Payload::Offset(2),
            Payload::Len(2),
        ]),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(53u16.to_be_bytes().to_vec())),
        ]),
    ]);
    dns.extend(redirect_to_port(53));
    let rule = |expressions: Vec<Expressions>| {
        NfTablesMessage::NewRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(TABLE.to_owned()),
                RuleAttribute::Chain(CHAIN.to_owned()),
                RuleAttribute::Expressions(expressions.into_iter().map(Into::into).collect()),
            ],
        })
    };
    let messages = [
        NfTablesMessage::NewTable(TableMessage {
            attributes: vec![TableAttribute::Name(TABLE.to_owned())],
        }),
        NfTablesMessage::NewChain(ChainMessage {
            attributes: vec![
                ChainAttribute::Table(TABLE.to_owned()),
                ChainAttribute::Name(CHAIN.to_owned()),
                ChainAttribute::Type("nat".to_owned()),
                ChainAttribute::Hook(vec![
                    Hook::Number(InetHookNumber::LocalOut.into()),
                    Hook::Priority(NAT_DST_PRIORITY as u32),
                ]),
            ],
        }),
        rule(tcp),
        rule(dns),
    ];
    let mut requests = vec![batch(ControlMessage::BatchBegin)];
    for message in messages {
        let mut request = NetlinkMessage::from(NetfilterMessage::new(inet(), message));
        // Rules in the order written (NLM_F_APPEND), not each at the front.
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        requests.push(request);
    }
    requests.push(batch(ControlMessage::BatchEnd));
    for (sequence, request) in (1u32..).zip(requests.iter_mut()) {
        request.header.sequence_number = sequence;
    }
    let mut socket = open(protocols::NETLINK_NETFILTER)?;
    send(&mut socket, &requests)?;
    receive_acks::<NetfilterMessage>(&mut socket, requests.len() - 2)
        .map_err(|e| format!("nftables capture rules: {e}"))
}

/// `NFT_REG_1` as the kernel reads a register attribute (big-endian u32).
fn register_1() -> [u8; 4] {
    1u32.to_be_bytes()
}

fn open(protocol: isize) -> Result<Socket, String> {
    let mut socket = Socket::new(protocol).map_err(|e| format!("a netlink socket: {e}"))?;
    socket
        .bind_auto()
        .map_err(|e| format!("binding a netlink socket: {e}"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| format!("connecting a netlink socket: {e}"))?;
    Ok(socket)
}

fn send<T: NetlinkSerializable>(
    socket: &mut Socket,
    messages: &[NetlinkMessage<T>],
) -> Result<(), String>
where
    NetlinkMessage<T>: Clone,
{
    let mut buffer = Vec::new();
    for message in messages {
        let mut message = message.clone();
        message.finalize();
        let start = buffer.len();
        buffer.resize(start + message.buffer_len(), 0);
        if let Some(slot) = buffer.get_mut(start..) {
            message.serialize(slot);
        }
    }
    socket
        .send(&buffer, 0)
        .map_err(|e| format!("sending to netlink: {e}"))?;
    Ok(())
}

/// Reads acknowledgements until `expected` arrived; the first error the
/// kernel reports is returned.
fn receive_acks<T>(socket: &mut Socket, expected: usize) -> Result<(), String>
where
    T: NetlinkDeserializable + std::fmt::Debug,
{
    let mut acknowledged = 0;
    while acknowledged < expected {
        let (bytes, _) = socket
            .recv_from_full()
            .map_err(|e| format!("reading from netlink: {e}"))?;
        let mut offset = 0;
        while let Some(rest) = bytes.get(offset..).filter(|rest| !rest.is_empty()) {
            let buffer = NetlinkBuffer::new_checked(&rest).map_err(|e| e.to_string())?;
            let length = buffer.length() as usize;
            let message = NetlinkMessage::<T>::parse(&buffer).map_err(|e| e.to_string())?;
            match message.payload {
                NetlinkPayload::Error(error) => match error.code {
                    None => acknowledged += 1,
                    Some(code) => {
                        return Err(std::io::Error::from_raw_os_error(-code.get()).to_string())
                    }
                },
                NetlinkPayload::Done(_) => return Ok(()),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
    Ok(())
}
