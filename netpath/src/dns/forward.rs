//! Forwarding to upstream resolvers, from the daemon's own network namespace (so a loopback
//! stub such as 127.0.0.53 on the host works too). Every query gets its own socket (a fresh
//! random source port, answers matched by the kernel) and a random ID; upstreams are tried in
//! order, twice round, within one time budget that ends before a client's own timeout (glibc:
//! 5 s), so the client gets our SERVFAIL rather than silence. A query runs in its own task:
//! a slow upstream delays only the queries waiting on it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout_at};

use super::message::{Forward, Verdict, upstream_verdict, with_id};

/// How long one upstream gets to answer one attempt.
pub const ATTEMPT: Duration = Duration::from_millis(1500);
/// How long a forwarded query may take in all.
pub const BUDGET: Duration = Duration::from_millis(4000);
/// Rounds over the upstream list.
const ROUNDS: usize = 2;

fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: valid buffer; getrandom never fails for 2 bytes once the pool is up.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 2, 0) };
    u16::from_ne_bytes(b)
}

/// Asks `upstreams` in turn; returns the answer for the client (its ID restored, truncated if
/// it must be) or SERVFAIL if none answered. `tcp`: the client asked over TCP, so do we.
pub async fn forward(f: &Forward, upstreams: &[IpAddr], tcp: bool) -> Vec<u8> {
    let deadline = Instant::now() + BUDGET;
    let mut last_failure: Option<Vec<u8>> = None;
    for up in upstreams.iter().cycle().take(upstreams.len() * ROUNDS) {
        if Instant::now() >= deadline {
            break;
        }
        let addr = SocketAddr::new(*up, 53);
        let attempt_end = (Instant::now() + ATTEMPT).min(deadline);
        let id = random_id();
        let q = with_id(&f.query, id);
        let mut resp = if tcp { ask_tcp(addr, &q, attempt_end).await } else { ask_udp(addr, &q, attempt_end).await };
        if !tcp && resp.as_deref().map(upstream_verdict) == Some(Verdict::Truncated) {
            // Too big for UDP upstream: the whole answer over TCP, then as much as the client takes.
            let tcp_end = (Instant::now() + ATTEMPT).min(deadline);
            if let Some(full) = ask_tcp(addr, &q, tcp_end).await {
                resp = Some(full);
            }
        }
        let Some(resp) = resp else { continue };
        let verdict = upstream_verdict(&resp);
        let Some(out) = f.relay(resp, id) else { continue };
        match verdict {
            Verdict::Answer | Verdict::Truncated => return out,
            Verdict::Failed => last_failure = Some(out),
        }
    }
    // Every upstream failed; if one at least said so (SERVFAIL, REFUSED), pass that on.
    last_failure.unwrap_or_else(|| f.servfail())
}

async fn ask_udp(addr: SocketAddr, q: &[u8], end: Instant) -> Option<Vec<u8>> {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(bind).await.ok()?;
    // Connected: the kernel drops datagrams from anyone else, and an ICMP "port unreachable"
    // fails the receive at once instead of waiting out the attempt.
    s.connect(addr).await.ok()?;
    s.send(q).await.ok()?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = timeout_at(end, s.recv(&mut buf)).await.ok()?.ok()?;
        // Ignore datagrams too short to be an answer and wait for the real one.
        if n >= 12 && buf[..2] == q[..2] {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

/// One query over TCP (two-byte length prefix, RFC 1035 4.2.2).
async fn ask_tcp(addr: SocketAddr, q: &[u8], end: Instant) -> Option<Vec<u8>> {
    timeout_at(end, async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let len = u16::try_from(q.len()).ok()?;
        let mut out = Vec::with_capacity(q.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(q);
        s.write_all(&out).await.ok()?;
        read_frame(&mut s).await
    })
    .await
    .ok()
    .flatten()
}

/// Reads one length-prefixed DNS message from a TCP stream.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await.ok()?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    r.read_exact(&mut buf).await.ok()?;
    Some(buf)
}

/// Writes one length-prefixed DNS message.
pub async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    w.write_all(&out).await
}
