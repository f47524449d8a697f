//! A datapath of its own for `test_run` tests: the calling thread moves to a fresh network
//! namespace (so ifindex 1 is a loopback nobody else uses and links it adds are private) and
//! the maps are pinned on a private bpffs, unmounted on drop. Nothing touches the machine.

use std::path::PathBuf;

use aya::programs::{TestRun, TestRunOptions};
use netpath::datapath::{Datapath, LoadOptions};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
/// TC_ACT_UNSPEC (-1) as test_run reports it: tcx goes on to the next program (or the stack).
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
/// XDP verdicts (`enum xdp_action`).
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;
/// test_run attaches the packet to the namespace's loopback device when no ifindex is given.
pub const LO: u32 = 1;

pub struct PrivateDatapath {
    dp: Option<Datapath>,
    pins: PathBuf,
}

impl PrivateDatapath {
    /// `tag` names the pin directory; unique per test.
    pub fn new(tag: &str) -> Self {
        Self::with_options(tag, LoadOptions::default())
    }

    /// [`PrivateDatapath::new`] loading with `opts` (small tables, say).
    pub fn with_options(tag: &str, opts: LoadOptions) -> Self {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        sweep();
        let pins = std::env::temp_dir().join(format!("{PREFIX}{}-{tag}", std::process::id()));
        match Datapath::load_with(&pins, opts) {
            Ok(dp) => PrivateDatapath { dp: Some(dp), pins },
            Err(e) => {
                // The bpffs may be mounted already: a failed load must not leave it behind.
                unpin(&pins);
                panic!("loading datapath: {e:?}");
            }
        }
    }

    /// Drops this datapath (its pins stay, as when a daemon stops) and loads another on the
    /// same pins, as a restarted daemon does.
    pub fn reload(&mut self, opts: LoadOptions) {
        self.dp.take();
        self.dp = Some(Datapath::load_with(&self.pins, opts).unwrap_or_else(|e| panic!("reloading: {e:?}")));
    }

    /// The pin directory (a private bpffs).
    pub fn pins(&self) -> &std::path::Path {
        &self.pins
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().unwrap()
    }

    /// Runs program `prog` on `pkt` (on lo); returns (verdict, packet after the program).
    pub fn run(&mut self, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(None, prog, pkt)
    }

    /// [`Self::run`] with the packet on interface `ifindex` (one of this namespace's).
    pub fn run_on(&mut self, ifindex: Option<u32>, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        self.run_with(ifindex, 0, prog, pkt)
    }

    /// [`Self::run_on`] with the packet a GSO packet of `gso_size`-byte segments (0: not GSO).
    pub fn run_with(&mut self, ifindex: Option<u32>, gso_size: u32, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; pkt.len() + 256];
        // struct __sk_buff up to `ifindex` (offset 40), or up to `gso_size` (offset 176); the
        // kernel zero-fills the rest.
        let mut ctx = [0u8; 180];
        ctx[40..44].copy_from_slice(&ifindex.unwrap_or(0).to_ne_bytes());
        ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        let len = if gso_size != 0 { 180 } else { 44 };
        let ctx_in = (ifindex.is_some() || gso_size != 0).then_some(&ctx[..len]);
        let opts = TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ctx_in, ..Default::default() };
        let r = self.dp().classifier(prog).unwrap().test_run(opts).expect("test_run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }
}

impl PrivateDatapath {
    /// Runs XDP program `prog` on `pkt`, as received on the namespace's loopback (ifindex 1).
    pub fn run_xdp(&mut self, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; pkt.len() + 256];
        let opts = TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ..Default::default() };
        let r = self.dp().xdp(prog).unwrap().test_run(opts).expect("test_run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// What the uplink's ingress does to `pkt` with XDP on: uplink_xdp, then uplink_in for what
    /// it passes, which must be the packet unchanged. An XDP redirect or drop is returned as
    /// TC's, so a test of uplink_in asserts the same of both paths.
    pub fn run_uplink_with_xdp(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out) = self.run_xdp(netpath_common::prog_names::UPLINK_XDP, pkt);
        match verdict {
            XDP_PASS => {
                assert_eq!(out, pkt, "uplink_xdp must pass packets unchanged");
                self.run(netpath_common::prog_names::UPLINK_IN, pkt)
            }
            XDP_REDIRECT => (TC_ACT_REDIRECT, out),
            XDP_DROP => (TC_ACT_SHOT, out),
            v => panic!("uplink_xdp returned {v}"),
        }
    }
}

/// Adds a veth pair `name`/`name`p (both up, `name` with `mtu`) to the calling thread's
/// namespace; returns `name`'s ifindex. (`ip` runs as a child of this thread, in its namespace.)
pub fn add_veth(name: &str, mtu: u32) -> u32 {
    let peer = format!("{name}p");
    for args in [
        vec!["link", "add", name, "mtu", &mtu.to_string(), "type", "veth", "peer", "name", &peer],
        vec!["link", "set", name, "up"],
        vec!["link", "set", &peer, "up"],
    ] {
        let st = std::process::Command::new("ip").args(&args).status().expect("running ip");
        assert!(st.success(), "ip {args:?}");
    }
    nix::net::if_::if_nametoindex(name).expect("the veth exists")
}

impl Drop for PrivateDatapath {
    fn drop(&mut self) {
        self.dp.take();
        unpin(&self.pins);
    }
}

const PREFIX: &str = "netpath-testrun-";

/// Removes the pin directories of runs that were killed before they could clean up.
fn sweep() {
    for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            unpin(&e.path());
        }
    }
}

fn unpin(pins: &std::path::Path) {
    let _ = nix::mount::umount2(pins, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(pins);
}
