//! Starts container supervisors from a small process of the daemon's own. A process spawned
//! from the daemon pays for the daemon's descriptor table twice: the kernel copies it into the
//! child and closes each close-on-exec entry at exec. With embedded DNS a container holds two
//! of the daemon's descriptors, so at 10,000 containers each `run` copied and closed 20,000
//! of them, about 10 ms. The spawner is started while the daemon holds few descriptors, and
//! inherits none but its end of a socket: the daemon sends it each supervisor's arguments,
//! with the supervisor's stdin and log as descriptors, and a socket to answer on; the
//! spawner starts it on a thread of its own and sends back how its first half exited.
//! Should the spawner be gone, the next start makes a new one; should that fail too, the
//! daemon starts supervisors itself, as before.

use std::ffi::{OsStr, OsString};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg, socketpair,
};

/// The hidden subcommand: `netpath __spawner`, its stdin the daemon's socket.
pub const SPAWNER: &str = "__spawner";

/// The largest request: a supervisor's arguments (a container's command among them).
const MAX_REQUEST: usize = 64 * 1024;

/// The daemon's side: the socket to a running spawner, made again when it is gone.
#[derive(Default)]
pub struct Spawner {
    running: Mutex<Option<(OwnedFd, Child)>>,
}

impl Spawner {
    /// Starts the spawner now, while the daemon holds few descriptors (a spawner made later,
    /// after one died, pays for the daemon's table once).
    pub fn start() -> Self {
        let s = Self::default();
        match launch() {
            Ok(r) => *s.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(r),
            Err(e) => tracing::warn!("starting the spawner: {e:#}; the daemon starts supervisors itself"),
        }
        s
    }

    /// Runs `/proc/self/exe ARGS` (of the spawner: the daemon's image) with `stdin` and `out`
    /// as stdin and stdout/stderr, and waits for it to exit. None when no spawner can do it
    /// (the caller starts it itself).
    pub fn status(&self, args: &[OsString], stdin: &OwnedFd, out: &OwnedFd) -> Option<Result<ExitStatus>> {
        let data = args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>().join(&0u8);
        if data.len() > MAX_REQUEST {
            return None;
        }
        let (mine, theirs) = pair().ok()?;
        let fds = [theirs.as_raw_fd(), stdin.as_raw_fd(), out.as_raw_fd()];
        let sent = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let send = |ctl: &OwnedFd| {
                sendmsg::<()>(
                    ctl.as_raw_fd(),
                    &[IoSlice::new(&data)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
            };
            match running.as_ref().map(|(ctl, _)| send(ctl)) {
                Some(Ok(_)) => true,
                _ => {
                    // Gone (or never started): one new one, for this request and the next.
                    if let Some((ctl, mut child)) = running.take() {
                        drop(ctl);
                        let _ = child.wait();
                    }
                    match launch() {
                        Ok(r) => {
                            let ok = send(&r.0).is_ok();
                            *running = Some(r);
                            ok
                        }
                        Err(e) => {
                            tracing::warn!("restarting the spawner: {e:#}");
                            false
                        }
                    }
                }
            }
        };
        drop(theirs); // the spawner holds its copy: its closing ends the answer
        if !sent {
            return None;
        }
        // Sent: the spawner may have started the supervisor, so from here a failure is an
        // error, never a reason for the caller to start another.
        let mut buf = [0u8; 4096];
        Some(match nix::unistd::read(&mine, &mut buf) {
            Ok(n) => parse_answer(&buf[..n]),
            Err(e) => Err(anyhow::anyhow!("reading the spawner's answer: {e}")),
        })
    }
}

fn pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
}

/// Starts `netpath __spawner` with one end of a new socket pair as its stdin.
fn launch() -> Result<(OwnedFd, Child)> {
    let (mine, theirs) = pair().context("socketpair")?;
    let child = std::process::Command::new("/proc/self/exe")
        .arg(SPAWNER)
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .spawn()
        .context("starting netpath __spawner")?;
    Ok((mine, child))
}

/// "ok RAW" (a wait status) or "error MESSAGE"; nothing at all if the spawner died meanwhile.
fn answer(res: std::io::Result<ExitStatus>) -> Vec<u8> {
    match res {
        Ok(st) => format!("ok {}", st.into_raw()).into_bytes(),
        Err(e) => format!("error {e}").into_bytes(),
    }
}

fn parse_answer(b: &[u8]) -> Result<ExitStatus> {
    let s = String::from_utf8_lossy(b);
    match s.split_once(' ') {
        Some(("ok", raw)) => Ok(ExitStatus::from_raw(raw.parse().context("the spawner's answer")?)),
        Some(("error", e)) => bail!("{e}"),
        _ if b.is_empty() => bail!("the spawner exited before it answered"),
        _ => bail!("the spawner's answer: {s:?}"),
    }
}

/// Splits a request into the supervisor's arguments.
fn parse_request(data: &[u8]) -> Vec<OsString> {
    data.split(|&b| b == 0).map(|a| OsStr::from_bytes(a).to_owned()).collect()
}

/// `netpath __spawner`: serves requests on stdin until the daemon closes its end.
pub fn serve() -> i32 {
    let ctl: RawFd = 0;
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 3]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (n, fds) = match recvmsg::<()>(ctl, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => {
                let mut fds = vec![];
                for c in m.cmsgs().into_iter().flatten() {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        // SAFETY: the kernel just gave us these descriptors; nobody else owns them.
                        fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                (m.bytes, fds)
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 1,
        };
        if n == 0 && fds.is_empty() {
            return 0; // the daemon is gone
        }
        let args = parse_request(&buf[..n]);
        let Ok([reply, stdin, out]) = <[OwnedFd; 3]>::try_from(fds) else { continue };
        std::thread::spawn(move || {
            let res = out.try_clone().and_then(|err| {
                std::process::Command::new("/proc/self/exe")
                    .args(&args)
                    .stdin(Stdio::from(stdin))
                    .stdout(Stdio::from(out))
                    .stderr(Stdio::from(err))
                    .status()
            });
            // No SIGPIPE should the daemon be gone meanwhile: the spawner ends on its own then.
            let _ = nix::sys::socket::send(reply.as_raw_fd(), &answer(res), MsgFlags::MSG_NOSIGNAL);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_go_both_ways() {
        let args: Vec<OsString> = vec!["__supervise".into(), "/x y/exit".into(), "--".into(), "sh".into(), "".into()];
        let data = args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>().join(&0u8);
        assert_eq!(parse_request(&data), args);
        let st = parse_answer(&answer(Ok(ExitStatus::from_raw(3 << 8)))).unwrap();
        assert_eq!(st.code(), Some(3));
        let e = parse_answer(&answer(Err(std::io::Error::other("no such file")))).unwrap_err();
        assert_eq!(e.to_string(), "no such file");
        assert!(parse_answer(b"").unwrap_err().to_string().contains("before it answered"));
        assert!(parse_answer(b"ok x").is_err());
    }
}
