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
    pin(&create_unpinned()?, path)
}

/// Creates a new, empty network namespace held only by the returned descriptor (closing it
/// frees the namespace): a spare, pinned later with [`pin`].
pub fn create_unpinned() -> Result<std::os::fd::OwnedFd> {
    std::thread::spawn(|| -> Result<std::os::fd::OwnedFd> {
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
        Ok(File::open("/proc/thread-self/ns/net").context("opening the new netns")?.into())
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))?
}

/// Pins the namespace `ns` (a descriptor of [`create_unpinned`]) at `path`, as [`create`] does.
pub fn pin(ns: &std::os::fd::OwnedFd, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let src = format!("/proc/self/fd/{}", ns.as_raw_fd());
    let res = mount(Some(src.as_str()), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("bind-mounting netns at {}", path.display()));
    if res.is_err() {
        let _ = std::fs::remove_file(path);
    }
    res
}

/// True when `path` is a mounted network namespace (not just the empty mount-point file).
pub fn is_mounted(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
}

/// Whether `path` is where a mount is mounted; None where the kernel cannot say (statx's
/// STATX_ATTR_MOUNT_ROOT is Linux 5.8+).
pub fn is_mount_root(path: &Path) -> Option<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statx is a valid out-value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let r = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), libc::AT_SYMLINK_NOFOLLOW, 0, &mut stx) };
    let known = stx.stx_attributes_mask & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0;
    (r == 0 && known).then_some(stx.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0)
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
    // The usual places first: mountinfo has a line per container namespace file, so reading
    // it costs tens of milliseconds at 10,000 containers.
    for at in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if nix::sys::statfs::statfs(at).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC) {
            return Ok(at.into());
        }
    }
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

/// Mount points and their filesystem types, from /proc/self/mountinfo.
pub fn mounts() -> Vec<(std::path::PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mountpoint = pre.split(' ').nth(4)?;
            Some((std::path::PathBuf::from(unescape_mountinfo(mountpoint)), post.split(' ').next()?.to_string()))
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as \ooo octal escapes.
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = u16::from(b[i + 1] - b'0') * 64 + u16::from(b[i + 2] - b'0') * 8 + u16::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes `dir`, where container namespaces are mounted, a (shared) mount of its own. A
/// container's processes get a copy of the host's mounts (their own mount namespace for
/// /etc files); with `dir` a mount, one lazy unmount of it there drops every namespace file
/// at once, so no container keeps another's network namespace alive, whatever the count.
/// Namespace files mounted before (by an older daemon) are carried over.
pub fn own_dir_mount(dir: &Path) -> Result<()> {
    // Every start after the first finds it so, without reading mountinfo (a line per
    // container namespace file).
    if is_mount_root(dir) == Some(true) {
        return Ok(());
    }
    let all = mounts();
    if all.iter().any(|(m, _)| m == dir) {
        return Ok(());
    }
    // Hold the namespaces mounted there now, unmount them, mount the directory, mount them again.
    let held: Vec<(std::path::PathBuf, File)> = all
        .iter()
        .filter(|(m, t)| t == "nsfs" && m.parent() == Some(dir))
        .filter_map(|(m, _)| File::open(m).ok().map(|f| (m.clone(), f)))
        .collect();
    for (m, _) in &held {
        umount2(m, MntFlags::MNT_DETACH).with_context(|| format!("unmounting {}", m.display()))?;
    }
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("bind-mounting {} on itself", dir.display()))?;
    // Shared, as iproute2 makes /run/netns: where the state dir is itself shared with another
    // mount namespace (the CLI's), namespace files still show through. Container processes
    // unmount their copy, so they receive nothing.
    mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
        .with_context(|| format!("making {} a shared mount", dir.display()))?;
    for (m, f) in &held {
        use std::os::fd::AsRawFd;
        let src = format!("/proc/self/fd/{}", f.as_raw_fd());
        mount(Some(src.as_str()), m, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("mounting {} again", m.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_mount_root;
    use std::path::Path;

    #[test]
    fn mount_roots_are_told_from_plain_directories() {
        assert_eq!(is_mount_root(Path::new("/")), Some(true));
        assert_eq!(is_mount_root(Path::new("/proc")), Some(true));
        assert_eq!(is_mount_root(Path::new("/proc/self/fd")), Some(false));
        assert_eq!(is_mount_root(Path::new("/no/such/path")), None);
    }
}
