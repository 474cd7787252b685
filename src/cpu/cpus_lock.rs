//! The CPU hotplug lock (the kernel's `cpu_hotplug_lock`): hotplug operations hold it for
//! writing, `stop_machine` for reading, so no CPU comes or goes while a stop_machine runs.
//!
//! Protocol:
//! 1. A hotplug operation (`cpu_up`, `cpu_down`, the kexec shutdown, state setup) takes the
//!    lock for writing for its whole length, before the hotplug table's mutex. A CPU coming
//!    up therefore runs its STARTING steps, joins the online mask and runs its ONLINE steps
//!    while no stop_machine is between its snapshot of the online mask and its last ack.
//! 2. `stop_machine` takes the lock for reading before its own serializing mutex
//!    (`cpus_read_lock(); stop_machine_cpuslocked()`), so the online mask it snapshots holds
//!    until every participant has left.
//! 3. Code that runs inside a hotplug operation and calls `stop_machine` (hotplug's own
//!    `take_cpu_down`, a PREPARE step on the controller, an ONLINE step that the controller
//!    waits for on the CPU) must not take the lock again: the writer marks its thread, and
//!    hands the mark to the job it waits for ([`CpusLock::delegate`]). A marked thread's
//!    read is a no-op, as the kernel's `_cpuslocked` variants are.
//! 4. A CPU thread waiting to take the lock marks itself in `waiting`. A hotplug operation
//!    that waits for that CPU's running job (`sched:active` teardown) checks the mark and
//!    gives up at once instead of waiting out its timeout for a job that cannot finish.
//!
//! Lock order: this lock, then the hotplug table's mutex, then `stop_machine`'s mutex.
//! Waits here are as long as the operation holding the lock, which is bounded by its own
//! timeouts (boot, teardown, call); they are not bounded again here.

use std::cell::Cell;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::mask::{AtomicCpuMask, CpuId};

thread_local! {
    /// The lock (by address) this thread holds for writing or was handed (step 3); 0 = none.
    static WRITER: Cell<usize> = const { Cell::new(0) };
}

/// The hotplug read-write lock of one runtime.
pub(crate) struct CpusLock {
    lock: RwLock<()>,
    /// CPUs whose thread is blocked taking the lock (step 4).
    waiting: AtomicCpuMask,
}

/// Held while a hotplug operation runs (step 1); restores the thread's mark on drop.
pub(crate) struct WriteGuard<'a> {
    _g: RwLockWriteGuard<'a, ()>,
    prev: usize,
}

/// Held while a stop_machine runs (step 2); `None` inside a hotplug operation (step 3).
pub(crate) struct ReadGuard<'a> {
    _g: Option<RwLockReadGuard<'a, ()>>,
}

/// The mark handed to a job the writer waits for (step 3); restores the job thread's mark on
/// drop.
pub(crate) struct Delegated {
    prev: usize,
}

impl CpusLock {
    pub(crate) fn new(cpus: usize) -> Self {
        CpusLock {
            lock: RwLock::new(()),
            waiting: AtomicCpuMask::new(cpus),
        }
    }

    fn addr(&self) -> usize {
        self as *const CpusLock as usize
    }

    /// Does this thread hold the lock for writing (or act for the thread that does)?
    pub(crate) fn held_here(&self) -> bool {
        WRITER.with(|w| w.get() == self.addr())
    }

    /// Step 1. `me` is the calling CPU, if the caller is one of this runtime's CPUs. Not
    /// reentrant: a thread that already holds it must not call this (the hotplug API checks).
    pub(crate) fn write(&self, me: Option<CpuId>) -> WriteGuard<'_> {
        let g = self.blocking(me, || self.lock.try_write().ok(), || self.lock.write());
        let prev = WRITER.with(|w| w.replace(self.addr()));
        WriteGuard { _g: g, prev }
    }

    /// Step 2 (a no-op under step 3).
    pub(crate) fn read(&self, me: Option<CpuId>) -> ReadGuard<'_> {
        if self.held_here() {
            return ReadGuard { _g: None };
        }
        let g = self.blocking(me, || self.lock.try_read().ok(), || self.lock.read());
        ReadGuard { _g: Some(g) }
    }

    /// Step 3: marks the calling thread (a job the writer waits for) as acting for the writer.
    pub(crate) fn delegate(&self) -> Delegated {
        Delegated {
            prev: WRITER.with(|w| w.replace(self.addr())),
        }
    }

    /// Step 4: is `cpu`'s thread blocked taking this lock?
    pub(crate) fn cpu_waits(&self, cpu: CpuId) -> bool {
        self.waiting.contains(cpu)
    }

    /// Takes the lock, marking `me` as waiting while it blocks. Poisoning is ignored: the lock
    /// guards no data (a panic while holding it leaves nothing half-written here).
    fn blocking<G>(
        &self,
        me: Option<CpuId>,
        try_take: impl FnOnce() -> Option<G>,
        take: impl FnOnce() -> Result<G, std::sync::PoisonError<G>>,
    ) -> G {
        if let Some(g) = try_take() {
            return g;
        }
        if let Some(c) = me {
            self.waiting.set(c);
        }
        let g = take().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = me {
            self.waiting.clear(c);
        }
        g
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        WRITER.with(|w| w.set(self.prev));
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        WRITER.with(|w| w.set(self.prev));
    }
}
