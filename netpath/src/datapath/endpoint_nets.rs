//! ENDPOINT_NETS: for each container address here that is none of the host's, the NETWORKS
//! entry covering it, so that the uplink programs decide a new flow from outside to it (a
//! flood's target) with one exact-match lookup instead of HOST_ADDRS and the trie.
//!
//! It holds nothing of its own: every entry is derived from ENDPOINTS, HOST_ADDRS and NETWORKS,
//! and is rewritten here whenever one of those changes for its address, so the invariant is
//! "what it holds, NETWORKS says too" (an address it lacks falls back to the trie in the
//! datapath; a missing entry costs speed, never a verdict). A daemon refills it at start
//! ([`Datapath::sync_endpoint_nets`]), which also fills it the first time, after an upgrade from
//! a build without it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use aya::maps::HashMap as BpfHashMap;
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use ipnet::Ipv4Net;
use netpath_common::{EndpointInfo, NetworkInfo, map_names};

use super::Datapath;

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

    /// Brings the ENDPOINT_NETS entries of `addrs` (wire order) in line with ENDPOINTS,
    /// HOST_ADDRS and NETWORKS.
    pub(super) fn sync_endpoint_nets_of(&mut self, addrs: impl IntoIterator<Item = u32>) -> Result<()> {
        if !self.has_endpoint_nets() {
            return Ok(());
        }
        for addr in addrs {
            let want = self.endpoint_net_wanted(addr)?;
            let mut m: BpfHashMap<_, u32, NetworkInfo> = self.map(map_names::ENDPOINT_NETS)?;
            match want {
                Some(net) => m.insert(addr, net, 0).context("adding to ENDPOINT_NETS")?,
                None => {
                    let _ = m.remove(&addr);
                }
            }
        }
        Ok(())
    }

    /// The addresses ENDPOINTS or ENDPOINT_NETS hold (wire order), those in `within` only.
    fn endpoint_net_candidates(&mut self, within: Option<Ipv4Net>) -> Result<BTreeSet<u32>> {
        let inside = |k: &u32| within.is_none_or(|n| n.contains(&Ipv4Addr::from(k.to_ne_bytes())));
        let eps: BpfHashMap<_, u32, EndpointInfo> = self.map(map_names::ENDPOINTS)?;
        let mut addrs: BTreeSet<u32> = eps.keys().filter_map(|k| k.ok()).filter(inside).collect();
        let held: BpfHashMap<_, u32, NetworkInfo> = self.map(map_names::ENDPOINT_NETS)?;
        addrs.extend(held.keys().filter_map(|k| k.ok()).filter(inside));
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
        let m: BpfHashMap<_, u32, NetworkInfo> = self.map(map_names::ENDPOINT_NETS)?;
        let mut v: Vec<_> =
            m.iter().filter_map(|r| r.ok()).map(|(k, net)| (Ipv4Addr::from(k.to_ne_bytes()), net)).collect();
        v.sort_by_key(|(a, _)| *a);
        Ok(v)
    }
}
