//! The processes the bench runs inside lab namespaces (as hidden subcommands of this binary):
//! the container's servers, the connection-rate client and a readiness probe.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Ports the servers listen on inside every container.
pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
pub const CONN_PORT: u16 = 8080;

/// Runs inside the container: `iperf3 -s` and `sockperf sr --tcp` as children (killed when
/// this process dies), and an accept loop on `CONN_PORT` that answers one byte and closes.
/// With `extra_port` (the last filler port of a many-ports variant) a second accept server
/// listens there, so the bench can check that the filler mappings really forward. Exits by
/// itself after `max_secs`.
pub fn serve(max_secs: u64, extra_port: Option<u16>) -> Result<()> {
    let spawn = |prog: &str, args: &[&str]| -> Result<()> {
        let mut c = Command::new(prog);
        c.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe. The children die with this (main) thread.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c.spawn().with_context(|| format!("starting {prog}"))?;
        Ok(())
    };
    spawn("iperf3", &["-s", "-p", &IPERF_PORT.to_string()])?;
    spawn("sockperf", &["sr", "--tcp", "-i", "0.0.0.0", "-p", &SOCKPERF_PORT.to_string()])?;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(max_secs));
        std::process::exit(0);
    });
    if let Some(port) = extra_port {
        let extra = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding port {port}"))?;
        std::thread::spawn(move || accept_loop(extra));
    }
    accept_loop(TcpListener::bind(("0.0.0.0", CONN_PORT)).context("binding the accept server")?);
    Ok(())
}

/// Answers every connection with one byte and closes it.
fn accept_loop(listener: TcpListener) {
    for mut s in listener.incoming().flatten() {
        let _ = s.write_all(b"x");
    }
}

/// Result of a connection-rate run, printed as JSON by the client.
pub struct ConnStats {
    pub conns: u64,
    pub errors: u64,
    pub secs: f64,
    pub first_error: Option<String>,
}

/// Opens connections to `addrs` (each in turn) for `secs` (at most `max` in all), on `threads`
/// threads: each one connects, reads the server's byte and closes with an RST (SO_LINGER 0),
/// so no TIME_WAIT state piles up and ephemeral ports are reused at once.
pub fn conn_client(addrs: &[SocketAddr], secs: f64, max: u64, threads: usize) -> Result<ConnStats> {
    anyhow::ensure!(!addrs.is_empty(), "no address to connect to");
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let per_thread = max.div_ceil(threads.max(1) as u64);
    let handles: Vec<_> = (0..threads.max(1))
        .map(|t| {
            let addrs = addrs.to_vec();
            std::thread::spawn(move || {
                let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
                while ok + errors < per_thread && Instant::now() < deadline {
                    let addr = addrs[(t + (ok + errors) as usize) % addrs.len()];
                    match one_conn(addr) {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (ok, errors, first_error)
            })
        })
        .collect();
    let mut st = ConnStats { conns: 0, errors: 0, secs: 0.0, first_error: None };
    for h in handles {
        let (ok, errors, first) = h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        st.conns += ok;
        st.errors += errors;
        if st.first_error.is_none() {
            st.first_error = first;
        }
    }
    st.secs = start.elapsed().as_secs_f64();
    Ok(st)
}

fn one_conn(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut b = [0u8; 1];
    let n = s.read(&mut b)?;
    if n != 1 {
        bail!("server closed without answering");
    }
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Tries until `timeout` to open one connection to the accept server (through whatever NAT
/// is in the way) and read its byte.
pub fn probe(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match one_conn(addr) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => bail!("no answer from {addr} within {timeout:?}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_client_counts_against_a_loopback_server() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let _ = s.write_all(b"x");
            }
        });
        let st = conn_client(&[addr], 5.0, 50, 2).unwrap();
        assert_eq!(st.conns, 50, "{:?}", st.first_error);
        assert_eq!(st.errors, 0);
        probe(addr, Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn probe_gives_up() {
        // A port nothing listens on (bound, then released).
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(probe(addr, Duration::from_millis(200)).is_err());
    }
}
