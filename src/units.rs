//! Configuration values with units, parsed once where they are read: a
//! number of seconds becomes a [`Duration`] as the file is deserialized, so
//! a bad one is an error naming its key and file (through figment) and no
//! code downstream sees an `f64`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::de::{self, Unexpected, Visitor};
use serde::{Deserializer, Serializer};

/// What a number of seconds must be.
#[derive(Clone, Copy)]
enum Bound {
    /// More than zero.
    Positive,
    /// Zero or more.
    NotNegative,
    /// More than zero, at most this many.
    UpTo(u64),
}

#[derive(Clone, Copy)]
struct SecondsVisitor(Bound);

impl Visitor<'_> for SecondsVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Bound::Positive => f.write_str("a positive number of seconds"),
            Bound::NotNegative => f.write_str("a number of seconds (0 or more)"),
            Bound::UpTo(most) => write!(f, "a number of seconds above 0 and at most {most}"),
        }
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Duration, E> {
        let fits = match self.0 {
            Bound::Positive => value > 0.0,
            Bound::NotNegative => value >= 0.0,
            #[allow(clippy::cast_precision_loss)]
            Bound::UpTo(most) => value > 0.0 && value <= most as f64,
        };
        match Duration::try_from_secs_f64(value) {
            Ok(duration) if fits => Ok(duration),
            _ => Err(E::invalid_value(Unexpected::Float(value), &self)),
        }
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Duration, E> {
        #[allow(clippy::cast_precision_loss)]
        SecondsVisitor(self.0)
            .visit_f64(value as f64)
            .map_err(|_: E| E::invalid_value(Unexpected::Signed(value), &self))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Duration, E> {
        #[allow(clippy::cast_precision_loss)]
        SecondsVisitor(self.0)
            .visit_f64(value as f64)
            .map_err(|_: E| E::invalid_value(Unexpected::Unsigned(value), &self))
    }
}

fn seconds<'de, D: Deserializer<'de>>(deserializer: D, bound: Bound) -> Result<Duration, D::Error> {
    deserializer.deserialize_any(SecondsVisitor(bound))
}

/// Writes a duration back as seconds.
pub(crate) fn serialize<S: Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// A positive number of seconds (`header_read_timeout = 30`, `1.5`).
pub(crate) mod positive_seconds {
    pub(crate) use super::serialize;

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<std::time::Duration, D::Error> {
        super::seconds(deserializer, super::Bound::Positive)
    }
}

/// A number of seconds, zero allowed (`shutdown_deadline = 0`: at once).
pub(crate) mod seconds_or_zero {
    pub(crate) use super::serialize;

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<std::time::Duration, D::Error> {
        super::seconds(deserializer, super::Bound::NotNegative)
    }
}

/// A positive number of seconds, at most five minutes (a DNS lookup).
pub(crate) mod lookup_seconds {
    pub(crate) use super::serialize;

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<std::time::Duration, D::Error> {
        super::seconds(deserializer, super::Bound::UpTo(300))
    }
}

/// A request-head size of at least 8 KiB.
pub(crate) mod head_bytes {
    use serde::de::{Error, Unexpected};
    use serde::Deserialize;

    /// The least `max_header_bytes`.
    pub(crate) const LEAST: usize = 8 * 1024;

    pub(crate) fn serialize<S: serde::Serializer>(
        bytes: &usize,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(*bytes as u64)
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<usize, D::Error> {
        let bytes = usize::deserialize(deserializer)?;
        if bytes < LEAST {
            return Err(D::Error::invalid_value(
                Unexpected::Unsigned(bytes as u64),
                &"a number of bytes of at least 8192",
            ));
        }
        Ok(bytes)
    }
}

/// Parses a listener address: `scheme://IP:PORT` (one of `schemes`),
/// `IP:PORT` or `localhost:PORT`. The same parse reads the config file and
/// the `--http`/`--socks` flags.
pub(crate) fn listen_address(text: &str, schemes: &[&str]) -> Result<SocketAddr, String> {
    let rest = match text.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) => rest,
        Some((scheme, _)) => return Err(format!("scheme {scheme:?} is not one of {schemes:?}")),
        None => text,
    };
    let rest = rest.trim_end_matches('/');
    if let Some(port) = rest.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?} has no valid port"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    rest.parse()
        .map_err(|_| format!("{text:?} is not IP:PORT (for example 127.0.0.1:3128)"))
}

struct ListenVisitor {
    schemes: &'static [&'static str],
    loopback_only: bool,
}

impl Visitor<'_> for ListenVisitor {
    type Value = SocketAddr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.loopback_only {
            f.write_str("a loopback IP:PORT (for example 127.0.0.1:9464)")
        } else {
            write!(f, "IP:PORT or {}://IP:PORT", self.schemes.join("|"))
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<SocketAddr, E> {
        let address = listen_address(text, self.schemes)
            .map_err(|_| E::invalid_value(Unexpected::Str(text), &self))?;
        if self.loopback_only && !address.ip().is_loopback() {
            return Err(E::invalid_value(Unexpected::Str(text), &self));
        }
        Ok(address)
    }
}

/// `network.proxy_url`: `http://IP:PORT` or `IP:PORT`.
pub(crate) mod http_listen {
    pub(crate) fn serialize<S: serde::Serializer>(
        address: &std::net::SocketAddr,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("http://{address}"))
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<std::net::SocketAddr, D::Error> {
        deserializer.deserialize_str(super::ListenVisitor {
            schemes: super::HTTP_SCHEMES,
            loopback_only: false,
        })
    }
}

/// `network.socks_url`: `socks5://IP:PORT` (or `socks5h`, `http`) or `IP:PORT`.
pub(crate) mod socks_listen {
    pub(crate) fn serialize<S: serde::Serializer>(
        address: &std::net::SocketAddr,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("socks5://{address}"))
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<std::net::SocketAddr, D::Error> {
        deserializer.deserialize_str(super::ListenVisitor {
            schemes: super::SOCKS_SCHEMES,
            loopback_only: false,
        })
    }
}

/// `IP:PORT`, any address (the caller decides what it allows).
pub(crate) mod any_listen {
    pub(crate) fn serialize<S: serde::Serializer>(
        address: &Option<std::net::SocketAddr>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match address {
            Some(address) => serializer.collect_str(address),
            None => serializer.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<std::net::SocketAddr>, D::Error> {
        use serde::de::Visitor;
        use serde::Deserialize;
        match Option::<String>::deserialize(deserializer)? {
            Some(text) => super::ListenVisitor {
                schemes: &[],
                loopback_only: false,
            }
            .visit_str(&text)
            .map(Some),
            None => Ok(None),
        }
    }
}

/// The schemes `network.proxy_url` and `--http` may name.
pub(crate) const HTTP_SCHEMES: &[&str] = &["http"];
/// The schemes `network.socks_url` and `--socks` may name.
pub(crate) const SOCKS_SCHEMES: &[&str] = &["socks5", "socks5h", "http"];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Probe {
        #[serde(with = "positive_seconds")]
        positive: Duration,
        #[serde(with = "seconds_or_zero")]
        zero: Duration,
        #[serde(with = "lookup_seconds")]
        lookup: Duration,
    }

    fn parse(text: &str) -> Result<Probe, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn seconds_become_durations_and_bad_ones_say_what_they_must_be() {
        let probe = parse("positive = 1.5\nzero = 0\nlookup = 300").unwrap();
        assert_eq!(probe.positive, Duration::from_millis(1500));
        assert_eq!(probe.zero, Duration::ZERO);
        assert_eq!(probe.lookup, Duration::from_secs(300));
        for (text, said) in [
            (
                "positive = 0\nzero = 0\nlookup = 1",
                "a positive number of seconds",
            ),
            (
                "positive = -2.5\nzero = 0\nlookup = 1",
                "a positive number of seconds",
            ),
            ("positive = 1\nzero = -1\nlookup = 1", "0 or more"),
            ("positive = 1\nzero = 0\nlookup = 301", "at most 300"),
            (
                "positive = nan\nzero = 0\nlookup = 1",
                "a positive number of seconds",
            ),
            (
                "positive = 1e300\nzero = 0\nlookup = 1",
                "a positive number of seconds",
            ),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(said), "{text}: {error}");
        }
    }
}
