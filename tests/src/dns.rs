//! An upstream resolver for labs: dnsmasq (Debian's `dnsmasq-base`) in one of the lab's
//! namespaces, answering a few fixed names and NXDOMAIN for everything else, never asking
//! anyone. The DNS tests and the DNS benchmark forward to it.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::{Lab, in_ns};

/// An external name every lab upstream answers.
pub const EXT_NAME: &str = "ext.test";

/// dnsmasq answering `ext.test` with `ext_ip`, `big.test` with a TXT record of about 800
/// bytes (UDP answers are cut at 512 bytes: `--edns-packet-max`, so it comes back truncated
/// over UDP and whole over TCP), and NXDOMAIN for every other name. Killed on drop.
pub struct Upstream(Child);

impl Upstream {
    pub fn start(lab: &Lab, ns: &Path, addr: &str, ext_ip: &str) -> Upstream {
        let big: Vec<String> = (0..4).map(|i| format!("\"{}\"", i.to_string().repeat(200))).collect();
        let mut c = in_ns(
            ns,
            "dnsmasq",
            &[
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--user=root",
                "--bind-interfaces",
                &format!("--listen-address={addr}"),
                "--edns-packet-max=512",
                "--cache-size=0",
                &format!("--address=/{EXT_NAME}/{ext_ip}"),
                &format!("--txt-record=big.test,{}", big.join(",")),
                "--address=/#/",
                "--log-facility=-",
            ],
        );
        let log = std::fs::File::create(lab.dir.join(format!("dnsmasq-{addr}.log"))).expect("dnsmasq log");
        c.stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        let mut child = c.spawn().expect("starting dnsmasq (apt-get install dnsmasq-base)");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = in_ns(ns, "dig", &["+short", "+tries=1", "+timeout=1", &format!("@{addr}"), EXT_NAME]).output();
            if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == ext_ip) {
                return Upstream(child);
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("dnsmasq at {addr} exited with {st}");
            }
            assert!(Instant::now() < deadline, "dnsmasq at {addr} did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
