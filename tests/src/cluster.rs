//! A multi-host lab: several [`Lab`] hosts on one "underlay" L2 segment, and a real etcd.
//!
//! The infrastructure is a lab of its own without a daemon: its host namespace is the
//! underlay switch (a bridge `ul`, one veth per node) and runs etcd on the underlay address
//! [`ETCD_IP`]. Each node is an ordinary [`Lab`] (host + client namespaces, its own daemon,
//! state dir, socket and pins) with a second interface `ul0` on the underlay
//! (192.0.2.N/24, TEST-NET-1: nothing routes it anywhere). Dropping the cluster stops the
//! daemons, etcd, and removes every namespace, as a single lab does.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::{DaemonOpts, Lab, in_ns, must};

pub const ETCD_IP: &str = "192.0.2.254";
pub const ETCD_PORT: u16 = 2379;

/// The underlay address of node `i` (0-based).
pub fn node_ip(i: usize) -> String {
    format!("192.0.2.{}", i + 1)
}

pub struct ClusterLab {
    /// The hosts; dropped (daemons stopped, namespaces gone) before the infrastructure.
    pub nodes: Vec<Option<Lab>>,
    etcd: Option<Child>,
    etcd_data: PathBuf,
    pub infra: Lab,
}

impl ClusterLab {
    /// `n` hosts, etcd running, each daemon joined with `--cluster-store`.
    pub fn new(tag: &str, n: usize) -> ClusterLab {
        Self::with_args(tag, n, &[])
    }

    /// [`ClusterLab::new`] with more `netpath daemon` flags for every node.
    pub fn with_args(tag: &str, n: usize, args: &[&str]) -> ClusterLab {
        let infra = Lab::without_daemon(&format!("{tag}-infra"));
        // A fixed MAC: a bridge without one takes the lowest of its ports' and changes it as
        // nodes come and go, and the nodes' neighbour entries for etcd then point nowhere.
        must(infra.host("ip", &["link", "add", "ul", "address", "02:00:c0:00:02:fe", "type", "bridge"]));
        must(infra.host("ip", &["addr", "add", &format!("{ETCD_IP}/24"), "dev", "ul"]));
        must(infra.host("ip", &["link", "set", "ul", "up"]));
        let etcd_data = infra.dir.join("etcd");
        let mut c = ClusterLab { nodes: vec![], etcd: None, etcd_data, infra };
        c.start_etcd();
        for i in 0..n {
            let mut opts = Self::daemon_opts(i);
            opts.args.extend(args.iter().map(|a| a.to_string()));
            c.add_node(tag, &opts);
        }
        c
    }

    /// Another host on the underlay (address [`node_ip`] of its index), its daemon started
    /// with `opts`; returns its index.
    pub fn add_node(&mut self, tag: &str, opts: &DaemonOpts) -> usize {
        let i = self.nodes.len();
        let mut lab = Lab::without_daemon(&format!("{tag}-n{i}"));
        let peer = format!("ulp{i}");
        let infra_ns = self.infra.host_ns.display().to_string();
        must(lab.host("ip", &["link", "add", "ul0", "type", "veth", "peer", "name", &peer, "netns", &infra_ns]));
        must(self.infra.host("ip", &["link", "set", &peer, "master", "ul", "up"]));
        must(lab.host("ip", &["addr", "add", &format!("{}/24", node_ip(i)), "dev", "ul0"]));
        must(lab.host("ip", &["link", "set", "ul0", "up"]));
        lab.start_daemon_with(opts);
        self.nodes.push(Some(lab));
        i
    }

    /// The flags that join node `i` to the cluster.
    pub fn daemon_opts(i: usize) -> DaemonOpts {
        DaemonOpts {
            args: vec![
                "--cluster-store".into(),
                format!("etcd://{ETCD_IP}:{ETCD_PORT}"),
                "--node-ip".into(),
                node_ip(i),
                "--node-name".into(),
                format!("node{i}"),
            ],
            // Each failed (re)connection attempt, for the log of a failing test.
            env: vec![("NETPATH_LOG".into(), "info,netpath::cluster=debug".into())],
            ..Default::default()
        }
    }

    pub fn node(&self, i: usize) -> &Lab {
        self.nodes[i].as_ref().expect("node was removed")
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Lab {
        self.nodes[i].as_mut().expect("node was removed")
    }

    /// Kills node `i` for good: its daemon (SIGKILL) and every namespace of it.
    pub fn destroy_node(&mut self, i: usize) {
        if let Some(mut lab) = self.nodes[i].take() {
            lab.kill_daemon();
        }
    }

    /// Starts etcd (again, on the same data) in the infrastructure namespace.
    pub fn start_etcd(&mut self) {
        assert!(self.etcd.is_none(), "etcd already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.infra.dir.join("etcd.log")).unwrap();
        let client = format!("http://{ETCD_IP}:{ETCD_PORT}");
        let child = in_ns(&self.infra.host_ns, "etcd", &[])
            .args(["--name", "lab", "--data-dir"])
            .arg(&self.etcd_data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            // Peers on the namespace's loopback: a one-member cluster talks to nobody.
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "lab=http://127.0.0.1:2380"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting etcd (apt install etcd-server)");
        self.etcd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = in_ns(&self.infra.host_ns, "etcdctl", &["--endpoints", &client, "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not come up:\n{}", self.etcd_log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops etcd (SIGKILL: as a crash or a lost host would).
    pub fn stop_etcd(&mut self) {
        if let Some(mut e) = self.etcd.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
    }

    pub fn etcd_log(&self) -> String {
        std::fs::read_to_string(self.infra.dir.join("etcd.log")).unwrap_or_default()
    }

    /// `node ls --format json` on node `i`: (name, status) pairs.
    pub fn node_ls(&self, i: usize) -> Vec<(String, String)> {
        self.node(i)
            .np(&["node", "ls", "--format", "json"])
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("node ls JSON");
                (v["Name"].as_str().unwrap_or("").to_string(), v["Status"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }

    /// The underlay as node `i` sees it (neighbours, sockets to etcd, a ping), for a failure
    /// message.
    pub fn underlay_report(&self, i: usize) -> String {
        let ns = &self.node(i).host_ns;
        let run = |prog: &str, args: &[&str]| {
            let o = in_ns(ns, prog, args).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            format!("$ {prog} {}\n{}", args.join(" "), o.unwrap_or_default())
        };
        [
            run("ip", &["neigh"]),
            run("ip", &["route"]),
            run("ss", &["-tan", "dst", ETCD_IP]),
            run("ping", &["-c", "1", "-W", "1", ETCD_IP]),
        ]
        .join("")
    }

    /// Waits (up to `secs`) until `f` holds; panics with `what` otherwise.
    pub fn wait_for(&self, secs: u64, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- etcd log ---\n{}", self.etcd_log());
        }
        for n in &mut self.nodes {
            n.take();
        }
        self.stop_etcd();
    }
}
