//! The embedded server's sockets: opened inside each container's network namespace (bound to
//! 127.0.0.11:53 on its `lo`), served by the daemon's tokio runtime. The socket a query
//! arrives on says which container asked, so no packet needs rewriting and no rule is needed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tracing::debug;

use super::files::EMBEDDED;
use super::forward::{forward, read_frame, write_frame};
use super::message::Outcome;
use super::{Inner, Shared};

/// Forwarded queries one container may have in flight; more are dropped (the client retries),
/// so a flood from one container cannot exhaust the daemon.
const MAX_INFLIGHT: usize = 256;
/// TCP connections one container may hold open.
const MAX_TCP: usize = 32;
/// A TCP client idle this long is disconnected (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The running server of one container; dropping it stops its task and closes the sockets.
pub struct Listener {
    pub netns_inode: Option<u64>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds 127.0.0.11:53 (UDP and TCP) inside the namespace at `netns`, on a short-lived thread
/// (setns changes only the calling thread).
fn bind_in(netns: &Path) -> Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let p = netns.to_owned();
    std::thread::spawn(move || -> Result<_> {
        crate::netlink::netns::enter(&p)?;
        let addr: SockAddr = SocketAddr::new(EMBEDDED.parse().unwrap(), 53).into();
        let udp = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        // A restarted daemon binds again at once, whatever the old sockets left behind.
        udp.set_reuse_address(true)?;
        udp.set_nonblocking(true)?;
        udp.bind(&addr).with_context(|| format!("binding {EMBEDDED}:53/udp"))?;
        let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        tcp.set_reuse_address(true)?;
        tcp.set_nonblocking(true)?;
        tcp.bind(&addr).with_context(|| format!("binding {EMBEDDED}:53/tcp"))?;
        tcp.listen(128)?;
        Ok((udp.into(), tcp.into()))
    })
    .join()
    .map_err(|_| anyhow!("socket thread panicked"))?
}

/// Opens and starts serving the embedded server `key` in `netns`: it answers for the
/// containers [`Inner::members`] lists under that key.
pub fn start(inner: &Shared, key: u64, netns: &Path) -> Result<Listener> {
    let (udp, tcp) = bind_in(netns).with_context(|| format!("embedded DNS in {}", netns.display()))?;
    let _rt = inner.runtime.enter();
    let udp = Arc::new(UdpSocket::from_std(udp)?);
    let tcp = TcpListener::from_std(tcp)?;
    let task = inner.runtime.spawn(serve(Arc::downgrade(inner), key, udp, tcp));
    Ok(Listener { netns_inode: crate::netlink::netns::inode(netns), task })
}

/// Receives one datagram into the worker thread's buffer and copies out just the query: a
/// 64 KiB buffer per container would cost 64 MiB of memory at 1,000 containers.
fn try_recv(sock: &UdpSocket) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 65535]);
    }
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        let (n, peer) = sock.try_recv_from(&mut b)?;
        Ok((b[..n].to_vec(), peer))
    })
}

/// Serves both sockets from one task: a task is most of what a container's server costs the
/// daemon, and a host may have ten thousand of them.
async fn serve(inner: std::sync::Weak<Inner>, key: u64, udp: Arc<UdpSocket>, tcp: TcpListener) {
    // Forwarded queries and TCP connections belong to this task: stopping it (container
    // removed) stops them and closes the sockets at once, so nothing keeps the container's
    // namespace alive. Made at first use: most containers never need them.
    let (mut forwards, mut conns): (Option<JoinSet<()>>, Option<JoinSet<()>>) = (None, None);
    loop {
        for set in [&mut forwards, &mut conns].into_iter().flatten() {
            while set.try_join_next().is_some() {}
        }
        tokio::select! {
            r = udp.readable() => {
                if r.is_ok() && !on_datagram(&inner, key, &udp, &mut forwards) {
                    return;
                }
            }
            r = tcp.accept() => {
                let Ok((stream, _)) = r else { continue };
                let conns = conns.get_or_insert_with(JoinSet::new);
                if conns.len() < MAX_TCP {
                    conns.spawn(serve_conn(inner.clone(), key, stream));
                }
            }
        }
    }
}

/// Answers one waiting datagram, at once or through a forward of its own (at most
/// MAX_INFLIGHT: more are dropped, the client retries). False once the server is gone.
fn on_datagram(
    inner: &std::sync::Weak<Inner>,
    key: u64,
    sock: &Arc<UdpSocket>,
    forwards: &mut Option<JoinSet<()>>,
) -> bool {
    let (q, peer) = match try_recv(sock) {
        Ok(x) => x,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
        Err(e) => {
            // ICMP errors from earlier sends surface here; the socket itself is fine.
            debug!("dns server {key}: recv: {e}");
            return true;
        }
    };
    let Some(inner) = inner.upgrade() else { return false };
    match inner.handle(key, &q, false) {
        Outcome::Reply(b) => {
            // Loopback takes a datagram at once; if its buffer is full, the client retries
            // as it would after a loss.
            let _ = sock.try_send_to(&b, peer);
        }
        Outcome::Forward(f) => {
            let forwards = forwards.get_or_insert_with(JoinSet::new);
            if forwards.len() >= MAX_INFLIGHT {
                return true;
            }
            let upstreams = inner.upstreams(key);
            let sock = sock.clone();
            forwards.spawn(async move {
                let out = forward(&f, &upstreams, false).await;
                let _ = sock.send_to(&out, peer).await;
            });
        }
        Outcome::Drop => {}
    }
    true
}

/// Answers length-prefixed queries on one connection, in order, until the client closes it,
/// stays idle, or sends something we drop.
async fn serve_conn(inner: std::sync::Weak<Inner>, key: u64, mut s: TcpStream) {
    while let Ok(Some(q)) = tokio::time::timeout(TCP_IDLE, read_frame(&mut s)).await {
        let Some(dns) = inner.upgrade() else { return };
        let out = match dns.handle(key, &q, true) {
            Outcome::Reply(b) => b,
            Outcome::Forward(f) => {
                let upstreams = dns.upstreams(key);
                drop(dns);
                forward(&f, &upstreams, true).await
            }
            Outcome::Drop => return,
        };
        if write_frame(&mut s, &out).await.is_err() {
            return;
        }
    }
}
