//! Address management: subnet validation, free-subnet selection, address allocation.
//! Pure functions over plain values so every rule is unit-tested without a kernel.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::error::{Error, Result};

/// A network's address pool: where containers get addresses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Addresses are handed out from here (defaults to the whole subnet), like `--ip-range`.
    pub range: Ipv4Net,
}

/// Parses a CIDR such as `172.20.0.0/16`. Host bits must be zero, as Docker insists.
pub fn parse_subnet(s: &str) -> Result<Ipv4Net> {
    let net: Ipv4Net =
        s.parse().map_err(|_| bad_request!("invalid CIDR {s:?}: expected an IPv4 network like 172.20.0.0/16"))?;
    if net.trunc() != net {
        return Err(bad_request!("invalid subnet {s}: host bits are set, did you mean {}?", net.trunc()));
    }
    if let Some((range, what)) = reserved_range(net) {
        return Err(bad_request!("subnet {s} overlaps {range}, the {what} range: containers cannot use it"));
    }
    if net.prefix_len() > 30 {
        return Err(bad_request!(
            "subnet {s} is too small: a network needs at least a /30 (gateway plus one container)"
        ));
    }
    Ok(net)
}

/// Ranges no network may use: unicast routing and ARP do not work there (RFC 6890).
const RESERVED: [(&str, &str); 4] = [
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (class E) and broadcast"),
];

/// The reserved range `net` overlaps, if any, with its name.
pub fn reserved_range(net: Ipv4Net) -> Option<(Ipv4Net, &'static str)> {
    RESERVED.iter().map(|(r, what)| (r.parse::<Ipv4Net>().unwrap(), *what)).find(|(r, _)| overlaps(*r, net))
}

/// Builds a pool from user input, checking that the gateway and range sit inside the subnet.
pub fn pool(subnet: Ipv4Net, gateway: Option<Ipv4Addr>, ip_range: Option<Ipv4Net>) -> Result<Pool> {
    let gateway = match gateway {
        Some(gw) => {
            if !is_host_addr(subnet, gw) {
                return Err(bad_request!("gateway {gw} is not a usable address of subnet {subnet}"));
            }
            gw
        }
        None => first_host(subnet),
    };
    let range = match ip_range {
        Some(r) => {
            if r.trunc() != r {
                return Err(bad_request!("invalid --ip-range {r}: host bits are set, did you mean {}?", r.trunc()));
            }
            if !subnet.contains(&r) {
                return Err(bad_request!("--ip-range {r} is not inside subnet {subnet}"));
            }
            r
        }
        None => subnet,
    };
    Ok(Pool { subnet, gateway, range })
}

fn first_host(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
}

/// True for addresses a container (or gateway) may use: inside the subnet, neither the network
/// nor the broadcast address.
fn is_host_addr(net: Ipv4Net, ip: Ipv4Addr) -> bool {
    net.contains(&ip) && ip != net.network() && ip != net.broadcast()
}

/// Allocates an address: the requested one if it is free and valid, else the lowest free one in
/// the pool's range. `used` holds the addresses already given out on this network.
pub fn allocate(pool: &Pool, used: &BTreeSet<Ipv4Addr>, requested: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
    allocate_except(pool, used, &[], requested)
}

/// [`allocate`], never handing out `reserved` (aux addresses, the host's own addresses on a
/// macvlan network's subnet), each with what holds it for the message.
pub fn allocate_except(
    pool: &Pool,
    used: &BTreeSet<Ipv4Addr>,
    reserved: &[(Ipv4Addr, String)],
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr> {
    if let Some(ip) = requested
        && let Some((_, who)) = reserved.iter().find(|(r, _)| *r == ip)
    {
        return Err(conflict!("address {ip} is reserved ({who})"));
    }
    let is_reserved = |ip: &Ipv4Addr| reserved.iter().any(|(r, _)| r == ip);
    if let Some(ip) = requested {
        if !is_host_addr(pool.subnet, ip) {
            return Err(bad_request!("address {ip} is not a usable address of subnet {}", pool.subnet));
        }
        if ip == pool.gateway {
            return Err(conflict!("address {ip} is the network's gateway"));
        }
        if used.contains(&ip) {
            return Err(conflict!("address {ip} is already in use"));
        }
        return Ok(ip);
    }
    let start = u32::from(pool.range.network());
    let end = u32::from(pool.range.broadcast());
    (start..=end)
        .map(Ipv4Addr::from)
        .find(|ip| is_host_addr(pool.subnet, *ip) && *ip != pool.gateway && !used.contains(ip) && !is_reserved(ip))
        .ok_or_else(|| Error::Conflict(format!("no free address left in {}", pool.range)))
}

/// The pools Docker uses for networks without `--subnet`: 172.17-31/16 then 192.168.x/20.
/// 172.17.0.0/16 belongs to the default `bridge` network, so user networks start at 172.18.
fn default_pools() -> impl Iterator<Item = Ipv4Net> {
    let b = (18u8..=31).map(|o| Ipv4Net::new(Ipv4Addr::new(172, o, 0, 0), 16).unwrap());
    let c = (0u8..16).map(|i| Ipv4Net::new(Ipv4Addr::new(192, 168, i * 16, 0), 20).unwrap());
    b.chain(c)
}

/// The first default pool that overlaps nothing in `taken` (other networks' subnets and the
/// prefixes already routed on the host).
pub fn next_free_subnet(taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    default_pools().find(|cand| !taken.iter().any(|t| overlaps(*cand, *t)))
}

pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Docker derives a container's MAC from its IPv4 address: 02:42 followed by the four octets.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_rejects_garbage_host_bits_and_tiny_nets() {
        assert!(matches!(parse_subnet("nope"), Err(Error::BadRequest(_))));
        assert!(matches!(parse_subnet("10.0.0.0/33"), Err(Error::BadRequest(_))));
        let e = parse_subnet("10.1.2.3/16").unwrap_err().to_string();
        assert!(e.contains("10.1.0.0/16"), "{e}");
        assert!(matches!(parse_subnet("10.0.0.0/31"), Err(Error::BadRequest(_))));
        assert_eq!(parse_subnet("10.0.0.0/30").unwrap(), net("10.0.0.0/30"));
    }

    #[test]
    fn pool_defaults_and_checks_gateway_and_range() {
        let p = pool(net("172.20.0.0/16"), None, None).unwrap();
        assert_eq!(p.gateway, ip("172.20.0.1"));
        assert_eq!(p.range, net("172.20.0.0/16"));
        assert!(pool(net("172.20.0.0/16"), Some(ip("10.0.0.1")), None).is_err());
        assert!(pool(net("172.20.0.0/16"), Some(ip("172.20.0.0")), None).is_err());
        assert!(pool(net("172.20.0.0/16"), Some(ip("172.20.255.255")), None).is_err());
        assert!(pool(net("172.20.0.0/16"), None, Some(net("172.21.0.0/24"))).is_err());
        assert!(pool(net("172.20.0.0/16"), None, Some(net("172.20.5.0/24"))).is_ok());
    }

    #[test]
    fn allocates_lowest_free_skipping_gateway_and_used() {
        let p = pool(net("10.9.0.0/24"), None, None).unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(allocate(&p, &used, None).unwrap(), ip("10.9.0.2"));
        used.insert(ip("10.9.0.2"));
        used.insert(ip("10.9.0.4"));
        assert_eq!(allocate(&p, &used, None).unwrap(), ip("10.9.0.3"));
        used.remove(&ip("10.9.0.2"));
        assert_eq!(allocate(&p, &used, None).unwrap(), ip("10.9.0.2"), "released address is reused");
    }

    #[test]
    fn gateway_in_middle_and_ip_range() {
        let p = pool(net("10.9.0.0/24"), Some(ip("10.9.0.10")), Some(net("10.9.0.8/29"))).unwrap();
        let mut used = BTreeSet::new();
        let mut got = vec![];
        while let Ok(a) = allocate(&p, &used, None) {
            used.insert(a);
            got.push(a.octets()[3]);
        }
        assert_eq!(got, vec![8, 9, 11, 12, 13, 14, 15]);
        // a static address outside the range but inside the subnet is allowed, as in Docker
        assert_eq!(allocate(&p, &used, Some(ip("10.9.0.100"))).unwrap(), ip("10.9.0.100"));
    }

    #[test]
    fn static_address_checks() {
        let p = pool(net("10.9.0.0/24"), None, None).unwrap();
        let used: BTreeSet<_> = [ip("10.9.0.5")].into();
        assert!(matches!(allocate(&p, &used, Some(ip("10.8.0.5"))), Err(Error::BadRequest(_))));
        assert!(matches!(allocate(&p, &used, Some(ip("10.9.0.255"))), Err(Error::BadRequest(_))));
        assert!(matches!(allocate(&p, &used, Some(ip("10.9.0.1"))), Err(Error::Conflict(_))));
        assert!(matches!(allocate(&p, &used, Some(ip("10.9.0.5"))), Err(Error::Conflict(_))));
        assert_eq!(allocate(&p, &used, Some(ip("10.9.0.6"))).unwrap(), ip("10.9.0.6"));
    }

    #[test]
    fn reserved_ranges_are_refused_by_name() {
        for (s, what) in [
            ("224.0.0.0/24", "multicast"),
            ("239.1.0.0/16", "multicast"),
            ("0.0.0.0/8", "this network"),
            ("127.0.0.0/16", "loopback"),
            ("240.0.0.0/24", "class E"),
            ("255.255.255.0/24", "broadcast"),
            ("192.0.0.0/2", "multicast"),
        ] {
            let e = parse_subnet(s).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains(s), "{s}: {e}");
        }
        assert!(parse_subnet("223.255.255.0/24").is_ok());
        assert!(parse_subnet("1.0.0.0/8").is_ok());
    }

    #[test]
    fn reserved_addresses_are_never_handed_out() {
        let p = pool(net("10.9.0.0/29"), None, None).unwrap();
        let reserved = vec![(ip("10.9.0.2"), "aux address router".to_string()), (ip("10.9.0.4"), "host".into())];
        let mut used = BTreeSet::new();
        let mut got = vec![];
        while let Ok(a) = allocate_except(&p, &used, &reserved, None) {
            used.insert(a);
            got.push(a.octets()[3]);
        }
        assert_eq!(got, vec![3, 5, 6]);
        let e = allocate_except(&p, &BTreeSet::new(), &reserved, Some(ip("10.9.0.2"))).unwrap_err();
        assert!(matches!(&e, Error::Conflict(m) if m.contains("reserved (aux address router)")), "{e}");
    }

    #[test]
    fn exhaustion_is_a_clear_error() {
        let p = pool(net("10.9.0.0/30"), None, None).unwrap();
        let used: BTreeSet<_> = [ip("10.9.0.2")].into();
        let e = allocate(&p, &used, None).unwrap_err().to_string();
        assert!(e.contains("no free address"), "{e}");
    }

    #[test]
    fn next_subnet_skips_taken_and_routed() {
        assert_eq!(next_free_subnet(&[]), Some(net("172.18.0.0/16")));
        let taken = [net("172.17.0.0/16"), net("172.18.0.0/16"), net("172.19.5.0/24")];
        assert_eq!(next_free_subnet(&taken), Some(net("172.20.0.0/16")));
        // a wide host route covering 172.16/12 pushes us to 192.168
        assert_eq!(next_free_subnet(&[net("172.16.0.0/12")]), Some(net("192.168.0.0/20")));
    }

    #[test]
    fn overlap_is_symmetric() {
        assert!(overlaps(net("10.0.0.0/8"), net("10.1.0.0/16")));
        assert!(overlaps(net("10.1.0.0/16"), net("10.0.0.0/8")));
        assert!(!overlaps(net("10.1.0.0/16"), net("10.2.0.0/16")));
    }

    #[test]
    fn mac_matches_docker() {
        assert_eq!(format_mac(&mac_for(ip("172.17.0.2"))), "02:42:ac:11:00:02");
    }
}
