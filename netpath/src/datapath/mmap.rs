//! Arrays the daemon maps into its own memory (created BPF_F_MMAPABLE), to write words beside
//! the programs in an order it chooses, with atomic operations as theirs: an update syscall
//! copies a whole value in no set order, and would undo a bit a program set meanwhile.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::Map;

/// The descriptor of array `name` of the loaded object.
pub(super) fn array_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Result<BorrowedFd<'a>> {
    match ebpf.map(name).with_context(|| format!("map {name} missing from the eBPF object"))? {
        Map::Array(d) => Ok(d.fd().as_fd()),
        _ => bail!("map {name} has an unexpected type"),
    }
}

/// The first `len` bytes of an array's values, mapped shared; unmapped on drop.
pub(super) struct Mapped {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapped {
    pub(super) fn new(fd: BorrowedFd<'_>, len: usize, what: &str) -> Result<Self> {
        // SAFETY: a fresh shared mapping of the map's values; checked below, unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("mapping {what} into memory"));
        }
        Ok(Self { ptr: NonNull::new(p.cast()).context("mmap returned null")?, len })
    }

    /// The `i`-th u64 of the mapping.
    pub(super) fn u64_at(&self, i: usize) -> &AtomicU64 {
        assert!((i + 1) * 8 <= self.len, "word {i} past the mapping");
        // SAFETY: in bounds (above), the mapping is page-aligned and lives as long as self;
        // the programs access these words with plain or atomic loads and atomic writes.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().cast::<u64>().add(i)) }
    }

    /// The `i`-th u32 of the mapping.
    pub(super) fn u32_at(&self, i: usize) -> &AtomicU32 {
        assert!((i + 1) * 4 <= self.len, "word {i} past the mapping");
        // SAFETY: as in u64_at.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().cast::<u32>().add(i)) }
    }
}

// SAFETY: the mapping is plain shared memory of the process, valid from any thread until
// dropped; every access goes through atomics.
unsafe impl Send for Mapped {}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in Mapped::new, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
