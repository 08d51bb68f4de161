//! Which upstream addresses latchkey may dial. An agent that can name a host could otherwise
//! make the proxy reach cloud metadata (169.254.169.254), the loopback admin listener, or the
//! internal network (SSRF). The check runs on the address actually dialled, after resolution,
//! so a DNS answer that changes between check and connect (rebinding) cannot slip through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// True if `ip` is not a globally routable unicast address: loopback, private (RFC 1918),
/// CGNAT, link-local, multicast, broadcast, unspecified, reserved, benchmarking, IETF protocol
/// assignments, IPv6 unique-local and site-local, and IPv6 forms that embed such an IPv4
/// address (v4-mapped, v4-translated, v4-compatible, NAT64 64:ff9b::/96, 6to4). Teredo is
/// refused whole: its embedded address is obfuscated and it tunnels to arbitrary IPv4 hosts.
/// So is local-use NAT64 (64:ff9b:1::/48, RFC 8215): where its IPv4 address sits depends on
/// the operator's prefix length, and it translates into the operator's own network.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => is_private_v6(v6),
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0                                   // "this network", includes 0.0.0.0
        || a == 10                           // RFC 1918
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || a == 127                          // loopback
        || (a == 169 && b == 254)            // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b)) // RFC 1918
        || (a == 192 && b == 0 && c == 0)    // IETF protocol assignments
        || (a == 192 && b == 168)            // RFC 1918
        || (a == 198 && (18..20).contains(&b)) // benchmarking 198.18.0.0/15
        || a >= 224 // multicast 224/4, reserved 240/4, broadcast
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    if let Some(v4) = embedded_v4(ip) {
        return is_private_v4(v4);
    }
    let first = seg[0];
    (first & 0xfe00) == 0xfc00                 // unique local fc00::/7
        || (first & 0xffc0) == 0xfe80          // link-local fe80::/10
        || (first & 0xffc0) == 0xfec0          // site-local fec0::/10 (deprecated)
        || (first & 0xff00) == 0xff00          // multicast
        || (first == 0x2001 && seg[1] == 0)    // Teredo 2001::/32
        || (first == 0x2001 && seg[1] == 0x0db8) // documentation
        || first == 0x0100 && seg[1..4] == [0, 0, 0] // discard-only 100::/64
        || (first == 0x0064 && seg[1] == 0xff9b && seg[2] == 1) // local-use NAT64 64:ff9b:1::/48
}

/// The IPv4 address inside v4-mapped (::ffff:a.b.c.d), v4-translated (::ffff:0:a.b.c.d),
/// v4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002:AABB:CCDD::/48) addresses.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if s[0..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        return Some(tail(s[6], s[7]));
    }
    if s[0..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        return Some(tail(s[6], s[7]));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(tail(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(tail(s[1], s[2]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let private = [
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "198.19.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::2",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b::c0a8:101",
            "64:ff9b:1::",
            "64:ff9b:1::808:808",
            "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
            "::ffff:0:0",
            "::ffff:192.168.0.1",
            "::ffff:100.64.0.1",
            "::ffff:255.255.255.255",
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:db8::1",
            "100::1",
        ];
        let public = [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.254",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.169.0.1",
            "169.253.0.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "64:ff9b::101:101",
            "::ffff:1.1.1.1",
            "::ffff:0:808:808",
            "2002:808:808::1",
            "2001:4860::8888",
        ];
        for p in private {
            assert!(is_private(p.parse().unwrap()), "{p} should be private");
        }
        for p in public {
            assert!(!is_private(p.parse().unwrap()), "{p} should be public");
        }
    }
}
