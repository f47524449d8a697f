//! Exits of detached processes. Each one's supervisor records its exit code in a file (so a
//! daemon restarted meanwhile, no longer its parent, still learns it) that it renames into
//! place: one inotify watch on their directory tells the daemon which container's process
//! ended, as it ends. A sweep of every running container's file, at start and every minute,
//! catches what the watch cannot (an overflowed queue, a watch that could not be made); at
//! ten thousand containers each sweep is ten thousand `stat`s, so it is not the every-few-
//! seconds poll it used to be.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tracing::warn;

use super::{Daemon, process};
use crate::state::store::Store;

/// A container whose process may have ended: id, exit file, pid and start time recorded.
type Candidate = (String, PathBuf, Option<u32>, Option<u64>);

/// [`Inotify`] for [`AsyncFd`], which wants a raw descriptor.
struct Watch(Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Daemon {
    /// Watches the exit files' directory; the caller sweeps once the watch is in place (an
    /// exit before it is caught by that sweep). None (logged) where the kernel refuses one.
    pub(super) fn watch_exits(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let dir = self.store.process_dir();
        let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .and_then(|w| w.add_watch(&dir, AddWatchFlags::IN_MOVED_TO).map(|_| w))
            .map_err(std::io::Error::from)
            // SAFETY: the AsyncFd owns the watch, whose descriptor stays open (and the same)
            // for its whole life.
            .and_then(|w| {
                unsafe { AsyncFd::register_with_interest(Watch(w), tokio::io::Interest::READABLE) }
                    .map_err(|e| std::io::Error::other(e.to_string()))
            });
        let watch = match watch {
            Ok(w) => w,
            Err(e) => {
                warn!("watching {} for exits: {e}; they are noticed within a minute instead", dir.display());
                return None;
            }
        };
        Some(tokio::spawn(self.clone().follow_exits(watch)))
    }

    async fn follow_exits(self: Arc<Self>, watch: AsyncFd<Watch>) {
        loop {
            let mut ready = match watch.readable().await {
                Ok(r) => r,
                Err(e) => return warn!("watching for exits: {e}; they are noticed within a minute instead"),
            };
            let events = match ready.get_inner().0.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EAGAIN) => {
                    ready.clear_ready();
                    continue;
                }
                Err(e) => return warn!("reading exit events: {e}; they are noticed within a minute instead"),
            };
            if events.iter().any(|e| e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)) {
                self.collect_exits().await; // some were lost: look at all
                continue;
            }
            let candidates: Vec<Candidate> = {
                let st = self.state();
                events
                    .iter()
                    .filter_map(|e| Store::exit_file_id(e.name.as_ref()?.to_str()?))
                    .filter_map(|prefix| self.candidate(st.container_by_id_prefix(prefix)?))
                    .collect()
            };
            // The supervisor renames the file into place once its command has ended, and exits
            // a moment later: the file is the news, whether or not it is still there.
            self.record_exits(candidates, false).await;
        }
    }

    /// Records the exit codes of every detached process that ended unseen: the state lock is
    /// held only to list the candidates, and the files are looked at on a blocking thread, the
    /// exit file first (one failed stat for a running container).
    pub(super) async fn collect_exits(&self) {
        let candidates: Vec<Candidate> = self.state().containers().filter_map(|c| self.candidate(c)).collect();
        self.record_exits(candidates, true).await;
    }

    fn candidate(&self, c: &crate::state::Container) -> Option<Candidate> {
        let p = c.process.as_ref().filter(|p| p.detached && p.exit_code.is_none())?;
        Some((c.id.clone(), self.store.exit_path(&c.id), p.pid, p.start_time))
    }

    /// `check_alive`: an exit file counts only once its supervisor is gone (a sweep, which
    /// may look between the rename and the supervisor's exit, and looks again later).
    async fn record_exits(&self, candidates: Vec<Candidate>, check_alive: bool) {
        if candidates.is_empty() {
            return;
        }
        let ended = tokio::task::spawn_blocking(move || {
            candidates
                .into_iter()
                .filter(|(_, exit, _, _)| exit.exists())
                .filter(|(_, _, pid, t)| !(check_alive && pid.is_some_and(|pid| process::is_alive(pid, *t))))
                .filter_map(|(id, exit, _, _)| process::recorded_exit(&exit).map(|code| (id, code)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (id, code) in ended {
            self.process_exited(&id, code).await;
        }
    }

    async fn process_exited(&self, container_id: &str, code: i32) {
        let _lock = self.locks.lock(container_id).await;
        let changed = self
            .state()
            .update_container(container_id, |c| c.process.as_mut().map(|p| p.exit_code = Some(code)).is_some());
        self.services_kick.notify_one();
        if changed == Some(true)
            && let Err(e) = self.persist_container(container_id).await
        {
            warn!("recording exit: {e}");
        }
    }
}
