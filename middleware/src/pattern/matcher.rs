//! A set of patterns, matched in time that does not grow with its size.
//!
//! Names go into a trie keyed by labels from the right (`com` → `example` →
//! `www`), so a lookup costs one hash probe per label of the host. Exact IPs
//! go into a hash map, CIDR ranges into one hash map per prefix length, so an
//! address lookup costs at most one probe per distinct prefix length.

use std::collections::HashMap;
use std::net::IpAddr;

use super::{mask_v4, mask_v6, HostPattern, Pattern};
use crate::target::Host;

#[derive(Debug, Clone, Copy)]
struct RuleRef {
    port: Option<u16>,
    index: u32,
}

/// The port a lookup passes to match a pattern on any port: 0 is never a
/// destination's port (targets and patterns refuse it), so it stands for
/// "some port" (a DNS question names no port).
pub(crate) const ANY_PORT: u16 = 0;

impl RuleRef {
    fn matches_port(&self, port: u16) -> bool {
        port == ANY_PORT || self.port.is_none_or(|p| p == port)
    }
}

fn first_for_port(rules: &[RuleRef], port: u16) -> Option<u32> {
    rules.iter().find(|r| r.matches_port(port)).map(|r| r.index)
}

#[derive(Debug, Default, Clone)]
struct Node {
    children: HashMap<Box<str>, Node>,
    exact: Vec<RuleRef>,
    subdomains: Vec<RuleRef>,
    apex_and_subdomains: Vec<RuleRef>,
}

/// How a host matched a pattern set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind {
    /// By `*`.
    Any,
    /// By a `*.` or `**.` wildcard.
    Wildcard,
    /// By the exact name.
    ExactName,
    /// By the exact IP address.
    ExactIp,
    /// By a CIDR range.
    Cidr,
}

/// A compiled list of patterns.
#[derive(Debug, Default, Clone)]
pub struct PatternSet {
    patterns: Vec<Pattern>,
    root: Node,
    any: Vec<RuleRef>,
    exact_ips: HashMap<IpAddr, Vec<RuleRef>>,
    /// (prefix length, network → rules), IPv4 ranges.
    v4_ranges: Vec<(u8, HashMap<u32, Vec<RuleRef>>)>,
    /// (prefix length, network → rules), IPv6 ranges.
    v6_ranges: Vec<(u8, HashMap<u128, Vec<RuleRef>>)>,
}

impl PatternSet {
    /// An empty set.
    pub fn new() -> PatternSet {
        PatternSet::default()
    }

    /// Adds a pattern.
    pub fn insert(&mut self, pattern: Pattern) {
        let rule = RuleRef {
            port: pattern.port,
            index: u32::try_from(self.patterns.len()).unwrap_or(u32::MAX),
        };
        match &pattern.host {
            HostPattern::Any => self.any.push(rule),
            HostPattern::Exact(name) => self.node_for(name).exact.push(rule),
            HostPattern::Subdomains(name) => self.node_for(name).subdomains.push(rule),
            HostPattern::ApexAndSubdomains(name) => {
                self.node_for(name).apex_and_subdomains.push(rule)
            }
            HostPattern::Ip(ip) => self.exact_ips.entry(*ip).or_default().push(rule),
            HostPattern::Cidr(network) => match network.address {
                IpAddr::V4(v4) => {
                    insert_range(&mut self.v4_ranges, network.prefix, u32::from(v4), rule)
                }
                IpAddr::V6(v6) => {
                    insert_range(&mut self.v6_ranges, network.prefix, u128::from(v6), rule)
                }
            },
        }
        self.patterns.push(pattern);
    }

    fn node_for(&mut self, name: &str) -> &mut Node {
        let mut node = &mut self.root;
        for label in name.rsplit('.') {
            node = node.children.entry(label.into()).or_default();
        }
        node
    }

    /// The number of patterns.
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns, in insertion order.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// The first pattern matching `host:port`, and how it matched. For
    /// names, the most specific pattern wins.
    pub fn find(&self, host: &Host, port: u16) -> Option<(&Pattern, MatchKind)> {
        let found = match host {
            Host::Name(name) => self.find_name(name, port),
            Host::Ip(ip) => self.find_ip(*ip, port),
        };
        found
            .or_else(|| first_for_port(&self.any, port).map(|i| (i, MatchKind::Any)))
            .and_then(|(index, kind)| self.patterns.get(index as usize).map(|p| (p, kind)))
    }

    /// The first pattern naming exactly this IP, or a CIDR range holding it
    /// (never `*`); the patterns that unlock a local address.
    pub fn find_ip_rule(&self, ip: IpAddr, port: u16) -> Option<&Pattern> {
        self.find_ip(ip, port)
            .and_then(|(index, _)| self.patterns.get(index as usize))
    }

    /// The first pattern naming exactly this name (never a wildcard).
    pub fn find_exact_name(&self, name: &str, port: u16) -> Option<&Pattern> {
        let mut node = &self.root;
        for label in name.rsplit('.') {
            node = node.children.get(label)?;
        }
        first_for_port(&node.exact, port).and_then(|i| self.patterns.get(i as usize))
    }

    /// Every pattern matching `host:port` (not only the most specific), by
    /// index in insertion order: what request rules use, where every
    /// block whose host matches applies.
    pub fn find_all(&self, host: &Host, port: u16) -> Vec<usize> {
        let mut found = Vec::new();
        let mut take = |rules: &[RuleRef]| {
            found.extend(
                rules
                    .iter()
                    .filter(|r| r.matches_port(port))
                    .map(|r| r.index as usize),
            );
        };
        match host {
            Host::Name(name) => {
                let mut node = &self.root;
                let mut labels = name.rsplit('.').peekable();
                while let Some(label) = labels.next() {
                    match node.children.get(label) {
                        Some(child) => node = child,
                        None => break,
                    }
                    if labels.peek().is_some() {
                        take(&node.subdomains);
                    } else {
                        take(&node.exact);
                    }
                    take(&node.apex_and_subdomains);
                }
            }
            Host::Ip(ip) => {
                if let Some(rules) = self.exact_ips.get(ip) {
                    take(rules);
                }
                match ip {
                    IpAddr::V4(v4) => {
                        for (prefix, map) in &self.v4_ranges {
                            if let Some(rules) = map.get(&mask_v4(u32::from(*v4), *prefix)) {
                                take(rules);
                            }
                        }
                    }
                    IpAddr::V6(v6) => {
                        for (prefix, map) in &self.v6_ranges {
                            if let Some(rules) = map.get(&mask_v6(u128::from(*v6), *prefix)) {
                                take(rules);
                            }
                        }
                    }
                }
            }
        }
        take(&self.any);
        found.sort_unstable();
        found.dedup();
        found
    }

    fn find_name(&self, name: &str, port: u16) -> Option<(u32, MatchKind)> {
        let mut best = None;
        let mut node = &self.root;
        let mut labels = name.rsplit('.').peekable();
        while let Some(label) = labels.next() {
            match node.children.get(label) {
                Some(child) => node = child,
                None => break,
            }
            if labels.peek().is_some() {
                if let Some(i) = first_for_port(&node.subdomains, port)
                    .or_else(|| first_for_port(&node.apex_and_subdomains, port))
                {
                    best = Some((i, MatchKind::Wildcard));
                }
            } else if let Some(i) = first_for_port(&node.exact, port) {
                best = Some((i, MatchKind::ExactName));
            } else if let Some(i) = first_for_port(&node.apex_and_subdomains, port) {
                best = Some((i, MatchKind::Wildcard));
            }
        }
        best
    }

    fn find_ip(&self, ip: IpAddr, port: u16) -> Option<(u32, MatchKind)> {
        if let Some(i) = self
            .exact_ips
            .get(&ip)
            .and_then(|rules| first_for_port(rules, port))
        {
            return Some((i, MatchKind::ExactIp));
        }
        let found = match ip {
            IpAddr::V4(v4) => find_range(&self.v4_ranges, u32::from(v4), mask_v4, port),
            IpAddr::V6(v6) => find_range(&self.v6_ranges, u128::from(v6), mask_v6, port),
        };
        found.map(|i| (i, MatchKind::Cidr))
    }
}

fn insert_range<K: std::hash::Hash + Eq>(
    ranges: &mut Vec<(u8, HashMap<K, Vec<RuleRef>>)>,
    prefix: u8,
    key: K,
    rule: RuleRef,
) {
    let position = match ranges.iter().position(|(p, _)| *p == prefix) {
        Some(position) => position,
        None => {
            ranges.push((prefix, HashMap::new()));
            ranges.sort_by_key(|range| std::cmp::Reverse(range.0));
            ranges.iter().position(|(p, _)| *p == prefix).unwrap_or(0)
        }
    };
    if let Some((_, map)) = ranges.get_mut(position) {
        map.entry(key).or_default().push(rule);
    }
}

fn find_range<K: std::hash::Hash + Eq + Copy>(
    ranges: &[(u8, HashMap<K, Vec<RuleRef>>)],
    value: K,
    mask: fn(K, u8) -> K,
    port: u16,
) -> Option<u32> {
    ranges.iter().find_map(|(prefix, map)| {
        map.get(&mask(value, *prefix))
            .and_then(|rules| first_for_port(rules, port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(patterns: &[&str]) -> PatternSet {
        let mut set = PatternSet::new();
        for p in patterns {
            set.insert(Pattern::parse(p).unwrap());
        }
        set
    }

    fn matched(set: &PatternSet, host: &str, port: u16) -> Option<String> {
        set.find(&Host::parse(host).unwrap(), port)
            .map(|(p, _)| p.text.clone())
    }

    #[test]
    fn find_all_returns_every_matching_pattern_in_order() {
        let s = set(&[
            "*.github.com",
            "api.github.com",
            "**.github.com",
            "api.github.com:8443",
            "*",
            "10.0.0.0/8",
            "10.1.2.3",
        ]);
        let host = |h: &str| Host::parse(h).unwrap();
        assert_eq!(s.find_all(&host("api.github.com"), 443), vec![0, 1, 2, 4]);
        assert_eq!(
            s.find_all(&host("api.github.com"), 8443),
            vec![0, 1, 2, 3, 4]
        );
        assert_eq!(s.find_all(&host("github.com"), 443), vec![2, 4]);
        assert_eq!(s.find_all(&host("a.b.github.com"), 443), vec![0, 2, 4]);
        assert_eq!(s.find_all(&host("10.1.2.3"), 80), vec![4, 5, 6]);
        assert_eq!(s.find_all(&host("example.org"), 80), vec![4]);
    }

    #[test]
    fn table() {
        let s = set(&[
            "example.com",
            "*.sub.org",
            "**.both.net",
            "api.test:8443",
            "10.0.0.0/8",
            "192.168.1.5",
            "[::1]:3000",
            "fd00::/8",
            "*.ports.io:443",
        ]);
        let cases: &[(&str, u16, Option<&str>)] = &[
            ("example.com", 80, Some("example.com")),
            ("EXAMPLE.com.", 443, Some("example.com")),
            ("www.example.com", 80, None),
            ("evilexample.com", 80, None),
            ("sub.org", 80, None),
            ("a.sub.org", 80, Some("*.sub.org")),
            ("a.b.c.sub.org", 80, Some("*.sub.org")),
            ("evilsub.org", 80, None),
            ("both.net", 80, Some("**.both.net")),
            ("x.y.both.net", 80, Some("**.both.net")),
            ("notboth.net", 80, None),
            ("api.test", 8443, Some("api.test:8443")),
            ("api.test", 443, None),
            ("10.255.0.1", 80, Some("10.0.0.0/8")),
            ("11.0.0.1", 80, None),
            ("192.168.1.5", 1, Some("192.168.1.5")),
            ("192.168.1.6", 1, None),
            ("[::1]", 3000, Some("[::1]:3000")),
            ("[::1]", 3001, None),
            ("[fd12::1]", 80, Some("fd00::/8")),
            ("x.ports.io", 443, Some("*.ports.io:443")),
            ("x.ports.io", 80, None),
            ("com", 80, None),
        ];
        for (host, port, expected) in cases {
            assert_eq!(
                matched(&s, host, *port).as_deref(),
                *expected,
                "{host}:{port}"
            );
        }
    }

    #[test]
    fn any_matches_everything_and_most_specific_wins() {
        let s = set(&["*", "**.example.com", "www.example.com"]);
        assert_eq!(matched(&s, "unrelated.org", 1).as_deref(), Some("*"));
        assert_eq!(matched(&s, "1.2.3.4", 1).as_deref(), Some("*"));
        assert_eq!(
            matched(&s, "www.example.com", 1).as_deref(),
            Some("www.example.com")
        );
        assert_eq!(
            matched(&s, "a.example.com", 1).as_deref(),
            Some("**.example.com")
        );
        assert!(s.find_ip_rule("1.2.3.4".parse().unwrap(), 1).is_none());
        assert!(s.find_exact_name("www.example.com", 1).is_some());
        assert!(s.find_exact_name("a.example.com", 1).is_none());
    }
}
