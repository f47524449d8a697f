//! Map migration at the datapath level, on a private bpffs: a reload whose object asks for
//! another table size migrates the pinned table into a new one (entries kept, or dropped
//! where they no longer fit), under the same versioned name, leaving no staging pin.

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapInfo};
use netpath::datapath::{LoadOptions, map_pin};
use netpath_common::{CtEntry, Tuple, hook};
use netpath_tests::testrun::PrivateDatapath;

fn ct_size(n: u32) -> LoadOptions {
    LoadOptions { max_entries: vec![("CT".into(), n)], ..Default::default() }
}

fn add_flows(p: &PrivateDatapath, n: u16) {
    let mut m = Map::HashMap(MapData::from_pin(map_pin(p.pins(), "CT")).unwrap());
    let mut ct = BpfHashMap::<_, Tuple, CtEntry>::try_from(&mut m).unwrap();
    for i in 0..n {
        let t = Tuple::new(1, 2, (1000 + i).to_be(), 80u16.to_be(), 6);
        ct.insert(t, CtEntry { xlate: t, hook: hook::UPLINK_IN, last_seen_ns: 42, ..Default::default() }, 0).unwrap();
    }
}

fn map_files(p: &PrivateDatapath) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p.pins().join("maps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_bigger_table_keeps_every_entry() {
    let mut p = PrivateDatapath::with_options("mig-grow", ct_size(8));
    add_flows(&p, 6);
    let before = map_files(&p);
    p.reload(ct_size(16));
    assert_eq!(MapInfo::from_pin(map_pin(p.pins(), "CT")).unwrap().max_entries(), 16);
    let flows = p.dp().flows().unwrap();
    assert_eq!(flows.len(), 6);
    assert!(flows.iter().all(|(k, e)| e.xlate == *k && e.last_seen_ns == 42), "values copied as they were");
    assert_eq!(map_files(&p), before, "same names, no staging pin left");
}

#[test]
fn a_smaller_table_keeps_what_fits() {
    let mut p = PrivateDatapath::with_options("mig-shrink", ct_size(8));
    add_flows(&p, 6);
    p.reload(ct_size(4));
    assert_eq!(p.dp().flows().unwrap().len(), 4);
    // And the same size again is a plain reuse.
    p.reload(ct_size(4));
    assert_eq!(p.dp().flows().unwrap().len(), 4);
}

#[test]
fn a_crashed_migrations_staging_pin_is_cleared() {
    let mut p = PrivateDatapath::with_options("mig-crash", ct_size(8));
    add_flows(&p, 3);
    // What a daemon killed mid-migration leaves: the new map under its staging name.
    let staging = p.pins().join("maps").join("CT@v1@new");
    MapData::from_pin(map_pin(p.pins(), "CT")).unwrap().pin(&staging).unwrap();
    p.reload(ct_size(8));
    assert!(!staging.exists());
    assert_eq!(p.dp().flows().unwrap().len(), 3, "the complete pin at the final name is kept");
}
