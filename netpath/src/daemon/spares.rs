//! Spare network namespaces, made in the background. A new namespace costs `unshare` from
//! half a millisecond to fifteen (the kernel takes locks that the teardown of removed
//! namespaces and veths holds, RTNL among them) and `lo` one more request: `run` takes a
//! spare with `lo` up and only pins it at the container's path. Spares are held by
//! descriptors alone, so a daemon that dies frees them with its descriptors: nothing to sweep.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use tracing::warn;

use super::{Daemon, lo_up};
use crate::netlink::netns;

/// Spares kept ready: a burst of runs takes them all, and the rest make their own.
const SPARES: usize = 4;

#[derive(Default)]
pub(super) struct Spares {
    ready: Mutex<Vec<OwnedFd>>,
    /// Wakes the task that makes them.
    taken: tokio::sync::Notify,
}

impl Daemon {
    /// A new container's namespace, pinned at `path`, with `lo` up: a spare if one is ready.
    pub(super) async fn new_sandbox_netns(&self, path: &Path) -> anyhow::Result<()> {
        let spare = self.spares.ready.lock().unwrap_or_else(|e| e.into_inner()).pop();
        self.spares.taken.notify_one();
        match spare {
            Some(ns) => netns::pin(&ns, path), // the mount holds it from here
            None => {
                netns::create(path)?;
                lo_up(path).await
            }
        }
    }

    /// Keeps [`SPARES`] namespaces ready, making them while no request is wiring a container.
    pub(super) async fn keep_spares(self: Arc<Self>) {
        loop {
            while self.spares.ready.lock().unwrap_or_else(|e| e.into_inner()).len() < SPARES {
                self.yield_to_wiring().await;
                match make_spare().await {
                    Ok(ns) => self.spares.ready.lock().unwrap_or_else(|e| e.into_inner()).push(ns),
                    Err(e) => {
                        warn!("making a spare network namespace: {e:#}; runs make their own");
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        break;
                    }
                }
            }
            self.spares.taken.notified().await;
        }
    }
}

async fn make_spare() -> anyhow::Result<OwnedFd> {
    let ns = tokio::task::spawn_blocking(netns::create_unpinned).await??;
    lo_up(Path::new(&format!("/proc/self/fd/{}", ns.as_raw_fd()))).await?;
    Ok(ns)
}
