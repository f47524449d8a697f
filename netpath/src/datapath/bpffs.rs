//! Making sure the pin directory lives on a bpf filesystem.

use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::{MsFlags, mount};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Ensures `dir` is on a bpffs. If its parent is a bpffs (the usual `/sys/fs/bpf/netpath`),
/// `dir` is just created there; otherwise a bpffs instance is mounted on `dir` itself, which
/// keeps a test daemon's pins private and lets them vanish with a single unmount.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    if dir.exists() && is_bpffs(dir) {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if parent == Path::new("/sys/fs/bpf") && !is_bpffs(parent) {
            // The conventional mount point exists but nothing is mounted: do what systemd does.
            mount(Some("bpf"), parent, Some("bpf"), MsFlags::empty(), Some("mode=0700"))
                .context("mounting bpffs on /sys/fs/bpf")?;
        }
        if is_bpffs(parent) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            return Ok(());
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    mount(Some("bpf"), dir, Some("bpf"), MsFlags::empty(), Some("mode=0700"))
        .with_context(|| format!("mounting bpffs on {}", dir.display()))
}
