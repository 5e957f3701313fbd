//! The canonical destination of a request, parsed once and strictly.
//!
//! Every transport turns what the client named (an absolute-form URI, a
//! CONNECT authority, a SOCKS5 address, an `x-unix-socket` path) into a
//! [`Target`] exactly once, with the functions here, and stores it in the
//! request's extensions. Layers read the `Target`; nobody re-parses a Host
//! header. Whatever these functions accept is the host the policy checks
//! *and* the host the connector dials.
//!
//! The rules, chosen to leave no second interpretation open:
//!
//! - names are ASCII only, lower-cased, with one trailing dot removed; labels
//!   are 1–63 bytes of `a-z 0-9 - _`, the whole name at most 253 bytes.
//!   Internationalised names are refused rather than mapped: send the
//!   punycode (`xn--…`) form, as curl, browsers and most clients already do;
//! - anything that a URL parser would read as an IPv4 address is one:
//!   `2130706433`, `0x7f.1`, `127.1` and `0177.0.0.1` all become `127.0.0.1`,
//!   and a name whose last label is numeric but is not a valid address
//!   (`1.2.3.4.5`, `example.123`) is refused;
//! - IPv6 literals are written in brackets in an authority (`[::1]:443`), and
//!   brackets are accepted around nothing else; IPv4-mapped (`::ffff:a.b.c.d`)
//!   and IPv4-compatible (`::a.b.c.d`) addresses are unwrapped to the IPv4;
//! - NUL, control characters, spaces, `%` (zone ids, percent-encoding), `@`
//!   (user info) and any other punctuation are refused;
//! - a port is 1 to 5 ASCII digits with a value from 1 to 65535.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Longest host name accepted, in bytes (RFC 1035, without the trailing dot).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label accepted, in bytes.
pub const MAX_LABEL_LEN: usize = 63;

/// Why a host, port or authority was refused by the parser.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The host was empty.
    #[error("the host is empty")]
    EmptyHost,
    /// The host contained a byte that no host may contain.
    #[error("the host contains a forbidden character {0:?}")]
    ForbiddenCharacter(char),
    /// The host was not ASCII.
    #[error("the host is not ASCII; send internationalised names in their punycode (xn--) form")]
    NotAscii,
    /// The name or one of its labels is too long or empty.
    #[error("the host name is malformed: {0}")]
    MalformedName(&'static str),
    /// The host looked like an IPv4 address but is not a valid one.
    #[error("the host ends in a number but is not a valid IPv4 address")]
    InvalidIpv4,
    /// The host looked like an IPv6 literal but is not a valid one.
    #[error("the host is not a valid bracketed IPv6 address")]
    InvalidIpv6,
    /// The port is missing where one is required.
    #[error("the port is missing")]
    MissingPort,
    /// The port is not 1 to 65535 written in decimal digits.
    #[error("the port must be a number from 1 to 65535")]
    InvalidPort,
    /// The URI scheme is not one the proxy forwards.
    #[error("the scheme {0:?} is not supported; use http:// (or CONNECT for TLS)")]
    UnsupportedScheme(String),
    /// A Unix socket path was not absolute.
    #[error("the unix socket path must be absolute")]
    RelativeSocketPath,
}

/// A canonical host: a lower-case ASCII name, or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// A DNS name, canonical: lower-case ASCII, no trailing dot.
    Name(String),
    /// An IP address; IPv4-mapped and IPv4-compatible IPv6 are unwrapped.
    Ip(IpAddr),
}

impl Host {
    /// Parses a host as it stands in an authority (IPv6 in brackets) or a
    /// SOCKS5 domain field (a bare IPv6 literal is accepted there too).
    pub fn parse(input: &str) -> Result<Host, TargetError> {
        if input.is_empty() {
            return Err(TargetError::EmptyHost);
        }
        if let Some(inner) = input.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(TargetError::InvalidIpv6)?;
            check_characters(inner, true)?;
            let v6: Ipv6Addr = inner.parse().map_err(|_| TargetError::InvalidIpv6)?;
            return Ok(Host::Ip(canonical_ip(IpAddr::V6(v6))));
        }
        check_characters(input, input.contains(':'))?;
        if input.contains(':') {
            let v6: Ipv6Addr = input.parse().map_err(|_| TargetError::InvalidIpv6)?;
            return Ok(Host::Ip(canonical_ip(IpAddr::V6(v6))));
        }
        let lower = input.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name.is_empty() {
            return Err(TargetError::EmptyHost);
        }
        if let Some(v4) = parse_ipv4_like(name)? {
            return Ok(Host::Ip(IpAddr::V4(v4)));
        }
        check_name(name)?;
        Ok(Host::Name(name.to_owned()))
    }

    /// The IP address, if this host is one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(*ip),
            Host::Name(_) => None,
        }
    }

    /// Whether this is the name `localhost` or a name under `.localhost`,
    /// which resolvers answer with a loopback address.
    pub fn is_localhost_name(&self) -> bool {
        match self {
            Host::Name(name) => name == "localhost" || name.ends_with(".localhost"),
            Host::Ip(_) => false,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(v4)) => write!(f, "{v4}"),
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
        }
    }
}

/// Where a request goes: a host and port, or a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A TCP or UDP destination.
    Host {
        /// The canonical host.
        host: Host,
        /// The port, always explicit.
        port: u16,
    },
    /// A Unix domain socket, by absolute path (canonicalised by the transport).
    Unix(PathBuf),
}

impl Target {
    /// A host target.
    pub fn host(host: Host, port: u16) -> Target {
        Target::Host { host, port }
    }

    /// Parses `host:port`, `[v6]:port`, or (when `default_port` is given)
    /// a bare `host` / `[v6]`.
    pub fn parse_authority(input: &str, default_port: Option<u16>) -> Result<Target, TargetError> {
        if input.contains('@') {
            return Err(TargetError::ForbiddenCharacter('@'));
        }
        let (host, port) = split_host_port(input)?;
        let port = match port {
            Some(port) => parse_port(port)?,
            None => default_port.ok_or(TargetError::MissingPort)?,
        };
        Ok(Target::Host {
            host: Host::parse(host)?,
            port,
        })
    }

    /// The target of an absolute-form URI (`http://host[:port]/…`); the port
    /// defaults by scheme (`http` 80, `https` 443); other schemes are refused.
    pub fn from_uri(uri: &http::Uri) -> Result<Target, TargetError> {
        let scheme = uri.scheme_str().ok_or(TargetError::EmptyHost)?;
        let default_port = default_port_for_scheme(scheme)?;
        let authority = uri.authority().ok_or(TargetError::EmptyHost)?;
        Target::parse_authority(authority.as_str(), Some(default_port))
    }

    /// The target of a SOCKS5 domain address (the domain field and port).
    pub fn from_socks_domain(domain: &str, port: u16) -> Result<Target, TargetError> {
        if port == 0 {
            return Err(TargetError::InvalidPort);
        }
        Ok(Target::Host {
            host: Host::parse(domain)?,
            port,
        })
    }

    /// The target of an IP address and port (a SOCKS5 IPv4/IPv6 address).
    pub fn from_ip(ip: IpAddr, port: u16) -> Result<Target, TargetError> {
        if port == 0 {
            return Err(TargetError::InvalidPort);
        }
        Ok(Target::Host {
            host: Host::Ip(canonical_ip(ip)),
            port,
        })
    }

    /// A Unix socket target; the path must be absolute.
    pub fn unix(path: impl Into<PathBuf>) -> Result<Target, TargetError> {
        let path = path.into();
        if !path.is_absolute() {
            return Err(TargetError::RelativeSocketPath);
        }
        Ok(Target::Unix(path))
    }

    /// The host, for host targets.
    pub fn host_ref(&self) -> Option<&Host> {
        match self {
            Target::Host { host, .. } => Some(host),
            Target::Unix(_) => None,
        }
    }

    /// The port, for host targets.
    pub fn port(&self) -> Option<u16> {
        match self {
            Target::Host { port, .. } => Some(*port),
            Target::Unix(_) => None,
        }
    }

    /// The socket path, for Unix targets.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Target::Unix(path) => Some(path),
            Target::Host { .. } => None,
        }
    }

    /// The host as shown in messages and logs: the canonical name or address
    /// (IPv6 without brackets), or the socket path.
    pub fn host_string(&self) -> String {
        match self {
            Target::Host {
                host: Host::Name(name),
                ..
            } => name.clone(),
            Target::Host {
                host: Host::Ip(ip), ..
            } => ip.to_string(),
            Target::Unix(path) => path.display().to_string(),
        }
    }
}

impl Target {
    /// Whether `text` is exactly what [`Display`](fmt::Display) writes for
    /// this target — `host:port`, or the host alone when the port is
    /// `default_port` (as a `Host` header writes it) — so a caller holding
    /// that text can send it as it is rather than format it again. Only
    /// the canonical spelling answers yes: a name as the target holds it,
    /// an IPv4 address as std writes it (no leading zeros), the port's own
    /// digits (no sign, no leading zero), no user part. An IPv6 host
    /// always answers no.
    pub fn is_written_as(&self, text: &str, default_port: Option<u16>) -> bool {
        let Target::Host { host, port } = self else {
            return false;
        };
        let written = if default_port == Some(*port) {
            text
        } else {
            let Some((written, digits)) = text.rsplit_once(':') else {
                return false;
            };
            let own = port.checked_ilog10().unwrap_or(0) as usize + 1;
            // The same value in as many characters: the same digits (a
            // sign or a leading zero takes one more).
            if digits.len() != own || digits.parse::<u16>() != Ok(*port) {
                return false;
            }
            written
        };
        match host {
            Host::Name(name) => written == name,
            // std parses only the dotted quad without leading zeros: the
            // text is the address's own.
            Host::Ip(IpAddr::V4(v4)) => written.parse::<Ipv4Addr>() == Ok(*v4),
            Host::Ip(IpAddr::V6(_)) => false,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The default port of a URI scheme the proxy forwards.
pub fn default_port_for_scheme(scheme: &str) -> Result<u16, TargetError> {
    if scheme.eq_ignore_ascii_case("http") {
        Ok(80)
    } else if scheme.eq_ignore_ascii_case("https") {
        Ok(443)
    } else {
        Err(TargetError::UnsupportedScheme(
            scheme.escape_debug().to_string(),
        ))
    }
}

/// Parses a port: 1 to 5 ASCII digits, 1..=65535.
pub fn parse_port(input: &str) -> Result<u16, TargetError> {
    if input.is_empty() || input.len() > 5 || !input.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::InvalidPort);
    }
    match input.parse::<u32>() {
        Ok(port @ 1..=65535) => u16::try_from(port).map_err(|_| TargetError::InvalidPort),
        _ => Err(TargetError::InvalidPort),
    }
}

/// Unwraps IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`,
/// except `::` and `::1`) IPv6 addresses to the IPv4 they carry.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let segments = v6.segments();
            if segments[..6].iter().all(|s| *s == 0) && !(segments[6] == 0 && segments[7] <= 1) {
                let [.., a, b, c, d] = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            ip
        }
    }
}

/// Splits an authority into host and optional port text.
fn split_host_port(input: &str) -> Result<(&str, Option<&str>), TargetError> {
    if input.starts_with('[') {
        let close = input.find(']').ok_or(TargetError::InvalidIpv6)?;
        let (host, rest) = input.split_at(close + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => match rest.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(TargetError::InvalidIpv6),
            },
        };
    }
    match input.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => Err(TargetError::InvalidIpv6),
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((input, None)),
    }
}

fn check_characters(input: &str, ipv6: bool) -> Result<(), TargetError> {
    for ch in input.chars() {
        if !ch.is_ascii() {
            return Err(TargetError::NotAscii);
        }
        let allowed =
            ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_') || (ipv6 && ch == ':');
        if !allowed {
            return Err(TargetError::ForbiddenCharacter(ch));
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), TargetError> {
    if name.len() > MAX_NAME_LEN {
        return Err(TargetError::MalformedName("longer than 253 bytes"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(TargetError::MalformedName("empty label"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(TargetError::MalformedName("label longer than 63 bytes"));
        }
    }
    Ok(())
}

/// The WHATWG URL "ends in a number" rule: when the last label is numeric,
/// the whole host must be an IPv4 address in one of the legacy spellings.
fn parse_ipv4_like(name: &str) -> Result<Option<Ipv4Addr>, TargetError> {
    let last = name.rsplit('.').next().unwrap_or(name);
    if !looks_numeric(last) {
        return Ok(None);
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 4 {
        return Err(TargetError::InvalidIpv4);
    }
    let mut numbers = Vec::with_capacity(parts.len());
    for part in &parts {
        numbers.push(parse_ipv4_number(part).ok_or(TargetError::InvalidIpv4)?);
    }
    let (last, init) = numbers.split_last().ok_or(TargetError::InvalidIpv4)?;
    if init.iter().any(|n| *n > 255) {
        return Err(TargetError::InvalidIpv4);
    }
    let remaining_bits = 8 * (4 - init.len() as u32);
    if remaining_bits < 32 && *last >= (1u64 << remaining_bits) || *last > u64::from(u32::MAX) {
        return Err(TargetError::InvalidIpv4);
    }
    let mut value: u64 = *last;
    for (index, number) in init.iter().enumerate() {
        value |= number << (24 - 8 * index as u32);
    }
    let value = u32::try_from(value).map_err(|_| TargetError::InvalidIpv4)?;
    Ok(Some(Ipv4Addr::from(value)))
}

fn looks_numeric(label: &str) -> bool {
    if label.is_empty() {
        return false;
    }
    if label.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match label.strip_prefix("0x") {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

fn parse_ipv4_number(part: &str) -> Option<u64> {
    if part.is_empty() || part.len() > 34 {
        return None;
    }
    let (digits, radix) = if let Some(hex) = part.strip_prefix("0x") {
        (hex, 16)
    } else if part.len() > 1 && part.starts_with('0') {
        (&part[1..], 8)
    } else {
        (part, 10)
    };
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Host header is kept only when it is, byte for byte, what would be
    /// written in its place.
    #[test]
    fn a_host_header_is_kept_only_when_it_is_ours_exactly() {
        let texts = [
            "example.com",
            "example.com:80",
            "example.com:8080",
            "example.com:+8080",
            "example.com:08080",
            "Example.com:8080",
            "example.com.:8080",
            "u@example.com:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.000.0.1:8080",
            "0x7f.0.0.1",
            "[::1]:8080",
            ":8080",
            "",
        ];
        let targets = [
            "example.com:80",
            "example.com:8080",
            "127.0.0.1:80",
            "127.0.0.1:8080",
            "[::1]:8080",
        ];
        let mut kept = 0;
        for target in targets {
            let target = Target::parse_authority(target, None).unwrap();
            let Target::Host { host, port } = &target else {
                unreachable!()
            };
            let ours = if *port == 80 {
                host.to_string()
            } else {
                target.to_string()
            };
            for text in texts {
                let keeps = target.is_written_as(text, Some(80));
                assert_eq!(
                    keeps,
                    text == ours && !matches!(host, Host::Ip(IpAddr::V6(_))),
                    "{text} for {target}"
                );
                kept += usize::from(keeps);
            }
        }
        assert_eq!(
            kept, 4,
            "example.com, example.com:8080, 127.0.0.1, 127.0.0.1:8080"
        );
    }

    fn host(input: &str) -> Result<String, TargetError> {
        Host::parse(input).map(|h| h.to_string())
    }

    #[test]
    fn canonical_spellings() {
        let cases = [
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("under_score.example", "under_score.example"),
            ("127.0.0.1", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0x7f.1", "127.0.0.1"),
            ("0x7F.1", "127.0.0.1"),
            ("127.1", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("127.0.1", "127.0.0.1"),
            ("10.1.0x10", "10.1.0.16"),
            ("0", "0.0.0.0"),
            ("169.254.169.254.", "169.254.169.254"),
            ("[::1]", "[::1]"),
            ("[::ffff:127.0.0.1]", "127.0.0.1"),
            ("[::ffff:7f00:1]", "127.0.0.1"),
            ("[::127.0.0.1]", "127.0.0.1"),
            ("[::]", "[::]"),
            ("[2001:DB8::1]", "[2001:db8::1]"),
            ("::1", "[::1]"),
        ];
        for (input, expected) in cases {
            assert_eq!(host(input).as_deref(), Ok(expected), "input {input:?}");
        }
    }

    #[test]
    fn refused_spellings() {
        let cases = [
            ("", TargetError::EmptyHost),
            (".", TargetError::EmptyHost),
            ("exa mple.com", TargetError::ForbiddenCharacter(' ')),
            ("exa\0mple.com", TargetError::ForbiddenCharacter('\0')),
            ("example.com\r", TargetError::ForbiddenCharacter('\r')),
            ("ex%41mple.com", TargetError::ForbiddenCharacter('%')),
            ("user@example.com", TargetError::ForbiddenCharacter('@')),
            ("*.example.com", TargetError::ForbiddenCharacter('*')),
            ("bücher.example", TargetError::NotAscii),
            ("a..b", TargetError::MalformedName("empty label")),
            ("1.2.3.4.5", TargetError::InvalidIpv4),
            ("example.123", TargetError::InvalidIpv4),
            ("256.0.0.1", TargetError::InvalidIpv4),
            ("1.2.3.256", TargetError::InvalidIpv4),
            ("4294967296", TargetError::InvalidIpv4),
            ("09.1.1.1", TargetError::InvalidIpv4),
            ("[1.2.3.4]", TargetError::InvalidIpv6),
            ("[::1", TargetError::InvalidIpv6),
            ("[fe80::1%25eth0]", TargetError::ForbiddenCharacter('%')),
            ("[example.com]", TargetError::InvalidIpv6),
        ];
        for (input, expected) in cases {
            assert_eq!(host(input), Err(expected), "input {input:?}");
        }
        let long_label = "a".repeat(64);
        assert!(matches!(
            Host::parse(&long_label),
            Err(TargetError::MalformedName(_))
        ));
        let long_name = vec!["a".repeat(60); 5].join(".");
        assert!(matches!(
            Host::parse(&long_name),
            Err(TargetError::MalformedName(_))
        ));
    }

    #[test]
    fn authorities_and_ports() {
        let ok = |input: &str, default: Option<u16>| {
            Target::parse_authority(input, default).map(|t| t.to_string())
        };
        assert_eq!(
            ok("example.com:443", None).as_deref(),
            Ok("example.com:443")
        );
        assert_eq!(
            ok("example.com", Some(443)).as_deref(),
            Ok("example.com:443")
        );
        assert_eq!(ok("[::1]:8080", None).as_deref(), Ok("[::1]:8080"));
        assert_eq!(ok("[::1]", Some(80)).as_deref(), Ok("[::1]:80"));
        assert_eq!(ok("0x7f.1:22", None).as_deref(), Ok("127.0.0.1:22"));
        assert_eq!(ok("example.com", None), Err(TargetError::MissingPort));
        for bad in [
            "example.com:0",
            "example.com:65536",
            "example.com:+80",
            "example.com:8a",
            "example.com:",
            "example.com:123456",
        ] {
            assert_eq!(ok(bad, None), Err(TargetError::InvalidPort), "{bad}");
        }
        assert_eq!(ok("::1:80", None), Err(TargetError::InvalidIpv6));
        assert_eq!(ok("[::1]x", None), Err(TargetError::InvalidIpv6));
        assert_eq!(
            ok("user:pw@example.com:80", None),
            Err(TargetError::ForbiddenCharacter('@'))
        );
        assert_eq!(parse_port("00080"), Ok(80));
    }

    #[test]
    fn uris() {
        let target = |uri: &str| Target::from_uri(&uri.parse().unwrap()).map(|t| t.to_string());
        assert_eq!(
            target("http://Example.com/x").as_deref(),
            Ok("example.com:80")
        );
        assert_eq!(
            target("https://example.com/").as_deref(),
            Ok("example.com:443")
        );
        assert_eq!(
            target("http://example.com:8080/").as_deref(),
            Ok("example.com:8080")
        );
        assert!(matches!(
            target("ftp://example.com/"),
            Err(TargetError::UnsupportedScheme(_))
        ));
        assert_eq!(target("/relative"), Err(TargetError::EmptyHost));
    }

    #[test]
    fn socks_and_unix() {
        let t = Target::from_socks_domain("0x7f.1", 80).unwrap();
        assert_eq!(t.to_string(), "127.0.0.1:80");
        assert!(Target::from_socks_domain("a\0b", 80).is_err());
        assert_eq!(
            Target::from_socks_domain("a", 0),
            Err(TargetError::InvalidPort)
        );
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            Target::from_ip(mapped, 1).unwrap().to_string(),
            "10.0.0.1:1"
        );
        assert_eq!(
            Target::unix("rel.sock"),
            Err(TargetError::RelativeSocketPath)
        );
        assert_eq!(
            Target::unix("/tmp/x.sock").unwrap().to_string(),
            "unix:/tmp/x.sock"
        );
    }
}
