//! Rate limits per destination: how many requests a second may go to the
//! hosts a pattern covers, with a burst, before the rest are refused
//! (`rate_limited`: a 429 with `Retry-After` over HTTP, reply 0x02 over
//! SOCKS5) by the [`RateLimitLayer`](crate::limits_layer::RateLimitLayer);
//! and how many may be open at once (`concurrency_limited`): a request
//! holds its place until its response head comes back, a tunnel or an
//! upgraded connection until it closes.
//!
//! Each entry is a pattern in the allowlist's syntax and a [`Rate`]; a
//! request is counted against the most specific pattern that matches its
//! destination, and only that one. Every request the stack sees counts
//! once: a `CONNECT` (or a SOCKS5 connection) when it opens, each request
//! inside an intercepted tunnel, each plain HTTP request; a DNS question
//! does not. The hosts a pattern covers share its one budget.
//!
//! ```
//! use portcullis_middleware::limits::{Rate, RateLimits};
//! use portcullis_middleware::Target;
//!
//! # fn main() -> Result<(), portcullis_middleware::limits::LimitError> {
//! let limits = RateLimits::new()
//!     .limit("**.github.com", Rate::new(10.0, 20)?)?
//!     .limit("uploads.github.com", Rate::new(1.0, 1)?)?;
//! let uploads = Target::parse_authority("uploads.github.com:443", None).unwrap();
//! let (pattern, limit) = limits.find(&uploads).unwrap();
//! assert_eq!((pattern.as_str(), limit.rate().map(|r| r.burst())), ("uploads.github.com", Some(1)));
//! # Ok(())
//! # }
//! ```

use std::fmt;

use crate::pattern::{Pattern, PatternSet};
use crate::target::Target;

/// A rate: `per_second` requests a second on average, and up to `burst`
/// at once after a quiet spell (a token bucket of `burst` tokens refilled
/// at `per_second`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_second: f64,
    burst: u32,
}

impl Rate {
    /// A rate of `per_second` (finite, above 0) with a burst of `burst`
    /// (at least 1).
    pub fn new(per_second: f64, burst: u32) -> Result<Rate, LimitError> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(LimitError::Rate(format!(
                "requests_per_second must be a number above 0, not {per_second}"
            )));
        }
        if burst == 0 {
            return Err(LimitError::Rate("burst must be at least 1".into()));
        }
        Ok(Rate { per_second, burst })
    }

    /// Requests a second, on average.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// Requests at once, after a quiet spell.
    pub fn burst(&self) -> u32 {
        self.burst
    }
}

/// What one entry limits: a [`Rate`], a number of requests in flight and
/// tunnels open at once, or both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    rate: Option<Rate>,
    concurrent: Option<u32>,
}

impl Limit {
    /// At most `concurrent` (at least 1) requests in flight and tunnels
    /// open at once.
    pub fn concurrent(concurrent: u32) -> Result<Limit, LimitError> {
        Limit {
            rate: None,
            concurrent: None,
        }
        .and_concurrent(concurrent)
    }

    /// Also at most `concurrent` (at least 1) at once.
    pub fn and_concurrent(mut self, concurrent: u32) -> Result<Limit, LimitError> {
        if concurrent == 0 {
            return Err(LimitError::Concurrent);
        }
        self.concurrent = Some(concurrent);
        Ok(self)
    }

    /// The rate, if one is set.
    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }

    /// How many at once, if that is limited.
    pub fn concurrent_cap(&self) -> Option<u32> {
        self.concurrent
    }
}

impl From<Rate> for Limit {
    fn from(rate: Rate) -> Limit {
        Limit {
            rate: Some(rate),
            concurrent: None,
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.rate, self.concurrent) {
            (Some(rate), Some(n)) => write!(f, "{rate}, {n} at once"),
            (Some(rate), None) => write!(f, "{rate}"),
            (None, Some(n)) => write!(f, "{n} at once"),
            (None, None) => f.write_str("no limit"),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = if self.per_second == 1.0 {
            "request"
        } else {
            "requests"
        };
        write!(
            f,
            "{} {noun} a second, burst {}",
            self.per_second, self.burst
        )
    }
}

/// Why a limit could not be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// The pattern does not parse.
    #[error("{pattern:?} is not a host pattern: {error}")]
    Pattern {
        /// The pattern as written.
        pattern: String,
        /// Why it does not parse.
        error: String,
    },
    /// The same pattern is limited twice.
    #[error("{0:?} is limited twice; keep one entry for it")]
    Duplicate(String),
    /// The rate is not one.
    #[error("{0}")]
    Rate(String),
    /// A concurrency cap of 0.
    #[error("concurrent must be at least 1")]
    Concurrent,
}

/// The rate limits of a policy, per destination pattern; see the [module
/// docs](self).
#[derive(Debug, Clone, Default)]
pub struct RateLimits {
    hosts: PatternSet,
    /// The limit of each of `hosts`' patterns, in its order.
    rates: Vec<Limit>,
}

impl PartialEq for RateLimits {
    fn eq(&self, other: &RateLimits) -> bool {
        self.hosts.patterns() == other.hosts.patterns() && self.rates == other.rates
    }
}

impl RateLimits {
    /// No limit.
    pub fn new() -> RateLimits {
        RateLimits::default()
    }

    /// Also limits requests to the hosts `pattern` covers to `limit` (a
    /// [`Rate`], or a [`Limit`]).
    pub fn limit(
        mut self,
        pattern: &str,
        limit: impl Into<Limit>,
    ) -> Result<RateLimits, LimitError> {
        let parsed = Pattern::parse(pattern).map_err(|error| LimitError::Pattern {
            pattern: pattern.to_owned(),
            error: error.to_string(),
        })?;
        // What it matches, not how it was written.
        let same = |known: &Pattern| known.host == parsed.host && known.port == parsed.port;
        if self.hosts.patterns().iter().any(same) {
            return Err(LimitError::Duplicate(pattern.to_owned()));
        }
        self.hosts.insert(parsed);
        self.rates.push(limit.into());
        Ok(self)
    }

    /// Whether there is no limit.
    pub fn is_empty(&self) -> bool {
        self.rates.is_empty()
    }

    /// The limit a request to `target` counts against: the most specific
    /// pattern that matches (as written) and its rate; `None` for a Unix
    /// socket or a destination no pattern covers.
    pub fn find(&self, target: &Target) -> Option<(String, Limit)> {
        let Target::Host { host, port } = target else {
            return None;
        };
        let (found, _) = self.hosts.find(host, *port)?;
        let index = self
            .hosts
            .patterns()
            .iter()
            .position(|pattern| std::ptr::eq(pattern, found))?;
        Some((found.to_string(), *self.rates.get(index)?))
    }

    /// Every limit, with its pattern as written.
    pub fn entries(&self) -> impl Iterator<Item = (String, Limit)> + '_ {
        self.hosts
            .patterns()
            .iter()
            .map(Pattern::to_string)
            .zip(self.rates.iter().copied())
    }
}
