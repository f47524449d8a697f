//! The state on disk: one file per object (`db/networks/<id>.json`, `db/containers/<id>.json`)
//! under `--state-dir`, so saving one container costs the same whatever the number of others.
//! Each file is written crash-safely (temp file, fsync, rename, fsync dir): a crash leaves the
//! old or the new version of that object, never a torn one.
//!
//! Writes of one object may be issued concurrently by different requests: each carries the
//! state's revision at the time it was taken, and an older revision never overwrites a newer.
//!
//! A clean stop also writes every object into one file, `db/snapshot.json`, which the next
//! start reads instead of one file per object: ten thousand small files cost that start
//! ~0.4 s (each a page of its own, cold by then), the snapshot a few ms. It exists only while
//! it holds exactly what the object files hold: the first write after it removes it, and a
//! start that finds the object directories changed since (an older build wrote to them)
//! reads the object files.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Container, FirewallRule, Network, Service};

/// What a write does to an object's file.
pub enum Op<'a, T> {
    Save(&'a T),
    Delete,
}

const EXIT_SUFFIX: &str = ".exit";

pub struct Store {
    dir: PathBuf,
    /// Object file → the revision last written to it. Held while writing that file, which
    /// also serialises the writes of one object (others proceed in parallel).
    written: Mutex<HashMap<PathBuf, std::sync::Arc<Mutex<u64>>>>,
    /// True while `db/snapshot.json` may exist (and then matches the object files). Object
    /// writes hold it shared, taking the snapshot away first; writing one holds it alone.
    snapshot: RwLock<bool>,
}

/// Every object of the state.
#[derive(Debug, Default, Deserialize)]
pub struct Objects {
    pub networks: Vec<Network>,
    pub containers: Vec<Container>,
    pub services: Vec<Service>,
    pub rules: Vec<FirewallRule>,
}

/// The same, borrowed from the state, for writing a snapshot without copying it.
#[derive(Serialize)]
pub struct ObjectsRef<'a> {
    pub networks: Vec<&'a Network>,
    pub containers: Vec<&'a Container>,
    pub services: Vec<&'a Service>,
    pub rules: Vec<&'a FirewallRule>,
}

/// `db/snapshot.json`: the objects, and the modification times of the object directories
/// when it was written.
#[derive(Deserialize)]
struct Snapshot {
    format: u32,
    dirs: Vec<(i64, i64)>,
    objects: Objects,
}

const SNAPSHOT: &str = "db/snapshot.json";
const SNAPSHOT_FORMAT: u32 = 1;

const NETWORKS: &str = "db/networks";
const CONTAINERS: &str = "db/containers";
const SERVICES: &str = "db/services";
const FIREWALL: &str = "db/firewall";
/// The single-file state of earlier versions, split into per-object files on first start.
const LEGACY: &str = "state.json";

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        for sub in ["", "netns", "containers", NETWORKS, CONTAINERS, SERVICES, FIREWALL] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        Ok(Self { dir: dir.to_owned(), written: Mutex::new(HashMap::new()), snapshot: RwLock::new(true) })
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn netns_dir(&self) -> PathBuf {
        self.dir.join("netns")
    }
    /// The pinned template of container processes' mount namespaces.
    pub fn mount_template(&self) -> PathBuf {
        self.dir.join("mnt-template")
    }
    pub fn netns_path(&self, container_id: &str) -> PathBuf {
        self.netns_dir().join(&container_id[..12])
    }
    /// Where containers' processes leave their logs and exit codes.
    pub fn process_dir(&self) -> PathBuf {
        self.dir.join("containers")
    }
    pub fn log_path(&self, container_id: &str) -> PathBuf {
        self.process_dir().join(format!("{}.log", &container_id[..12]))
    }
    /// Where a detached process's supervisor records its exit code.
    pub fn exit_path(&self, container_id: &str) -> PathBuf {
        self.process_dir().join(format!("{}{EXIT_SUFFIX}", &container_id[..12]))
    }
    /// The container id prefix an exit file (a name in [`Self::process_dir`]) is for.
    pub fn exit_file_id(name: &str) -> Option<&str> {
        name.strip_suffix(EXIT_SUFFIX).filter(|id| id.len() == 12)
    }

    /// Reads every object. A file that does not parse is an error naming it, never an empty
    /// state (which would make the daemon forget, and then leak, what that file described).
    pub fn load(&self) -> Result<(Vec<Network>, Vec<Container>)> {
        self.migrate_legacy()?;
        Ok((self.load_dir(NETWORKS)?, self.load_dir(CONTAINERS)?))
    }

    /// Reads every object: from the snapshot a clean stop left, if it still holds what the
    /// object files hold, or else from those files.
    pub fn load_all(&self) -> Result<Objects> {
        if !self.dir.join(LEGACY).exists() {
            match self.read_snapshot() {
                Ok(Some(o)) => return Ok(o),
                Ok(None) => {}
                Err(e) => warn!("state: not using {SNAPSHOT}: {e:#}"),
            }
        }
        drop(self.take_snapshot_away()?);
        let (networks, containers) = self.load()?;
        Ok(Objects { networks, containers, services: self.load_services()?, rules: self.load_rules()? })
    }

    fn read_snapshot(&self) -> Result<Option<Objects>> {
        let b = match fs::read(self.dir.join(SNAPSHOT)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let snap: Snapshot = serde_json::from_slice(&b).context("parsing it")?;
        anyhow::ensure!(snap.format == SNAPSHOT_FORMAT, "format {} (this build writes {SNAPSHOT_FORMAT})", snap.format);
        if snap.dirs != self.dir_times()? {
            info!("state: the object files changed after {SNAPSHOT} was written; reading them");
            return Ok(None);
        }
        Ok(Some(snap.objects))
    }

    /// When each object directory last changed: every write renames or removes a file in one.
    fn dir_times(&self) -> Result<Vec<(i64, i64)>> {
        use std::os::unix::fs::MetadataExt;
        [NETWORKS, CONTAINERS, SERVICES, FIREWALL]
            .iter()
            .map(|d| {
                let m = fs::metadata(self.dir.join(d)).with_context(|| format!("reading {d}"))?;
                Ok((m.mtime(), m.mtime_nsec()))
            })
            .collect()
    }

    /// Writes the snapshot of `objects` (the serialised [`ObjectsRef`] of the state, taken
    /// while no object write runs: the state then holds what the files hold, or newer).
    pub fn save_snapshot(&self, objects: impl FnOnce() -> Result<Vec<u8>>) -> Result<()> {
        let mut live = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        let dirs = serde_json::to_string(&self.dir_times()?)?;
        let mut data = format!("{{\"format\":{SNAPSHOT_FORMAT},\"dirs\":{dirs},\"objects\":").into_bytes();
        data.extend(objects()?);
        data.push(b'}');
        let file = self.dir.join(SNAPSHOT);
        let tmp = file.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &file).with_context(|| format!("replacing {}", file.display()))?;
        fs::File::open(self.dir.join("db"))?.sync_all().context("syncing the state directory")?;
        *live = true;
        Ok(())
    }

    /// Removes the snapshot (durably) unless already gone; returns the shared hold under which
    /// an object file may change.
    fn take_snapshot_away(&self) -> Result<RwLockReadGuard<'_, bool>> {
        loop {
            let live = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
            if !*live {
                return Ok(live);
            }
            drop(live);
            let mut live = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
            if *live {
                match fs::remove_file(self.dir.join(SNAPSHOT)) {
                    Ok(()) => fs::File::open(self.dir.join("db"))?.sync_all().context("syncing the state directory")?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).context(format!("removing {SNAPSHOT}")),
                }
                *live = false;
            }
        }
    }

    /// Reads every service.
    pub fn load_services(&self) -> Result<Vec<Service>> {
        self.load_dir(SERVICES)
    }

    /// Reads every firewall rule.
    pub fn load_rules(&self) -> Result<Vec<FirewallRule>> {
        self.load_dir(FIREWALL)
    }

    fn load_dir<T: DeserializeOwned>(&self, sub: &str) -> Result<Vec<T>> {
        let dir = self.dir.join(sub);
        let mut out = vec![];
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = e?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with('.') {
                // A write the daemon did not finish: the object's file still holds the old version.
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let b = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            out.push(serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?);
        }
        Ok(out)
    }

    /// Splits the single state file of earlier versions into per-object files.
    fn migrate_legacy(&self) -> Result<()> {
        #[derive(serde::Deserialize)]
        struct Legacy {
            networks: Vec<Network>,
            containers: Vec<Container>,
        }
        let file = self.dir.join(LEGACY);
        let b = match fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        let old: Legacy = serde_json::from_slice(&b).with_context(|| format!("parsing {}", file.display()))?;
        for n in &old.networks {
            self.write_file(&self.network_file(&n.id), Op::Save(n), 0)?;
        }
        for c in &old.containers {
            self.write_file(&self.container_file(&c.id), Op::Save(c), 0)?;
        }
        // Only once every object is safely in its own file.
        fs::rename(&file, self.dir.join(format!("{LEGACY}.migrated"))).context("retiring the old state file")?;
        info!(
            "state: moved {} networks and {} containers to per-object files",
            old.networks.len(),
            old.containers.len()
        );
        Ok(())
    }

    fn network_file(&self, id: &str) -> PathBuf {
        self.dir.join(NETWORKS).join(format!("{id}.json"))
    }
    fn container_file(&self, id: &str) -> PathBuf {
        self.dir.join(CONTAINERS).join(format!("{id}.json"))
    }

    pub fn write_network(&self, id: &str, op: Op<Network>, rev: u64) -> Result<()> {
        self.write_file(&self.network_file(id), op, rev)
    }
    pub fn write_container(&self, id: &str, op: Op<Container>, rev: u64) -> Result<()> {
        self.write_file(&self.container_file(id), op, rev)
    }
    pub fn write_service(&self, id: &str, op: Op<Service>, rev: u64) -> Result<()> {
        self.write_file(&self.dir.join(SERVICES).join(format!("{id}.json")), op, rev)
    }

    pub fn write_rule(&self, id: &str, op: Op<FirewallRule>, rev: u64) -> Result<()> {
        self.write_file(&self.dir.join(FIREWALL).join(format!("{id}.json")), op, rev)
    }

    fn write_file<T: Serialize>(&self, file: &Path, op: Op<T>, rev: u64) -> Result<()> {
        let _no_snapshot = self.take_snapshot_away()?;
        let slot = self.written.lock().unwrap().entry(file.to_owned()).or_default().clone();
        let mut last = slot.lock().unwrap();
        if rev != 0 && *last > rev {
            return Ok(()); // a newer version is already on disk
        }
        let dir = file.parent().context("object file without a directory")?;
        match op {
            Op::Save(v) => {
                let tmp = dir.join(format!(".{}.tmp", file.file_name().unwrap_or_default().to_string_lossy()));
                let data = serde_json::to_vec_pretty(v)?;
                let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                f.write_all(&data)?;
                f.sync_all()?;
                drop(f);
                fs::rename(&tmp, file).with_context(|| format!("replacing {}", file.display()))?;
            }
            Op::Delete => match fs::remove_file(file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
            },
        }
        fs::File::open(dir)?.sync_all().context("syncing the state directory")?;
        *last = rev;
        drop(last);
        drop(slot);
        if matches!(op, Op::Delete) {
            // Forget deleted objects so churn does not grow the table.
            let mut w = self.written.lock().unwrap();
            if w.get(file).is_some_and(|s| std::sync::Arc::strong_count(s) == 1) {
                w.remove(file);
            } else if w.contains_key(file) {
                warn!("state: {} was rewritten while being deleted", file.display());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{container, network};
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("netpath-store-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn objects_roundtrip_one_file_each_and_no_temp_left() {
        let d = tmpdir("rt");
        let s = Store::open(&d).unwrap();
        assert!(s.load().unwrap().0.is_empty(), "an empty dir is an empty state");
        let n = network("n1", "10.5.0.0/24");
        let c = container("c1", &n, "10.5.0.2", Some(80));
        s.write_network(&n.id, Op::Save(&n), 1).unwrap();
        s.write_container(&c.id, Op::Save(&c), 2).unwrap();
        let (nets, ctrs) = s.load().unwrap();
        assert_eq!(nets[0].name, "n1");
        assert_eq!(ctrs[0].name, "c1");
        assert_eq!(ctrs[0].ports.len(), 1);
        assert_eq!(fs::read_dir(d.join(CONTAINERS)).unwrap().count(), 1, "no temp file left");
        s.write_container(&c.id, Op::Delete, 3).unwrap();
        assert!(s.load().unwrap().1.is_empty());
        assert_eq!(s.written.lock().unwrap().len(), 1, "deleted objects are forgotten (the network stays)");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_older_revision_never_overwrites_a_newer_one() {
        let d = tmpdir("rev");
        let s = Store::open(&d).unwrap();
        let n = network("n", "10.5.0.0/24");
        let mut c = container("new", &n, "10.5.0.2", None);
        s.write_container(&c.id, Op::Save(&c), 5).unwrap();
        c.name = "old".into();
        s.write_container(&c.id, Op::Save(&c), 4).unwrap();
        assert_eq!(s.load().unwrap().1[0].name, "new");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file_and_torn_writes_are_ignored() {
        let d = tmpdir("corrupt");
        let s = Store::open(&d).unwrap();
        fs::write(d.join(CONTAINERS).join(".abc.json.tmp"), b"{ half").unwrap();
        assert!(s.load().unwrap().1.is_empty(), "an unfinished write is not an object");
        assert!(!d.join(CONTAINERS).join(".abc.json.tmp").exists(), "and is cleaned up");
        fs::write(d.join(CONTAINERS).join("abc.json"), b"{ not json").unwrap();
        let e = s.load().unwrap_err();
        assert!(format!("{e:#}").contains("abc.json"), "{e:#}");
        fs::remove_dir_all(&d).unwrap();
    }

    fn snapshot_of(s: &Store, nets: &[&Network], ctrs: &[&Container]) {
        s.save_snapshot(|| {
            let o = ObjectsRef { networks: nets.to_vec(), containers: ctrs.to_vec(), services: vec![], rules: vec![] };
            Ok(serde_json::to_vec(&o)?)
        })
        .unwrap();
    }

    #[test]
    fn a_clean_stop_leaves_a_snapshot_the_next_start_reads_instead_of_the_files() {
        let d = tmpdir("snap");
        let s = Store::open(&d).unwrap();
        let n = network("n", "10.5.0.0/24");
        let c = container("c", &n, "10.5.0.2", Some(80));
        s.write_network(&n.id, Op::Save(&n), 1).unwrap();
        s.write_container(&c.id, Op::Save(&c), 2).unwrap();
        snapshot_of(&s, &[&n], &[&c]);
        // Spoil the container's file in place (no rename: its directory does not change):
        // only a start that reads the snapshot still succeeds.
        fs::write(s.container_file(&c.id), b"{ spoilt").unwrap();
        let o = Store::open(&d).unwrap().load_all().unwrap();
        assert_eq!((o.networks[0].name.as_str(), o.containers[0].name.as_str()), ("n", "c"));
        assert_eq!(o.containers[0].ports, c.ports);
        assert!(d.join(SNAPSHOT).exists(), "kept while nothing changes");
        fs::remove_dir_all(&d).unwrap();
    }

    /// A store holding network `n` and a snapshot of it, and container `c` (on `n`) not yet
    /// written anywhere.
    fn snapshot_of_one_network(tag: &str) -> (PathBuf, Store, Container) {
        let d = tmpdir(tag);
        let s = Store::open(&d).unwrap();
        let n = network("n", "10.5.0.0/24");
        let c = container("c", &n, "10.5.0.2", None);
        s.write_network(&n.id, Op::Save(&n), 1).unwrap();
        snapshot_of(&s, &[&n], &[]);
        (d, s, c)
    }

    #[test]
    fn the_first_write_after_a_snapshot_takes_it_away() {
        let (d, _, c) = snapshot_of_one_network("snapwrite");
        let s = Store::open(&d).unwrap();
        assert!(s.load_all().unwrap().containers.is_empty());
        s.write_container(&c.id, Op::Save(&c), 2).unwrap();
        assert!(!d.join(SNAPSHOT).exists(), "a write removes it before changing a file");
        // And a daemon that stops uncleanly now leaves the files, which have the container.
        assert_eq!(Store::open(&d).unwrap().load_all().unwrap().containers.len(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_snapshot_is_not_read_when_the_files_changed_behind_it_or_it_does_not_parse() {
        let (d, s, c) = snapshot_of_one_network("snapstale");
        // A build without snapshots writes a container's file (temp file and rename), later.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let tmp = d.join(CONTAINERS).join("x.tmp");
        fs::write(&tmp, serde_json::to_vec(&c).unwrap()).unwrap();
        fs::rename(&tmp, s.container_file(&c.id)).unwrap();
        let o = Store::open(&d).unwrap().load_all().unwrap();
        assert_eq!(o.containers.len(), 1, "the files, not the stale snapshot");
        assert!(!d.join(SNAPSHOT).exists(), "and the stale snapshot is gone");
        fs::write(d.join(SNAPSHOT), b"{ torn").unwrap();
        assert_eq!(Store::open(&d).unwrap().load_all().unwrap().containers.len(), 1);
        assert!(!d.join(SNAPSHOT).exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_single_state_file_of_earlier_versions_is_split() {
        let d = tmpdir("legacy");
        fs::create_dir_all(&d).unwrap();
        let n = network("n", "10.5.0.0/24");
        let c = container("c", &n, "10.5.0.2", None);
        let legacy = serde_json::json!({ "networks": [n], "containers": [c] });
        fs::write(d.join(LEGACY), legacy.to_string()).unwrap();
        let s = Store::open(&d).unwrap();
        let (nets, ctrs) = s.load().unwrap();
        assert_eq!((nets.len(), ctrs.len()), (1, 1));
        assert!(!d.join(LEGACY).exists());
        assert!(d.join("state.json.migrated").exists());
        // Idempotent: a second start reads the per-object files.
        let (nets, ctrs) = Store::open(&d).unwrap().load().unwrap();
        assert_eq!((nets.len(), ctrs.len()), (1, 1));
        fs::remove_dir_all(&d).unwrap();
    }
}
