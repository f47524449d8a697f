//! The one ethtool setting netpath changes: GRO on a container's end of its veth, which gives
//! that end NAPI, without which a veth refuses frames XDP redirects to it in native mode; and
//! the one it reads: an uplink's driver (`--xdp auto` leaves veths to TC).
//! ethtool has no rtnetlink message; its ioctl is the simplest way in.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, anyhow};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETHTOOL_GDRVINFO: u32 = 0x03;

/// struct ethtool_drvinfo: cmd, driver, version, fw_version, bus_info, erom_version,
/// reserved2, then five counters.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    _rest: [u8; 32 * 4 + 12 + 4 * 5],
}

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    /// The rest of struct ifreq's union.
    _pad: [u8; 16],
}

/// Turns GRO on for interface `ifname` inside the network namespace at `netns`.
pub fn enable_gro(netns: &Path, ifname: &str) -> Result<()> {
    anyhow::ensure!(ifname.len() < libc::IFNAMSIZ, "interface name {ifname} too long");
    let name = ifname.to_owned();
    in_netns(netns, move || set_gro(&name)).with_context(|| format!("enabling GRO on {ifname}"))
}

/// [`enable_gro`] for the interface with index `ifindex` there (whatever its name), which
/// must be up. `renew`: if GRO is on already, turns it off and on again. A veth makes its
/// other end a target of XDP redirects only when GRO goes on while it is up; GRO turned on
/// while it was down (elsewhere, before it was moved) gives it NAPI but not that.
pub fn enable_gro_index(netns: &Path, ifindex: u32, renew: bool) -> Result<()> {
    in_netns(netns, move || {
        let mut buf = [0 as libc::c_char; libc::IFNAMSIZ];
        // SAFETY: if_indextoname writes at most IFNAMSIZ bytes into `buf`.
        let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
        anyhow::ensure!(!p.is_null(), "no interface {ifindex}: {}", std::io::Error::last_os_error());
        // SAFETY: on success `buf` holds a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        anyhow::ensure!(is_up(&name)?, "{name} is down");
        if renew && gro(&name, ETHTOOL_GGRO, 0)? != 0 {
            gro(&name, ETHTOOL_SGRO, 0)?;
        }
        set_gro(&name)
    })
    .with_context(|| format!("enabling GRO on interface {ifindex}"))
}

/// Whether `name` is up (SIOCGIFFLAGS), in the calling thread's namespace.
fn is_up(name: &str) -> Result<bool> {
    #[repr(C)]
    struct IfReqFlags {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let sock = socket()?;
    let mut req = IfReqFlags { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq, alive and full size.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    anyhow::ensure!(r == 0, "reading {name}'s flags: {}", std::io::Error::last_os_error());
    Ok(req.flags & libc::IFF_UP as libc::c_short != 0)
}

/// Runs `f` on a throwaway thread inside the network namespace at `netns` (setns is per thread).
fn in_netns(netns: &Path, f: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    let netns = netns.to_owned();
    std::thread::spawn(move || -> Result<()> {
        super::netns::enter(&netns)?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("ethtool thread panicked"))?
}

/// ETHTOOL_SGRO on `name`, in the calling thread's namespace.
fn set_gro(name: &str) -> Result<()> {
    gro(name, ETHTOOL_SGRO, 1).map(|_| ())
}

/// ETHTOOL_GGRO or ETHTOOL_SGRO (`cmd`) with `data` on `name`; returns the value after.
fn gro(name: &str, cmd: u32, data: u32) -> Result<u32> {
    let sock = socket()?;
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &mut value, _pad: [0; 16] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, both alive.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) };
    anyhow::ensure!(r == 0, "{}", std::io::Error::last_os_error());
    Ok(value.data)
}

fn socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The driver of interface `ifname` in the calling thread's network namespace (`veth`,
/// `virtio_net`, `mlx5_core`, ...).
pub fn driver(ifname: &str) -> Result<String> {
    anyhow::ensure!(ifname.len() < libc::IFNAMSIZ, "interface name {ifname} too long");
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = EthtoolDrvinfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], _rest: [0; 32 * 4 + 12 + 4 * 5] };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: (&mut info as *mut EthtoolDrvinfo).cast(), _pad: [0; 16] };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: SIOCETHTOOL writes the ethtool_drvinfo the ifreq points to, alive and full size.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) };
    anyhow::ensure!(r == 0, "reading {ifname}'s driver: {}", std::io::Error::last_os_error());
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_name_linux_cannot_hold_is_refused_before_any_ioctl() {
        let e = super::driver("a-name-far-too-long-for-linux").unwrap_err();
        assert!(format!("{e:#}").contains("too long"), "{e:#}");
    }
}
