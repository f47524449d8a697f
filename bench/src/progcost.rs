//! What uplink_xdp and uplink_in cost on the flood's frame, the programs alone: BPF_PROG_RUN
//! repeating the frame (a UDP frame from outside to a container's closed address, which both
//! drop as `direct-access`) on a private datapath in a namespace of its own. No generator, no
//! veth: the per-program figure beside the flood's packet rates, and a way to compare two
//! builds of the programs (`--object`) under the same load.

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use netpath::datapath::LoadOptions;
use netpath_common::net_flags;
use netpath_common::prog_names::{UPLINK_IN, UPLINK_XDP};
use netpath_tests::packet::Ipv4Packet;
use netpath_tests::testrun::{LO, PrivateDatapath};
use netpath_tests::{CLIENT_IP, HOST_ETH0_IP};

use crate::variants::{CTR_IP, SUBNET};

/// Runs per measurement, and measurements (the median is reported).
const REPEAT: u32 = 2_000_000;
const ROUNDS: usize = 5;

fn ip(s: &str) -> std::net::Ipv4Addr {
    s.parse().expect("a literal address")
}

/// Returns the median ns per run of (uplink_xdp, uplink_in). Moves the calling thread to a
/// network namespace of its own (run it in a process of its own).
pub fn run(object: Option<&std::path::Path>) -> Result<(f64, f64)> {
    let object = object.map(std::fs::read).transpose().context("reading the eBPF object")?;
    let mut f = PrivateDatapath::with_options("bench-progcost", LoadOptions { object, ..Default::default() });
    let dp = f.dp();
    // As the xdp section's lab: the default `bridge` network and the bench's `nat` network
    // with the container, the host's addresses; the flood comes from the client's address.
    let (subnet, gw) = (SUBNET.parse::<ipnet::Ipv4Net>()?, ip("203.0.113.1"));
    dp.set_network("172.17.0.0/16".parse()?, 1, ip("172.17.0.1"), net_flags::MASQUERADE)?;
    dp.set_network(subnet, 2, gw, net_flags::MASQUERADE)?;
    dp.set_endpoint(ip(CTR_IP), LO, 2, [2, 0x42, 0xcb, 0, 0x71, 2], [2, 0x42, 0xcb, 0, 0x71, 1])?;
    dp.sync_host_addrs(&[ip(HOST_ETH0_IP), ip("172.17.0.1"), gw])?;
    dp.set_uplink_addr(LO, Some(ip(HOST_ETH0_IP)))?;
    dp.set_xdp_uplink(LO, Some([0; 6]))?;
    let frame = Ipv4Packet::udp(CLIENT_IP, 7000, CTR_IP, 9, &[0; 18]).build();
    let (mut xdp, mut tc) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        for (prog, out) in [(UPLINK_XDP, &mut xdp), (UPLINK_IN, &mut tc)] {
            let mut data_out = vec![0u8; frame.len() + 256];
            let opts = TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut data_out),
                repeat: REPEAT,
                ..Default::default()
            };
            let r = if prog == UPLINK_XDP {
                f.dp().xdp(prog)?.test_run(opts)
            } else {
                f.dp().classifier(prog)?.test_run(opts)
            }
            .with_context(|| format!("BPF_PROG_RUN of {prog}"))?;
            out.push(r.duration.as_nanos() as f64);
        }
    }
    let med = |v: &[f64]| crate::stats::median(v).unwrap_or(f64::NAN);
    Ok((med(&xdp), med(&tc)))
}
