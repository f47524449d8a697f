//! The embedded server's sockets: opened inside each container's network namespace (bound to
//! 127.0.0.11:53 on its `lo`), served by the daemon's tokio runtime. The socket a query
//! arrives on says which container asked, so no packet needs rewriting and no rule is needed.
//!
//! Every server's sockets sit in one epoll set that one task waits on: a host may run ten
//! thousand containers, and a task and two reactor registrations each were most of what a
//! container cost the daemon. Forwards and TCP connections get tasks of their own, while
//! they last.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
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
/// Ready sockets taken per wake-up before the task lets others run.
const BATCH: usize = 64;

/// One server's sockets, and what it has in flight.
struct Socks {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    /// Forwarded queries and TCP connections belong to their server: removing it stops them
    /// and closes its sockets at once, so nothing keeps the container's namespace alive.
    /// Made at first use: most containers never need them.
    forwards: Option<JoinSet<()>>,
    conns: Option<JoinSet<()>>,
}

/// The epoll set of every server's sockets (event data: key << 1 | is-TCP).
pub struct Poller {
    epoll: AsyncFd<OwnedFd>,
    socks: Mutex<HashMap<u64, Socks>>,
}

fn epoll_ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, data: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: data };
    // SAFETY: plain syscall on descriptors we own, with an event that outlives it.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Poller {
    /// Makes the (empty) set; inside the daemon's runtime.
    pub fn new() -> Result<Arc<Self>> {
        // SAFETY: plain syscall; the descriptor is owned from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns `fd`, which stays open and the same for its whole life.
        let epoll = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Arc::new(Self { epoll, socks: Mutex::default() }))
    }

    /// Starts the task that serves the set, for as long as `inner` lives.
    pub fn serve(self: &Arc<Self>, inner: Weak<Inner>) {
        tokio::spawn(poll_loop(inner, self.clone()));
    }

    fn socks(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Socks>> {
        self.socks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, key: u64, udp: UdpSocket, tcp: TcpListener) -> Result<()> {
        let epfd = self.epoll.get_ref().as_raw_fd();
        epoll_ctl(epfd, libc::EPOLL_CTL_ADD, udp.as_raw_fd(), key << 1).context("watching the UDP socket")?;
        if let Err(e) = epoll_ctl(epfd, libc::EPOLL_CTL_ADD, tcp.as_raw_fd(), key << 1 | 1) {
            let _ = epoll_ctl(epfd, libc::EPOLL_CTL_DEL, udp.as_raw_fd(), 0);
            return Err(e).context("watching the TCP socket");
        }
        self.socks().insert(key, Socks { udp: Arc::new(udp), tcp, forwards: None, conns: None });
        Ok(())
    }

    fn remove(&self, key: u64) {
        let Some(s) = self.socks().remove(&key) else { return };
        // Out of the set now: a forward still holding the UDP socket ends with its task.
        let epfd = self.epoll.get_ref().as_raw_fd();
        let _ = epoll_ctl(epfd, libc::EPOLL_CTL_DEL, s.udp.as_raw_fd(), 0);
        let _ = epoll_ctl(epfd, libc::EPOLL_CTL_DEL, s.tcp.as_raw_fd(), 0);
    }
}

/// The running server of one container; dropping it stops it and closes its sockets.
pub struct Listener {
    pub netns_inode: Option<u64>,
    key: u64,
    poller: Arc<Poller>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.poller.remove(self.key);
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
    let poller = inner.poller.clone();
    poller.add(key, udp, tcp)?;
    Ok(Listener { netns_inode: crate::netlink::netns::inode(netns), key, poller })
}

/// Waits for any server's socket to be ready and serves it, a datagram or a connection at a
/// time (the set is level-triggered: what is left is reported again).
async fn poll_loop(inner: Weak<Inner>, poller: Arc<Poller>) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; BATCH];
    loop {
        let Ok(mut ready) = poller.epoll.readable().await else { return };
        // SAFETY: `events` has room for BATCH entries; timeout 0 never blocks.
        let n = unsafe { libc::epoll_wait(poller.epoll.get_ref().as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0) };
        if n <= 0 {
            ready.clear_ready(); // nothing ready (or EINTR): wait for the next wake-up
            continue;
        }
        drop(ready);
        let Some(dns) = inner.upgrade() else { return };
        for ev in &events[..n as usize] {
            let data = ev.u64;
            if data & 1 == 0 {
                on_datagram(&dns, &poller, data >> 1);
            } else {
                on_connection(&inner, &poller, data >> 1);
            }
        }
        drop(dns);
        tokio::task::yield_now().await;
    }
}

/// Accepts one connection of server `key` and serves it in a task (at most MAX_TCP).
fn on_connection(inner: &Weak<Inner>, poller: &Poller, key: u64) {
    let mut socks = poller.socks();
    let Some(s) = socks.get_mut(&key) else { return };
    let Ok((stream, _)) = s.tcp.accept() else { return };
    let conns = s.conns.get_or_insert_with(JoinSet::new);
    while conns.try_join_next().is_some() {}
    if conns.len() >= MAX_TCP {
        return; // closed at once: the client retries or falls back
    }
    let stream = stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream));
    if let Ok(stream) = stream {
        conns.spawn(serve_conn(inner.clone(), key, stream));
    }
}

/// Answers one waiting datagram of server `key`, at once or through a forward of its own (at
/// most MAX_INFLIGHT: more are dropped, the client retries).
fn on_datagram(dns: &Inner, poller: &Poller, key: u64) {
    // Not under the sockets' lock while answering: answering takes the servers' lock, which
    // is held while a server is removed (and so its sockets taken out).
    let Some(sock) = poller.socks().get(&key).map(|s| s.udp.clone()) else { return };
    let (q, peer) = match try_recv(&sock) {
        Ok(x) => x,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
        Err(e) => {
            // ICMP errors from earlier sends surface here; the socket itself is fine.
            debug!("dns server {key}: recv: {e}");
            return;
        }
    };
    match dns.handle(key, &q, false) {
        Outcome::Reply(b) => {
            // Loopback takes a datagram at once; if its buffer is full, the client retries
            // as it would after a loss.
            let _ = sock.send_to(&b, peer);
        }
        Outcome::Forward(f) => {
            let upstreams = dns.upstreams(key);
            let mut socks = poller.socks();
            let Some(s) = socks.get_mut(&key) else { return };
            let forwards = s.forwards.get_or_insert_with(JoinSet::new);
            while forwards.try_join_next().is_some() {}
            if forwards.len() >= MAX_INFLIGHT {
                return;
            }
            forwards.spawn(async move {
                let out = forward(&f, &upstreams, false).await;
                let _ = sock.send_to(&out, peer);
            });
        }
        Outcome::Drop => {}
    }
}

/// Receives one datagram into the thread's buffer and copies out just the query: a
/// 64 KiB buffer per container would cost 64 MiB of memory at 1,000 containers.
fn try_recv(sock: &UdpSocket) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 65535]);
    }
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        let (n, peer) = sock.recv_from(&mut b)?;
        Ok((b[..n].to_vec(), peer))
    })
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
