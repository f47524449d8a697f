//! Container processes: starting one inside a sandbox, telling whether it still runs, and
//! stopping it.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, bail};

/// Opens a namespace file for entering it in a child (after fork, before exec).
pub fn open_netns(path: &Path) -> Result<OwnedFd> {
    Ok(File::open(path).with_context(|| format!("opening netns {}", path.display()))?.into())
}

/// Prepares `cmd` to run inside the network namespace `netns` (if any); `new_session` puts it
/// in its own session and process group so it and its children can be signalled together.
pub fn enter_in_child(cmd: &mut std::process::Command, netns: Option<OwnedFd>, new_session: bool) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = &netns
                && libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if new_session && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts a detached container process: own session, stdin from /dev/null, stdout and stderr
/// appended to `log`.
pub fn spawn_detached(argv: &[String], netns: Option<&Path>, log: &Path) -> Result<tokio::process::Child> {
    let Some((prog, args)) = argv.split_first() else { bail!("no command given") };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    let fd = netns.map(open_netns).transpose()?;
    enter_in_child(&mut cmd, fd, true);
    let child =
        tokio::process::Command::from(cmd).kill_on_drop(false).spawn().with_context(|| format!("starting {prog:?}"))?;
    Ok(child)
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
}
