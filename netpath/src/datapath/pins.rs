//! Where the datapath pins things under the daemon's `--bpffs` dir:
//!
//! ```text
//! <bpffs>/maps/<MAP>@v<rev>        a map, at its layout revision (netpath_common::layout)
//! <bpffs>/maps/<MAP>@v<rev>@new    a migration's new map until it is complete (removed on start)
//! <bpffs>/links/<ifname>@<prog>    a tcx link: from_container, uplink_in/uplink_out, vxlan_in, underlay_in
//! <bpffs>/links/cgroup@<prog>      a cgroup sock_addr link
//! <bpffs>/<MAP>                    revision 0: the unversioned map pins of earlier builds
//! ```
//!
//! bpffs refuses dots in names (reserved for its own files), hence `@`; a dot in an interface
//! name is written `%2e` (and `%` as `%25`). Links keep the programs attached while no daemon
//! runs; the next daemon adopts them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    pub fn make_dirs(&self) -> Result<()> {
        for d in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// A map's pin at layout revision `rev` (0: the unversioned pins of earlier builds).
    pub fn map(&self, name: &str, rev: u32) -> PathBuf {
        if rev == 0 { self.root.join(name) } else { self.maps_dir().join(format!("{name}@v{rev}")) }
    }

    /// Where a migration builds a map before it takes the final name.
    pub fn staging(&self, name: &str, rev: u32) -> PathBuf {
        self.maps_dir().join(format!("{name}@v{rev}@new"))
    }

    /// The revisions of `name` pinned under maps/ (staging pins excluded).
    pub fn pinned_revisions(&self, name: &str) -> Vec<u32> {
        let prefix = format!("{name}@v");
        let mut revs: Vec<u32> = std::fs::read_dir(self.maps_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok())
            .collect();
        revs.sort();
        revs
    }

    /// Name of a link pin (under links/): the interface (or `cgroup`) and the program.
    pub fn link_name(target: &str, prog: &str) -> String {
        format!("{}@{prog}", target.replace('%', "%25").replace('.', "%2e"))
    }

    /// The (target, program) a link pin name stands for.
    pub fn parse_link_name(name: &str) -> Option<(String, &str)> {
        let (target, prog) = name.rsplit_once('@')?;
        Some((target.replace("%2e", ".").replace("%25", "%"), prog))
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.links_dir().join(name)
    }
}

/// The pin of map `name` at this build's layout revision under `bpffs` (for tools and tests).
/// Its name carries no dot: bpffs reserves them.
pub fn map_pin(bpffs: &Path, name: &str) -> PathBuf {
    let rev = netpath_common::layout::current(name).map_or(0, |l| l.rev);
    Pins::new(bpffs).map(name, rev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_carry_no_dots_and_read_back() {
        for ifname in ["eth0", "eth0.100", "a%2eb", "veth1234abcd"] {
            let n = Pins::link_name(ifname, "uplink_in");
            assert!(!n.contains('.'), "{n}");
            assert_eq!(Pins::parse_link_name(&n), Some((ifname.to_string(), "uplink_in")));
        }
    }

    #[test]
    fn map_pins_are_versioned_without_dots() {
        let p = Pins::new(Path::new("/sys/fs/bpf/netpath"));
        assert_eq!(p.map("CT", 1), Path::new("/sys/fs/bpf/netpath/maps/CT@v1"));
        assert_eq!(p.map("CT", 0), Path::new("/sys/fs/bpf/netpath/CT"));
        assert_eq!(p.staging("CT", 2), Path::new("/sys/fs/bpf/netpath/maps/CT@v2@new"));
    }
}
