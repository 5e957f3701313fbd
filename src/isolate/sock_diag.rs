//! The listening sockets of this network namespace, from the kernel's
//! `sock_diag` netlink interface: which Unix socket file or abstract name,
//! which TCP port, and the socket's inode (what `/proc/PID/fd` links name
//! as `socket:[INODE]`).

use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{IPPROTO_TCP, TCP_LISTEN};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId};
use netlink_packet_sock_diag::unix::{nlas::Nla, ShowFlags, StateFlags, UnixRequest};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

/// A listening Unix socket.
#[derive(Debug, Clone, Default)]
pub(crate) struct UnixListener {
    /// The socket's own inode.
    pub(crate) socket: u32,
    /// The file it is bound to: the kernel's `dev_t` (major << 20 | minor)
    /// and the file's inode, low 32 bits.
    pub(crate) file: Option<(u32, u32)>,
    /// The abstract name it is bound to (without the leading NUL).
    pub(crate) abstract_name: Option<Vec<u8>>,
}

/// Whether a listener's `file` is `(device, inode)` as `stat` gives them.
pub(crate) fn same_file(file: (u32, u32), device: u64, inode: u64) -> bool {
    let (kernel_device, bound_inode) = file;
    let (major, minor) = (kernel_device >> 20, kernel_device & 0xf_ffff);
    u64::from(major) == nix::sys::stat::major(device)
        && u64::from(minor) == nix::sys::stat::minor(device)
        && u64::from(bound_inode) == inode & 0xffff_ffff
}

/// Every listening Unix socket in this network namespace.
pub(crate) fn unix_listeners() -> Result<Vec<UnixListener>, String> {
    let request = SockDiagMessage::UnixRequest(UnixRequest {
        state_flags: StateFlags::LISTEN,
        inode: 0,
        show_flags: ShowFlags::VFS | ShowFlags::NAME,
        cookie: [0xff; 8],
    });
    let mut listeners = Vec::new();
    dump(request, |message| {
        if let SockDiagMessage::UnixResponse(response) = message {
            if response.header.state != TCP_LISTEN {
                return;
            }
            let mut listener = UnixListener {
                socket: response.header.inode,
                ..UnixListener::default()
            };
            for nla in &response.nlas {
                match nla {
                    Nla::Vfs(vfs) => {
                        // Vfs keeps its fields private: read them back
                        // from its wire form (inode, then device).
                        let mut raw = [0u8; 8];
                        netlink_packet_core::Emitable::emit(vfs, &mut raw);
                        let inode = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                        let device = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
                        listener.file = Some((device, inode));
                    }
                    Nla::Name(netlink_packet_sock_diag::unix::nlas::UnixDiagName::Abstract(
                        name,
                    )) => listener.abstract_name = Some(name.clone()),
                    _ => {}
                }
            }
            listeners.push(listener);
        }
    })?;
    Ok(listeners)
}

/// The inodes of the TCP sockets listening on `address` (its family, its
/// IP, its port) in this network namespace.
pub(crate) fn tcp_listeners(address: SocketAddr) -> Result<Vec<u32>, String> {
    let (family, socket_id) = match address.ip() {
        IpAddr::V4(_) => (libc_family(nix::libc::AF_INET), SocketId::new_v4()),
        IpAddr::V6(_) => (libc_family(nix::libc::AF_INET6), SocketId::new_v6()),
    };
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: netlink_packet_sock_diag::inet::StateFlags::LISTEN,
        socket_id,
    });
    let mut inodes = Vec::new();
    dump(request, |message| {
        if let SockDiagMessage::InetResponse(response) = message {
            let id = &response.header.socket_id;
            if response.header.state == TCP_LISTEN
                && id.source_port == address.port()
                && id.source_address == address.ip()
            {
                inodes.push(response.header.inode);
            }
        }
    })?;
    Ok(inodes)
}

fn libc_family(family: i32) -> u8 {
    u8::try_from(family).unwrap_or_default()
}

/// Sends one dump request and hands each answer to `each`.
fn dump(request: SockDiagMessage, mut each: impl FnMut(&SockDiagMessage)) -> Result<(), String> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(|e| e.to_string())?;
    socket.bind_auto().map_err(|e| e.to_string())?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(|e| e.to_string())?;
    let mut request = NetlinkMessage::from(request);
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.finalize();
    let mut buffer = vec![0u8; request.header.length as usize];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0).map_err(|e| e.to_string())?;
    let mut received = Vec::with_capacity(1 << 16);
    loop {
        received.clear();
        socket.recv(&mut received, 0).map_err(|e| e.to_string())?;
        let mut offset = 0;
        while offset < received.len() {
            let bytes = received.get(offset..).unwrap_or_default();
            let message =
                NetlinkMessage::<SockDiagMessage>::deserialize(bytes).map_err(|e| e.to_string())?;
            let length = message.header.length as usize;
            match &message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => return Err(format!("sock_diag: {error:?}")),
                NetlinkPayload::InnerMessage(inner) => each(inner),
                _ => {}
            }
            if length == 0 {
                return Ok(());
            }
            offset += length;
        }
    }
}
