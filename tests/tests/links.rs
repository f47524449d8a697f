//! Program attachments as pinned links, at the datapath level in a private namespace: a
//! reload (what a restarted daemon does) adopts them without attaching twice and gives them
//! the new programs; pins of interfaces that are gone or were replaced are removed, links of
//! programs the build does not have (an older build's `to_container`) detached; what the new
//! state does not claim is released; detach_all leaves nothing attached.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use std::time::{Duration, Instant};

use aya::programs::links::{FdLink, LinkOrder};
use aya::programs::{SchedClassifier, TcAttachType, tc::TcAttachOptions};
use netpath::datapath::LoadOptions;
use netpath_tests::testrun::{PrivateDatapath, add_veth};

/// (program name, program id) of what tcx runs on `ifname` in direction `dir`.
fn attached(ifname: &str, dir: TcAttachType) -> Vec<(String, u32)> {
    let (_, progs) = SchedClassifier::query_tcx(ifname, dir).unwrap_or_else(|e| panic!("query {ifname}: {e}"));
    progs.iter().map(|p| (p.name_as_str().unwrap_or("?").to_string(), p.id())).collect()
}

fn link_pins(p: &PrivateDatapath) -> BTreeSet<String> {
    std::fs::read_dir(p.pins().join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

const UP_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

#[test]
fn a_reload_adopts_links_and_gives_them_the_new_programs() {
    let mut p = PrivateDatapath::new("links-adopt");
    let x1 = add_veth("x1", 1500);
    let up = add_veth("up0", 1500);
    p.dp().attach_endpoint("x1", x1).unwrap();
    p.dp().attach_uplink("up0", up, Some(UP_ADDR), None).unwrap();
    let before = attached("x1", TcAttachType::Ingress);
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].0, "from_container");
    assert_eq!(link_pins(&p), set(&["x1@from_container", "up0@uplink_in", "up0@uplink_out"]));

    p.reload(LoadOptions::default());
    // Still attached once, now running the program this load verified.
    let after = attached("x1", TcAttachType::Ingress);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].0, "from_container");
    assert_ne!(after[0].1, before[0].1, "the link runs the new program");
    // Asking again claims the adopted link rather than attaching more; nothing runs on the
    // way into the container.
    p.dp().attach_endpoint("x1", x1).unwrap();
    assert_eq!(attached("x1", TcAttachType::Ingress).len(), 1);
    assert!(attached("x1", TcAttachType::Egress).is_empty());
    // The uplink nobody asked for this time is released.
    p.dp().release_unclaimed();
    assert!(attached("up0", TcAttachType::Ingress).is_empty());
    assert!(attached("up0", TcAttachType::Egress).is_empty());
    assert_eq!(link_pins(&p), set(&["x1@from_container"]));
    assert_eq!(attached("x1", TcAttachType::Ingress).len(), 1, "claimed links stay");
    // Detaching the endpoint removes its link and pin.
    p.dp().detach_endpoint(x1);
    assert!(attached("x1", TcAttachType::Ingress).is_empty());
    assert!(link_pins(&p).is_empty());
}

/// A tcx link on `ifname` in direction `dir` running `prog` of this datapath, pinned as
/// `links/<pin>` the way a daemon pins its links; the returned handle is closed.
fn pin_link(p: &mut PrivateDatapath, prog: &str, ifname: &str, dir: TcAttachType, pin: &str) {
    let path = p.pins().join("links").join(pin);
    let c = p.dp().classifier(prog).unwrap();
    let id = c.attach_with_options(ifname, dir, TcAttachOptions::TcxOrder(LinkOrder::default())).unwrap();
    let link = FdLink::try_from(c.take_link(id).unwrap()).unwrap();
    link.pin(&path).unwrap_or_else(|e| panic!("pinning {}: {e}", path.display()));
}

/// Polls (up to 10 s) until `done` holds.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_reload_detaches_links_of_programs_the_build_does_not_have() {
    let mut p = PrivateDatapath::new("links-retired");
    let x1 = add_veth("x1", 1500);
    p.dp().attach_endpoint("x1", x1).unwrap();
    // What a build that counted traffic in eBPF left on the egress of every container veth:
    // a pinned `to_container` link (played here by a program of this build). And a link
    // pinned under a name no build used.
    pin_link(&mut p, "from_container", "x1", TcAttachType::Egress, "x1@to_container");
    pin_link(&mut p, "uplink_out", "x1", TcAttachType::Egress, "x1@no_such_program");
    assert_eq!(attached("x1", TcAttachType::Egress).len(), 2);

    p.reload(LoadOptions::default());
    // Detached off the load path (each detach waits out a grace period), pins and all.
    eventually("the links of unknown programs are detached", || attached("x1", TcAttachType::Egress).is_empty());
    eventually("their pins are removed", || link_pins(&p) == set(&["x1@from_container"]));
    // The container's own link was adopted, not disturbed.
    p.dp().attach_endpoint("x1", x1).unwrap();
    let ingress = attached("x1", TcAttachType::Ingress);
    assert_eq!(ingress.len(), 1, "{ingress:?}");
    assert_eq!(ingress[0].0, "from_container");
}

fn ip(args: &str) {
    let st = std::process::Command::new("ip").args(args.split(' ')).status().unwrap();
    assert!(st.success(), "ip {args}");
}

#[test]
fn pins_of_interfaces_gone_or_replaced_are_removed_on_load() {
    let mut p = PrivateDatapath::new("links-stale");
    let x1 = add_veth("x1", 1500);
    let x2 = add_veth("x2", 1500);
    p.dp().attach_endpoint("x1", x1).unwrap();
    p.dp().attach_endpoint("x2", x2).unwrap();
    assert_eq!(link_pins(&p).len(), 2);
    // While no datapath runs: x2 goes away, x1 is replaced by another interface of that name.
    p.reload(LoadOptions::default());
    ip("link del x2");
    ip("link del x1");
    let x1_new = add_veth("x1", 1500);
    assert_ne!(x1_new, x1);
    p.reload(LoadOptions::default());
    assert!(link_pins(&p).is_empty(), "{:?}", link_pins(&p));
    assert!(attached("x1", TcAttachType::Ingress).is_empty(), "the new x1 got nothing it did not ask for");
    // Wiring the new x1 attaches afresh.
    p.dp().attach_endpoint("x1", x1_new).unwrap();
    assert_eq!(attached("x1", TcAttachType::Ingress).len(), 1);
}

#[test]
fn pruning_removes_the_pins_of_an_interface_deleted_under_the_daemon() {
    let mut p = PrivateDatapath::new("links-defunct");
    let x1 = add_veth("x1", 1500);
    let x2 = add_veth("x2", 1500);
    p.dp().attach_endpoint("x1", x1).unwrap();
    p.dp().attach_endpoint("x2", x2).unwrap();
    ip("link del x1");
    // The daemon's housekeeping does this once a minute.
    netpath::datapath::EndpointLinks::new(p.dp()).prune_defunct();
    assert_eq!(link_pins(&p), set(&["x2@from_container"]));
    assert_eq!(attached("x2", TcAttachType::Ingress).len(), 1);
}

#[test]
fn detach_all_leaves_nothing_attached_or_pinned() {
    let mut p = PrivateDatapath::new("links-all");
    let x1 = add_veth("x1", 1500);
    let up = add_veth("up0", 1500);
    p.dp().attach_endpoint("x1", x1).unwrap();
    p.dp().attach_uplink("up0", up, Some(UP_ADDR), None).unwrap();
    p.dp().detach_all();
    for ifname in ["x1", "up0"] {
        for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
            assert!(attached(ifname, dir).is_empty(), "{ifname} {dir:?}");
        }
    }
    assert!(link_pins(&p).is_empty());
    p.dp().unpin_maps().unwrap();
    assert_eq!(std::fs::read_dir(p.pins().join("maps")).unwrap().count(), 0);
}
