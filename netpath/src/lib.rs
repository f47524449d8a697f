//! netpath: container networking with an eBPF datapath. The binary is a thin shell over this
//! library so tests can use the same API client, datapath loader and netns helpers.

#[macro_use]
pub mod error;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod cni;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod docker;
pub mod drivers;
pub mod firewall;
pub mod ipam;
pub mod laps;
pub mod maglev;
pub mod netlink;
pub mod ports;
pub mod state;
