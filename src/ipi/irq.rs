//! The soft irq mask (`irq_save`/`irq_restore`, powerpc's lazy masking), owned by the IPI
//! layer because what it masks is the IPI handler.
//!
//! 1. Masking raises the CPU's depth from 0 to 1 (`irq_save`; nested saves see it raised and
//!    leave it). Only the CPU's own thread and its handlers touch the mask, so Relaxed atomics
//!    plus a compiler fence (the C `atomic_signal_fence`) order it.
//! 2. An IPI handler that finds the depth raised records "pending" and returns (`handler.rs`).
//! 3. The outermost `irq_restore` lowers the depth, then checks "pending", and replays what was
//!    deferred with the depth raised again, as the handler would have run it.
//!
//! A handler that interrupts between steps 1 and 3 either sees the mask (step 2) or runs in
//! full and leaves the depth as it found it. With accounting on ([`crate::Builder`]'s
//! `irq_accounting`), the outermost mask's start and length go to the CPU's counters and ring.

use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, AtomicU64, Ordering};

use super::layer::{current_id, IpiLayer};
use crate::cpu::events::EventKind;
use crate::cpu::state::CpuState;

/// One CPU's soft irq mask. Every method is async-signal-safe (plain atomics).
pub(crate) struct SoftIrqMask {
    /// Nesting depth; 0 when unmasked.
    depth: AtomicU32,
    /// An IPI arrived while masked: replay at `irq_restore` (step 2).
    pending: AtomicBool,
    /// When the outermost mask started (ns), when accounting is on.
    masked_since: AtomicU64,
}

impl SoftIrqMask {
    pub(super) fn new() -> Self {
        SoftIrqMask {
            depth: AtomicU32::new(0),
            pending: AtomicBool::new(false),
            masked_since: AtomicU64::new(0),
        }
    }

    /// Whether irqs are soft-masked on this CPU.
    #[inline]
    pub(crate) fn masked(&self) -> bool {
        self.depth.load(Ordering::Relaxed) != 0
    }

    /// Step 2: the IPI handler found irqs masked; the IPI is replayed at `irq_restore`.
    #[inline]
    pub(super) fn defer(&self) {
        self.pending.store(true, Ordering::Relaxed);
    }

    /// A handler masks irqs while it runs callbacks (irqs were unmasked).
    #[inline]
    pub(super) fn mask_in_handler(&self) {
        self.depth.store(1, Ordering::Relaxed);
    }

    /// A handler's callbacks are done: irqs unmasked again.
    #[inline]
    pub(super) fn unmask_in_handler(&self) {
        self.depth.store(0, Ordering::Relaxed);
    }

    /// A parking CPU masks irqs; returns the depth to restore if it is ever released.
    pub(crate) fn mask_for_park(&self) -> u32 {
        self.depth.swap(1, Ordering::Relaxed)
    }

    /// Restores the depth `mask_for_park` returned (0: unmasked, for a job being unwound).
    pub(crate) fn restore_depth(&self, depth: u32) {
        self.depth.store(depth, Ordering::Relaxed);
    }

    /// For a report: the nesting depth and whether an IPI waits for the unmask.
    pub(super) fn report(&self) -> (u32, bool) {
        (
            self.depth.load(Ordering::Relaxed),
            self.pending.load(Ordering::Relaxed),
        )
    }

    /// On the CPU's new thread, once committed: unmasked, nothing pending from its previous
    /// life.
    pub(super) fn reset(&self) {
        self.pending.store(false, Ordering::Relaxed);
        self.depth.store(0, Ordering::Relaxed);
    }
}

/// The state `irq_save` found, to hand back to `irq_restore` (like the kernel's `flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "pass the flags to irq_restore"]
pub struct IrqFlags {
    was_masked: bool,
}

/// Soft-masks IPIs on the calling CPU and returns the previous state (step 1). Nestable. On a
/// thread outside the runtime it does nothing. Async-signal-safe.
#[inline]
pub fn irq_save() -> IrqFlags {
    match current_id() {
        Some((shared, cpu)) => {
            let m = shared.ipi_cpu(cpu).irq();
            // A load and a store, not a locked swap (~20 cycles on x86, most of this function):
            // only this thread and its own handlers write the word. A handler that interrupts
            // between the two sees the old value, unmasked, handles its IPI in full and leaves
            // the word as it found it, so the store that follows is still right.
            let was = m.depth.load(Ordering::Relaxed) != 0;
            if !was {
                m.depth.store(1, Ordering::Relaxed);
            }
            compiler_fence(Ordering::SeqCst);
            if !was && shared.irq_accounting() {
                m.masked_since
                    .store(crate::cpu::clock::now_ns(), Ordering::Relaxed);
                shared.machine().cpus()[cpu]
                    .ring()
                    .record(EventKind::IrqOff, 0, 0);
            }
            IrqFlags { was_masked: was }
        }
        None => IrqFlags { was_masked: false },
    }
}

/// Restores the state `irq_save` returned; the outermost restore runs the IPIs that arrived
/// while masked (step 3). Async-signal-safe as far as the deferred callbacks are.
#[inline]
pub fn irq_restore(flags: IrqFlags) {
    if flags.was_masked {
        return;
    }
    if let Some((shared, id)) = current_id() {
        let m = shared.ipi_cpu(id).irq();
        let cpu = &shared.machine().cpus()[id];
        if shared.irq_accounting() {
            let ns =
                crate::cpu::clock::now_ns().saturating_sub(m.masked_since.load(Ordering::Relaxed));
            cpu.stats().masked_ns.fetch_add(ns, Ordering::Relaxed);
            cpu.ring().record(EventKind::IrqOn, ns, 0);
        }
        m.depth.store(0, Ordering::Relaxed);
        // The unmask before the pending check: a handler that ran before the unmask set
        // `pending`; one that runs after it sees the unmasked flag and handles the IPI itself.
        compiler_fence(Ordering::SeqCst);
        if m.pending.load(Ordering::Relaxed) {
            replay(shared, cpu, m);
        }
    }
}

/// Unmasks irqs on the calling CPU if something left them masked (a job that panicked between
/// `irq_save` and `irq_restore`, or returned without restoring), replaying what was deferred.
/// Returns whether they were masked. Thread context, between jobs.
pub(crate) fn irq_unmask_after_job() -> bool {
    if irqs_disabled() {
        irq_restore(IrqFlags { was_masked: false });
        true
    } else {
        false
    }
}

/// Whether the calling CPU has irqs soft-masked (false outside the runtime).
#[inline]
pub fn irqs_disabled() -> bool {
    current_id().is_some_and(|(s, c)| s.ipi_cpu(c).irq().masked())
}

/// Runs `f` with irqs soft-masked on the calling CPU (nothing on another thread). Registered
/// with the machine at build (`Machine::set_masked_section`) for the job wake-up, whose
/// holder must not be interrupted by a handler that waits for the CPU it wakes.
pub(super) fn masked_section(f: &mut dyn FnMut()) {
    let fl = irq_save();
    f();
    irq_restore(fl);
}

#[cold]
fn replay(shared: &IpiLayer, cpu: &CpuState, m: &SoftIrqMask) {
    let mut n = 0;
    let safe = !cpu.jobs().in_job_code();
    while m.pending.swap(false, Ordering::Relaxed) {
        m.depth.store(1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        let Some(ran) = super::handler::replay_deferred(shared, cpu, safe) else {
            // The CPU is now stopped: nothing more runs here.
            m.depth.store(0, Ordering::Relaxed);
            return;
        };
        n += ran;
        compiler_fence(Ordering::SeqCst);
        m.depth.store(0, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }
    cpu.ring().record(EventKind::IrqReplay, n as u64, 0);
}
