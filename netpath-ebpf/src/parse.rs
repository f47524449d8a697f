//! Bounds-checked header parsing, for TC and XDP alike. Every read goes through
//! [`Frame::load`], which fails cleanly past the end of the packet.

use netpath_common::{Tuple, proto};
use network_types::eth::EthHdr;
use network_types::ip::Ipv4Hdr;

use crate::frame::Frame;

pub const ETH_LEN: usize = core::mem::size_of::<EthHdr>();
const ETH_P_IP: u16 = 0x0800;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAM_PROBLEM: u8 = 12;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An IPv4 packet. `tuple` is meaningful only when `translatable`: unfragmented TCP/UDP/ICMP-echo
/// packets whose L4 header lies inside the IPv4 total length. Everything else is passed through
/// untouched (never mistranslated); addresses are still known for policy.
pub struct Packet {
    pub l4: usize,
    /// End of the IPv4 packet (frame offset); Ethernet padding may follow.
    pub end: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub tuple: Tuple,
    pub translatable: bool,
    pub tcp_flags: u8,
    /// Offset of the L4 checksum (TCP/UDP/ICMP).
    pub csum_off: usize,
    /// An ICMP error (unreachable, time exceeded, parameter problem) quoting another packet.
    pub icmp_error: bool,
    /// The interface it is on (skb->ifindex, XDP's ingress_ifindex), read once here: given several reads of a
    /// context field, LLVM may compute its address once and load through that later, and the
    /// verifier refuses a load through a moved context pointer.
    pub ifindex: u32,
}

/// Offsets of IPv4 fields from the start of the frame.
pub const IP_CSUM: usize = ETH_LEN + 10;
pub const IP_SADDR: usize = ETH_LEN + 12;
pub const IP_DADDR: usize = ETH_LEN + 16;

/// Parses an Ethernet frame; `None` for anything that is not a well-formed IPv4 header.
#[inline(always)]
pub fn parse<C: Frame>(ctx: &C) -> Option<Packet> {
    let eth: EthHdr = ctx.load(0).ok()?;
    if u16::from_be(eth.ether_type) != ETH_P_IP {
        return None;
    }
    let ip: Ipv4Hdr = ctx.load(ETH_LEN).ok()?;
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let saddr = u32::from_ne_bytes(ip.src_addr);
    let daddr = u32::from_ne_bytes(ip.dst_addr);
    let frags = u16::from_be_bytes(ip.frags);
    let l4 = ETH_LEN + ihl;
    // Ethernet pads short frames: bytes past the IPv4 total length are not L4 header. A zero
    // total length is IPv4 BIG TCP (GSO packets over 64 KiB); the frame length bounds those.
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    let end = if tot_len == 0 { ctx.len() } else { ETH_LEN + tot_len };
    let mut p = Packet {
        l4,
        end,
        saddr,
        daddr,
        tuple: Tuple::new(saddr, daddr, 0, 0, ip.proto),
        translatable: false,
        tcp_flags: 0,
        csum_off: 0,
        icmp_error: false,
        ifindex: ctx.ifindex(),
    };
    // More-fragments set or a non-zero offset: ports are not in every piece.
    if frags & 0x3fff != 0 || end > ctx.len() || end < l4 + l4_min_len(ip.proto) {
        return Some(p);
    }
    match ip.proto {
        proto::TCP | proto::UDP => {
            let Ok(ports) = ctx.load::<[u16; 2]>(l4) else { return Some(p) };
            p.tuple.sport = ports[0];
            p.tuple.dport = ports[1];
            if ip.proto == proto::TCP {
                let Ok(flags) = ctx.load::<u8>(l4 + 13) else { return Some(p) };
                // The checksum must be inside the packet too.
                if ctx.load::<u16>(l4 + 16).is_err() {
                    return Some(p);
                }
                p.tcp_flags = flags;
                p.csum_off = l4 + 16;
            } else {
                if ctx.load::<u16>(l4 + 6).is_err() {
                    return Some(p);
                }
                p.csum_off = l4 + 6;
            }
            p.translatable = true;
        }
        proto::ICMP => {
            let Ok(hdr) = ctx.load::<[u8; 8]>(l4) else { return Some(p) };
            let id = u16::from_ne_bytes([hdr[4], hdr[5]]);
            match hdr[0] {
                ICMP_ECHO_REQUEST => p.tuple.sport = id,
                ICMP_ECHO_REPLY => p.tuple.dport = id,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM => {
                    p.icmp_error = true;
                    return Some(p);
                }
                _ => return Some(p),
            }
            p.csum_off = l4 + 2;
            p.translatable = true;
        }
        _ => {}
    }
    Some(p)
}

/// The shortest L4 header netpath reads for `proto` (TCP without options, UDP, ICMP echo).
#[inline(always)]
fn l4_min_len(proto: u8) -> usize {
    if proto == proto::TCP { 20 } else { 8 }
}

/// Offset of the field carrying `sport` (ICMP: the echo identifier).
#[inline(always)]
pub fn sport_off(p: &Packet) -> usize {
    if p.tuple.proto == proto::ICMP { p.l4 + 4 } else { p.l4 }
}

/// Offset of the field carrying `dport` (ICMP: the echo identifier).
#[inline(always)]
pub fn dport_off(p: &Packet) -> usize {
    if p.tuple.proto == proto::ICMP { p.l4 + 4 } else { p.l4 + 2 }
}

/// The packet an ICMP error quotes: its IPv4 header and the first 8 bytes after it.
pub struct Quoted {
    /// Offset of the quoted IPv4 header.
    pub l3: usize,
    /// Offset of the quoted L4 header.
    pub l4: usize,
    pub tuple: Tuple,
}

/// Parses the packet quoted by the ICMP error `p`: TCP, UDP or an ICMP echo, unfragmented.
#[inline(always)]
pub fn quoted<C: Frame>(ctx: &C, p: &Packet) -> Option<Quoted> {
    let l3 = p.l4 + 8;
    let ip: Ipv4Hdr = ctx.load(l3).ok()?;
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 || u16::from_be_bytes(ip.frags) & 0x1fff != 0 {
        return None;
    }
    let l4 = l3 + ihl;
    // The 8 quoted L4 bytes must be inside the error, not in Ethernet padding after it.
    if l4 + 8 > p.end {
        return None;
    }
    let mut t = Tuple::new(u32::from_ne_bytes(ip.src_addr), u32::from_ne_bytes(ip.dst_addr), 0, 0, ip.proto);
    match ip.proto {
        proto::TCP | proto::UDP => {
            let ports: [u16; 2] = ctx.load(l4).ok()?;
            t.sport = ports[0];
            t.dport = ports[1];
        }
        proto::ICMP => {
            let hdr: [u8; 8] = ctx.load(l4).ok()?;
            let id = u16::from_ne_bytes([hdr[4], hdr[5]]);
            match hdr[0] {
                ICMP_ECHO_REQUEST => t.sport = id,
                ICMP_ECHO_REPLY => t.dport = id,
                _ => return None,
            }
        }
        _ => return None,
    }
    Some(Quoted { l3, l4, tuple: t })
}
