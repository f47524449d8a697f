//! The few bpf(2) commands aya does not expose in a form we can use: links we create, pin,
//! inspect (which interface or cgroup), update and detach ourselves, and map access by raw
//! bytes (migration copies maps whose layout no Rust type describes any more).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_map_info};

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, zero-initialised bpf_attr of the size we pass.
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, cmd as libc::c_int, attr as *mut bpf_attr, size_of::<bpf_attr>() as u32)
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a plain C union of integers; all-zero is its documented default.
    unsafe { std::mem::zeroed() }
}

fn fd_result(r: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(r as i32) }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens a pinned object (map or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = p.as_ptr() as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr).map(fd_result)
}

/// Pins an object (map or link) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = p.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = fd.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}

fn obj_info<T>(fd: BorrowedFd<'_>) -> io::Result<T> {
    // SAFETY: the info structs are plain integers; zero is valid.
    let mut info: T = unsafe { std::mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info = &mut info as *mut T as u64;
    attr.info.info_len = size_of::<T>() as u32;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// What the kernel says a map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

pub fn map_info(fd: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let i: bpf_map_info = obj_info(fd)?;
    Ok(MapInfo {
        map_type: i.type_,
        key_size: i.key_size,
        value_size: i.value_size,
        max_entries: i.max_entries,
        flags: i.map_flags,
    })
}

/// What a link is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkTarget {
    /// tcx on an interface; ifindex 0 once the interface is gone.
    Tcx {
        ifindex: u32,
        attach_type: u32,
    },
    Cgroup {
        cgroup_id: u64,
        attach_type: u32,
    },
    /// XDP on an interface; ifindex 0 once the interface is gone.
    Xdp {
        ifindex: u32,
    },
    Other(u32),
}

impl LinkTarget {
    /// The interface of an interface's link (tcx or XDP).
    pub fn ifindex(&self) -> Option<u32> {
        match *self {
            LinkTarget::Tcx { ifindex, .. } | LinkTarget::Xdp { ifindex } => Some(ifindex),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LinkInfo {
    pub target: LinkTarget,
}

const BPF_LINK_TYPE_CGROUP: u32 = aya_obj::generated::bpf_link_type::BPF_LINK_TYPE_CGROUP as u32;
const BPF_LINK_TYPE_TCX: u32 = aya_obj::generated::bpf_link_type::BPF_LINK_TYPE_TCX as u32;
const BPF_LINK_TYPE_XDP: u32 = aya_obj::generated::bpf_link_type::BPF_LINK_TYPE_XDP as u32;

pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let i: bpf_link_info = obj_info(fd)?;
    // SAFETY: the union member read is the one the kernel filled for this link type.
    let target = unsafe {
        match i.type_ {
            BPF_LINK_TYPE_TCX => LinkTarget::Tcx {
                ifindex: i.__bindgen_anon_1.tcx.ifindex,
                attach_type: i.__bindgen_anon_1.tcx.attach_type,
            },
            BPF_LINK_TYPE_XDP => LinkTarget::Xdp { ifindex: i.__bindgen_anon_1.xdp.ifindex },
            BPF_LINK_TYPE_CGROUP => LinkTarget::Cgroup {
                cgroup_id: i.__bindgen_anon_1.cgroup.cgroup_id,
                attach_type: i.__bindgen_anon_1.cgroup.attach_type,
            },
            t => LinkTarget::Other(t),
        }
    };
    Ok(LinkInfo { target })
}

/// Where a new link goes: an interface (tcx) or a cgroup directory.
pub enum AttachTo<'a> {
    Ifindex(u32),
    Cgroup(BorrowedFd<'a>),
}

/// Attaches `prog` through a new bpf link (appended after any other program there).
pub fn link_create(prog: BorrowedFd<'_>, to: AttachTo<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    link_create_flags(prog, to, attach_type, 0)
}

/// [`link_create`] with link flags (XDP: the mode, XDP_FLAGS_DRV_MODE or XDP_FLAGS_SKB_MODE).
pub fn link_create_flags(prog: BorrowedFd<'_>, to: AttachTo<'_>, attach_type: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    attr.link_create.flags = flags;
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    match to {
        AttachTo::Ifindex(i) => attr.link_create.__bindgen_anon_2.target_ifindex = i,
        AttachTo::Cgroup(fd) => attr.link_create.__bindgen_anon_2.target_fd = fd.as_raw_fd() as u32,
    }
    attr.link_create.attach_type = attach_type;
    sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map(fd_result)
}

/// Atomically replaces the program of a link: packets see either the old or the new one.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = prog.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches a link now, whoever else still holds it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.link_detach.link_fd = link.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
}

fn elem_attr(fd: BorrowedFd<'_>, key: *const u8, value: *mut u8, flags: u64) -> bpf_attr {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2.map_fd = fd.as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = key as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = value as u64;
    attr.__bindgen_anon_2.flags = flags;
    attr
}

fn not_found(r: io::Result<i64>) -> io::Result<bool> {
    match r {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The key after `key` (the first with None) into `next`; false at the end.
pub fn map_next_key(fd: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let k = key.map_or(std::ptr::null(), |k| k.as_ptr());
    // next_key shares the value slot of the union.
    let mut attr = elem_attr(fd, k, next.as_mut_ptr(), 0);
    not_found(sys_bpf(bpf_cmd::BPF_MAP_GET_NEXT_KEY, &mut attr))
}

/// Reads `key`'s value (every CPU's, for per-CPU maps) into `value`; false if absent.
pub fn map_lookup(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = elem_attr(fd, key.as_ptr(), value.as_mut_ptr(), 0);
    not_found(sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr))
}

pub fn map_update(fd: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let mut attr = elem_attr(fd, key.as_ptr(), value.as_ptr() as *mut u8, flags);
    sys_bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Deletes `key`; false if it was not there.
pub fn map_delete(fd: BorrowedFd<'_>, key: &[u8]) -> io::Result<bool> {
    let mut attr = elem_attr(fd, key.as_ptr(), std::ptr::null_mut(), 0);
    not_found(sys_bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr))
}
