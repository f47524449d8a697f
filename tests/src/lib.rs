//! The netns lab: every end-to-end test, the demo and the benchmarks run here.
//!
//! A lab is a directory under /tmp holding a "host" network namespace (with an `eth0` veth to
//! a "client" namespace), a real `netpath daemon` running inside the host namespace with its
//! own state dir, socket and bpffs pin dir, and any other namespaces a test adds. Names are
//! unique per process and lab, so tests run in parallel. Dropping the lab (also on panic)
//! stops the daemon, kills every process left in the lab's namespaces, unmounts everything and
//! removes the directory; `Lab::new` first sweeps labs left by killed runs.
//! Traffic only ever goes to addresses of namespaces the lab made.

pub mod cluster;
pub mod dns;
pub mod overlay_lab;
pub mod packet;
pub mod testrun;

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use netpath::netlink::netns;

const LAB_PREFIX: &str = "netpath-lab-";

/// Addresses of the link between the host namespace's `eth0` and the client namespace:
/// TEST-NET-2, never routed anywhere.
pub const HOST_ETH0_IP: &str = "198.51.100.1";
pub const CLIENT_IP: &str = "198.51.100.2";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// How [`Lab::start_daemon_with`] starts the daemon.
#[derive(Debug, Clone, Default)]
pub struct DaemonOpts {
    /// Extra `netpath daemon` flags.
    pub args: Vec<String>,
    /// Extra environment (e.g. NETPATH_CRASH_AT).
    pub env: Vec<(String, String)>,
    /// No `--uplink eth0`: every interface that is not netpath's is an uplink.
    pub all_uplinks: bool,
}

pub struct Lab {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub host_ns: PathBuf,
    pub client_ns: PathBuf,
    /// The daemon's `--resolv-conf`: the upstreams of its embedded DNS server. No nameserver
    /// unless a test sets one ([`Lab::set_upstreams`]), so no lab ever asks the machine's own.
    pub resolv_conf: PathBuf,
    daemon: Option<Child>,
    /// `netpath daemon` flags every start of this lab's daemon gets (restarts included).
    daemon_args: Vec<String>,
}

/// The second build of the eBPF programs the upgrade tests switch to (`cargo xtask build`
/// makes it): $NETPATH_TEST_EBPF_VARIANT, or its place in the workspace's target dir.
pub fn variant_object() -> PathBuf {
    if let Ok(p) = std::env::var("NETPATH_TEST_EBPF_VARIANT") {
        return PathBuf::from(p);
    }
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf-upgrade-test/bpfel-unknown-none/debug/netpath-ebpf");
    assert!(p.is_file(), "{} is missing: run `cargo xtask build` first", p.display());
    p
}

/// The netpath binary under test: $NETPATH_BIN, or `netpath` next to the test's target dir.
pub fn netpath_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NETPATH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/test-xxxx or target/<profile>/netpath-demo
    for dir in exe.ancestors().skip(1).take(2) {
        let cand = dir.join("netpath");
        if cand.is_file() {
            return cand;
        }
    }
    panic!("netpath binary not found next to {}: run `cargo build` (or `cargo xtask test`) first", exe.display());
}

/// Runs a command inside the network namespace at `ns` (setns in the child, so the caller's
/// threads are untouched).
pub fn in_ns(ns: &Path, prog: &str, args: &[&str]) -> Command {
    let fd: std::os::fd::OwnedFd =
        std::fs::File::open(ns).unwrap_or_else(|e| panic!("open {}: {e}", ns.display())).into();
    let mut c = Command::new(prog);
    c.args(args);
    // SAFETY: setns is async-signal-safe.
    unsafe {
        c.pre_exec(move || {
            use std::os::fd::AsRawFd;
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// Runs to completion and panics with both output streams if it failed.
pub fn must(mut c: Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("spawning {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Lab {
    /// Builds a lab (host + client namespaces, linked by a veth) and starts its daemon.
    pub fn new(tag: &str) -> Lab {
        Self::with_daemon_args(tag, &[])
    }

    /// [`Lab::new`] with `netpath daemon` flags its every start gets (`--xdp native`: the same
    /// tests with XDP on the uplink).
    pub fn with_daemon_args(tag: &str, args: &[&str]) -> Lab {
        let mut lab = Self::without_daemon(tag);
        lab.daemon_args = args.iter().map(|a| a.to_string()).collect();
        lab.start_daemon();
        lab
    }

    /// Makes the client send full L4 checksums, as frames off a wire carry, instead of leaving
    /// them to (veth) offload: uplink_xdp passes those to TC (it cannot complete them).
    pub fn client_sends_full_checksums(&self) {
        must(in_ns(&self.client_ns, "ethtool", &["-K", "eth0", "tx", "off"]));
    }

    /// Frames XDP redirected from the uplink (the host's eth0, a veth: its own counters of
    /// native XDP, `ethtool -S`).
    pub fn uplink_xdp_redirects(&self) -> u64 {
        must(in_ns(&self.host_ns, "ethtool", &["-S", "eth0"]))
            .lines()
            .filter_map(|l| l.trim().split_once(": "))
            .filter(|(k, _)| k.ends_with("_xdp_redirect"))
            .map(|(_, v)| v.parse::<u64>().unwrap())
            .sum()
    }

    /// Replaces the flags the daemon's next starts get.
    pub fn set_daemon_args(&mut self, args: &[&str]) {
        self.daemon_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// Builds the namespaces only; call [`Lab::start_daemon`] yourself.
    pub fn without_daemon(tag: &str) -> Lab {
        sweep();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("{LAB_PREFIX}{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("ns")).expect("lab dir");
        let lab = Lab {
            socket: dir.join("netpath.sock"),
            state_dir: dir.join("state"),
            bpffs: dir.join("bpf"),
            host_ns: dir.join("ns/host"),
            client_ns: dir.join("ns/client"),
            resolv_conf: dir.join("resolv.conf"),
            dir,
            daemon: None,
            daemon_args: vec![],
        };
        lab.set_upstreams(&[]);
        // From here on, Drop cleans up whatever was made.
        lab.make_ns(&lab.host_ns);
        lab.make_ns(&lab.client_ns);
        // One veth: host "eth0" <-> client "eth0".
        let peer_ns = lab.client_ns.display().to_string();
        must(in_ns(
            &lab.host_ns,
            "ip",
            &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer_ns],
        ));
        must(in_ns(&lab.host_ns, "ip", &["addr", "add", &format!("{HOST_ETH0_IP}/24"), "dev", "eth0"]));
        must(in_ns(&lab.host_ns, "ip", &["link", "set", "eth0", "up"]));
        must(in_ns(&lab.client_ns, "ip", &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]));
        must(in_ns(&lab.client_ns, "ip", &["link", "set", "eth0", "up"]));
        lab
    }

    /// Writes the lab's resolv.conf: the daemon forwards names it does not know to `servers`
    /// (addresses of the lab's own namespaces), and default-bridge containers get them.
    pub fn set_upstreams(&self, servers: &[&str]) {
        let mut s = String::from("# netpath lab: upstream resolvers\n");
        servers.iter().for_each(|a| s.push_str(&format!("nameserver {a}\n")));
        std::fs::write(&self.resolv_conf, s).expect("writing the lab's resolv.conf");
    }

    /// Makes another namespace (with `lo` up) that belongs to this lab.
    pub fn add_ns(&self, name: &str) -> PathBuf {
        let p = self.dir.join("ns").join(name);
        self.make_ns(&p);
        p
    }

    fn make_ns(&self, p: &Path) {
        netns::create(p).unwrap_or_else(|e| panic!("creating netns {}: {e:#}", p.display()));
        must(in_ns(p, "ip", &["link", "set", "lo", "up"]));
    }

    /// Starts `netpath daemon` inside the host namespace and waits until it answers.
    pub fn start_daemon(&mut self) {
        self.start_daemon_with(&DaemonOpts::default());
    }

    /// [`Lab::start_daemon`] with extra flags and environment; waits until it has reconciled
    /// (unless it dies first and `opts.may_die`).
    pub fn start_daemon_with(&mut self, opts: &DaemonOpts) {
        self.spawn_daemon(opts);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Answering is not enough: wait until it has made the kernel match its state.
            let out = self.try_np(&["system", "info"]);
            if out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|v| v["Ready"] == true)
            {
                return;
            }
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {st}:\n{}", self.daemon_log());
            }
            assert!(Instant::now() < deadline, "daemon did not come up:\n{}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the daemon without waiting for it.
    pub fn spawn_daemon(&mut self, opts: &DaemonOpts) {
        assert!(self.daemon.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("daemon.log")).unwrap();
        let mut c = in_ns(&self.host_ns, netpath_bin().to_str().unwrap(), &[]);
        c.arg("--socket")
            .arg(&self.socket)
            .arg("daemon")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--resolv-conf")
            .arg(&self.resolv_conf)
            .args(&self.daemon_args)
            .args(&opts.args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if !opts.all_uplinks {
            c.arg("--uplink").arg("eth0");
        }
        self.daemon = Some(c.spawn().expect("starting netpath daemon"));
    }

    /// Kills the daemon with SIGKILL (a crash) and reaps it.
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    /// Waits (up to 20 s) for a daemon that is expected to die (a crash point) and reaps it;
    /// false if it is still running.
    pub fn wait_daemon_died(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(d) = self.daemon.as_mut() {
            if d.try_wait().unwrap().is_some() {
                self.daemon = None;
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// The daemon's pid, while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.id())
    }

    /// Stops the daemon (SIGTERM) and waits for it; containers stay, as after a real restart.
    pub fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = d.kill();
                    let _ = d.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn restart_daemon(&mut self) {
        self.stop_daemon();
        self.start_daemon();
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The CLI, pointed at this lab's daemon. Runs where the test runs (any namespace works:
    /// it only talks to the socket and enters container namespaces by path).
    pub fn np_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(netpath_bin());
        c.arg("--socket").arg(&self.socket).args(args).stdin(Stdio::null());
        c
    }

    pub fn try_np(&self, args: &[&str]) -> Output {
        self.np_cmd(args).output().expect("running netpath")
    }

    /// Runs the CLI, asserts success, returns stdout.
    pub fn np(&self, args: &[&str]) -> String {
        let out = self.try_np(args);
        assert!(
            out.status.success(),
            "netpath {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI, asserts a non-zero exit, returns stderr.
    pub fn np_fails(&self, args: &[&str]) -> String {
        let out = self.try_np(args);
        assert!(
            !out.status.success(),
            "netpath {args:?} unexpectedly succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn inspect(&self, container: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&self.np(&["inspect", container])).expect("inspect JSON");
        v[0].clone()
    }

    pub fn inspect_network(&self, network: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.np(&["network", "inspect", network])).expect("inspect JSON");
        v[0].clone()
    }

    /// A container's address on a network, from `netpath inspect`.
    pub fn ip_of(&self, container: &str, network: &str) -> String {
        self.inspect(container)["NetworkSettings"]["Networks"][network]["IPAddress"]
            .as_str()
            .unwrap_or_else(|| panic!("{container} has no address on {network}"))
            .to_string()
    }

    /// The network namespace of a container (a file under the state dir): commands run there
    /// directly keep running whatever the daemon does.
    pub fn sandbox(&self, container: &str) -> PathBuf {
        PathBuf::from(self.inspect(container)["NetworkSettings"]["SandboxKey"].as_str().expect("SandboxKey"))
    }

    /// Runs a command in the host namespace.
    pub fn host(&self, prog: &str, args: &[&str]) -> Command {
        in_ns(&self.host_ns, prog, args)
    }

    /// Waits until the daemon has deleted what removed containers left behind: `rm` answers
    /// once the container is gone from the datapath and the state, and its veths and namespace
    /// follow in the background (`PendingRemovals` of `system info`). At once when no daemon runs.
    pub fn settle(&self) {
        if self.daemon.is_none() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.try_np(&["system", "info"]);
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return };
            let pending = v["PendingRemovals"].as_u64().unwrap_or(0);
            if pending == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{pending} removals still pending after 30 s:\n{}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Interface names in a namespace, once the daemon has settled (see [`Lab::settle`]).
    pub fn links(&self, ns: &Path) -> Vec<String> {
        self.settle();
        must(in_ns(ns, "ip", &["-o", "link", "show"]))
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap().to_string())
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_daemon();
        if std::thread::panicking() {
            eprintln!("--- daemon log of {} ---\n{}", self.dir.display(), self.daemon_log());
        }
        destroy(&self.dir);
    }
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> =
        info.lines().filter_map(|l| l.split(' ').nth(4)).map(PathBuf::from).filter(|p| p.starts_with(dir)).collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Kills every process inside the lab's namespaces (daemon and containers alike), unmounts
/// namespaces and the bpffs, removes the directory. With the last reference gone the kernel
/// deletes the namespaces and every link in them.
fn destroy(dir: &Path) {
    let mounts = mounts_under(dir);
    let inodes: HashSet<u64> = mounts.iter().filter(|m| netns::is_mounted(m)).filter_map(|m| netns::inode(m)).collect();
    for _ in 0..50 {
        let mut found = false;
        for pid in std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        {
            if netns::inode(Path::new(&format!("/proc/{pid}/ns/net"))).is_some_and(|i| inodes.contains(&i)) {
                found = true;
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        if !found {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for m in mounts {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes labs whose creating process is gone (a killed test run).
pub fn sweep() {
    let tmp = std::env::temp_dir();
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(LAB_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid != std::process::id() as i32 && !Path::new(&format!("/proc/{pid}")).exists() {
            destroy(&e.path());
        }
    }
}
