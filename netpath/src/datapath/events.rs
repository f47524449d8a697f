//! The reading end of the FLOW_EVENTS ring buffer, and the switch that makes the programs
//! write to it (CONFIG[FLOW_EVENTS]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use aya::maps::{MapData, RingBuf};
use netpath_common::FlowEvent;

/// The ring's consumer. One per datapath: the daemon's reader task owns it (an [`AsRawFd`],
/// so it can wait for data with tokio's `AsyncFd`); tests read it directly.
pub struct FlowEventRing {
    ring: RingBuf<MapData>,
}

impl FlowEventRing {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Moves up to `max` waiting events into `out`, oldest first, without blocking. Returns
    /// how many records it consumed: fewer than `max` means the ring is empty now. A record
    /// too short to be a [`FlowEvent`] (none should be) is consumed and skipped.
    pub fn drain(&mut self, out: &mut Vec<FlowEvent>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(item) = self.ring.next() else { break };
            n += 1;
            if item.len() >= size_of::<FlowEvent>() {
                // SAFETY: at least size_of::<FlowEvent>() bytes; FlowEvent is plain integers
                // (any bit pattern is valid); read_unaligned needs no alignment.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
            }
        }
        n
    }

    /// Every event waiting now.
    pub fn drain_all(&mut self) -> Vec<FlowEvent> {
        let mut out = vec![];
        while self.drain(&mut out, 1024) == 1024 {}
        out
    }
}

impl AsFd for FlowEventRing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for FlowEventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
