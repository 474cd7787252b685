//! The CPU hotplug lock (the kernel's `cpu_hotplug_lock`): hotplug operations hold it for
//! writing, `stop_machine` for reading, so no CPU comes or goes while a stop_machine runs.
//! It lives in the `stop` layer, the lowest one that takes it (`StopLayer` holds it; hotplug
//! and kexec, above, take it for writing through `stop().cpus_lock`).
//!
//! Protocol:
//! 1. A hotplug operation (`cpu_up`, `cpu_down`, the kexec shutdown and handover, state setup)
//!    takes the lock for writing for its whole length, before the hotplug table's mutex. A CPU
//!    coming up therefore runs its STARTING steps, joins the online mask and runs its ONLINE
//!    steps while no stop_machine is between its snapshot of the online mask and its last ack.
//! 2. `stop_machine` takes the lock for reading before its own serializing mutex
//!    (`cpus_read_lock(); stop_machine_cpuslocked()`), so the online mask it snapshots holds
//!    until every participant has left.
//! 3. Code that runs inside a hotplug operation and calls `stop_machine` (hotplug's own
//!    `take_cpu_down`, a PREPARE step on the controller, an ONLINE step that the controller
//!    waits for on the CPU) must not take the lock again: the writer marks its thread, and
//!    hands the mark to the job it waits for ([`CpusLock::delegate`]). A marked thread's
//!    read is a no-op, as the kernel's `_cpuslocked` variants are; a marked thread's write is
//!    refused ([`Reentrant`]) instead of deadlocking on itself.
//! 4. A CPU thread waiting to take the lock marks itself in `waiting`. A hotplug operation
//!    that waits for that CPU's running job (`sched:active` teardown) checks the mark and
//!    gives up at once instead of waiting out its timeout for a job that cannot finish.
//! 5. The lock is phase-fair (Brandenburg and Anderson's PF-RW): when a writer leaves and
//!    readers wait, every waiting reader goes in before the next writer; a reader that comes
//!    while a writer waits queues behind that writer. So a `stop_machine` waits for at most
//!    the writer holding the lock and one more, however many hotplug threads churn (a std
//!    `RwLock` prefers writers, and three threads cycling `cpu_down`/`cpu_up` kept a
//!    `stop_machine` out for up to 26 s). Writers are not starved either: readers that come
//!    while a writer waits do not overtake it.
//!
//! Lock order: this lock, then the hotplug table's mutex, then `stop_machine`'s mutex.
//! Waits here are as long as the operations ahead, which are bounded by their own timeouts
//! (boot, teardown, call); they are not bounded again here. A waiting CPU thread sleeps in a
//! futex (the condition variable) with irqs on, so it still takes IPIs, and with them the
//! rendezvous of a `stop_machine` that holds the lock for reading.

use std::cell::Cell;

use crate::cpu::mask::CpuId;
use crate::sync::{AtomicBool, Condvar, Mutex, MutexGuard, Ordering};

crate::sync::protocol_thread_local! {
    /// The lock (by address) this thread holds for writing or was handed (step 3); 0 = none.
    static WRITER: Cell<usize> = Cell::new(0);
}

/// Who holds and who waits (step 5), under the lock's mutex.
#[derive(Debug, Default)]
struct Phase {
    /// Readers inside.
    readers: u32,
    /// A writer is inside.
    writer: bool,
    /// Readers blocked in `read`.
    readers_waiting: u32,
    /// Writers blocked in `write`.
    writers_waiting: u32,
    /// A writer left while readers waited: they go in before any writer.
    readers_turn: bool,
}

impl Phase {
    fn reader_may_enter(&self) -> bool {
        !self.writer && (self.writers_waiting == 0 || self.readers_turn)
    }

    fn writer_may_enter(&self) -> bool {
        !self.writer && self.readers == 0 && !self.readers_turn
    }
}

/// The hotplug read-write lock of one runtime.
pub(crate) struct CpusLock {
    phase: Mutex<Phase>,
    changed: Condvar,
    /// Per CPU: its thread is blocked taking the lock (step 4).
    waiting: Box<[AtomicBool]>,
}

/// `write` on a thread that already holds the lock for writing, or acts for the thread that
/// does (step 3): the caller would wait for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reentrant;

/// Held while a hotplug operation runs (step 1); restores the thread's mark on drop.
pub(crate) struct WriteGuard<'a> {
    lock: &'a CpusLock,
    prev: usize,
}

/// Held while a stop_machine runs (step 2); holds nothing inside a hotplug operation (step 3).
pub(crate) struct ReadGuard<'a> {
    lock: Option<&'a CpusLock>,
}

/// The mark handed to a job the writer waits for (step 3); restores the job thread's mark on
/// drop.
pub(crate) struct Delegated {
    prev: usize,
}

impl CpusLock {
    pub(crate) fn new(cpus: usize) -> Self {
        CpusLock {
            phase: Mutex::new(Phase::default()),
            changed: Condvar::new(),
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

    /// Step 1. `me` is the calling CPU, if the caller is one of this runtime's CPUs. Refused
    /// on a thread that holds it already (step 3).
    pub(crate) fn write(&self, me: Option<CpuId>) -> Result<WriteGuard<'_>, Reentrant> {
        if self.held_here() {
            return Err(Reentrant);
        }
        let mut p = self.lock_phase();
        if !p.writer_may_enter() {
            p.writers_waiting += 1;
            p = self.block(me, p, Phase::writer_may_enter);
            p.writers_waiting -= 1;
        }
        p.writer = true;
        drop(p);
        let prev = WRITER.with(|w| w.replace(self.addr()));
        Ok(WriteGuard { lock: self, prev })
    }

    /// Step 2 (a no-op under step 3).
    pub(crate) fn read(&self, me: Option<CpuId>) -> ReadGuard<'_> {
        if self.held_here() {
            return ReadGuard { lock: None };
        }
        let mut p = self.lock_phase();
        if !p.reader_may_enter() {
            p.readers_waiting += 1;
            p = self.block(me, p, Phase::reader_may_enter);
            p.readers_waiting -= 1;
            if p.readers_waiting == 0 {
                // The last reader of the turn is in: the next writer may go once they leave.
                p.readers_turn = false;
            }
        }
        p.readers += 1;
        ReadGuard { lock: Some(self) }
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

    /// Poisoning is ignored: a panic can only come from the standard library here, and the
    /// counts are updated in single statements that a panic cannot leave half-done.
    fn lock_phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `may_enter`, marking `me` as waiting meanwhile (step 4).
    fn block<'a>(
        &'a self,
        me: Option<CpuId>,
        mut p: MutexGuard<'a, Phase>,
        may_enter: fn(&Phase) -> bool,
    ) -> MutexGuard<'a, Phase> {
        // SeqCst: the writer that waits for this CPU's job reads the mark after its own
        // write lock is held; the mark is set before this thread can block on that lock.
        let w = me.and_then(|c| self.waiting.get(c));
        if let Some(w) = w {
            w.store(true, Ordering::SeqCst);
        }
        while !may_enter(&p) {
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(w) = w {
            w.store(false, Ordering::SeqCst);
        }
        p
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        WRITER.with(|w| w.set(self.prev));
        let mut p = self.lock.lock_phase();
        p.writer = false;
        // Step 5: the readers that waited for this writer go before the next writer.
        if p.readers_waiting > 0 {
            p.readers_turn = true;
        }
        drop(p);
        self.lock.changed.notify_all();
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        if let Some(lock) = self.lock {
            let mut p = lock.lock_phase();
            p.readers -= 1;
            let last = p.readers == 0;
            drop(p);
            if last {
                lock.changed.notify_all();
            }
        }
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        WRITER.with(|w| w.set(self.prev));
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Step 5 on the state alone: a writer leaving with a reader waiting hands the turn to
    /// readers, and the writer queued behind it stays out until they are in and gone.
    #[test]
    fn a_leaving_writer_lets_waiting_readers_in_before_the_next_writer() {
        let mut p = Phase {
            writer: true,
            readers_waiting: 1,
            writers_waiting: 1,
            ..Phase::default()
        };
        assert!(!p.reader_may_enter() && !p.writer_may_enter());
        // The first writer leaves (WriteGuard::drop).
        p.writer = false;
        p.readers_turn = true;
        assert!(p.reader_may_enter(), "the waiting reader is next");
        assert!(
            !p.writer_may_enter(),
            "the queued writer overtook the reader"
        );
        // The reader goes in (read), the turn ends, the writer still waits for it to leave.
        p.readers_waiting = 0;
        p.readers_turn = false;
        p.readers = 1;
        assert!(!p.writer_may_enter());
        // A reader that comes now queues behind the waiting writer.
        assert!(
            !p.reader_may_enter(),
            "a new reader overtook the waiting writer"
        );
        p.readers = 0;
        assert!(p.writer_may_enter());
    }

    #[test]
    fn write_on_a_thread_that_holds_it_is_refused() {
        let lock = CpusLock::new(1);
        let w = lock.write(None).unwrap();
        assert_eq!(lock.write(None).err(), Some(Reentrant));
        drop(w);
        let d = lock.delegate();
        assert_eq!(lock.write(None).err(), Some(Reentrant));
        drop(d);
        assert!(lock.write(None).is_ok());
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
                let _w = lock.write(None).unwrap();
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
                let _w = lock.write(Some(0)).unwrap();
                assert!(lock.held_here());
                assert!(lock.read(Some(0)).lock.is_none());
            }
            assert!(!lock.held_here());
            {
                let _d = lock.delegate();
                assert!(lock.read(None).lock.is_none());
            }
            assert!(lock.read(None).lock.is_some());
        });
    }

    /// Step 5: a reader that waits while a writer holds the lock goes in before a second
    /// writer that is also waiting, in every interleaving; and nothing deadlocks.
    #[test]
    fn loom_waiting_reader_goes_before_the_next_writer() {
        loom::model(|| {
            let lock = Arc::new(CpusLock::new(1));
            let order = Arc::new(crate::sync::AtomicU32::new(0));
            let w1 = lock.write(None).unwrap();
            let (l2, o2) = (lock.clone(), order.clone());
            let reader = loom::thread::spawn(move || {
                let _r = l2.read(None);
                o2.fetch_add(1, Ordering::SeqCst)
            });
            let (l3, o3) = (lock.clone(), order.clone());
            let writer = loom::thread::spawn(move || {
                let _w = l3.write(None).unwrap();
                o3.fetch_add(1, Ordering::SeqCst)
            });
            let both_waited = {
                let p = lock.lock_phase();
                p.readers_waiting > 0 && p.writers_waiting > 0
            };
            drop(w1);
            let r = reader.join().unwrap();
            let w = writer.join().unwrap();
            if both_waited {
                assert!(r < w, "the second writer went before the waiting reader");
            }
        });
    }
}
