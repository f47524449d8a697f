//! ENDPOINT_NETS: for each container address here that is none of the host's, the NETWORKS
//! entry covering it, so that the uplink programs decide a new flow from outside to it (a
//! flood's target) with one array read instead of HOST_ADDRS and the trie.
//!
//! It holds nothing of its own: every entry is derived from ENDPOINTS, HOST_ADDRS and NETWORKS,
//! and is rewritten here whenever one of those changes for its address, so the invariant is
//! "what it holds, NETWORKS says too" (an address it lacks falls back to the trie in the
//! datapath; a missing entry costs speed, never a verdict). A daemon refills it at start
//! ([`Datapath::sync_endpoint_nets`]), which also fills it the first time, after an upgrade from
//! a build without it.
//!
//! It is an array of slots, one per address hash (netpath_common::endpoint_net_slot), each
//! with its address: a lookup in a hash map cost the flood's packet 6 ns, an array read 1. Two
//! addresses of one slot: the first keeps it, the other is left to the trie (until a start
//! refills the table with the first gone). The daemon writes slots through a mapping of the
//! array, the address last and cleared first, so a program that reads an address there reads
//! the fields written for it (an update syscall copies the whole slot in no set order).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use aya::maps::HashMap as BpfHashMap;
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use ipnet::Ipv4Net;
use netpath_common::{ENDPOINT_NET_SLOTS, EndpointInfo, EndpointNet, NetworkInfo, endpoint_net_slot, map_names};

use super::Datapath;
use super::mmap::Mapped;

impl Datapath {
    /// False for an object from before the map (`--ebpf-object`): its programs use the trie.
    pub(super) fn has_endpoint_nets(&self) -> bool {
        self.ebpf.map(map_names::ENDPOINT_NETS).is_some()
    }

    /// What ENDPOINT_NETS must hold for `addr` (wire order): NETWORKS' entry for it if it is a
    /// container's (ENDPOINTS) and not the host's (HOST_ADDRS, where ports are published).
    fn endpoint_net_wanted(&mut self, addr: u32) -> Result<Option<NetworkInfo>> {
        let eps: BpfHashMap<_, u32, EndpointInfo> = self.map(map_names::ENDPOINTS)?;
        if eps.get(&addr, 0).is_err() {
            return Ok(None);
        }
        let host: BpfHashMap<_, u32, u32> = self.map(map_names::HOST_ADDRS)?;
        if host.get(&addr, 0).is_ok() {
            return Ok(None);
        }
        // A lookup in a trie is a longest-prefix match, as the programs' own.
        let nets: LpmTrie<_, u32, NetworkInfo> = self.map(map_names::NETWORKS)?;
        Ok(nets.get(&LpmKey::new(32, addr), 0).ok())
    }

    /// True for an object from before the slots (`--ebpf-object`): its ENDPOINT_NETS is a hash
    /// by address (layout revision 1), kept the same way.
    fn endpoint_nets_hashed(&self) -> bool {
        matches!(self.ebpf.map(map_names::ENDPOINT_NETS), Some(aya::maps::Map::HashMap(_)))
    }

    /// The array mapped into this process, once for the datapath's life: every `run` and `rm`
    /// writes a slot, and a mapping per write cost an mmap and an munmap each.
    fn endpoint_net_slots(&mut self) -> Result<&Slots> {
        if self.endpoint_slots.is_none() {
            let fd = super::mmap::array_fd(&self.ebpf, map_names::ENDPOINT_NETS)?;
            let len = ENDPOINT_NET_SLOTS as usize * size_of::<EndpointNet>();
            self.endpoint_slots = Some(Slots(Mapped::new(fd, len, map_names::ENDPOINT_NETS)?));
        }
        Ok(self.endpoint_slots.as_ref().expect("mapped above"))
    }

    /// Brings the ENDPOINT_NETS entries of `addrs` (wire order) in line with ENDPOINTS,
    /// HOST_ADDRS and NETWORKS.
    pub(super) fn sync_endpoint_nets_of(&mut self, addrs: impl IntoIterator<Item = u32>) -> Result<()> {
        if !self.has_endpoint_nets() {
            return Ok(());
        }
        let mut wanted = vec![];
        for addr in addrs {
            wanted.push((addr, self.endpoint_net_wanted(addr)?));
        }
        if self.endpoint_nets_hashed() {
            let mut m: BpfHashMap<_, u32, NetworkInfo> = self.map(map_names::ENDPOINT_NETS)?;
            for (addr, want) in wanted {
                match want {
                    Some(net) => m.insert(addr, net, 0).context("adding to ENDPOINT_NETS")?,
                    None => {
                        let _ = m.remove(&addr);
                    }
                }
            }
            return Ok(());
        }
        let slots = self.endpoint_net_slots()?;
        for (addr, want) in wanted {
            slots.set(addr, want);
        }
        Ok(())
    }

    /// Takes `addrs` (wire order) out of ENDPOINT_NETS, whatever the other maps say: before
    /// they become the host's (ports may be published on them).
    pub(super) fn forget_endpoint_nets(&mut self, addrs: &[u32]) -> Result<()> {
        if !self.has_endpoint_nets() {
            return Ok(());
        }
        if self.endpoint_nets_hashed() {
            let mut m: BpfHashMap<_, u32, NetworkInfo> = self.map(map_names::ENDPOINT_NETS)?;
            addrs.iter().for_each(|a| drop(m.remove(a)));
            return Ok(());
        }
        let slots = self.endpoint_net_slots()?;
        addrs.iter().for_each(|a| slots.set(*a, None));
        Ok(())
    }

    /// The addresses ENDPOINTS or ENDPOINT_NETS hold (wire order), those in `within` only.
    fn endpoint_net_candidates(&mut self, within: Option<Ipv4Net>) -> Result<BTreeSet<u32>> {
        let inside = |k: &u32| within.is_none_or(|n| n.contains(&Ipv4Addr::from(k.to_ne_bytes())));
        let eps: BpfHashMap<_, u32, EndpointInfo> = self.map(map_names::ENDPOINTS)?;
        let mut addrs: BTreeSet<u32> = eps.keys().filter_map(|k| k.ok()).filter(inside).collect();
        addrs.extend(self.endpoint_nets()?.into_iter().map(|(a, _)| u32::from_ne_bytes(a.octets())).filter(inside));
        Ok(addrs)
    }

    /// Rebuilds ENDPOINT_NETS from ENDPOINTS, HOST_ADDRS and NETWORKS: at every start (an
    /// earlier build may have had no such map, or a daemon died between two writes).
    pub fn sync_endpoint_nets(&mut self) -> Result<()> {
        if !self.has_endpoint_nets() {
            return Ok(());
        }
        let addrs = self.endpoint_net_candidates(None)?;
        self.sync_endpoint_nets_of(addrs)
    }

    /// After NETWORKS changed for `subnet`: its addresses' entries (subnets do not overlap).
    pub(super) fn sync_endpoint_nets_within(&mut self, subnet: Ipv4Net) -> Result<()> {
        if !self.has_endpoint_nets() {
            return Ok(());
        }
        let addrs = self.endpoint_net_candidates(Some(subnet))?;
        self.sync_endpoint_nets_of(addrs)
    }

    /// The entries ENDPOINT_NETS holds, by address: for tools and tests.
    pub fn endpoint_nets(&mut self) -> Result<Vec<(Ipv4Addr, NetworkInfo)>> {
        let held: Vec<(u32, NetworkInfo)> = if self.endpoint_nets_hashed() {
            let m: BpfHashMap<_, u32, NetworkInfo> = self.map(map_names::ENDPOINT_NETS)?;
            m.iter().filter_map(|r| r.ok()).collect()
        } else {
            self.endpoint_net_slots()?.held().map(|e| (e.addr, e.net)).collect()
        };
        let mut v: Vec<_> = held.into_iter().map(|(a, net)| (Ipv4Addr::from(a.to_ne_bytes()), net)).collect();
        v.sort_by_key(|(a, _)| *a);
        Ok(v)
    }
}

/// ENDPOINT_NETS mapped: slots of four u32 words, the NetworkInfo's three and the address.
pub(super) struct Slots(Mapped);

impl Slots {
    fn word(&self, slot: u32, i: usize) -> &AtomicU32 {
        self.0.u32_at(slot as usize * 4 + i)
    }

    fn get(&self, slot: u32) -> EndpointNet {
        let w = |i| self.word(slot, i).load(Ordering::SeqCst);
        let addr = w(3);
        EndpointNet { net: NetworkInfo { net_id: w(0), gateway: w(1), flags: w(2) }, addr }
    }

    fn put(&self, slot: u32, e: EndpointNet) {
        let w = |i, v| self.word(slot, i).store(v, Ordering::SeqCst);
        w(3, 0);
        w(0, e.net.net_id);
        w(1, e.net.gateway);
        w(2, e.net.flags);
        w(3, e.addr);
    }

    /// Makes `addr`'s slot say `want`, if the slot is free or `addr`'s already.
    fn set(&self, addr: u32, want: Option<NetworkInfo>) {
        let slot = endpoint_net_slot(addr);
        let cur = self.get(slot);
        match want {
            Some(net) if cur.addr == addr && cur.net == net => {}
            Some(net) if cur.addr == addr || cur.addr == 0 => self.put(slot, EndpointNet { net, addr }),
            // Another address's slot: this one is left to the trie.
            Some(_) => {}
            None if cur.addr == addr => self.put(slot, EndpointNet::default()),
            None => {}
        }
    }

    fn held(&self) -> impl Iterator<Item = EndpointNet> + '_ {
        (0..ENDPOINT_NET_SLOTS).map(|s| self.get(s)).filter(|e| e.addr != 0)
    }
}
