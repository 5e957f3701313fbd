//! Host patterns as written in `allowed_domains` and `denied_domains`,
//! and [`PatternSet`], a compiled list of them: data, below the policy and
//! the request rules, which both name hosts with them.

mod matcher;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::target::{canonical_ip, parse_port, Host, TargetError};

pub(crate) use matcher::ANY_PORT;
pub use matcher::{MatchKind, PatternSet};

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern was empty.
    #[error("the pattern is empty")]
    Empty,
    /// A `*` stood somewhere other than alone or as a leading `*.` / `**.` label.
    #[error("a wildcard may only be `*` alone or a leading `*.` or `**.` label")]
    MisplacedWildcard,
    /// A wildcard was put in front of an IP address.
    #[error("a wildcard cannot stand in front of an IP address; use a CIDR range")]
    WildcardIp,
    /// The CIDR range was malformed.
    #[error("the CIDR range is malformed (expected ADDRESS/PREFIX, e.g. 10.0.0.0/8)")]
    InvalidCidr,
    /// A host with a path (`example.com/path`): patterns match hosts only.
    #[error("a pattern is a host, not a host and a path: use {host:?} (paths are not matched)")]
    HostWithPath {
        /// The host before the path.
        host: String,
    },
    /// A URL where a host was expected.
    #[error("a pattern is a host, not a URL: did you mean {suggestion}?")]
    Url {
        /// The host (and port) the URL names.
        suggestion: String,
    },
    /// A file path where a host was expected.
    #[error(
        "a pattern is a host, not a path; allow a Unix socket with allow_unix_sockets in [network]"
    )]
    Path,
    /// The host part was malformed.
    #[error("{0}")]
    Host(#[from] TargetError),
}

/// What a pattern's host part matches.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostPattern {
    /// `*`: every host.
    Any,
    /// `example.com`: exactly that name.
    Exact(String),
    /// `*.example.com`: every subdomain at any depth, not the apex.
    Subdomains(String),
    /// `**.example.com`: the apex and every subdomain.
    ApexAndSubdomains(String),
    /// `127.0.0.1`, `[::1]`: exactly that address.
    Ip(IpAddr),
    /// `10.0.0.0/8`, `fc00::/7`: a range of addresses.
    Cidr(IpNetwork),
}

/// A range of IP addresses (an address with its prefix length, host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNetwork {
    /// The network address (host bits cleared).
    pub address: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl IpNetwork {
    /// A network; host bits of `address` are cleared, and IPv4-mapped IPv6
    /// ranges of prefix 96 or more become the IPv4 range they mean.
    pub fn new(address: IpAddr, prefix: u8) -> Option<IpNetwork> {
        match address {
            IpAddr::V4(v4) if prefix <= 32 => Some(IpNetwork {
                address: IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(v4), prefix))),
                prefix,
            }),
            IpAddr::V6(v6) if prefix <= 128 => {
                if prefix >= 96 {
                    if let IpAddr::V4(v4) = canonical_ip(address) {
                        return IpNetwork::new(IpAddr::V4(v4), prefix - 96);
                    }
                }
                Some(IpNetwork {
                    address: IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(v6), prefix))),
                    prefix,
                })
            }
            _ => None,
        }
    }

    /// Whether `ip` lies in this range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_v4(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_v6(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `10.0.0.0/8`, `fd00::/8`, or a bare address (a range of one).
impl std::str::FromStr for IpNetwork {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<IpNetwork, PatternError> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => {
                if prefix.is_empty()
                    || prefix.len() > 3
                    || !prefix.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(PatternError::InvalidCidr);
                }
                let prefix: u8 = prefix.parse().map_err(|_| PatternError::InvalidCidr)?;
                (address, Some(prefix))
            }
            None => (text, None),
        };
        let address = address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| PatternError::InvalidCidr)?;
        let prefix = prefix.unwrap_or(if address.is_ipv4() { 32 } else { 128 });
        IpNetwork::new(address, prefix).ok_or(PatternError::InvalidCidr)
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

pub(crate) fn mask_v4(value: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        value & (u32::MAX << (32 - u32::from(prefix)))
    }
}

pub(crate) fn mask_v6(value: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        value & (u128::MAX << (128 - u32::from(prefix)))
    }
}

/// One parsed pattern: a host part and an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// What hosts it matches.
    pub host: HostPattern,
    /// The one port it is limited to, if any.
    pub port: Option<u16>,
    /// The pattern as written.
    pub text: String,
}

impl Pattern {
    /// Parses a pattern (see the table in the crate documentation).
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if let Some((_, rest)) = text.split_once("://") {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let authority = authority.rsplit('@').next().unwrap_or_default();
            return Err(PatternError::Url {
                suggestion: authority.to_owned(),
            });
        }
        if text.starts_with('/') || text.starts_with("./") || text.starts_with('~') {
            return Err(PatternError::Path);
        }
        let (host_text, port) = split_pattern(text)?;
        let host = parse_host_pattern(host_text)?;
        Ok(Pattern {
            host,
            port,
            text: text.to_owned(),
        })
    }

    /// Whether the pattern matches every host (`*`, with or without a port).
    pub fn is_any(&self) -> bool {
        self.host == HostPattern::Any
    }
}

/// As written (`"*.example.com"`).
impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

/// Parsed once, as it is read: a configuration list of patterns is typed
/// from the start, and a bad entry fails at its own place in the list
/// (`network.allowed_domains[2]: "a.*.com": …`).
impl<'de> serde::Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Pattern, D::Error> {
        let text = String::deserialize(deserializer)?;
        Pattern::parse(&text)
            .map_err(|error| serde::de::Error::custom(format!("{text:?}: {error}")))
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn split_pattern(text: &str) -> Result<(&str, Option<u16>), PatternError> {
    if let Some(rest) = text.strip_prefix('[') {
        let close = rest.find(']').ok_or(TargetError::InvalidIpv6)?;
        let (inner, after) = rest.split_at(close);
        let after = &after[1..];
        let port = match after {
            "" => None,
            _ => Some(parse_port(
                after.strip_prefix(':').ok_or(TargetError::InvalidIpv6)?,
            )?),
        };
        return Ok((inner, port));
    }
    match text.matches(':').count() {
        0 => Ok((text, None)),
        1 => {
            let (host, port) = text.split_once(':').ok_or(TargetError::InvalidPort)?;
            Ok((host, Some(parse_port(port)?)))
        }
        _ => Ok((text, None)),
    }
}

fn parse_host_pattern(text: &str) -> Result<HostPattern, PatternError> {
    if text == "*" {
        return Ok(HostPattern::Any);
    }
    if let Some(rest) = text.strip_prefix("**.") {
        return Ok(HostPattern::ApexAndSubdomains(wildcard_base(rest)?));
    }
    if let Some(rest) = text.strip_prefix("*.") {
        return Ok(HostPattern::Subdomains(wildcard_base(rest)?));
    }
    if text.contains('*') {
        return Err(PatternError::MisplacedWildcard);
    }
    if let Some((address, prefix)) = text.split_once('/') {
        // `example.com/path`: a host and a path, not a range.
        let Ok(address) = address.parse::<IpAddr>() else {
            return Err(match Host::parse(address) {
                Ok(Host::Name(name)) => PatternError::HostWithPath { host: name },
                _ => PatternError::InvalidCidr,
            });
        };
        if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PatternError::InvalidCidr);
        }
        let prefix: u8 = prefix.parse().map_err(|_| PatternError::InvalidCidr)?;
        return IpNetwork::new(address, prefix)
            .map(HostPattern::Cidr)
            .ok_or(PatternError::InvalidCidr);
    }
    match Host::parse(text)? {
        Host::Name(name) => Ok(HostPattern::Exact(name)),
        Host::Ip(ip) => Ok(HostPattern::Ip(ip)),
    }
}

fn wildcard_base(rest: &str) -> Result<String, PatternError> {
    if rest.contains('*') {
        return Err(PatternError::MisplacedWildcard);
    }
    match Host::parse(rest)? {
        Host::Name(name) => Ok(name),
        Host::Ip(_) => Err(PatternError::WildcardIp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let p = |s: &str| Pattern::parse(s).map(|p| (p.host, p.port));
        assert_eq!(
            p("Example.com."),
            Ok((HostPattern::Exact("example.com".into()), None))
        );
        assert_eq!(
            p("*.example.com"),
            Ok((HostPattern::Subdomains("example.com".into()), None))
        );
        assert_eq!(
            p("**.example.com:8443"),
            Ok((
                HostPattern::ApexAndSubdomains("example.com".into()),
                Some(8443)
            ))
        );
        assert_eq!(p("*"), Ok((HostPattern::Any, None)));
        assert_eq!(p("*:443"), Ok((HostPattern::Any, Some(443))));
        assert_eq!(
            p("127.0.0.1"),
            Ok((HostPattern::Ip("127.0.0.1".parse().unwrap()), None))
        );
        assert_eq!(
            p("127.1:3000"),
            Ok((HostPattern::Ip("127.0.0.1".parse().unwrap()), Some(3000)))
        );
        assert_eq!(
            p("[::1]:3000"),
            Ok((HostPattern::Ip("::1".parse().unwrap()), Some(3000)))
        );
        assert_eq!(
            p("::1"),
            Ok((HostPattern::Ip("::1".parse().unwrap()), None))
        );
        let cidr = |a: &str, n| HostPattern::Cidr(IpNetwork::new(a.parse().unwrap(), n).unwrap());
        assert_eq!(p("10.0.0.0/8"), Ok((cidr("10.0.0.0", 8), None)));
        assert_eq!(p("10.9.9.9/8:22"), Ok((cidr("10.0.0.0", 8), Some(22))));
        assert_eq!(p("fc00::/7"), Ok((cidr("fc00::", 7), None)));
        assert_eq!(p("[fc00::/7]:443"), Ok((cidr("fc00::", 7), Some(443))));
        assert_eq!(p("::ffff:10.0.0.0/104"), Ok((cidr("10.0.0.0", 8), None)));
    }

    #[test]
    fn refuses_bad_patterns() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert_eq!(
            Pattern::parse("foo*.com"),
            Err(PatternError::MisplacedWildcard)
        );
        assert_eq!(
            Pattern::parse("a.*.com"),
            Err(PatternError::MisplacedWildcard)
        );
        assert_eq!(
            Pattern::parse("*.*.com"),
            Err(PatternError::MisplacedWildcard)
        );
        assert_eq!(Pattern::parse("*.10.0.0.1"), Err(PatternError::WildcardIp));
        assert_eq!(
            Pattern::parse("10.0.0.0/33"),
            Err(PatternError::InvalidCidr)
        );
        assert_eq!(Pattern::parse("10.0.0.0/"), Err(PatternError::InvalidCidr));
        for with_path in ["example.com/8", "example.com/path", "example.com/a/b"] {
            assert_eq!(
                Pattern::parse(with_path),
                Err(PatternError::HostWithPath {
                    host: "example.com".into()
                }),
                "{with_path}"
            );
        }
        assert_eq!(Pattern::parse("10.0.0.0/x"), Err(PatternError::InvalidCidr));
        assert_eq!(
            Pattern::parse("example.com:0"),
            Err(PatternError::Host(TargetError::InvalidPort))
        );
        assert!(Pattern::parse("exa mple.com").is_err());
        assert!(Pattern::parse("[::1").is_err());
    }
}

#[cfg(test)]
mod mistake_tests {
    use super::*;

    #[test]
    fn urls_and_paths_get_the_fix() {
        assert_eq!(
            Pattern::parse("https://user@api.example.com:8443/v1?x"),
            Err(PatternError::Url {
                suggestion: "api.example.com:8443".into()
            })
        );
        assert_eq!(Pattern::parse("/run/docker.sock"), Err(PatternError::Path));
        assert!(Pattern::parse("example.com").is_ok());
    }
}
