//! Container processes: starting one inside a sandbox, telling whether it still runs, and
//! stopping it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};

/// Opens a namespace file for entering it in a child (after fork, before exec).
pub fn open_netns(path: &Path) -> Result<OwnedFd> {
    Ok(File::open(path).with_context(|| format!("opening netns {}", path.display()))?.into())
}

/// What a container's processes see instead of the host's: their own /etc/resolv.conf,
/// /etc/hosts and /etc/hostname (bind-mounted in a private mount namespace, the way
/// `ip netns exec` uses /etc/netns/NAME/) and their own UTS hostname.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// A mount namespace without any namespace-file mounts (see [`make_mount_template`]):
    /// the container's own is a copy of it, not of the host's, whose thousands of
    /// namespace mounts would make every start cost as much as there are containers.
    pub mount_template: Option<PathBuf>,
    /// The daemon's directory of namespace files (a mount of its own): unmounted in the
    /// container's mount namespace so it keeps no other container's namespace alive.
    /// Only needed without a template.
    pub netns_dir: Option<PathBuf>,
    pub resolv_conf: PathBuf,
    pub hosts: PathBuf,
    pub hostname_file: PathBuf,
    pub hostname: String,
}

/// [`Isolation`] ready for the child: C strings made before fork (no allocation after it).
struct IsolationPlan {
    /// The template mount namespace, opened before fork.
    template: Option<OwnedFd>,
    /// (source, target) bind mounts.
    binds: Vec<(CString, CString)>,
    /// The namespace-file directory: the child's copies of those mounts would keep other
    /// containers' namespaces alive after their removal, so it unmounts them (all at once).
    netns_dir: Option<CString>,
    hostname: Vec<u8>,
}

impl Isolation {
    /// The `__supervise` flags that make the supervisor isolate itself this way.
    fn supervisor_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![];
        let mut flag = |f: &str, v: &std::ffi::OsStr| {
            a.push(f.into());
            a.push(v.to_owned());
        };
        if let Some(t) = &self.mount_template {
            flag("--mount-template", t.as_os_str());
        }
        if let Some(d) = &self.netns_dir {
            flag("--netns-dir", d.as_os_str());
        }
        flag("--resolv-conf", self.resolv_conf.as_os_str());
        flag("--hosts", self.hosts.as_os_str());
        flag("--hostname-file", self.hostname_file.as_os_str());
        flag("--hostname", std::ffi::OsStr::new(&self.hostname));
        a
    }
}

/// Where `netpath __supervise` puts itself before it runs the command: a network namespace
/// and an isolation, from its flags.
#[derive(Debug, Default)]
pub struct SuperviseIn {
    pub netns: Option<PathBuf>,
    pub isolation: Option<Isolation>,
}

impl SuperviseIn {
    /// Enters them; the caller is single-threaded (a mount namespace takes no other).
    fn enter(&self) -> Result<()> {
        if let Some(ns) = &self.netns {
            let fd = open_netns(ns)?;
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering netns {}", ns.display()))?;
        }
        if let Some(iso) = &self.isolation {
            IsolationPlan::new(iso)?.apply().context("isolating the container's files and hostname")?;
        }
        Ok(())
    }
}

impl IsolationPlan {
    fn new(iso: &Isolation) -> Result<Self> {
        let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).context("path with a NUL byte");
        let mut binds = vec![];
        for (src, dst) in
            [(&iso.resolv_conf, "/etc/resolv.conf"), (&iso.hosts, "/etc/hosts"), (&iso.hostname_file, "/etc/hostname")]
        {
            if !src.is_file() {
                bail!("{} is missing (is the daemon running?)", src.display());
            }
            // A host without the file has nothing to mount over; its processes do without.
            if Path::new(dst).exists() {
                binds.push((c(src)?, c(Path::new(dst))?));
            }
        }
        let template = match &iso.mount_template {
            Some(t) if crate::netlink::netns::is_mounted(t) => {
                Some(File::open(t).with_context(|| format!("opening {}", t.display()))?.into())
            }
            _ => None,
        };
        let netns_dir = if template.is_some() { None } else { iso.netns_dir.as_deref().map(c).transpose()? };
        Ok(Self { template, binds, netns_dir, hostname: iso.hostname.as_bytes().to_vec() })
    }

    /// Runs in the child between fork and exec: only async-signal-safe syscalls.
    fn apply(&self) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        // SAFETY: plain syscalls on NUL-terminated strings that outlive them.
        unsafe {
            if let Some(t) = &self.template
                && libc::setns(t.as_raw_fd(), libc::CLONE_NEWNS) != 0
            {
                return Err(err());
            }
            if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS) != 0 {
                return Err(err());
            }
            // Slave, so nothing mounted or unmounted here propagates back to the host.
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err(err());
            }
            if let Some(d) = &self.netns_dir {
                libc::umount2(d.as_ptr(), libc::MNT_DETACH);
            }
            for (src, dst) in &self.binds {
                if libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
                    return Err(err());
                }
            }
            if libc::sethostname(self.hostname.as_ptr().cast(), self.hostname.len()) != 0 {
                return Err(err());
            }
        }
        Ok(())
    }
}

/// Prepares `cmd` to run inside the network namespace `netns` (if any), isolated as `iso` says
/// (if given); `new_session` puts it in its own session and process group so it and its
/// children can be signalled together.
pub fn enter_in_child(
    cmd: &mut std::process::Command,
    netns: Option<OwnedFd>,
    iso: Option<&Isolation>,
    new_session: bool,
) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let plan = iso.map(IsolationPlan::new).transpose()?;
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = &netns
                && libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(p) = &plan {
                p.apply()?;
            }
            if new_session && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Holds a started supervisor back from running its command until dropped (or released):
/// the write end of the pipe on the supervisor's stdin, whose end of file lets it go. The
/// daemon dying lets it go too, and the record it persisted decides what happens next.
pub struct Gate(#[allow(dead_code)] OwnedFd);

impl Gate {
    /// Lets the command run.
    pub fn release(self) {}
}

/// Starts a detached container process: own session, stdin from /dev/null, stdout and stderr
/// appended to `log`. It runs under `netpath __supervise` (this binary), which records its exit
/// code in `exit_file`: a daemon restarted meanwhile, no longer its parent, still learns it.
/// The command itself waits until the returned [`Gate`] is released or dropped, so the rest
/// of the container's wiring can finish while the process is being started. `spawner`
/// starts the supervisor; where it cannot, the daemon does.
pub fn spawn_detached(
    argv: &[String],
    netns: Option<&Path>,
    iso: Option<&Isolation>,
    log: &Path,
    exit_file: &Path,
    spawner: &super::spawner::Spawner,
) -> Result<(u32, Gate)> {
    let Some(prog) = argv.first() else { bail!("no command given") };
    // The supervisor would report this only after the fact; say it now, as Docker does.
    if !is_executable(prog) {
        bail!("exec: {prog:?}: executable file not found in $PATH");
    }
    let _ = std::fs::remove_file(exit_file);
    let pid_file = exit_file.with_extension("pid");
    let _ = std::fs::remove_file(&pid_file);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    // /proc/self/exe: the running daemon's image, even if its file was replaced since.
    // Both ends close on exec: the supervisor gets the read end as its stdin (dup'd, so
    // open), and no other child keeps the write end, whose closing is the signal.
    let (hold_r, hold_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    let mut args: Vec<std::ffi::OsString> =
        vec![SUPERVISE.into(), exit_file.into(), "--pid-file".into(), pid_file.clone().into(), "--hold".into()];
    // The supervisor enters the namespaces itself: with nothing to run between fork and exec,
    // the process is spawned without copying the daemon's memory (posix_spawn, a vfork), which
    // costs the same whatever the daemon holds. A fork copied its page tables: the more
    // containers, the bigger the daemon and the slower every start.
    if let Some(ns) = netns {
        open_netns(ns)?; // a missing namespace is the daemon's error to report, not the log's
        args.extend(["--netns".into(), ns.into()]);
    }
    if let Some(iso) = iso {
        IsolationPlan::new(iso)?; // the same checks, here, with a clear message
        args.extend(iso.supervisor_args());
    }
    args.push("--".into());
    args.extend(argv.iter().map(Into::into));
    // The supervisor forks and its first half exits at once: the daemon holds no handle (and
    // no descriptor) per container, and no zombie is left to reap; exits are learnt from the
    // file the supervisor writes, as after a daemon restart.
    let out = OwnedFd::from(out);
    let st = match spawner.status(&args, &hold_r, &out) {
        Some(st) => st,
        None => std::process::Command::new("/proc/self/exe")
            .args(&args)
            .stdin(Stdio::from(hold_r))
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .map_err(anyhow::Error::from),
    }
    .with_context(|| format!("starting {prog:?}"))?;
    let pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok());
    let _ = std::fs::remove_file(&pid_file);
    match (st.success(), pid) {
        (true, Some(pid)) => Ok((pid, Gate(hold_w))),
        _ => bail!("starting {prog:?}: the supervisor did not start ({st})"),
    }
}

/// The hidden subcommand that builds the template mount namespace: `netpath __mount-template`.
pub const MOUNT_TEMPLATE: &str = "__mount-template";

/// In a fresh process: leaves the host's mount namespace for a copy of it, rids the copy of
/// the daemon's namespace directory `netns_dir` (a mount that would keep receiving new
/// containers' namespaces) and of every other namespace-file mount, says "ready" on stdout
/// and waits for stdin to close, so the caller can pin the namespace.
pub fn mount_template_child(netns_dir: &Path) -> Result<()> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    // Slave: host mounts still show through (where the host's are shared); nothing goes back.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .context("making / a slave mount")?;
    let mut nsfs: Vec<PathBuf> =
        crate::netlink::netns::mounts().into_iter().filter(|(_, t)| t == "nsfs").map(|(m, _)| m).collect();
    nsfs.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in nsfs {
        let _ = umount2(&m, MntFlags::MNT_DETACH);
    }
    umount2(netns_dir, MntFlags::MNT_DETACH).with_context(|| format!("unmounting {}", netns_dir.display()))?;
    use std::io::{Read, Write};
    println!("ready");
    std::io::stdout().flush()?;
    let _ = std::io::stdin().read_to_end(&mut vec![]);
    Ok(())
}

/// Makes (or finds) the template mount namespace pinned at `at`: what container processes'
/// mount namespaces are copied from (see [`Isolation::mount_template`]).
pub fn make_mount_template(at: &Path, netns_dir: &Path) -> Result<()> {
    if crate::netlink::netns::is_mounted(at) {
        return Ok(());
    }
    let mut child = std::process::Command::new("/proc/self/exe")
        .arg(MOUNT_TEMPLATE)
        .arg(netns_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the mount-namespace template helper")?;
    let res = (|| -> Result<()> {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("helper stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("the mount-namespace template helper failed");
        }
        File::create(at).with_context(|| format!("creating {}", at.display()))?;
        let src = format!("/proc/{}/ns/mnt", child.id());
        let pinned =
            nix::mount::mount(Some(src.as_str()), at, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>);
        if pinned.is_err() {
            let _ = std::fs::remove_file(at);
        }
        pinned.with_context(|| format!("pinning the template mount namespace at {}", at.display()))
    })();
    drop(child.stdin.take());
    let _ = child.wait();
    res
}

/// The hidden subcommand that supervises a detached process:
/// `netpath __supervise EXIT_FILE [--pid-file PATH] -- CMD...`.
pub const SUPERVISE: &str = "__supervise";

/// Signals `stop` sends to the whole process group: the supervisor must outlive the command
/// to record how it ended, so it ignores them (and restores them for the command).
const STOP_SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Runs `argv` (already in the container's namespace and session), waits for it and writes its
/// exit code (128+N for signal N, as a shell reports it) to `exit_file`; returns that code.
/// `hold`: first wait for the end of stdin (the daemon's [`Gate`]), and give the command
/// /dev/null instead.
pub fn supervise(exit_file: &Path, pid_file: Option<&Path>, hold: bool, into: &SuperviseIn, argv: &[String]) -> i32 {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let Some((prog, args)) = argv.split_first() else { return 127 };
    if let Err(e) = into.enter() {
        eprintln!("netpath: {e:#}");
        return 127;
    }
    if let Some(pf) = pid_file {
        // SAFETY: no thread exists yet in this process.
        match unsafe { libc::fork() } {
            -1 => {
                eprintln!("netpath: fork: {}", std::io::Error::last_os_error());
                return 127;
            }
            0 => {
                // The supervisor proper: reparented once the first half exits, and leader of a
                // session (and process group) of its own, so `stop` signals it and its command.
                // SAFETY: plain syscall.
                unsafe { libc::setsid() };
            }
            child => {
                let tmp = pf.with_extension("pid.tmp");
                let ok = std::fs::write(&tmp, child.to_string()).and_then(|()| std::fs::rename(&tmp, pf)).is_ok();
                return if ok { 0 } else { 127 };
            }
        }
    }
    if hold {
        // Whatever comes (a byte, end of file, an error), the wait is over: the daemon has
        // wired the container, or died, and then its restart adopts or removes the container.
        use std::io::Read;
        let _ = std::io::stdin().read(&mut [0u8; 1]);
    }
    // SAFETY: setting dispositions to SIG_IGN before any thread exists.
    unsafe { STOP_SIGNALS.iter().for_each(|&s| _ = libc::signal(s, libc::SIG_IGN)) };
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args);
    if hold {
        cmd.stdin(Stdio::null());
    }
    // SAFETY: signal() is async-signal-safe; ignored dispositions survive exec otherwise.
    unsafe {
        cmd.pre_exec(|| {
            STOP_SIGNALS.iter().for_each(|&s| _ = libc::signal(s, libc::SIG_DFL));
            Ok(())
        });
    }
    let code = match cmd.status() {
        Ok(st) => st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
        Err(e) => {
            eprintln!("netpath: starting {prog:?}: {e}");
            127
        }
    };
    let tmp = exit_file.with_extension("tmp");
    if std::fs::write(&tmp, code.to_string()).and_then(|()| std::fs::rename(&tmp, exit_file)).is_err() {
        eprintln!("netpath: could not record the exit code in {}", exit_file.display());
    }
    code
}

/// The exit code a supervisor recorded, if it did.
pub fn recorded_exit(exit_file: &Path) -> Option<i32> {
    std::fs::read_to_string(exit_file).ok()?.trim().parse().ok()
}

/// True when `prog` names an executable file, directly or through $PATH.
fn is_executable(prog: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if prog.contains('/') {
        return ok(Path::new(prog));
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| ok(&d.join(prog))))
}

/// The kernel's start time of `pid` (field 22 of /proc/PID/stat), if it exists and is not a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; everything after its ')' is plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// True when `pid` is still the process we started (same start time, not a recycled pid).
pub fn is_alive(pid: u32, started: Option<u64>) -> bool {
    match (start_time(pid), started) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// A handle that becomes readable when `pid` exits (a pidfd), so a stop returns the moment the
/// process is gone instead of at the next polling tick. None where pidfds are unavailable.
pub fn exit_watch(pid: u32) -> Option<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: plain syscall; the fd it returns is owned by us from here on.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns `fd`, which stays open and the same for its whole life.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

/// Waits up to `timeout` for our process `pid` to be gone; true if it is.
pub async fn wait_exit(
    watch: Option<&tokio::io::unix::AsyncFd<OwnedFd>>,
    pid: u32,
    started: Option<u64>,
    timeout: std::time::Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    if let Some(w) = watch {
        let _ = tokio::time::timeout_at(deadline, w.readable()).await;
        return !is_alive(pid, started);
    }
    while tokio::time::Instant::now() < deadline {
        if !is_alive(pid, started) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    !is_alive(pid, started)
}

/// Kills every process inside the network namespace at `path` (found through /proc): what a
/// container leaves running when the daemon died before recording its pid.
pub fn kill_netns_members(path: &Path) {
    // Unmounted, the path is an empty file whose inode means nothing.
    if !crate::netlink::netns::is_mounted(path) {
        return;
    }
    let Some(ino) = crate::netlink::netns::inode(path) else { return };
    let me = std::process::id();
    for pid in std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        if pid != me && crate::netlink::netns::inode(Path::new(&format!("/proc/{pid}/ns/net"))) == Some(ino) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Sends `sig` to the process (and its group when it leads one).
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    use nix::unistd::Pid;
    let p = Pid::from_raw(pid as i32);
    if nix::unistd::getpgid(Some(p)).ok() == Some(p) {
        let _ = nix::sys::signal::killpg(p, sig);
    } else {
        let _ = nix::sys::signal::kill(p, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_start_time_is_stable() {
        let me = std::process::id();
        let t = start_time(me).expect("own stat");
        assert!(is_alive(me, Some(t)));
        assert!(!is_alive(me, Some(t + 1)), "a different start time means a recycled pid");
        assert!(!is_alive(u32::MAX - 1, None));
    }

    #[test]
    fn executables_are_found_directly_or_on_the_path() {
        assert!(is_executable("sh"));
        assert!(is_executable("/bin/sh"));
        assert!(!is_executable("no-such-command-here"));
        let plain = std::env::temp_dir().join(format!("netpath-plain-test-{}", std::process::id()));
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        assert!(!is_executable(plain.to_str().unwrap()), "a file without x bits");
        std::fs::remove_file(&plain).unwrap();
        assert!(!is_executable("/bin"), "a directory");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(crate::netlink::netns::unescape_mountinfo(r"/tmp/a\040b/c\134d"), "/tmp/a b/c\\d");
        assert_eq!(
            crate::netlink::netns::unescape_mountinfo(r"/plain\04"),
            r"/plain\04",
            "a cut escape stays as written"
        );
    }

    #[test]
    fn recorded_exit_codes_are_read_back_and_garbage_is_none() {
        let f = std::env::temp_dir().join(format!("netpath-exit-test-{}", std::process::id()));
        assert_eq!(recorded_exit(&f), None, "nothing recorded");
        std::fs::write(&f, "143\n").unwrap();
        assert_eq!(recorded_exit(&f), Some(143));
        std::fs::write(&f, "half").unwrap();
        assert_eq!(recorded_exit(&f), None);
        std::fs::remove_file(&f).unwrap();
    }
}
