//! The SOCKS5 request (RFC 1928 §4), read and checked before fast-socks5
//! sees it. fast-socks5 answers a domain that is not UTF-8 with 0x05
//! (connection refused) from inside `read_command`, and logs the target it
//! read at debug level; reading the request here first lets a malformed one
//! get 0x01 (general failure) or 0x08 (address type not supported), and
//! keeps every byte fast-socks5 reads one we already checked. A request that
//! passes is replayed to fast-socks5 from memory by [`Replay`].

use std::io;
use std::net::IpAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use portcullis_middleware::Target;

/// `CONNECT`.
const CONNECT: u8 = 1;
/// `BIND`.
const BIND: u8 = 2;
/// `UDP ASSOCIATE`.
const UDP_ASSOCIATE: u8 = 3;

/// What a request asks for.
#[derive(Debug)]
pub(super) enum Command {
    /// `CONNECT` to this destination (already checked as a target).
    Connect(Target),
    /// `UDP ASSOCIATE`; its address is the client's own, in fast-socks5's
    /// reading of the same bytes.
    UdpAssociate,
    /// `BIND` (not served: 0x07).
    Bind,
}

/// A request that was read whole.
#[derive(Debug)]
pub(super) struct Request {
    /// What it asks for.
    pub(super) command: Command,
    /// Every byte of the request, for fast-socks5 to read again.
    pub(super) bytes: Vec<u8>,
}

/// Why a request was refused before fast-socks5 read it, with the reply
/// code it gets.
#[derive(Debug, thiserror::Error)]
pub(super) enum Malformed {
    /// The version byte is not 5: no reply, the connection is closed.
    #[error("SOCKS version {0} in the request (expected 5)")]
    Version(u8),
    /// A command other than 1, 2 or 3: reply 0x07.
    #[error("SOCKS5 command {0} does not exist")]
    Command(u8),
    /// An address type other than 1, 3 or 4: reply 0x08.
    #[error("SOCKS5 address type {0} is not supported")]
    AddressType(u8),
    /// A domain that is not UTF-8 or not a host name, or port 0: reply 0x01.
    #[error("invalid SOCKS5 destination: {0}")]
    Destination(String),
}

impl Malformed {
    /// The reply code sent for this refusal, if any.
    pub(super) fn reply_code(&self) -> Option<u8> {
        match self {
            Malformed::Version(_) => None,
            Malformed::Command(_) => Some(0x07),
            Malformed::AddressType(_) => Some(0x08),
            Malformed::Destination(_) => Some(0x01),
        }
    }
}

/// Reads one request. `Ok(Err(_))` is a malformed request that was read;
/// `Err(_)` is an I/O error (the client went away).
pub(super) async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<Result<Request, Malformed>> {
    let mut bytes = vec![0u8; 4];
    stream.read_exact(&mut bytes).await?;
    let [version, command, _reserved, address_type] = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if version != 5 {
        return Ok(Err(Malformed::Version(version)));
    }
    let address_len = match address_type {
        1 => 4,
        4 => 16,
        3 => {
            let len = stream.read_u8().await?;
            bytes.push(len);
            usize::from(len)
        }
        other => return Ok(Err(Malformed::AddressType(other))),
    };
    let start = bytes.len();
    bytes.resize(start + address_len + 2, 0);
    stream.read_exact(&mut bytes[start..]).await?;
    let address = &bytes[start..start + address_len];
    let port = u16::from_be_bytes([bytes[start + address_len], bytes[start + address_len + 1]]);
    // The ASSOCIATE address is the client's own and may carry port 0; a
    // CONNECT destination is checked whole.
    let checked_port = if command == CONNECT { port } else { 1 };
    let target = match (address_type, address) {
        (1, &[a, b, c, d]) => Target::from_ip(IpAddr::from([a, b, c, d]), checked_port),
        (4, _) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(address);
            Target::from_ip(IpAddr::from(octets), checked_port)
        }
        _ => match std::str::from_utf8(address) {
            Ok(domain) => Target::from_socks_domain(domain, checked_port),
            Err(_) => {
                return Ok(Err(Malformed::Destination(
                    "the domain is not UTF-8".to_owned(),
                )))
            }
        },
    };
    let target = match target {
        Ok(target) => target,
        Err(error) => return Ok(Err(Malformed::Destination(error.to_string()))),
    };
    let command = match command {
        CONNECT => Command::Connect(target),
        UDP_ASSOCIATE => Command::UdpAssociate,
        BIND => Command::Bind,
        other => return Ok(Err(Malformed::Command(other))),
    };
    Ok(Ok(Request { command, bytes }))
}

/// Writes a reply with `code` and an unspecified bound address.
pub(super) async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, code: u8) -> io::Result<()> {
    stream.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::transport::replay::Replay;

    async fn read_bytes(bytes: &[u8]) -> Result<Request, Malformed> {
        let mut reader = bytes;
        read(&mut reader).await.unwrap()
    }

    #[tokio::test]
    async fn a_request_is_read_whole_and_replayed() {
        let bytes = [
            5, 1, 0, 3, 7, b'o', b'k', b'.', b't', b'e', b's', b't', 0, 80, 0xAA,
        ];
        let request = read_bytes(&bytes).await.unwrap();
        assert!(matches!(request.command, Command::Connect(_)));
        assert_eq!(request.bytes, &bytes[..14]);
        let mut replay = Replay::new(request.bytes.clone(), &bytes[14..]);
        let mut again = Vec::new();
        replay.read_to_end(&mut again).await.unwrap();
        assert_eq!(again, &bytes[..]);
    }

    #[tokio::test]
    async fn malformed_requests_get_their_own_codes() {
        let not_utf8 = read_bytes(&[5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80]).await;
        assert_eq!(not_utf8.unwrap_err().reply_code(), Some(0x01));
        let newline = read_bytes(&[5, 1, 0, 3, 3, b'a', b'\n', b'b', 0, 80]).await;
        assert_eq!(newline.unwrap_err().reply_code(), Some(0x01));
        let port_zero = read_bytes(&[5, 1, 0, 3, 1, b'a', 0, 0]).await;
        assert_eq!(port_zero.unwrap_err().reply_code(), Some(0x01));
        let address_type = read_bytes(&[5, 1, 0, 9, 0, 0]).await;
        assert_eq!(address_type.unwrap_err().reply_code(), Some(0x08));
        let version = read_bytes(&[4, 1, 0, 1]).await;
        assert_eq!(version.unwrap_err().reply_code(), None);
        // An ASSOCIATE may name port 0 (the client does not know it yet).
        let associate = read_bytes(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        assert!(matches!(associate.unwrap().command, Command::UdpAssociate));
        let ip_port_zero = read_bytes(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 0]).await;
        assert_eq!(ip_port_zero.unwrap_err().reply_code(), Some(0x01));
        // A four-letter domain is a domain, not an IPv4 address.
        let four = read_bytes(&[5, 1, 0, 3, 4, b'a', b'.', b'b', b'c', 0, 80]).await;
        match four.unwrap().command {
            Command::Connect(target) => assert_eq!(target.to_string(), "a.bc:80"),
            other => panic!("{other:?}"),
        }
        let bind = read_bytes(&[5, 2, 0, 1, 127, 0, 0, 1, 0, 80]).await;
        assert!(matches!(bind.unwrap().command, Command::Bind));
        let unknown = read_bytes(&[5, 0x3a, 0, 1, 127, 0, 0, 1, 0, 80]).await;
        assert_eq!(unknown.unwrap_err().reply_code(), Some(0x07));
    }
}
