//! Synthetic addresses: each name the policy DNS server answers gets one
//! IPv4 address from 198.18.0.0/15 and one IPv6 address from a ULA prefix,
//! kept for the whole run, so a captured connection to that address is
//! decided (and dialled, after the proxy's own lookup) by that name. Two
//! names on one CDN address stay two names.
//!
//! Both ranges are local/private in the policy's address check: an
//! address from them that maps to no name is refused like any private
//! address, and a synthetic address never leaves the namespace.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;

/// The first IPv4 address handed out (198.18.0.0/15, RFC 2544).
const V4_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// How many addresses the IPv4 range holds.
const V4_SIZE: u32 = 1 << 17;
/// The IPv6 prefix (a ULA /64 of our own: `fd70:6f72:7463:0::/64`).
const V6_BASE: u128 = 0xfd70_6f72_7463_0000_0000_0000_0000_0000;

/// The most names one run maps; past it a new name is refused (`SERVFAIL`),
/// and names already mapped keep their addresses.
pub(crate) const MAX_NAMES: usize = 65_536;

/// The one-to-one map between names and synthetic addresses.
#[derive(Debug, Default)]
pub(crate) struct SyntheticNames {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    by_name: HashMap<String, u32>,
    by_index: Vec<String>,
    /// New names refused since the table filled up.
    turned_away: u64,
}

/// What [`SyntheticNames::addresses`] says of a name it could not map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableFull {
    /// How many new names have been refused so far, this one included.
    pub(crate) refused: u64,
}

impl TableFull {
    /// Whether this refusal is worth a log line: the first, then each
    /// power of ten, so a child asking for names in a loop cannot flood the
    /// log (the count in each line says how many were refused).
    pub(crate) fn worth_logging(self) -> bool {
        let mut count = self.refused;
        while count >= 10 && count % 10 == 0 {
            count /= 10;
        }
        count == 1
    }
}

impl SyntheticNames {
    /// The addresses of `name` (canonical: lower-case, no trailing dot),
    /// given one if it has none; `Err` when the table is full.
    pub(crate) fn addresses(&self, name: &str) -> Result<(Ipv4Addr, Ipv6Addr), TableFull> {
        let mut table = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let index = match table.by_name.get(name) {
            Some(index) => *index,
            None => {
                let index = u32::try_from(table.by_index.len() + 1).ok();
                let Some(index) = index.filter(|_| table.by_index.len() < MAX_NAMES) else {
                    table.turned_away += 1;
                    return Err(TableFull {
                        refused: table.turned_away,
                    });
                };
                // Index 0 would be the range's network address: start at 1.
                table.by_index.push(name.to_owned());
                table.by_name.insert(name.to_owned(), index);
                index
            }
        };
        Ok(addresses_of(index))
    }

    /// The name an address was given, when it is one of ours.
    pub(crate) fn name(&self, address: IpAddr) -> Option<String> {
        let index = index_of(address)?;
        let table = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = usize::try_from(index).ok()?.checked_sub(1)?;
        table.by_index.get(slot).cloned()
    }

    /// Whether `address` lies in one of the synthetic ranges (mapped or not).
    pub(crate) fn is_synthetic(address: IpAddr) -> bool {
        match address {
            IpAddr::V4(v4) => u32::from(v4).wrapping_sub(V4_BASE) < V4_SIZE,
            IpAddr::V6(v6) => u128::from(v6) >> 64 == V6_BASE >> 64,
        }
    }
}

fn addresses_of(index: u32) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::from(V4_BASE + index),
        Ipv6Addr::from(V6_BASE + u128::from(index)),
    )
}

fn index_of(address: IpAddr) -> Option<u32> {
    if !SyntheticNames::is_synthetic(address) {
        return None;
    }
    match address {
        IpAddr::V4(v4) => Some(u32::from(v4) - V4_BASE),
        IpAddr::V6(v6) => u32::try_from(u128::from(v6) - V6_BASE).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_map_one_to_one_and_stay() {
        let names = SyntheticNames::default();
        let (a4, a6) = names.addresses("a.test").unwrap();
        let (b4, b6) = names.addresses("b.test").unwrap();
        assert_ne!(a4, b4);
        assert_ne!(a6, b6);
        assert_eq!(names.addresses("a.test").unwrap(), (a4, a6));
        assert_eq!(a4, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(names.name(a4.into()).as_deref(), Some("a.test"));
        assert_eq!(names.name(b6.into()).as_deref(), Some("b.test"));
        // In range but never given, and outside the ranges.
        assert_eq!(names.name(Ipv4Addr::new(198, 19, 255, 255).into()), None);
        assert_eq!(names.name(Ipv4Addr::new(198, 18, 0, 0).into()), None);
        assert_eq!(names.name(Ipv4Addr::new(93, 184, 216, 34).into()), None);
        assert!(SyntheticNames::is_synthetic(
            Ipv4Addr::new(198, 19, 1, 1).into()
        ));
        assert!(!SyntheticNames::is_synthetic(
            Ipv4Addr::new(198, 20, 0, 0).into()
        ));
        assert!(!SyntheticNames::is_synthetic(
            "fd70:6f72:7464::1".parse().unwrap()
        ));
    }

    #[test]
    fn a_full_table_refuses_new_names_and_logs_at_powers_of_ten() {
        let names = SyntheticNames::default();
        for index in 0..MAX_NAMES {
            names.addresses(&format!("n{index}.test")).unwrap();
        }
        // Names already mapped keep their addresses.
        assert!(names.addresses("n0.test").is_ok());
        let logged: Vec<u64> = (0..466)
            .map(|index| names.addresses(&format!("new{index}.test")).unwrap_err())
            .filter(|full| full.worth_logging())
            .map(|full| full.refused)
            .collect();
        assert_eq!(logged, [1, 10, 100]);
        assert_eq!(names.addresses("one-more.test").unwrap_err().refused, 467);
    }
}
