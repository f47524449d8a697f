//! Network namespaces as files: made by unshare on a throwaway thread and kept alive by a bind
//! mount under the daemon's state dir, so each daemon owns its own (no global /run/netns names).

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering netns {}", path.display()))
}

/// Creates a new, empty network namespace pinned at `path`.
pub fn create(path: &Path) -> Result<()> {
    File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let p = path.to_owned();
    let res = std::thread::spawn(move || -> Result<()> {
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
        mount(Some("/proc/thread-self/ns/net"), &p, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("bind-mounting netns at {}", p.display()))
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))?;
    if res.is_err() {
        let _ = std::fs::remove_file(path);
    }
    res
}

/// True when `path` is a mounted network namespace (not just the empty mount-point file).
pub fn is_mounted(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
}

/// Unpins and removes a namespace made by [`create`]. The namespace itself lives on while a
/// process is still inside it. Missing files are fine.
pub fn remove(path: &Path) -> Result<()> {
    if is_mounted(path) {
        umount2(path, MntFlags::MNT_DETACH).with_context(|| format!("unmounting {}", path.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Inode of a namespace file: equal inodes mean the same namespace.
pub fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14+): how BPF
/// programs recognise it.
pub fn current_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let s = std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("127.0.0.1:0"));
    // A namespace without addresses still lets a socket exist; binding is not needed.
    let fd = match &s {
        Ok(s) => std::os::fd::AsRawFd::as_raw_fd(s),
        Err(_) => anyhow::bail!("cannot open a socket to read the namespace cookie"),
    };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd and out-pointers of the right size.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup or, on hybrid systems,
/// /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Result<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut found: Vec<std::path::PathBuf> = info
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mountpoint = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == "cgroup2").then(|| std::path::PathBuf::from(mountpoint))
        })
        .collect();
    found.sort_by_key(|p| p.components().count());
    found
        .into_iter()
        .next()
        .context("no cgroup2 hierarchy is mounted (needed for host-local access to published ports)")
}
