//! Running tools with a time limit, and stopping cleanly on Ctrl-C.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use netpath_tests::in_ns;

/// Runs `cmd` (feeding `stdin`), kills it if it is still running after `timeout`, and returns
/// its output whatever the exit status.
pub fn output(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = describe(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped stdout")));
    let err = reader(Box::new(child.stderr.take().expect("piped stderr")));
    let status = wait_until(&mut child, Instant::now() + timeout)?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    match status {
        Some(status) => Ok(Output { status, stdout, stderr }),
        None => bail!(
            "{what} did not finish within {:.0?} and was killed; stderr: {}",
            timeout,
            tail(&String::from_utf8_lossy(&stderr))
        ),
    }
}

/// Like [`output`], but a non-zero exit is an error carrying both output streams.
pub fn check(cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<String> {
    let what = describe(&cmd);
    let out = output(cmd, stdin, timeout)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr)),
            if stdout.trim().is_empty() { String::new() } else { format!(" | stdout: {}", tail(&stdout)) }
        );
    }
    Ok(stdout)
}

/// Runs a short configuration command inside a namespace (ip, sysctl, iptables-restore, ...).
pub fn ns_check(ns: &Path, prog: &str, args: &[&str]) -> Result<String> {
    check(in_ns(ns, prog, args), None, Duration::from_secs(60))
}

/// Waits for `child` until `deadline`; kills and reaps it after that (returning `None`).
pub fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills and reaps a child we started (by its own handle, never by name).
pub fn stop_child(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// `prog arg arg ...`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args().take(12) {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if cmd.get_args().len() > 12 {
        s.push_str(" ...");
    }
    s
}

/// The last few hundred characters of a tool's output, on one line.
pub fn tail(s: &str) -> String {
    let s = s.trim();
    let start = s.char_indices().rev().nth(400).map_or(0, |(i, _)| i);
    let t = s[start..].replace('\n', " / ");
    if start > 0 { format!("...{t}") } else { t }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM ask the bench to stop after the current measurement, so that every lab is
/// torn down by its owner instead of being left to the next run's sweep.
pub fn install_stop_handler() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let act = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            let _ = sigaction(sig, &act);
        }
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// New TCP connections per second from namespace `ns` to `addr` (this binary's
/// `__conn-client`, once `__probe` finds every backend answering). Fails when more than 1% of
/// the connections failed.
pub fn conn_rate(exe: &Path, ns: &Path, addr: &str, secs: u32) -> Result<f64> {
    let exe = exe.to_str().context("exe path")?;
    // Servers start asynchronously: wait until they answer (each, when `addr` lists several).
    for a in addr.split(',') {
        let probe = netpath_tests::in_ns(ns, exe, &["__probe", a, "--timeout-secs", "30"]);
        check(probe, None, Duration::from_secs(40))?;
    }
    let c = netpath_tests::in_ns(ns, exe, &["__conn-client", addr, "--secs", &secs.to_string()]);
    let out = check(c, None, Duration::from_secs(u64::from(secs) + 60))?;
    let j: serde_json::Value = serde_json::from_str(out.trim()).context("conn client JSON")?;
    let conns = j["conns"].as_f64().context("conns")?;
    let errors = j["errors"].as_f64().context("errors")?;
    if conns == 0.0 || errors > conns / 100.0 {
        bail!("{errors} of {} connections failed (first: {})", conns + errors, j["first_error"]);
    }
    Ok(conns / j["secs"].as_f64().context("secs")?)
}

/// One iperf3 TCP stream from namespace `ns` to `ip:port`: Gbit/s received.
pub fn iperf_tcp(ns: &Path, ip: &str, port: u16, secs: u32) -> Result<f64> {
    let c = netpath_tests::in_ns(ns, "iperf3", &["-c", ip, "-p", &port.to_string(), "-t", &secs.to_string(), "-J"]);
    let out = check(c, None, Duration::from_secs(u64::from(secs) + 60))?;
    crate::figures::parse_iperf_tcp(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_collects_and_times_out() {
        let mut c = Command::new("sh");
        c.args(["-c", "cat; echo err >&2; exit 3"]);
        let out = output(c, Some(b"hello"), Duration::from_secs(10)).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"err\n");

        let mut c = Command::new("sleep");
        c.arg("10");
        let t = Instant::now();
        assert!(output(c, None, Duration::from_millis(100)).is_err());
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn check_reports_failure() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo boom >&2; exit 1"]);
        let e = check(c, None, Duration::from_secs(10)).unwrap_err().to_string();
        assert!(e.contains("boom"), "{e}");
    }

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail("a\nb\n"), "a / b");
        let long = "x".repeat(1000) + "END";
        assert!(tail(&long).ends_with("END") && tail(&long).len() < 420);
    }
}
