//! The local/private address set: addresses a policy refuses unless they
//! are named exactly in the allowlist or `allow_local_binding` is on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether `ip` is local, private or otherwise not a public unicast address.
///
/// IPv4: `0.0.0.0/8`, loopback `127/8`, RFC 1918 (`10/8`, `172.16/12`,
/// `192.168/16`), CGNAT `100.64/10`, link-local `169.254/16` (cloud metadata
/// included), `192.0.0.0/24`, the TEST-NETs (`192.0.2/24`, `198.51.100/24`,
/// `203.0.113/24`), benchmarking `198.18/15`, multicast `224/4`, reserved
/// `240/4` and broadcast.
///
/// IPv6: `::`, `::1`, ULA `fc00::/7`, link-local `fe80::/10`, site-local
/// `fec0::/10`, multicast `ff00::/8`, documentation `2001:db8::/32`,
/// discard `100::/64`, Teredo `2001::/32` (its IPv4 is obfuscated, so it is
/// refused whole), and every form that embeds an IPv4 (mapped `::ffff:0:0/96`,
/// compatible `::/96`, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4
/// `2002::/16`), judged by that IPv4.
pub fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_local_v4(v4),
        IpAddr::V6(v6) => is_local_v6(v6),
    }
}

fn is_local_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b))
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && c == 0)
        || (a == 192 && b == 88 && c == 99)
        || (a == 192 && b == 0 && c == 2)
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || a >= 224
}

fn is_local_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = embedded_ipv4(ip) {
        return is_local_v4(v4);
    }
    ip.is_unspecified()
        || ip.is_loopback()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        || (s[0] & 0xff00) == 0xff00
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0x2001 && s[1] == 0)
        || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0)
        || (s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 1)
}

/// The IPv4 address carried by an IPv4-mapped (`::ffff:0:0/96`),
/// IPv4-compatible (`::/96`), IPv4-translated (`::ffff:0:0:0/96`, RFC 2765
/// and 6145), NAT64 well-known (`64:ff9b::/96`) or 6to4 (`2002::/16`) IPv6
/// address. (The NAT64 local-use prefix `64:ff9b:1::/48` and Teredo are
/// refused whole by [`is_local`].)
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let low = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..5].iter().all(|x| *x == 0)
        && (s[5] == 0xffff || (s[5] == 0 && !(s[6] == 0 && s[7] <= 1)))
    {
        return Some(low);
    }
    if s[..4].iter().all(|x| *x == 0) && s[4] == 0xffff && s[5] == 0 {
        return Some(low);
    }
    if s[0] == 0x0064 && s[1] == 0xff9b && s[2..6].iter().all(|x| *x == 0) {
        return Some(low);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

/// Whether `ip` is a cloud metadata or instance-service address (AWS, GCP,
/// Azure, Oracle, Alibaba, ECS/EKS task credentials), in any spelling that
/// embeds it. Such an address stays refused even with
/// `allow_local_binding`, unless an allowlist entry names that exact address.
pub fn is_metadata(ip: IpAddr) -> bool {
    let v4 = match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => embedded_ipv4(v6),
    };
    if let Some(v4) = v4 {
        return matches!(
            v4.octets(),
            [169, 254, 169, 254]
                | [169, 254, 169, 253]
                | [169, 254, 169, 123]
                | [169, 254, 170, 2]
                | [169, 254, 170, 23]
                | [100, 100, 100, 200]
                | [192, 0, 0, 192]
        );
    }
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0xfd00
                && s[1] == 0x0ec2
                && s[2..7].iter().all(|x| *x == 0)
                && matches!(s[7], 0x254 | 0x23)
        }
        IpAddr::V4(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_public() {
        let local = [
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001:0:4136:e378::1",
            "100::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:c0a8:101::",
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "::ffff:0:10.1.2.3",
            "192.88.99.1",
        ];
        for ip in local {
            assert!(is_local(ip.parse().unwrap()), "{ip} should be local");
        }
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::ffff:0:808:808",
        ];
        for ip in public {
            assert!(!is_local(ip.parse().unwrap()), "{ip} should be public");
        }
    }

    #[test]
    fn metadata_in_every_spelling() {
        for ip in [
            "169.254.169.254",
            "169.254.170.2",
            "100.100.100.200",
            "192.0.0.192",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(is_metadata(ip.parse().unwrap()), "{ip} is metadata");
        }
        for ip in ["169.254.1.1", "10.0.0.1", "fd00:ec2::1", "8.8.8.8"] {
            assert!(!is_metadata(ip.parse().unwrap()), "{ip} is not metadata");
        }
    }
}
