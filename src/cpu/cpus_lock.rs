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

use super::mask::CpuId;
use crate::sync::{AtomicBool, Ordering, RwLock, RwLockReadGuard, RwLockWriteGuard};

crate::sync::protocol_thread_local! {
    /// The lock (by address) this thread holds for writing or was handed (step 3); 0 = none.
    static WRITER: Cell<usize> = Cell::new(0);
}

/// The hotplug read-write lock of one runtime.
pub(crate) struct CpusLock {
    lock: RwLock<()>,
    /// Per CPU: its thread is blocked taking the lock (step 4).
    waiting: Box<[AtomicBool]>,
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
            waiting: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
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
        // An RMW read: it sees the newest mark, as a polling writer must (a plain load may,
        // in the memory model, go on returning an older value).
        self.waiting
            .get(cpu)
            .is_some_and(|w| w.fetch_or(false, Ordering::SeqCst))
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
        // SeqCst: the writer that waits for this CPU's job reads the mark after its own
        // write lock is held; the mark is set before this thread can block on that lock.
        let w = me.and_then(|c| self.waiting.get(c));
        if let Some(w) = w {
            w.store(true, Ordering::SeqCst);
        }
        let g = take().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = w {
            w.store(false, Ordering::SeqCst);
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

#[cfg(all(test, loom))]
mod loom_cpus_lock {
    use super::*;
    use loom::sync::Arc;

    /// Steps 2 and 4: a job on CPU 1 takes the lock for reading while `cpu_down` holds it for
    /// writing. In every interleaving the reader never runs inside the write section, nothing
    /// deadlocks (loom fails a model whose threads all block), and the job's waiting mark is
    /// gone once it holds the lock. (That the writer's polling sees the mark and gives up is a
    /// liveness property loom cannot check with a spinning writer; the integration test
    /// `cpu_down_gives_up_on_a_job_that_waits_for_the_hotplug_lock` does.)
    #[test]
    fn loom_reader_and_writer_exclude_and_the_mark_clears() {
        loom::model(|| {
            let lock = Arc::new(CpusLock::new(2));
            let inside = Arc::new(AtomicBool::new(false));
            let (l2, i2) = (lock.clone(), inside.clone());
            let job = loom::thread::spawn(move || {
                let _r = l2.read(Some(1));
                assert!(!l2.cpu_waits(1), "marked as waiting while holding the lock");
                i2.store(true, Ordering::SeqCst);
                i2.store(false, Ordering::SeqCst);
            });
            {
                let _w = lock.write(None);
                assert!(lock.held_here());
                assert!(
                    !inside.fetch_or(false, Ordering::SeqCst),
                    "reader inside a write section"
                );
            }
            assert!(!lock.held_here(), "the writer's mark outlived its guard");
            job.join().unwrap();
            assert!(!lock.cpu_waits(1));
        });
    }

    /// Step 3: inside the write section (or a job handed the mark) a read is a no-op, not a
    /// deadlock, and the marks are restored when the guards drop.
    #[test]
    fn loom_read_inside_write_is_a_no_op() {
        loom::model(|| {
            let lock = CpusLock::new(1);
            {
                let _w = lock.write(Some(0));
                assert!(lock.held_here());
                assert!(lock.read(Some(0))._g.is_none());
            }
            assert!(!lock.held_here());
            {
                let _d = lock.delegate();
                assert!(lock.read(None)._g.is_none());
            }
            assert!(lock.read(None)._g.is_some());
        });
    }
}
