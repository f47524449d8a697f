//! Map pins across daemon restarts and upgrades. aya reuses a pin by name without looking at
//! it, so before every load each map of the object is planned here:
//!
//! - its pin at the current layout revision exists and the kernel reports the layout the
//!   object asks for: reused as is;
//! - nothing is pinned: created;
//! - an older, newer or mismatching pin exists: migrated. The old map is opened first, the new
//!   one created under a staging name, the entries copied (converted where a registered
//!   converter says how); then the caller moves the programs over (link update), the entries
//!   the old programs wrote in between are copied again, the new map takes the final name and
//!   the old pins go. Where no conversion exists the new map starts empty and the reason is
//!   logged: a pin is never silently reinterpreted.
//!
//! A crash at any point leaves either the old pin (and a staging pin the next start removes)
//! or the complete new one.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use netpath_common::layout::{self, map_type};
use netpath_common::map_names;
use tracing::{info, warn};

use super::pins::Pins;
use super::sys::{self, MapInfo};

/// A map as the object being loaded defines it.
#[derive(Debug, Clone)]
pub struct Want {
    pub name: String,
    pub rev: u32,
    pub info: MapInfo,
}

/// The pinned maps of `object` (with max_entries overrides applied), each with its layout
/// revision from the catalogue.
pub fn object_layouts(object: &[u8], overrides: &[(String, u32)]) -> Result<Vec<Want>> {
    let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    let mut wants = vec![];
    for (name, m) in &obj.maps {
        if m.pinning() != aya_obj::maps::PinningType::ByName {
            continue;
        }
        let Some(l) = layout::current(name) else {
            bail!("map {name} of the eBPF object has no entry in netpath_common::layout::MAPS");
        };
        let max_entries = overrides.iter().find(|(n, _)| n == name).map_or(m.max_entries(), |(_, v)| *v);
        let info = MapInfo {
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries,
            flags: kernel_flags(m.map_type(), m.map_flags()),
        };
        wants.push(Want { name: name.clone(), rev: l.rev, info });
    }
    wants.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(wants)
}

/// The flags the kernel reports for a map made with `flags`: it makes device maps read-only
/// to programs (their lookups return the kernel's own entry), so a pin of one matches.
fn kernel_flags(map_type: u32, flags: u32) -> u32 {
    const BPF_F_RDONLY_PROG: u32 = 1 << 7;
    if map_type == map_type::DEVMAP_HASH { flags | BPF_F_RDONLY_PROG } else { flags }
}

/// Converts one (key, value) of an old layout into the new one, or drops it (None).
type EntryFn = fn(&[u8], &[u8]) -> Option<(Vec<u8>, Vec<u8>)>;

/// How a source map's entries get into the new one.
#[derive(Clone, Copy)]
enum Convert {
    /// Same key and value bytes (the map's type or size may differ).
    Same,
    /// A change of layout: each (key, value) becomes a new one, or is dropped (None). For
    /// per-CPU maps it is called once per CPU's value.
    #[allow(dead_code)] // no layout needs one yet; registered in `converter` when one does
    Entries(EntryFn),
}

/// The registered conversions between layout revisions of a map.
fn converter(name: &str, from: u32, to: u32) -> Option<Convert> {
    match (name, from, to) {
        // Revision 1 versioned the pins. Entries kept their meaning: CT became a
        // preallocated hash (was LRU), DROPS got the ct-full slot.
        (_, 0, 1) => Some(Convert::Same),
        _ => None,
    }
}

/// Maps whose values are u64 counters the datapath increments: the second copy adds what the
/// old programs counted in between instead of overwriting what the new ones counted.
const COUNTERS: [&str; 2] = [map_names::DROPS, map_names::CT_STATS];

enum How {
    Copy(Convert),
    Replace(String),
}

struct Source {
    path: PathBuf,
    fd: OwnedFd,
    info: MapInfo,
    how: How,
    /// Values at the first copy (counter maps only).
    snapshot: HashMap<Vec<u8>, Vec<u8>>,
    copied: usize,
    lost: usize,
}

/// What to do with one map around the load.
pub struct MapPlan {
    pub name: String,
    rev: u32,
    want: MapInfo,
    /// Where aya finds (reuse) or creates and pins the map.
    pub load_path: PathBuf,
    final_path: PathBuf,
    source: Option<Source>,
    /// Other pins of this map, removed once the new one is in place.
    stale: Vec<PathBuf>,
}

fn family(t: u32) -> u32 {
    match t {
        map_type::LRU_HASH => map_type::HASH,
        10 => map_type::PERCPU_HASH, // LRU_PERCPU_HASH
        t => t,
    }
}

fn per_cpu(t: u32) -> bool {
    matches!(t, map_type::PERCPU_HASH | map_type::PERCPU_ARRAY | 10)
}

fn type_name(t: u32) -> &'static str {
    match t {
        map_type::HASH => "hash",
        map_type::ARRAY => "array",
        map_type::PERCPU_HASH => "per-CPU hash",
        map_type::PERCPU_ARRAY => "per-CPU array",
        map_type::LRU_HASH => "LRU hash",
        map_type::LPM_TRIE => "LPM trie",
        map_type::RINGBUF => "ring buffer",
        map_type::DEVMAP_HASH => "device hash",
        _ => "map",
    }
}

fn describe(i: &MapInfo) -> String {
    format!("{} of {} entries, key {} B, value {} B", type_name(i.map_type), i.max_entries, i.key_size, i.value_size)
}

/// How the entries of `have` (pinned at revision `rev`) can reach a map of `want`.
fn decide(name: &str, rev: u32, have: &MapInfo, want: &Want) -> How {
    let same_bytes = have.key_size == want.info.key_size && have.value_size == want.info.value_size;
    let same_kind = family(have.map_type) == family(want.info.map_type);
    if have.map_type == map_type::RINGBUF || want.info.map_type == map_type::RINGBUF {
        // Nothing to copy (and no keys to walk): events a follower has not read are lost.
        return How::Replace("a ring buffer carries events in flight, not state".into());
    }
    if name == map_names::CT_PORTS {
        // Copied, it would bring its COMPLETE word along, which speaks for the old CT only.
        return How::Replace("derived from CT: refilled from it once the new programs run".into());
    }
    if rev > want.rev {
        return How::Replace(format!(
            "pinned by a newer build (layout revision {rev}); this build knows revisions up to {}",
            want.rev
        ));
    }
    if rev == want.rev {
        return if same_bytes && same_kind {
            How::Copy(Convert::Same)
        } else {
            How::Replace(format!(
                "its layout ({}) differs from revision {rev}'s ({}) without a new revision",
                describe(have),
                describe(&want.info)
            ))
        };
    }
    let known = layout::revision(name, rev).is_some_and(|l| {
        l.key_size == have.key_size && l.value_size == have.value_size && family(l.map_type) == family(have.map_type)
    });
    if !known {
        return How::Replace(format!("its layout ({}) is no known revision {rev} of {name}", describe(have)));
    }
    match converter(name, rev, want.rev) {
        None => How::Replace(format!("no converter from layout revision {rev} to {}", want.rev)),
        Some(Convert::Same) if !(same_bytes && same_kind) => How::Replace(format!(
            "revision {rev} ({}) cannot be copied into revision {} ({})",
            describe(have),
            want.rev,
            describe(&want.info)
        )),
        Some(c) => How::Copy(c),
    }
}

/// Plans every map of the object: opens the pins to migrate from (before anything new exists)
/// and clears what a crashed migration left.
pub fn plan(pins: &Pins, wants: &[Want]) -> Result<Vec<MapPlan>> {
    let mut plans = vec![];
    for w in wants {
        let final_path = pins.map(&w.name, w.rev);
        let staging = pins.staging(&w.name, w.rev);
        if staging.exists() {
            info!("map {}: removing {} left by an interrupted migration", w.name, staging.display());
            std::fs::remove_file(&staging).with_context(|| format!("removing {}", staging.display()))?;
        }
        // Older and newer pins of the same map, newest first; then the unversioned one.
        let mut others: Vec<(u32, PathBuf)> = pins
            .pinned_revisions(&w.name)
            .into_iter()
            .filter(|r| *r != w.rev)
            .map(|r| (r, pins.map(&w.name, r)))
            .collect();
        others.reverse();
        if w.rev != 0 && pins.map(&w.name, 0).exists() {
            others.push((0, pins.map(&w.name, 0)));
        }
        let mut p = MapPlan {
            name: w.name.clone(),
            rev: w.rev,
            want: w.info,
            load_path: final_path.clone(),
            final_path: final_path.clone(),
            source: None,
            stale: vec![],
        };
        let candidate = if final_path.exists() {
            // A pin at the final name holds the newest data: any other pin is what a crash
            // between the rename and the clean-up left.
            Some((w.rev, final_path.clone()))
        } else if !others.is_empty() {
            Some(others.remove(0))
        } else {
            None
        };
        p.stale = others.into_iter().map(|(_, path)| path).collect();
        if let Some((rev, path)) = candidate {
            let fd = sys::obj_get(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
            let have = sys::map_info(fd.as_fd()).with_context(|| format!("inspecting {}", path.display()))?;
            if path == final_path && have == w.info {
                // Reused as is: aya opens the same pin.
            } else {
                let how = decide(&w.name, rev, &have, w);
                p.load_path = staging;
                p.source = Some(Source { path, fd, info: have, how, snapshot: HashMap::new(), copied: 0, lost: 0 });
            }
        }
        plans.push(p);
    }
    Ok(plans)
}

/// Removes the pins of maps the object does not have: any pin under maps/ of another name (a
/// map this build retired, see `layout::RETIRED`, or one a newer build added), and the
/// unversioned pins (revision 0) of catalogued or retired maps it does not have. Other files
/// at the top of the pin dir are not netpath's to judge and stay.
pub fn sweep_unknown(pins: &Pins, wants: &[Want]) {
    let why = |map: &str| {
        if layout::RETIRED.contains(&map) {
            format!("map {map} was retired (this build has no map of that name)")
        } else {
            format!("no map of this build is called {map}")
        }
    };
    let wanted = |map: &str| wants.iter().any(|w| w.name == map);
    for e in std::fs::read_dir(pins.maps_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let map = name.split("@v").next().unwrap_or_default();
        if !wanted(map) {
            info!("removing pin {name}: {}", why(map));
            let _ = std::fs::remove_file(e.path());
        }
    }
    let known = layout::PREVIOUS.iter().map(|l| l.name).chain(layout::RETIRED.iter().copied());
    for map in known.filter(|m| !wanted(m)) {
        let path = pins.map(map, 0);
        if path.is_file() {
            info!("removing pin {}: {}", path.display(), why(map));
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Raw access to one map for copying.
struct Raw<'a> {
    fd: BorrowedFd<'a>,
    info: MapInfo,
    /// Bytes of one CPU's value (per-CPU values are 8-byte aligned).
    stride: usize,
    cpus: usize,
}

impl<'a> Raw<'a> {
    fn new(fd: BorrowedFd<'a>, info: MapInfo, cpus: usize) -> Self {
        let (stride, cpus) = if per_cpu(info.map_type) {
            ((info.value_size as usize).div_ceil(8) * 8, cpus)
        } else {
            (info.value_size as usize, 1)
        };
        Self { fd, info, stride, cpus }
    }

    fn value_len(&self) -> usize {
        self.stride * self.cpus
    }

    /// Every (key, value), bounded so a map changing under us cannot keep us here.
    fn entries(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = vec![];
        let mut key: Option<Vec<u8>> = None;
        let mut next = vec![0u8; self.info.key_size as usize];
        let bound = 2 * self.info.max_entries as usize + 16;
        while out.len() < bound && sys::map_next_key(self.fd, key.as_deref(), &mut next)? {
            let mut v = vec![0u8; self.value_len()];
            if sys::map_lookup(self.fd, &next, &mut v)? {
                out.push((next.clone(), v));
            }
            key = Some(next.clone());
        }
        Ok(out)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut v = vec![0u8; self.value_len()];
        Ok(sys::map_lookup(self.fd, key, &mut v)?.then_some(v))
    }
}

/// Converts one source entry to the destination's layout.
fn convert(c: Convert, src: &Raw, dst: &Raw, key: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut out = vec![0u8; dst.value_len()];
    let mut new_key = key.to_vec();
    for cpu in 0..src.cpus.min(dst.cpus) {
        let v = &value[cpu * src.stride..][..src.info.value_size as usize];
        let (k, nv) = match c {
            Convert::Same => (key.to_vec(), v.to_vec()),
            Convert::Entries(f) => f(key, v)?,
        };
        new_key = k;
        out[cpu * dst.stride..][..nv.len()].copy_from_slice(&nv);
    }
    Some((new_key, out))
}

fn is_array(t: u32) -> bool {
    matches!(t, map_type::ARRAY | map_type::PERCPU_ARRAY)
}

fn fits(dst: &Raw, key: &[u8]) -> bool {
    !is_array(dst.info.map_type) || u32::from_ne_bytes(key[..4].try_into().unwrap()) < dst.info.max_entries
}

impl MapPlan {
    pub fn migrating(&self) -> bool {
        self.source.is_some()
    }

    /// First copy: everything the old map holds now.
    pub fn copy(&mut self, new_fd: BorrowedFd<'_>, cpus: usize) -> Result<()> {
        let counters = COUNTERS.contains(&self.name.as_str());
        let Some(s) = self.source.as_mut() else { return Ok(()) };
        let How::Copy(c) = s.how else { return Ok(()) };
        let (src, dst) = (Raw::new(s.fd.as_fd(), s.info, cpus), Raw::new(new_fd, self.want, cpus));
        for (k, v) in src.entries()? {
            match convert(c, &src, &dst, &k, &v) {
                Some((nk, nv)) if fits(&dst, &nk) && sys::map_update(new_fd, &nk, &nv, 0).is_ok() => s.copied += 1,
                _ => s.lost += 1,
            }
            if counters {
                s.snapshot.insert(k, v);
            }
        }
        Ok(())
    }

    /// Second copy, after the programs moved to the new maps: flows the old programs created
    /// since the first copy, and what they counted since.
    pub fn copy_again(&mut self, new_fd: BorrowedFd<'_>, cpus: usize) -> Result<()> {
        let counters = COUNTERS.contains(&self.name.as_str());
        let Some(s) = self.source.as_mut() else { return Ok(()) };
        let How::Copy(c) = s.how else { return Ok(()) };
        let (src, dst) = (Raw::new(s.fd.as_fd(), s.info, cpus), Raw::new(new_fd, self.want, cpus));
        for (k, v) in src.entries()? {
            let Some((nk, nv)) = convert(c, &src, &dst, &k, &v) else { continue };
            if !fits(&dst, &nk) {
                continue;
            }
            match (counters, dst.get(&nk)?) {
                (true, Some(mut now)) => {
                    // Add what the old programs counted since the first copy, word by word.
                    let then = match s.snapshot.get(&k) {
                        Some(then) => match convert(c, &src, &dst, &k, then) {
                            Some((_, then)) => then,
                            None => continue,
                        },
                        None => vec![0u8; nv.len()],
                    };
                    let mut moved = false;
                    for i in (0..nv.len().min(now.len())).step_by(8) {
                        let w = |b: &[u8]| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap());
                        let delta = w(&nv).wrapping_sub(w(&then));
                        if delta != 0 {
                            moved = true;
                            let sum = w(&now).wrapping_add(delta);
                            now[i..i + 8].copy_from_slice(&sum.to_ne_bytes());
                        }
                    }
                    if moved {
                        let _ = sys::map_update(new_fd, &nk, &now, 0);
                    }
                }
                // BPF_NOEXIST: never overwrite what the new programs wrote meanwhile.
                (_, None) if sys::map_update(new_fd, &nk, &nv, 1).is_ok() => s.copied += 1,
                _ => {}
            }
        }
        Ok(())
    }

    /// Puts the new map under its final name and removes the old pins.
    pub fn finish(self) -> Result<()> {
        if let Some(s) = &self.source {
            // rename() replaces a mismatching pin of the same name atomically.
            std::fs::rename(&self.load_path, &self.final_path)
                .with_context(|| format!("renaming {} to {}", self.load_path.display(), self.final_path.display()))?;
            if s.path != self.final_path {
                let _ = std::fs::remove_file(&s.path);
            }
            let to = format!("{} ({})", self.final_path.display(), describe(&self.want));
            let from = format!("{} ({})", s.path.display(), describe(&s.info));
            match &s.how {
                How::Copy(_) if s.lost == 0 => {
                    info!("map {}: migrated {from} to {to}: {} entries", self.name, s.copied)
                }
                How::Copy(_) => warn!(
                    "map {}: migrated {from} to {to}: {} entries, {} did not fit or convert and were dropped",
                    self.name, s.copied, s.lost
                ),
                How::Replace(reason) => {
                    warn!("map {}: replaced {from} with an empty {to}: {reason}", self.name)
                }
            }
        }
        for p in &self.stale {
            info!("map {}: removing superseded pin {}", self.name, p.display());
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// Undoes a plan whose load failed: the old pins stay, the staging pin goes.
    pub fn abort(&self) {
        if self.source.is_some() {
            let _ = std::fs::remove_file(&self.load_path);
        }
    }

    pub fn rev(&self) -> u32 {
        self.rev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(name: &str, rev: u32, t: u32, k: u32, v: u32, max: u32) -> Want {
        Want {
            name: name.into(),
            rev,
            info: MapInfo { map_type: t, key_size: k, value_size: v, max_entries: max, flags: 0 },
        }
    }

    fn info(t: u32, k: u32, v: u32, max: u32) -> MapInfo {
        MapInfo { map_type: t, key_size: k, value_size: v, max_entries: max, flags: 0 }
    }

    #[test]
    fn the_embedded_object_matches_the_layout_catalogue() {
        let wants = object_layouts(super::super::EBPF_OBJECT, &[]).unwrap();
        assert_eq!(wants.len(), layout::MAPS.len(), "every catalogued map is in the object and vice versa");
        for w in &wants {
            let l = layout::current(&w.name).unwrap();
            let from_table = info(l.map_type, l.key_size, l.value_size, l.max_entries);
            // As the kernel reports it (device maps come back read-only to programs).
            assert_eq!(w.info, MapInfo { flags: kernel_flags(l.map_type, l.flags), ..from_table }, "{}", w.name);
        }
    }

    #[test]
    fn the_landed_builds_unversioned_pins_are_copied_into_rev_1() {
        // CT: LRU (rev 0) into a preallocated hash; DROPS: 6 slots into 7.
        let ct = want("CT", 1, map_type::HASH, 16, 32, 131_072);
        assert!(matches!(decide("CT", 0, &info(map_type::LRU_HASH, 16, 32, 131_072), &ct), How::Copy(Convert::Same)));
        let drops = want("DROPS", 1, map_type::PERCPU_ARRAY, 4, 8, 7);
        assert!(matches!(decide("DROPS", 0, &info(map_type::PERCPU_ARRAY, 4, 8, 6), &drops), How::Copy(_)));
    }

    #[test]
    fn a_pin_of_no_known_layout_is_replaced_with_a_reason() {
        let eps = want("ENDPOINTS", 1, map_type::HASH, 4, 20, 16384);
        let How::Replace(why) = decide("ENDPOINTS", 0, &info(map_type::HASH, 4, 24, 16384), &eps) else {
            panic!("a 24-byte value is no ENDPOINTS layout")
        };
        assert!(why.contains("no known revision 0"), "{why}");
        let How::Replace(why) = decide("ENDPOINTS", 1, &info(map_type::HASH, 4, 24, 16384), &eps) else {
            panic!("same revision, other size")
        };
        assert!(why.contains("without a new revision"), "{why}");
        let How::Replace(why) = decide("ENDPOINTS", 2, &info(map_type::HASH, 4, 20, 16384), &eps) else {
            panic!("newer revision")
        };
        assert!(why.contains("newer build"), "{why}");
        let lpm = want("NETWORKS", 1, map_type::LPM_TRIE, 4, 20, 16384);
        assert!(matches!(decide("NETWORKS", 1, &info(map_type::HASH, 4, 20, 16384), &lpm), How::Replace(_)));
    }

    #[test]
    fn a_ring_buffer_of_another_size_is_replaced_not_copied() {
        let ring = want("FLOW_EVENTS", 1, map_type::RINGBUF, 0, 0, 256 * 1024);
        let How::Replace(why) = decide("FLOW_EVENTS", 1, &info(map_type::RINGBUF, 0, 0, 128 * 1024), &ring) else {
            panic!("a ring buffer has no entries to copy")
        };
        assert!(why.contains("ring buffer"), "{why}");
    }

    #[test]
    fn an_array_that_gained_slots_is_copied_at_the_same_revision() {
        // CONFIG got the flow-events switch, CT_STATS the flow-events-lost counter.
        let config = want("CONFIG", 1, map_type::ARRAY, 4, 8, 2);
        assert!(matches!(decide("CONFIG", 1, &info(map_type::ARRAY, 4, 8, 1), &config), How::Copy(Convert::Same)));
        // OVERLAY_CONFIG got this node's underlay address.
        let overlay = want("OVERLAY_CONFIG", 1, map_type::ARRAY, 4, 4, 2);
        let before = info(map_type::ARRAY, 4, 4, 1);
        assert!(matches!(decide("OVERLAY_CONFIG", 1, &before, &overlay), How::Copy(Convert::Same)));
        let stats = want("CT_STATS", 1, map_type::PERCPU_ARRAY, 4, 8, 3);
        assert!(matches!(decide("CT_STATS", 1, &info(map_type::PERCPU_ARRAY, 4, 8, 2), &stats), How::Copy(_)));
    }

    #[test]
    fn pins_of_a_retired_map_are_swept_and_other_files_stay() {
        // A plain directory stands in for the bpffs: the sweep only lists and removes files.
        let root = std::env::temp_dir().join(format!("netpath-sweep-{}", std::process::id()));
        let pins = Pins::new(&root);
        pins.make_dirs().unwrap();
        let touch = |p: PathBuf| std::fs::write(p, b"").unwrap();
        touch(pins.map("ENDPOINT_STATS", 1));
        touch(pins.map("ENDPOINT_STATS", 0));
        touch(pins.map("CT", 1));
        touch(pins.map("CT", 0)); // the landed build's CT: the plan migrates it
        touch(root.join("not-netpaths"));
        sweep_unknown(&pins, &[want("CT", 1, map_type::HASH, 16, 32, 131_072)]);
        assert!(!pins.map("ENDPOINT_STATS", 1).exists() && !pins.map("ENDPOINT_STATS", 0).exists());
        assert!(pins.map("CT", 1).exists() && pins.map("CT", 0).exists());
        assert!(root.join("not-netpaths").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_conntrack_port_bits_are_refilled_never_copied() {
        let bits = want("CT_PORTS", 1, map_type::ARRAY, 4, 8, 2049);
        let How::Replace(why) = decide("CT_PORTS", 1, &info(map_type::ARRAY, 4, 8, 2048), &bits) else {
            panic!("CT_PORTS is derived from CT")
        };
        assert!(why.contains("refilled"), "{why}");
    }

    #[test]
    fn a_different_size_of_the_same_revision_is_copied() {
        let ct = want("CT", 1, map_type::HASH, 16, 32, 65_536);
        assert!(matches!(decide("CT", 1, &info(map_type::HASH, 16, 32, 131_072), &ct), How::Copy(Convert::Same)));
    }
}
