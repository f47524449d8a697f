//! `test_run` tests of the container program on hand-built packets: ordinary and malformed
//! traffic passes untouched. Each test runs in its own network namespace (entered by the
//! test's thread) with the maps pinned on a private bpffs, so nothing touches the machine.
//! (Per-endpoint traffic counters are the kernel's veth statistics: `bridge.rs` checks them
//! with real traffic.)

use netpath_common::prog_names::FROM_CONTAINER;
use netpath_tests::packet::Ipv4Packet;
use netpath_tests::testrun::{PrivateDatapath as Fixture, TC_ACT_OK};

/// No drop counted, no flow tracked: the program let the packets by without acting on them.
fn left_alone(f: &mut Fixture) {
    let c = f.dp().counters().unwrap();
    assert!(c.drops.values().all(|n| *n == 0), "{:?}", c.drops);
    assert!(f.dp().flows().unwrap().is_empty(), "{:?}", f.dp().flows());
}

#[test]
fn traffic_between_containers_passes_untouched() {
    let mut f = Fixture::new("pass");
    let udp = Ipv4Packet::udp("172.17.0.2", 4000, "172.17.0.3", 53, b"hello").build();
    let tcp = Ipv4Packet::tcp("172.17.0.2", 4001, "172.17.0.3", 80, b"").build();
    for pkt in [&udp, &tcp] {
        let (verdict, out) = f.run(FROM_CONTAINER, pkt);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(&out, pkt, "nothing to rewrite");
    }
    left_alone(&mut f);
}

#[test]
fn malformed_packets_pass_unchanged() {
    let mut f = Fixture::new("malformed");
    let good = Ipv4Packet::udp("10.0.0.1", 1, "10.0.0.2", 2, b"payload").build();
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43; // IHL 3 (< 5)
    let mut fragment = good.clone();
    fragment[20] = 0x20; // more fragments
    // The kernel's test_run refuses IPv4 frames shorter than an IPv4 header, so a header
    // cut short is exercised through the IHL instead: it claims more than the packet holds.
    let mut ihl_past_end = good[..14 + 20 + 4].to_vec();
    ihl_past_end[14] = 0x4f;
    let l4_truncated = good[..14 + 20 + 3].to_vec(); // UDP header cut short
    let mut options = good[..14 + 20].to_vec(); // IHL 6: four bytes of options before UDP
    options[14] = 0x46;
    options.extend_from_slice(&[1, 1, 1, 0]);
    options.extend_from_slice(&good[34..]);
    let mut runt = good[..14].to_vec(); // Ethernet header only, experimental ethertype
    runt[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    for pkt in [bad_ihl, fragment, ihl_past_end, l4_truncated, options, runt] {
        let (verdict, out) = f.run(FROM_CONTAINER, &pkt);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, pkt);
    }
    left_alone(&mut f);
}
