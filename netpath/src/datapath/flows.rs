//! The conntrack table seen from the daemon through a descriptor of its own, so scanning it
//! (expiry, flushing a removed container's flows, counting) never holds the lock the rest of
//! the datapath's map updates take. A scan reads every entry once; flushes asked for while
//! one runs are served together by the next (see the daemon's flusher).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, Result};
use netpath_common::{CtEntry, Tuple};

use super::sys;

pub struct FlowTable {
    fd: OwnedFd,
}

fn bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is one of the shared #[repr(C)] plain-integer types without padding.
    unsafe { std::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
}

fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    // SAFETY: same size, plain integers: every bit pattern is a valid T.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast(), size_of::<T>()) };
    v
}

impl FlowTable {
    pub(super) fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Every entry, read in one pass.
    pub fn entries(&self) -> Result<Vec<(Tuple, CtEntry)>> {
        let (mut key, mut next) = ([0u8; size_of::<Tuple>()], [0u8; size_of::<Tuple>()]);
        let mut val = [0u8; size_of::<CtEntry>()];
        let mut out = vec![];
        let mut first = true;
        while sys::map_next_key(self.fd.as_fd(), (!first).then_some(&key[..]), &mut next)
            .context("walking conntrack")?
        {
            first = false;
            key = next;
            if sys::map_lookup(self.fd.as_fd(), &key, &mut val).context("reading conntrack")? {
                out.push((from_bytes::<Tuple>(&key), from_bytes::<CtEntry>(&val)));
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> Result<usize> {
        Ok(self.entries()?.len())
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    fn remove(&self, k: &Tuple) {
        let _ = sys::map_delete(self.fd.as_fd(), bytes(k));
    }

    /// Forgets every flow to or from any of `addrs` (wire order), in one pass: containers
    /// going away, whose replacements must not inherit stale translations (that is what keeps
    /// UDP clients working across a re-create). Returns the entries that went.
    pub fn flush(&self, addrs: &HashSet<u32>) -> Result<Vec<(Tuple, CtEntry)>> {
        let doomed: Vec<(Tuple, CtEntry)> = self
            .entries()?
            .into_iter()
            .filter(|(k, e)| [k.saddr, k.daddr, e.xlate.saddr, e.xlate.daddr].iter().any(|a| addrs.contains(a)))
            .collect();
        doomed.iter().for_each(|(k, _)| self.remove(k));
        Ok(doomed)
    }

    /// Forgets the flows whose forward entry `doomed` picks (both entries of each): those a
    /// new firewall rule denies. Returns the entries that went.
    pub fn flush_where(&self, doomed: impl Fn(&Tuple, &CtEntry) -> bool) -> Result<Vec<(Tuple, CtEntry)>> {
        let entries: HashMap<Tuple, CtEntry> = self.entries()?.into_iter().collect();
        let mut gone = vec![];
        for (k, e) in entries.iter().filter(|(k, e)| e.is_reply == 0 && doomed(k, e)) {
            gone.push((*k, *e));
            let reply = e.xlate.reversed();
            if let Some(r) = entries.get(&reply) {
                gone.push((reply, *r));
            }
        }
        gone.iter().for_each(|(k, _)| self.remove(k));
        Ok(gone)
    }

    /// Expires idle flows (both entries of a flow go together). Returns the entries that went.
    pub fn expire(&self, now_ns: u64) -> Result<Vec<(Tuple, CtEntry)>> {
        let entries: HashMap<Tuple, CtEntry> = self.entries()?.into_iter().collect();
        let doomed = super::conntrack::expired(&entries, now_ns);
        doomed.iter().for_each(|k| self.remove(k));
        Ok(doomed.into_iter().filter_map(|k| Some((k, *entries.get(&k)?))).collect())
    }
}
