//! Hand-built packets for `test_run` tests of the datapath: Ethernet + IPv4 + TCP/UDP with
//! correct checksums, plus ways to break them on purpose.

use std::net::Ipv4Addr;

pub const ETH_P_IP: u16 = 0x0800;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The Internet checksum (RFC 1071) over `data`, starting from `sum`.
pub fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub struct Ipv4Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
}

impl Ipv4Packet {
    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Self {
        Self {
            src_mac: [0x02, 0x42, 0xac, 0x11, 0, 2],
            dst_mac: [0x02, 0x42, 0xac, 0x11, 0, 3],
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: PROTO_UDP,
            sport,
            dport,
            payload: payload.to_vec(),
        }
    }

    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Self {
        Self { proto: PROTO_TCP, ..Self::udp(src, sport, dst, dport, payload) }
    }

    /// Serialises to bytes with valid IPv4 and L4 checksums.
    pub fn build(&self) -> Vec<u8> {
        self.frame(&self.l4())
    }

    /// Ethernet + IPv4 (no options, valid header checksum) around an L4 message built by the caller.
    pub fn frame(&self, l4: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, self.proto, 0, 0];
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        let total = (20 + l4.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let c = csum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut p = Vec::with_capacity(14 + total as usize);
        p.extend_from_slice(&self.dst_mac);
        p.extend_from_slice(&self.src_mac);
        p.extend_from_slice(&ETH_P_IP.to_be_bytes());
        p.extend_from_slice(&ip);
        p.extend_from_slice(l4);
        p
    }

    fn l4(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&self.sport.to_be_bytes());
        h.extend_from_slice(&self.dport.to_be_bytes());
        let csum_at = if self.proto == PROTO_TCP {
            h.extend_from_slice(&1u32.to_be_bytes()); // seq
            h.extend_from_slice(&0u32.to_be_bytes()); // ack
            h.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]); // SYN, window, csum, urg
            16
        } else {
            h.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            6
        };
        h.extend_from_slice(&self.payload);
        let c = csum(&h, self.pseudo_sum(h.len()));
        h[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        h
    }

    fn pseudo_sum(&self, l4_len: usize) -> u32 {
        let mut ph = Vec::new();
        ph.extend_from_slice(&self.src.octets());
        ph.extend_from_slice(&self.dst.octets());
        ph.extend_from_slice(&[0, self.proto]);
        ph.extend_from_slice(&(l4_len as u16).to_be_bytes());
        ph.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum()
    }
}

/// True when the IPv4 header checksum of a packet built above verifies.
pub fn ipv4_header_ok(pkt: &[u8]) -> bool {
    let ihl = usize::from(pkt[14] & 0x0f) * 4;
    csum(&pkt[14..14 + ihl], 0) == 0
}

pub const PROTO_ICMP: u8 = 1;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// An ICMP echo request or reply (`icmp_type`) with valid checksums.
pub fn icmp_echo(src: &str, dst: &str, icmp_type: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut rest = id.to_be_bytes().to_vec();
    rest.extend_from_slice(&seq.to_be_bytes());
    rest.extend_from_slice(payload);
    icmp(src, dst, icmp_type, 0, &rest)
}

/// An ICMP error (`icmp_type`/`code`, e.g. destination unreachable) from `src` to `dst` quoting
/// the IPv4 header and the first 8 L4 bytes of `original` (a whole frame), as routers do.
pub fn icmp_error(src: &str, dst: &str, icmp_type: u8, code: u8, original: &[u8]) -> Vec<u8> {
    let quote_end = ipv4_l4_offset(original) + 8;
    let mut rest = vec![0, 0, 0, 0]; // unused (or next-hop MTU)
    rest.extend_from_slice(&original[14..quote_end]);
    icmp(src, dst, icmp_type, code, &rest)
}

fn icmp(src: &str, dst: &str, icmp_type: u8, code: u8, rest: &[u8]) -> Vec<u8> {
    let mut msg = vec![icmp_type, code, 0, 0];
    msg.extend_from_slice(rest);
    let c = csum(&msg, 0);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    Ipv4Packet { proto: PROTO_ICMP, ..Ipv4Packet::udp(src, 0, dst, 0, b"") }.frame(&msg)
}

/// `frame` with IPv4 `options` (a multiple of 4 bytes) inserted after its header: IHL, total
/// length and header checksum follow; the L4 checksum is unaffected (the pseudo-header has no IHL).
pub fn with_ip_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "IPv4 options come in 32-bit words");
    let l4 = ipv4_l4_offset(frame);
    let mut p = frame[..l4].to_vec();
    p.extend_from_slice(options);
    p.extend_from_slice(&frame[l4..]);
    p[14] += (options.len() / 4) as u8;
    let total = u16::from_be_bytes([p[16], p[17]]) + options.len() as u16;
    p[16..18].copy_from_slice(&total.to_be_bytes());
    refresh_ipv4_checksum(&mut p);
    p
}

/// Recomputes the IPv4 header checksum after a test changed header fields on purpose (over
/// the header bytes the frame holds, should the IHL claim more).
pub fn refresh_ipv4_checksum(frame: &mut [u8]) {
    let end = (14 + usize::from(frame[14] & 0x0f) * 4).min(frame.len());
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = csum(&frame[14..end], 0);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Offset of the L4 header in a frame (after any IPv4 options).
pub fn ipv4_l4_offset(frame: &[u8]) -> usize {
    14 + usize::from(frame[14] & 0x0f) * 4
}

/// (source, destination) of an IPv4 frame.
pub fn ipv4_addrs(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    let a = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    (a(26), a(30))
}

/// (source port, destination port) of a TCP or UDP frame.
pub fn l4_ports(frame: &[u8]) -> (u16, u16) {
    let l4 = ipv4_l4_offset(frame);
    (u16::from_be_bytes([frame[l4], frame[l4 + 1]]), u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]))
}

/// The identifier of an ICMP echo request or reply.
pub fn icmp_echo_id(frame: &[u8]) -> u16 {
    let l4 = ipv4_l4_offset(frame);
    u16::from_be_bytes([frame[l4 + 4], frame[l4 + 5]])
}

/// True when the L4 checksum of an IPv4 frame verifies over the L4 bytes the total length
/// covers: TCP and UDP with the pseudo-header, ICMP without. A UDP checksum of 0 ("none")
/// does not count as verifying: tests that expect one check for 0 themselves.
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let l4 = &frame[14 + ihl..14 + total];
    let proto = frame[23];
    if proto == PROTO_ICMP {
        return csum(l4, 0) == 0;
    }
    let mut ph = frame[26..34].to_vec();
    ph.extend_from_slice(&[0, proto]);
    ph.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let pseudo = ph.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    csum(l4, pseudo) == 0
}

/// The host MAC the outer frames of [`vxlan`] are addressed to, and the sending node's.
pub const UNDERLAY_DST_MAC: [u8; 6] = [0x02, 0, 0xc0, 0xa8, 0x4d, 1];
pub const UNDERLAY_SRC_MAC: [u8; 6] = [0x02, 0, 0xc0, 0xa8, 0x4d, 2];

/// `inner` (an Ethernet frame) in VXLAN (RFC 7348) over UDP/IPv4 from node `src` to node
/// `dst` on `vni`, as a netpath node sends it: DF, outer UDP checksum zero, port 4789.
pub fn vxlan(src: &str, dst: &str, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(16 + inner.len());
    l4.extend_from_slice(&49152u16.to_be_bytes());
    l4.extend_from_slice(&4789u16.to_be_bytes());
    l4.extend_from_slice(&((16 + inner.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(&0x0800_0000u32.to_be_bytes());
    l4.extend_from_slice(&(vni << 8).to_be_bytes());
    l4.extend_from_slice(inner);
    let outer = Ipv4Packet {
        src_mac: UNDERLAY_SRC_MAC,
        dst_mac: UNDERLAY_DST_MAC,
        ..Ipv4Packet::udp(src, 49152, dst, 4789, &[])
    };
    outer.frame(&l4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_have_valid_checksums() {
        for p in
            [Ipv4Packet::udp("10.0.0.1", 1, "10.0.0.2", 2, b"abc"), Ipv4Packet::tcp("10.0.0.1", 1, "10.0.0.2", 2, b"")]
        {
            let b = p.build();
            assert!(ipv4_header_ok(&b));
            let l4 = &b[34..];
            assert_eq!(csum(l4, p.pseudo_sum(l4.len())), 0, "L4 checksum verifies");
            assert!(l4_checksum_ok(&b));
            let o = with_ip_options(&b, &[1, 1, 1, 0]);
            assert!(ipv4_header_ok(&o) && l4_checksum_ok(&o));
            assert_eq!((ipv4_l4_offset(&o), l4_ports(&o)), (38, (1, 2)));
        }
        let echo = icmp_echo("10.0.0.1", "10.0.0.2", ICMP_ECHO_REQUEST, 0x4242, 1, b"ping");
        assert!(ipv4_header_ok(&echo) && l4_checksum_ok(&echo));
        assert_eq!(icmp_echo_id(&echo), 0x4242);
        let err = icmp_error("10.0.0.9", "10.0.0.1", ICMP_DEST_UNREACH, 3, &echo);
        assert!(ipv4_header_ok(&err) && l4_checksum_ok(&err));
        assert_eq!(err.len(), 14 + 20 + 8 + 20 + 8);
    }
}
