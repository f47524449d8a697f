//! Attachments: a namespace a runtime owns (CNI's `CNI_NETNS`), wired to a netpath network
//! under a key the runtime chose, (network, container id, interface name). The daemon keeps
//! each as a container record labelled with its key, so `ps`, restart and reconcile treat it
//! like any container.

use serde::{Deserialize, Serialize};

/// Labels that carry an attachment's key on its container record.
pub const LABEL_NETWORK: &str = "io.netpath.attach.network";
pub const LABEL_CONTAINER_ID: &str = "io.netpath.attach.container-id";
pub const LABEL_IFNAME: &str = "io.netpath.attach.ifname";

/// The key a runtime names an attachment by. No `deny_unknown_fields` here or where it is
/// flattened (serde cannot combine them): a newer daemon's extra answer fields must not
/// break an older plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachKey {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

impl AttachKey {
    /// The name of the container record: a digest of the key (container ids can be long
    /// and use characters names cannot), stable so a lookup is one index probe.
    pub fn record_name(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for part in [&self.network, &self.container_id, &self.ifname] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let d = h.finalize();
        let hex: String = d.iter().take(12).map(|b| format!("{b:02x}")).collect();
        format!("attach-{hex}")
    }

    /// The query string naming this key (GET and DELETE /attachments).
    pub fn query(&self) -> String {
        let q = |s: &str| super::client::seg(s);
        format!("network={}&container_id={}&ifname={}", q(&self.network), q(&self.container_id), q(&self.ifname))
    }
}

/// One published port, as CNI's `portMappings` capability names it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default, rename = "hostIP")]
    pub host_ip: Option<String>,
}

/// POST /attachments.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Attach {
    #[serde(flatten)]
    pub key: AttachKey,
    /// The namespace to wire (a bind mount or /proc/PID/ns/net).
    pub netns: String,
    /// Create the network with this subnet (and gateway) when it does not exist yet.
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    /// A fixed address instead of the next free one.
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub ports: Vec<PortMapping>,
}

/// POST /attachments/gc: every attachment on `network` whose key is not in `valid` goes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachGc {
    pub network: String,
    pub valid: Vec<ValidAttachment>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ValidAttachment {
    pub container_id: String,
    pub ifname: String,
}

/// What an attachment is: everything a CNI result needs, in one answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(flatten)]
    pub key: AttachKey,
    /// The container record's name (`netpath inspect NAME`).
    pub name: String,
    pub netns: String,
    pub mac: String,
    /// The network's bridge and its MAC.
    pub bridge: String,
    pub bridge_mac: String,
    pub host_ifname: String,
    pub ip: String,
    pub prefix: u8,
    pub gateway: String,
    pub nameservers: Vec<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}
