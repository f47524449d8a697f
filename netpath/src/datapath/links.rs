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

/// The attach type of each program we attach (tcx direction, or cgroup hook). A link pin of
/// any other program (`to_container` of builds that counted traffic in eBPF, say) is
/// detached when a daemon adopts the pins.
fn attach_type(prog: &str) -> Option<u32> {
    use bpf_attach_type::*;
    let t = match prog {
        prog_names::FROM_CONTAINER | prog_names::UPLINK_IN | prog_names::VXLAN_IN => BPF_TCX_INGRESS,
        prog_names::UPLINK_OUT => BPF_TCX_EGRESS,
        prog_names::SOCK_CONNECT4 => BPF_CGROUP_INET4_CONNECT,
        prog_names::SOCK_SENDMSG4 => BPF_CGROUP_UDP4_SENDMSG,
        prog_names::SOCK_RECVMSG4 => BPF_CGROUP_UDP4_RECVMSG,
        prog_names::SOCK_GETPEERNAME4 => BPF_CGROUP_INET4_GETPEERNAME,
        _ => return None,
    };
    Some(t as u32)
}

/// The target part of cgroup link pin names.
const CGROUP: &str = "cgroup";

struct Held {
    prog: String,
    target: LinkTarget,
    /// Asked for since this daemon started (adopted links start unclaimed).
    claimed: bool,
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
    let link = sys::link_create(fd.as_fd(), AttachTo::Ifindex(ifindex), t)
        .with_context(|| format!("attaching {prog} to {ifname}"))?;
    // A pin we hold no link for (removed from under us, say) would refuse the new one.
    let _ = std::fs::remove_file(&path);
    sys::obj_pin(link.as_fd(), &path).with_context(|| format!("pinning link {}", path.display()))?;
    let target = LinkTarget::Tcx { ifindex, attach_type: t };
    lock(links).held.insert(name, Held { prog: prog.to_string(), target, claimed: true });
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
            matches!(info, Ok(i) if matches!(i.target, LinkTarget::Tcx { ifindex: 0, .. }))
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
        let Some((target, prog)) = Pins::parse_link_name(name) else {
            info!("detaching and removing unknown pin {}", path.display());
            self.detach(name);
            return Ok(false);
        };
        let Some(want_type) = attach_type(prog) else {
            retired.push(name.to_string());
            return Ok(false);
        };
        let fd = sys::obj_get(&path).with_context(|| format!("opening {}", path.display()))?;
        let li = sys::link_info(fd.as_fd()).context("reading link info")?;
        match li.target {
            LinkTarget::Tcx { ifindex, attach_type } if attach_type == want_type && target != CGROUP => {
                let now = nix::net::if_::if_nametoindex(target.as_str()).unwrap_or(0);
                if ifindex == 0 || now != ifindex {
                    info!(
                        "link {name}: interface {target} is gone or was replaced (link on ifindex {ifindex}, now {now}); removing it"
                    );
                    let _ = sys::link_detach(fd.as_fd());
                    self.remove_pin(name);
                    return Ok(false);
                }
            }
            LinkTarget::Cgroup { attach_type, .. } if attach_type == want_type && target == CGROUP => {}
            t => anyhow::bail!("unexpected link target {t:?}"),
        }
        let new = self.progs.get(prog).with_context(|| format!("program {prog} is not loaded"))?;
        sys::link_update(fd.as_fd(), new.as_fd()).context("replacing the link's program")?;
        self.held.insert(name.to_string(), Held { prog: prog.to_string(), target: li.target, claimed: false });
        Ok(true)
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
        self.held.insert(name.to_string(), Held { prog: prog.to_string(), target, claimed: true });
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
            .filter(|(_, h)| matches!(h.target, LinkTarget::Tcx { ifindex: i, .. } if i == ifindex))
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

    /// The ifindexes `prog` is attached to (claimed or not).
    pub fn ifindexes(&self, prog: &str) -> Vec<u32> {
        self.held
            .values()
            .filter(|h| h.prog == prog)
            .filter_map(|h| match h.target {
                LinkTarget::Tcx { ifindex, .. } => Some(ifindex),
                _ => None,
            })
            .collect()
    }

    /// The tcx links held, by name and pin: what [`prune_defunct`] checks.
    fn tcx_pins(&self) -> Vec<(String, std::path::PathBuf)> {
        self.held
            .iter()
            .filter(|(_, h)| matches!(h.target, LinkTarget::Tcx { .. }))
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
