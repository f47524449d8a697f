//! An XDP-native traffic generator, the way `xdp-trafficgen` works: a small XDP program that
//! writes the frame and returns `XDP_TX`, run with `BPF_PROG_RUN` in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`) on the client's veth. Each repetition transmits the frame
//! through the veth's `ndo_xdp_xmit`, so the peer (the lab host's uplink) receives it as an
//! XDP frame from its NAPI poll, with no socket buffer: what a NIC driver hands native XDP.
//! The peer takes such frames only with NAPI on (an XDP program or GRO on it).
//!
//! Why not `xdp-trafficgen` itself: Debian's 1.3.1 fails to load on this kernel (its
//! `xdp_redirect_map_err` tracepoint is gone) and sends only IPv6 with a hop limit of 1,
//! which netpath's IPv4 published ports never see.
//!
//! The receive work runs in the generator's own softirq (the kernel flushes each batch with
//! bottom halves enabled), so a thread sends as fast as the receiving side consumes: the
//! rate measures the receiver's cost per packet on that CPU.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const XDP_DROP: i32 = 1;
const XDP_TX: i32 = 3;
/// Repetitions per BPF_PROG_RUN call, at first; then what takes about [`CALL_TARGET`] at the
/// rate measured so far (each call sets up and tears down a page pool, which on a busy
/// machine costs milliseconds: small calls would measure that).
const REPEAT_FIRST: u32 = 16 * 1024;
const REPEAT_MAX: u32 = 4 << 20;
const CALL_TARGET: Duration = Duration::from_millis(100);
/// Frames per batch the kernel runs before flushing them (its default, NAPI's weight).
const BATCH: u32 = 64;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed; pointers in it are live.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) }
}

fn put32(a: &mut [u8], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(a: &mut [u8], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// One eBPF instruction: opcode, dst and src registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = dst | (src << 4);
    i[2..4].copy_from_slice(&off.to_ne_bytes());
    i[4..8].copy_from_slice(&imm.to_ne_bytes());
    i
}

/// The generator's program: writes `frame` over the packet and returns XDP_TX. Live frames
/// are initialised once per page and the page comes back however the receiver left it (a
/// forwarded frame has a new MAC header, a lower TTL, NAT's addresses), so every run writes
/// the frame again, as xdp-trafficgen's program does.
fn tx_prog(frame: &[u8]) -> Vec<[u8; 8]> {
    assert!(frame.len().is_multiple_of(4), "the frame is written 4 bytes at a time");
    let words = frame.len() / 4;
    let mut p = vec![
        insn(0x61, 2, 1, 0, 0),                  // r2 = ctx->data
        insn(0x61, 3, 1, 4, 0),                  // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),                  // r4 = r2
        insn(0x07, 4, 0, 0, frame.len() as i32), // r4 += len
        insn(0x2d, 4, 3, words as i16 + 2, 0),   // if r4 > r3: to the drop below
    ];
    for (n, w) in frame.chunks(4).enumerate() {
        // *(u32 *)(r2 + 4n) = the frame's bytes there
        p.push(insn(0x62, 2, 0, (4 * n) as i16, i32::from_ne_bytes([w[0], w[1], w[2], w[3]])));
    }
    p.push(insn(0xb7, 0, 0, 0, XDP_TX)); // r0 = XDP_TX
    p.push(insn(0x95, 0, 0, 0, 0)); // exit
    p.push(insn(0xb7, 0, 0, 0, XDP_DROP)); // r0 = XDP_DROP
    p.push(insn(0x95, 0, 0, 0, 0)); // exit
    p
}

/// Loads [`tx_prog`]; returns its fd.
fn load_tx_prog(frame: &[u8]) -> Result<std::os::fd::OwnedFd> {
    load_xdp(&tx_prog(frame), "np_xgen", 0)
}

/// Loads XDP program `insns` named `name` (at most 15 bytes) for `expected_attach_type`;
/// returns its fd.
fn load_xdp(insns: &[[u8; 8]], name: &str, expected_attach_type: u32) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let license = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, BPF_PROG_TYPE_XDP);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1);
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    attr[48..48 + name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    put32(&mut attr, 68, expected_attach_type);
    let fd = bpf(BPF_PROG_LOAD, &mut attr).with_context(|| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        format!("loading XDP program {name}: {}", String::from_utf8_lossy(&log[..end]))
    })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `__xdp-drop`: the flood table's ceiling. A bare `XDP_DROP` (two instructions) in native
/// mode on `ifname` (of the calling process's namespace) for `secs`: what the generator gets
/// through a receiver that does nothing, hence its own share (and the veth's) of the cost
/// per frame. Attached by a BPF link, so it goes when this process does, however it ends.
/// Returns the frames it dropped (the veth's own count of XDP drops).
pub fn drop_all(ifname: &str, secs: f64) -> Result<u64> {
    use std::os::fd::AsRawFd;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    let prog = load_xdp(&[insn(0xb7, 0, 0, 0, XDP_DROP), insn(0x95, 0, 0, 0, 0)], "np_xdrop", BPF_XDP)?;
    let ifindex = nix::net::if_::if_nametoindex(ifname).with_context(|| format!("no interface {ifname}"))?;
    let before = xdp_drops(ifname)?;
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, prog.as_raw_fd() as u32);
    put32(&mut attr, 4, ifindex);
    put32(&mut attr, 8, BPF_XDP);
    put32(&mut attr, 12, XDP_FLAGS_DRV_MODE);
    let link = bpf(BPF_LINK_CREATE, &mut attr).with_context(|| format!("attaching XDP_DROP to {ifname}"))?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    // SAFETY: the link fd the kernel returned above, closed once: the program detaches.
    unsafe { libc::close(link as i32) };
    Ok(xdp_drops(ifname)? - before)
}

/// The frames native XDP dropped on `ifname` so far (a veth's `ethtool -S` counters).
fn xdp_drops(ifname: &str) -> Result<u64> {
    let out = std::process::Command::new("ethtool").args(["-S", ifname]).output().context("running ethtool")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(k, _)| k.ends_with("_xdp_drops"))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum())
}

fn csum_fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

/// A 60-byte frame (64 on a wire with its FCS): Ethernet, IPv4, UDP, 18 B of payload, every
/// checksum complete (as frames off a wire carry them).
pub fn udp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let payload = [0u8; 18];
    let udp_len = 8 + payload.len() as u16;
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len as usize);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_at = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&ip_len.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    let ip_sum = csum_fold(sum16(&f[ip_at..ip_at + 20]));
    f[ip_at + 10..ip_at + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let udp_at = f.len();
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&payload);
    let pseudo = sum16(&src.ip().octets()) + sum16(&dst.ip().octets()) + 17 + u32::from(udp_len);
    let s = match csum_fold(pseudo + sum16(&f[udp_at..])) {
        0 => 0xffff,
        s => s,
    };
    f[udp_at + 6..udp_at + 8].copy_from_slice(&s.to_be_bytes());
    f
}

/// Transmits `frame` out of interface `ifindex` (of the calling process's namespace) from
/// `threads` threads, each pinned to its own CPU, for `secs`. Returns the frames handed to the
/// interface (the peer may still drop some: see its veth counters) and the seconds it took
/// (a call in flight at the deadline finishes).
pub fn generate(ifindex: u32, frame: &[u8], threads: usize, secs: f64) -> Result<(u64, f64)> {
    let prog = load_tx_prog(frame)?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|i| {
                let prog = &prog;
                s.spawn(move || -> Result<u64> {
                    use std::os::fd::AsRawFd;
                    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
                    unsafe {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(i % ncpu, &mut set);
                        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    }
                    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index.
                    let mut ctx = [0u8; 24];
                    put32(&mut ctx, 4, frame.len() as u32);
                    put32(&mut ctx, 12, ifindex);
                    let mut sent = 0u64;
                    let mut repeat = REPEAT_FIRST;
                    while Instant::now() < end {
                        let t = Instant::now();
                        let mut attr = [0u8; 128];
                        put32(&mut attr, 0, prog.as_raw_fd() as u32);
                        put32(&mut attr, 8, frame.len() as u32);
                        put64(&mut attr, 16, frame.as_ptr() as u64);
                        put32(&mut attr, 32, repeat);
                        put32(&mut attr, 40, ctx.len() as u32);
                        put64(&mut attr, 48, ctx.as_ptr() as u64);
                        put32(&mut attr, 64, BPF_F_TEST_XDP_LIVE_FRAMES);
                        put32(&mut attr, 72, BATCH);
                        match bpf(BPF_PROG_TEST_RUN, &mut attr) {
                            Ok(_) => {
                                sent += u64::from(repeat);
                                let rate = f64::from(repeat) / t.elapsed().as_secs_f64().max(1e-6);
                                let left = end.saturating_duration_since(Instant::now()).min(CALL_TARGET);
                                repeat = ((rate * left.as_secs_f64()) as u32).clamp(1024, REPEAT_MAX);
                            }
                            Err(e) if e.raw_os_error() == Some(libc::EINTR) => break,
                            Err(e) => return Err(e).context("BPF_PROG_RUN (live frames)"),
                        }
                    }
                    Ok(sent)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.join().map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        }
        Ok((total, start.elapsed().as_secs_f64()))
    })
}

/// `__xdp-gen`: [`generate`] a [`udp_frame`] on `ifname`.
pub fn run(
    ifname: &str,
    dst_mac: &str,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    threads: usize,
    secs: f64,
) -> Result<(u64, f64)> {
    let ifindex = nix::net::if_::if_nametoindex(ifname).with_context(|| format!("no interface {ifname}"))?;
    // From netlink (getifaddrs), not /sys: sysfs shows the namespace it was mounted in.
    let src_mac = nix::ifaddrs::getifaddrs()?
        .filter(|a| a.interface_name == ifname)
        .find_map(|a| a.address.and_then(|s| s.as_link_addr().and_then(|l| l.addr())))
        .with_context(|| format!("cannot read {ifname}'s MAC address"))?;
    let frame = udp_frame(parse_mac(dst_mac)?, src_mac, src, dst);
    generate(ifindex, &frame, threads, secs)
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut m = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("not a MAC address: {s:?}");
    }
    for (b, p) in m.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("not a MAC address: {s:?}"))?;
    }
    Ok(m)
}

/// The namespace's UDP counters (/proc/net/snmp follows the reader's network namespace).
pub fn udp_snmp() -> Result<std::collections::BTreeMap<String, u64>> {
    let t = std::fs::read_to_string("/proc/net/snmp")?;
    let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("Udp:")).collect();
    let (Some(k), Some(v)) = (rows.first(), rows.get(1)) else { bail!("no Udp rows in /proc/net/snmp") };
    Ok(k.split_whitespace()
        .skip(1)
        .zip(v.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)))
        .map(|(a, b)| (a.to_string(), b))
        .collect())
}

/// `__udp-sink`: receives datagrams on `port` for `secs` (recvmmsg by 64, busy-polling);
/// returns how many.
pub fn sink(port: u16, secs: f64) -> Result<u64> {
    use std::os::fd::AsRawFd;
    const N: usize = 64;
    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).context("binding the sink")?;
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &(4 << 20)).context("SO_RCVBUF")?;
    let mut bufs = vec![[0u8; 64]; N];
    let mut iovs: Vec<libc::iovec> =
        bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: plain C struct; all-zero is valid.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut got = 0u64;
    while Instant::now() < end {
        // SAFETY: `msgs` points at `iovs` and `bufs`, all alive for the call.
        // Never sleeping: a reader that blocks costs the sender a cross-CPU wakeup (an IPI, a
        // VM exit here) per datagram or so, the same on every row, hiding the datapath's cost.
        let n = unsafe {
            libc::recvmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), N as u32, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if n > 0 {
            got += n as u64;
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_64_bytes_on_the_wire_with_valid_checksums() {
        let f = udp_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            "198.51.100.2:7000".parse().unwrap(),
            "198.51.100.1:15201".parse().unwrap(),
        );
        assert_eq!(f.len() + 4, 64);
        assert_eq!(csum_fold(sum16(&f[14..34])), 0, "IPv4 header checksum");
        let pseudo = sum16(&f[26..34]) + 17 + 26;
        assert_eq!(csum_fold(pseudo + sum16(&f[34..])), 0, "UDP checksum");
    }

    #[test]
    fn parse_mac_rejects_junk() {
        assert_eq!(parse_mac("02:00:00:00:00:0a").unwrap(), [2, 0, 0, 0, 0, 10]);
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("zz:00:00:00:00:00").is_err());
    }
}
