//! `CpuIdentity`: which logical CPU this is and which OS thread currently is it — the CPU
//! number, the thread's kernel tid, the host core it is pinned to, and its join handle.
//!
//! The CPU's thread writes its tid and core when it starts (and clears its tid when it ends);
//! whoever starts or reaps the thread keeps and takes the handle. Readers (signal senders,
//! reports) only load.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

use super::lock::LockUnpoisoned;
use super::mask::CpuId;

/// One logical CPU's number and the OS thread that currently runs it.
pub(crate) struct CpuIdentity {
    /// Read as a field by `CpuState::id` (the hottest accessor: no call for it).
    pub(super) id: CpuId,
    /// Kernel tid of the CPU's current thread, 0 when it has none. SeqCst: a signal sender
    /// reads it to address the thread, and must not see a tid older than the thread's start.
    tid: AtomicI32,
    /// Host core this CPU is pinned to, or -1 (Relaxed: a report).
    core: AtomicI32,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl CpuIdentity {
    pub(super) fn new(id: CpuId) -> Self {
        CpuIdentity {
            id,
            tid: AtomicI32::new(0),
            core: AtomicI32::new(-1),
            thread: Mutex::new(None),
        }
    }

    /// Kernel tid of the CPU's current thread, 0 when it has none. Async-signal-safe.
    #[inline]
    pub(crate) fn tid(&self) -> i32 {
        self.tid.load(Ordering::SeqCst)
    }

    /// On the CPU's thread: its tid when it starts, 0 when it ends.
    pub(crate) fn set_tid(&self, tid: i32) {
        self.tid.store(tid, Ordering::SeqCst);
    }

    /// Host core this CPU is pinned to, if any.
    pub(crate) fn core(&self) -> Option<usize> {
        usize::try_from(self.core.load(Ordering::Relaxed)).ok()
    }

    pub(crate) fn set_core(&self, core: usize) {
        self.core.store(core as i32, Ordering::Relaxed);
    }

    /// Keeps the handle of the CPU's new thread; returns the previous one, if any.
    pub(crate) fn set_thread(&self, h: JoinHandle<()>) -> Option<JoinHandle<()>> {
        self.thread.lock_unpoisoned().replace(h)
    }

    /// Takes the handle of the CPU's thread, to join or abandon it.
    pub(crate) fn take_thread(&self) -> Option<JoinHandle<()>> {
        self.thread.lock_unpoisoned().take()
    }
}
