//! Program attachments as pinned bpf links, so the datapath keeps running while no daemon
//! does. A starting daemon adopts the pins it finds: each link gets the new program by an
//! atomic link update (packets see the old or the new program, never none); pins whose
//! interface is gone or was replaced by another of the same name are removed. Attachments
//! the daemon then asks for are claimed (or made); the rest are released once it has
//! reconciled. The pins hold the links: no descriptor stays open per link (a host with
//! thousands of containers would otherwise need thousands).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use aya::Ebpf;
use aya_obj::generated::bpf_attach_type;
use netpath_common::prog_names;
use tracing::{info, warn};

use super::pins::Pins;
use super::sys::{self, AttachTo, LinkTarget};

/// tcx: attach ahead of the interface's other programs (no anchor given: first of all).
const BPF_F_BEFORE: u32 = 1 << 3;

/// The attach type of each program we attach (tcx direction, or cgroup hook). A link pin of
/// any other program (`to_container` of builds that counted traffic in eBPF, say) is
/// detached when a daemon adopts the pins.
fn attach_type(prog: &str) -> Option<u32> {
    use bpf_attach_type::*;
    let t = match prog {
        prog_names::FROM_CONTAINER | prog_names::UPLINK_IN | prog_names::VXLAN_IN | prog_names::UNDERLAY_IN => {
            BPF_TCX_INGRESS
        }
        prog_names::UPLINK_OUT | prog_names::OVERLAY_BRIDGE_OUT => BPF_TCX_EGRESS,
        prog_names::SOCK_CONNECT4 => BPF_CGROUP_INET4_CONNECT,
        prog_names::SOCK_SENDMSG4 => BPF_CGROUP_UDP4_SENDMSG,
        prog_names::SOCK_RECVMSG4 => BPF_CGROUP_UDP4_RECVMSG,
        prog_names::SOCK_GETPEERNAME4 => BPF_CGROUP_INET4_GETPEERNAME,
        prog_names::UPLINK_XDP => BPF_XDP,
        _ => return None,
    };
    Some(t as u32)
}

/// The target part of cgroup link pin names.
const CGROUP: &str = "cgroup";

/// How an XDP program runs on an interface: in its driver, or (for any device) in the stack
/// once the socket buffer is built (generic XDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    Native,
    Generic,
}

impl XdpMode {
    const ALL: [XdpMode; 2] = [XdpMode::Native, XdpMode::Generic];

    pub fn name(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }

    /// XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE.
    fn flags(self) -> u32 {
        match self {
            XdpMode::Native => 1 << 2,
            XdpMode::Generic => 1 << 1,
        }
    }

    /// The program part of an XDP link's pin name: the kernel does not say which mode a link
    /// runs in, so the pin does (a daemon started with another mode replaces the link).
    fn pin_prog(self, prog: &str) -> String {
        format!("{prog}-{}", self.name())
    }

    /// Splits an XDP pin's program part into the program and its mode.
    fn parse_pin_prog(pin_prog: &str) -> Option<(&str, XdpMode)> {
        let (prog, mode) = pin_prog.rsplit_once('-')?;
        Some((prog, XdpMode::ALL.into_iter().find(|m| m.name() == mode)?))
    }
}

struct Held {
    prog: String,
    target: LinkTarget,
    /// Asked for since this daemon started (adopted links start unclaimed).
    claimed: bool,
    /// An XDP link's mode.
    xdp: Option<XdpMode>,
}

pub struct Links {
    pins: Pins,
    held: HashMap<String, Held>,
    /// The loaded programs' descriptors (duplicated from the object), so links can be made
    /// without the object, and without the lock its maps are behind.
    progs: HashMap<String, OwnedFd>,
}

/// The links of a datapath, shared: a link change waits out an RCU grace period under the
/// kernel's RTNL lock, so it happens without holding this (or the maps') lock.
pub type SharedLinks = std::sync::Arc<std::sync::Mutex<Links>>;

fn prog_fd<'a>(ebpf: &'a Ebpf, prog: &str) -> Result<std::os::fd::BorrowedFd<'a>> {
    let p = ebpf.program(prog).with_context(|| format!("program {prog} missing from the eBPF object"))?;
    Ok(p.fd().with_context(|| format!("program {prog} is not loaded"))?.as_fd())
}

fn lock(l: &SharedLinks) -> std::sync::MutexGuard<'_, Links> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// Attaches `prog` to interface `ifname` (`ifindex`) unless an adopted link is there already
/// (then claims it). The link is made and pinned without holding the lock. Returns true if
/// it made a new link.
pub fn attach_tcx(links: &SharedLinks, ifname: &str, ifindex: u32, prog: &str) -> Result<bool> {
    let name = Pins::link_name(ifname, prog);
    let (fd, t, path) = {
        let mut l = lock(links);
        if let Some(h) = l.held.get_mut(&name) {
            if matches!(h.target, LinkTarget::Tcx { ifindex: i, .. } if i == ifindex) {
                h.claimed = true;
                return Ok(false);
            }
            // The interface was replaced since: the old link goes with it.
            l.detach(&name);
        }
        let t = attach_type(prog).context("not a tcx program")?;
        let fd = l.progs.get(prog).with_context(|| format!("program {prog} is not loaded"))?.try_clone()?;
        (fd, t, l.pins.link(&name))
    };
    // underlay_in goes ahead of the interface's other programs (uplink_in, when the underlay
    // is an uplink too): it hands on what is not its own, and uplink_in would pass VXLAN to
    // the stack, ending the chain before it.
    let flags = if prog == prog_names::UNDERLAY_IN { BPF_F_BEFORE } else { 0 };
    let link = sys::link_create_flags(fd.as_fd(), AttachTo::Ifindex(ifindex), t, flags)
        .with_context(|| format!("attaching {prog} to {ifname}"))?;
    // A pin we hold no link for (removed from under us, say) would refuse the new one.
    let _ = std::fs::remove_file(&path);
    sys::obj_pin(link.as_fd(), &path).with_context(|| format!("pinning link {}", path.display()))?;
    let target = LinkTarget::Tcx { ifindex, attach_type: t };
    lock(links).held.insert(name, Held { prog: prog.to_string(), target, claimed: true, xdp: None });
    Ok(true)
}

/// Attaches XDP program `prog` to interface `ifname` (`ifindex`) in `mode` unless an adopted
/// link in that mode is there already (then claims it). A link in the other mode goes first:
/// an interface runs one XDP program. Returns true if it made a new link.
pub fn attach_xdp(links: &SharedLinks, ifname: &str, ifindex: u32, prog: &str, mode: XdpMode) -> Result<bool> {
    let name = Pins::link_name(ifname, &mode.pin_prog(prog));
    let (fd, path) = {
        let mut l = lock(links);
        if let Some(h) = l.held.get_mut(&name) {
            if h.target == (LinkTarget::Xdp { ifindex }) {
                h.claimed = true;
                return Ok(false);
            }
            l.detach(&name);
        }
        for other in XdpMode::ALL.into_iter().filter(|m| *m != mode) {
            let other = Pins::link_name(ifname, &other.pin_prog(prog));
            if l.held.contains_key(&other) {
                info!("link {other}: XDP mode changes to {}; replacing it", mode.name());
                l.detach(&other);
            }
        }
        let fd = l.progs.get(prog).with_context(|| format!("program {prog} is not loaded"))?.try_clone()?;
        (fd, l.pins.link(&name))
    };
    let t = attach_type(prog).context("not an XDP program")?;
    let link = sys::link_create_flags(fd.as_fd(), AttachTo::Ifindex(ifindex), t, mode.flags())
        .with_context(|| format!("attaching {prog} to {ifname} in {} mode", mode.name()))?;
    let _ = std::fs::remove_file(&path);
    sys::obj_pin(link.as_fd(), &path).with_context(|| format!("pinning link {}", path.display()))?;
    let target = LinkTarget::Xdp { ifindex };
    lock(links).held.insert(name, Held { prog: prog.to_string(), target, claimed: true, xdp: Some(mode) });
    Ok(true)
}

/// Removes the pins of links whose interface went away behind the daemon's back (the kernel
/// keeps such a link, defunct, for as long as it is pinned). The check reads each link's info
/// without holding the lock, so attaching is never held up by it. Returns how many went.
pub fn prune_defunct(links: &SharedLinks) -> usize {
    let candidates = lock(links).tcx_pins();
    let defunct: Vec<String> = candidates
        .into_iter()
        .filter(|(_, path)| {
            let info = sys::obj_get(path).and_then(|fd| sys::link_info(fd.as_fd()));
            matches!(info, Ok(i) if i.target.ifindex() == Some(0))
        })
        .map(|(n, _)| n)
        .collect();
    let mut l = lock(links);
    for n in &defunct {
        l.detach(n);
    }
    defunct.len()
}

/// Removes link pins taken out of the table: without detaching first (`detach` false) for an
/// interface already deleted, whose links the kernel has made defunct, so releasing them
/// costs nothing; with a detach otherwise.
pub fn drop_pins(paths: &[std::path::PathBuf], detach: bool) {
    for p in paths {
        if detach && let Ok(fd) = sys::obj_get(p) {
            let _ = sys::link_detach(fd.as_fd());
        }
        let _ = std::fs::remove_file(p);
    }
}

/// Detaches the links of programs this build does not have (`to_container`, which builds that
/// counted traffic in eBPF put on every container veth) and removes their pins, on a thread of
/// its own: each detach waits out an RCU grace period under the RTNL lock, so on a host with
/// a thousand containers doing it on the load path would hold the daemon's start up for
/// seconds. The links run until then, as they did while no daemon ran.
fn detach_in_background(pins: &Pins, names: Vec<String>) {
    if names.is_empty() {
        return;
    }
    let mut progs: Vec<&str> = names.iter().filter_map(|n| Some(Pins::parse_link_name(n)?.1)).collect();
    progs.sort();
    progs.dedup();
    info!(
        "detaching {} links of programs this build does not have ({}) in the background",
        names.len(),
        progs.join(", ")
    );
    let paths: Vec<std::path::PathBuf> = names.iter().map(|n| pins.link(n)).collect();
    std::thread::spawn(move || {
        let t = std::time::Instant::now();
        drop_pins(&paths, true);
        info!("detached {} links of programs this build does not have in {:.1?}", paths.len(), t.elapsed());
    });
}

/// The cgroup id of a cgroup2 directory (its inode number).
fn cgroup_id(dir: &Path) -> Result<u64> {
    Ok(std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?.ino())
}

impl Links {
    pub fn new(pins: Pins, ebpf: &Ebpf) -> Result<Self> {
        let mut progs = HashMap::new();
        for (name, _) in ebpf.programs() {
            if attach_type(name).is_some() {
                progs.insert(name.to_string(), prog_fd(ebpf, name)?.try_clone_to_owned()?);
            }
        }
        Ok(Self { pins, held: HashMap::new(), progs })
    }

    /// Adopts every link pin: moves it to this object's program, or removes it where its
    /// target is gone. Returns how many links now run the new programs.
    pub fn adopt(&mut self) -> Result<usize> {
        let mut adopted = 0;
        let dir = self.pins.links_dir();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut retired = vec![];
        for name in names {
            match self.adopt_one(&name, &mut retired) {
                Ok(true) => adopted += 1,
                Ok(false) => {}
                Err(e) => {
                    warn!("link {name}: {e:#}; detaching it");
                    self.detach(&name);
                }
            }
        }
        detach_in_background(&self.pins, retired);
        Ok(adopted)
    }

    /// Adopts one pin (true), or removes it; the pins of programs this build does not have go
    /// to `retired`.
    fn adopt_one(&mut self, name: &str, retired: &mut Vec<String>) -> Result<bool> {
        let path = self.pins.link(name);
        // Removing the pin alone would leave the link attached for as long as anything else
        // holds it: these are detached.
        let Some((target, pin_prog)) = Pins::parse_link_name(name) else {
            info!("detaching and removing unknown pin {}", path.display());
            self.detach(name);
            return Ok(false);
        };
        let (prog, xdp) = match XdpMode::parse_pin_prog(pin_prog) {
            Some((prog, mode)) => (prog, Some(mode)),
            None => (pin_prog, None),
        };
        let Some(want_type) = attach_type(prog) else {
            retired.push(name.to_string());
            return Ok(false);
        };
        let fd = sys::obj_get(&path).with_context(|| format!("opening {}", path.display()))?;
        let li = sys::link_info(fd.as_fd()).context("reading link info")?;
        let current = match li.target {
            LinkTarget::Tcx { ifindex, attach_type } if attach_type == want_type && target != CGROUP => {
                self.still_there(name, &target, ifindex, fd.as_fd())
            }
            LinkTarget::Xdp { ifindex } if xdp.is_some() && target != CGROUP => {
                self.still_there(name, &target, ifindex, fd.as_fd())
            }
            LinkTarget::Cgroup { attach_type, .. } if attach_type == want_type && target == CGROUP => true,
            t => anyhow::bail!("unexpected link target {t:?}"),
        };
        if !current {
            return Ok(false);
        }
        let new = self.progs.get(prog).with_context(|| format!("program {prog} is not loaded"))?;
        sys::link_update(fd.as_fd(), new.as_fd()).context("replacing the link's program")?;
        self.held.insert(name.to_string(), Held { prog: prog.to_string(), target: li.target, claimed: false, xdp });
        Ok(true)
    }

    /// False, with link `name` (pin and attachment) removed, if its interface `target` is gone
    /// or was replaced by another of the same name.
    ///
    /// One lookup by name per link, not one dump of every interface: a dump of the host's links
    /// fills in each veth's peer namespace id, found by a walk over every namespace id the host
    /// has given out, so with 10,000 containers one dump cost the kernel about a second.
    fn still_there(&self, name: &str, target: &str, ifindex: u32, fd: std::os::fd::BorrowedFd<'_>) -> bool {
        let now = nix::net::if_::if_nametoindex(target).unwrap_or(0);
        if ifindex == 0 || now != ifindex {
            info!(
                "link {name}: interface {target} is gone or was replaced (link on ifindex {ifindex}, now {now}); removing it"
            );
            let _ = sys::link_detach(fd);
            self.remove_pin(name);
            return false;
        }
        true
    }

    /// Makes sure socket program `prog` is attached to the cgroup2 directory `cgroup`.
    pub fn attach_cgroup(&mut self, cgroup: &Path, prog: &str) -> Result<()> {
        let name = Pins::link_name(CGROUP, prog);
        let id = cgroup_id(cgroup)?;
        if let Some(h) = self.held.get_mut(&name) {
            if matches!(h.target, LinkTarget::Cgroup { cgroup_id, .. } if cgroup_id == id) {
                h.claimed = true;
                return Ok(());
            }
            self.detach(&name);
        }
        let t = attach_type(prog).context("not a cgroup program")?;
        let dir = std::fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        // A bpf_link always coexists with other programs on the cgroup (no ALLOW_MULTI flag).
        let prog_fd = self.progs.get(prog).with_context(|| format!("program {prog} is not loaded"))?;
        let fd = sys::link_create(prog_fd.as_fd(), AttachTo::Cgroup(dir.as_fd()), t)
            .with_context(|| format!("attaching {prog} to {}", cgroup.display()))?;
        self.pin(&name, fd, prog, LinkTarget::Cgroup { cgroup_id: id, attach_type: t })
    }

    fn pin(&mut self, name: &str, fd: OwnedFd, prog: &str, target: LinkTarget) -> Result<()> {
        let path = self.pins.link(name);
        // A pin we hold no link for (removed from under us, say) would refuse the new one.
        let _ = std::fs::remove_file(&path);
        // Closing the only descriptor of an unpinned link detaches it.
        sys::obj_pin(fd.as_fd(), &path).with_context(|| format!("pinning link {}", path.display()))?;
        self.held.insert(name.to_string(), Held { prog: prog.to_string(), target, claimed: true, xdp: None });
        Ok(())
    }

    fn remove_pin(&self, name: &str) {
        let _ = std::fs::remove_file(self.pins.link(name));
    }

    /// Detaches one link now (whoever else holds it) and removes its pin.
    pub fn detach(&mut self, name: &str) {
        self.held.remove(name);
        if let Ok(fd) = sys::obj_get(&self.pins.link(name)) {
            // Fails with ENOLINK once its interface is gone: already detached then.
            let _ = sys::link_detach(fd.as_fd());
        }
        self.remove_pin(name);
    }

    /// Takes the links of `progs` on interface `ifindex` out of the table (however they were
    /// named) and returns their pins, for [`drop_pins`] once the lock is released.
    pub fn take_ifindex(&mut self, ifindex: u32, progs: &[&str]) -> Vec<std::path::PathBuf> {
        let doomed: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| progs.contains(&h.prog.as_str()))
            .filter(|(_, h)| h.target.ifindex() == Some(ifindex))
            .map(|(n, _)| n.clone())
            .collect();
        doomed
            .into_iter()
            .map(|n| {
                self.held.remove(&n);
                self.pins.link(&n)
            })
            .collect()
    }

    /// Whether the object has program `prog` (loaded, attachable).
    pub fn has_prog(&self, prog: &str) -> bool {
        self.progs.contains_key(prog)
    }

    /// The ifindexes `prog` is attached to (claimed or not).
    pub fn ifindexes(&self, prog: &str) -> Vec<u32> {
        self.held.values().filter(|h| h.prog == prog).filter_map(|h| h.target.ifindex()).collect()
    }

    /// The interfaces XDP program `prog` runs on, by name, with its mode.
    pub fn xdp_links(&self, prog: &str) -> Vec<(String, XdpMode)> {
        self.held
            .iter()
            .filter(|(_, h)| h.prog == prog)
            .filter_map(|(n, h)| Some((Pins::parse_link_name(n)?.0, h.xdp?)))
            .collect()
    }

    /// The mode of `prog`'s XDP link on `ifindex`, if it has one.
    pub fn xdp_mode(&self, ifindex: u32, prog: &str) -> Option<XdpMode> {
        self.held.values().find(|h| h.prog == prog && h.target.ifindex() == Some(ifindex)).and_then(|h| h.xdp)
    }

    /// The tcx links held, by name and pin: what [`prune_defunct`] checks.
    fn tcx_pins(&self) -> Vec<(String, std::path::PathBuf)> {
        self.held
            .iter()
            .filter(|(_, h)| h.target.ifindex().is_some())
            .map(|(n, _)| (n.clone(), self.pins.link(n)))
            .collect()
    }

    /// Detaches adopted links nobody claimed: attachments of a former state.
    pub fn release_unclaimed(&mut self) -> usize {
        let doomed: Vec<String> = self.held.iter().filter(|(_, h)| !h.claimed).map(|(n, _)| n.clone()).collect();
        for n in &doomed {
            info!("link {n}: not claimed by this daemon's state; detaching it");
            self.detach(n);
        }
        doomed.len()
    }

    /// Detaches every link and removes every link pin (the datapath stops).
    pub fn detach_all(&mut self) {
        self.held.clear();
        for e in std::fs::read_dir(self.pins.links_dir()).into_iter().flatten().flatten() {
            if let Ok(fd) = sys::obj_get(&e.path()) {
                let _ = sys::link_detach(fd.as_fd());
            }
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_link_pins_name_their_mode_and_read_back() {
        for mode in XdpMode::ALL {
            let name = Pins::link_name("eth0.100", &mode.pin_prog(prog_names::UPLINK_XDP));
            let (target, pin_prog) = Pins::parse_link_name(&name).unwrap();
            assert_eq!(target, "eth0.100");
            assert_eq!(XdpMode::parse_pin_prog(pin_prog), Some((prog_names::UPLINK_XDP, mode)));
            assert_eq!(attach_type(prog_names::UPLINK_XDP), Some(bpf_attach_type::BPF_XDP as u32));
        }
        // tcx pins carry no mode: their program name is whole.
        assert_eq!(XdpMode::parse_pin_prog(prog_names::UPLINK_IN), None);
        assert_eq!(XdpMode::parse_pin_prog("uplink_xdp-turbo"), None);
    }
}
