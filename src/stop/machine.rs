//! `stop_machine`: run a function on some CPUs while every online CPU spins with irqs masked
//! (the kernel's `multi_cpu_stop`).
//!
//! Protocol:
//! 1. The caller sets state PREPARE with an ack count of N (online CPUs), and sends every other
//!    online CPU an async IPI that enters `multi_cpu_stop`; a caller that is itself a CPU enters
//!    it inline with irqs masked.
//! 2. Each CPU spins on the state. On every new state it does that state's work
//!    (DISABLE_IRQ: nothing more to do, IPI context already has irqs masked; RUN: call `f` if it
//!    is in the target mask) and acks; the last of the N acks moves the state on and resets the
//!    count: PREPARE -> DISABLE_IRQ -> RUN -> EXIT.
//! 3. The caller waits until all N have left. PREPARE is bounded: if not all N CPUs arrived
//!    within the call timeout (one has irqs masked for good, say), the caller CASes
//!    PREPARE -> ABORT; arrived CPUs leave at once, late ones leave as soon as they arrive, and
//!    `f` runs nowhere. After PREPARE every CPU is present, so the rest cannot stall.
//!
//! The shared block belongs to the caller alone: participants get a raw pointer, and their
//! last access is the `left` increment, so the caller frees it only after all N have left and
//! a handler never frees memory. On abort the caller leaks it instead of waiting for CPUs still
//! to arrive (bounded, and only on a failed stop_machine).
//! If a system stop (`send_stop`/`crash_stop`) parks a participant midway, the others would
//! wait for its ack forever: the caller aborts as soon as it sees a stop in progress.
//!
//! No CPU comes or goes during a call: the caller first takes the CPU hotplug lock for reading
//! (`cpu/cpus_lock.rs`, the kernel's `cpus_read_lock`), so the online mask of step 1 holds until
//! every participant has left and a CPU coming up cannot run between two words of an update.
//! Hotplug's own calls (`take_cpu_down`, steps that call this) hold the lock already and skip it.
//!
//! Calls are serialized by one mutex per runtime, as the kernel's `stop_cpus_mutex` does; a
//! second caller waits for the first to finish (bounded by the first's PREPARE timeout plus
//! the run time of its `f`). A caller that is itself a CPU keeps taking IPIs while it waits
//! (the wait is in thread context with irqs on), so it joins the first call's stop instead of
//! deadlocking against it; a caller with irqs masked, or in IPI context, could not, and gets
//! `IpiError::IrqsDisabled` at once.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::cpu::clock::now_ns;
use crate::cpu::context::{irq_restore, irq_save};
use crate::cpu::lock::LockUnpoisoned;
use crate::cpu::mask::{CpuId, CpuMask};

use super::layer::StopLayer;

const PREPARE: u32 = 1;
const RUN: u32 = 3;
const EXIT: u32 = 4;
/// Not part of the sequence: EXIT is final, so no ack can move the state here.
const ABORT: u32 = 100;

/// Why `stop_machine` failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StopMachineError {
    /// Not every online CPU joined within the call timeout; `f` ran nowhere.
    #[error("stop_machine: CPUs {missing} did not join within {waited_ms} ms; nothing ran")]
    Timeout {
        /// The CPUs that did not join.
        missing: CpuMask,
        /// How long it waited, in ms.
        waited_ms: u64,
    },
    /// `f` returned an error on `cpu` (the first one to fail).
    #[error("stop_machine: function failed on CPU {cpu} with code {code}")]
    Failed {
        /// The first CPU on which `f` failed.
        cpu: CpuId,
        /// The error code `f` returned.
        code: i32,
    },
    /// A system stop (`send_stop`/`crash_stop`) started meanwhile; the machine is stopping.
    #[error("stop_machine: aborted, the system is being stopped")]
    Stopped,
    /// This image handed over to the next one (kexec).
    #[error("stop_machine: generation {generation} has handed over to the next image")]
    Retired {
        /// Generation of this (retired) image.
        generation: u64,
    },
    /// An IPI could not be sent.
    #[error("stop_machine: {0}")]
    Ipi(#[from] crate::ipi::IpiError),
}

/// The block pointer handed to participants (see the module comment for why not an `Arc`).
#[derive(Clone, Copy)]
struct BlockPtr(*const MultiStop);

// SAFETY: `MultiStop` is `Sync` (atomics, an immutable mask and a `Sync` closure), and the
// pointer's lifetime is managed by the caller as the module comment describes.
unsafe impl Send for BlockPtr {}

/// The function run under stop_machine, in IPI context (irqs masked, signal-handler rules).
pub type StopFn = dyn Fn(CpuId) -> Result<(), i32> + Send + Sync;

struct MultiStop {
    state: AtomicU32,
    ack: AtomicU32,
    num: u32,
    active: CpuMask,
    f: Box<StopFn>,
    /// `f`'s type name, for the fatal-panic line.
    f_name: &'static str,
    left: AtomicU32,
    arrived: Box<[AtomicU32]>,
    failed_cpu: AtomicUsize,
    failed_code: AtomicI32,
    /// Spin iterations before a participant sleeps (see `run`).
    spin_limit: u32,
}

impl MultiStop {
    fn set_state(&self, s: u32) {
        self.ack.store(self.num, Ordering::SeqCst);
        self.state.store(s, Ordering::SeqCst);
        crate::cpu::futex::wake(&self.state, i32::MAX);
    }

    fn ack_state(&self, cur: u32) {
        if self.ack.fetch_sub(1, Ordering::AcqRel) == 1 && cur < EXIT {
            self.set_state(cur + 1);
        }
    }

    /// Step 2. Runs in IPI context on `cpu`. Async-signal-safe as far as `f` is. The caller,
    /// when it participates inline, passes the PREPARE deadline and aborts at it itself.
    fn run(&self, cpu: CpuId, deadline: Option<u64>) {
        self.arrived[cpu].store(1, Ordering::SeqCst);
        let mut cur = 0;
        let mut spins = 0u32;
        loop {
            let new = self.state.load(Ordering::Acquire);
            if new == ABORT {
                break;
            }
            if new == PREPARE && deadline.is_some_and(|d| now_ns() >= d) {
                let _ = self.state.compare_exchange(
                    PREPARE,
                    ABORT,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                crate::cpu::futex::wake(&self.state, i32::MAX);
                continue;
            }
            if new != cur {
                cur = new;
                // DISABLE_IRQ needs no work: IPI context already has irqs masked.
                if cur == RUN && self.active.contains(cpu) {
                    let r =
                        crate::ipi::fatal::run(cpu, "stop_machine function", self.f_name, || {
                            (self.f)(cpu)
                        });
                    if let Err(code) = r {
                        if self
                            .failed_cpu
                            .compare_exchange(usize::MAX, cpu, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                        {
                            self.failed_code.store(code, Ordering::Release);
                        }
                    }
                }
                self.ack_state(cur);
                if cur == EXIT {
                    break;
                }
                spins = 0;
                continue;
            }
            // Spin, then sleep on the state word (futex is async-signal-safe). With no more
            // participants than cores, spin ~20 µs (a futex wake-up costs about that); with
            // more, spinners would hold the cores the laggards need, so sleep almost at once.
            spins += 1;
            if spins < self.spin_limit {
                std::hint::spin_loop();
            } else {
                crate::cpu::futex::wait(
                    &self.state,
                    new,
                    Some(std::time::Duration::from_millis(1)),
                );
            }
        }
        self.left.fetch_add(1, Ordering::AcqRel);
    }
}

impl StopLayer {
    /// Implements [`Handle::stop_machine`](crate::Handle::stop_machine).
    pub(crate) fn stop_machine<F>(&self, f: F, cpus: &CpuMask) -> Result<(), StopMachineError>
    where
        F: Fn(CpuId) -> Result<(), i32> + Send + Sync + 'static,
    {
        let s = self;
        if s.is_retired() {
            return Err(StopMachineError::Retired {
                generation: s.generation(),
            });
        }
        if let Some(cpu) = s
            .this_cpu_here()
            .filter(|_| crate::cpu::context::irqs_disabled())
        {
            return Err(crate::ipi::IpiError::IrqsDisabled { cpu }.into());
        }
        // No CPU comes or goes until this returns (`cpu/cpus_lock.rs`; a no-op inside a hotplug
        // operation, which holds it already). Bounded by the hotplug operation's own timeouts.
        let _cpus = s.cpus_lock.read(s.this_cpu_here());
        // Unbounded only as long as the running stop_machine takes (module comment).
        let _serial = s.stop.machine.lock_unpoisoned();
        let online = s.online().load();
        let me = s.this_cpu_here().filter(|&c| online.contains(c));
        let ms = Arc::new(MultiStop {
            state: AtomicU32::new(0),
            ack: AtomicU32::new(0),
            num: online.weight() as u32,
            active: cpus.and(&online),
            f: Box::new(f),
            f_name: std::any::type_name::<F>(),
            left: AtomicU32::new(0),
            arrived: (0..s.cpus().len()).map(|_| AtomicU32::new(0)).collect(),
            failed_cpu: AtomicUsize::new(usize::MAX),
            failed_code: AtomicI32::new(0),
            spin_limit: if online.weight() <= s.cores().len().max(1) {
                4096
            } else {
                64
            },
        });
        ms.set_state(PREPARE);
        let start = now_ns();
        let deadline = start + s.call_timeout().as_nanos() as u64;
        let block = BlockPtr(Arc::as_ptr(&ms));
        let sent = self.call_many(
            &online,
            move || {
                let block = block;
                if let Some(c) = crate::cpu::context::this_cpu() {
                    // SAFETY: the caller keeps the block alive until every participant has
                    // done its last access (`left`), or leaks it (module comment).
                    unsafe { &*block.0 }.run(c, None)
                }
            },
            false,
        );
        let mut missing_send = CpuMask::new();
        if let Err(e) = sent {
            // A CPU that went offline since the snapshot will never arrive: abort.
            if let crate::ipi::IpiError::Partial { failed, .. } = &e {
                missing_send = failed.clone();
            }
            ms.state.store(ABORT, Ordering::SeqCst);
            crate::cpu::futex::wake(&ms.state, i32::MAX);
        }
        if let Some(me) = me {
            let fl = irq_save();
            ms.run(me, Some(deadline));
            irq_restore(fl);
        }
        loop {
            if s.stop.coord.in_progress() && ms.left.load(Ordering::Acquire) != ms.num {
                // A system stop may have parked a participant: nobody would ever ack for it.
                ms.state.store(ABORT, Ordering::SeqCst);
                crate::cpu::futex::wake(&ms.state, i32::MAX);
                std::mem::forget(ms);
                return Err(StopMachineError::Stopped);
            }
            let st = ms.state.load(Ordering::Acquire);
            if st == PREPARE && now_ns() >= deadline {
                if ms
                    .state
                    .compare_exchange(PREPARE, ABORT, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    crate::cpu::futex::wake(&ms.state, i32::MAX);
                    break;
                }
                continue;
            }
            if st == ABORT {
                break;
            }
            if ms.left.load(Ordering::Acquire) == ms.num {
                let fc = ms.failed_cpu.load(Ordering::Acquire);
                if fc != usize::MAX {
                    return Err(StopMachineError::Failed {
                        cpu: fc,
                        code: ms.failed_code.load(Ordering::Acquire),
                    });
                }
                return Ok(());
            }
            std::thread::yield_now();
        }
        // Aborted: report who never arrived, and leave the block to the late arrivals.
        let missing: CpuMask = online
            .iter()
            .filter(|&c| ms.arrived[c].load(Ordering::SeqCst) == 0)
            .collect::<CpuMask>()
            .or(&missing_send);
        std::mem::forget(ms);
        Err(StopMachineError::Timeout {
            missing,
            waited_ms: (now_ns() - start) / 1_000_000,
        })
    }
}
