//! One CPU's part of the IPI layer's state: the doorbell's in-flight flag, the soft irq mask
//! (`irq.rs`), NMI reasons and dedicated vectors pending, the backtrace NMI's sample, and how
//! many of our handlers run on it. The fields are private;
//! the handlers (`handler.rs`, `nmi.rs`) and the senders (`call.rs`) use the methods below.
//! Every method is async-signal-safe (one atomic operation).
//!
//! 1. A sender sets a bit (an NMI reason or a vector) with a read-modify-write, then signals
//!    the CPU; the CPU's handler takes every bit at once with a swap, so each set bit is taken
//!    exactly once, by one handler, after its sender's writes.
//! 2. An NMI sender that cannot signal clears only its own reason again, so a later NMI is not
//!    coalesced with one that will never arrive.
//! 3. The controller clears the words before a new thread starts for the CPU (`reset`), and
//!    the CPU's PREPARE step (`smpcfd:prepare`) clears stale NMI reasons again.
//!
//! The doorbell flag (Go's `signalPending`) is `cpu/idle.rs` step 2's: a sender that decides
//! to ring sets it with a swap and rings only if it was clear; the handler clears it before it
//! drains the queue, so a sender that sets it after that rings again.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use super::irq::SoftIrqMask;

/// The IPI layer's state of one CPU.
pub(crate) struct IpiCpu {
    /// A doorbell is in flight, do not ring again (Go's `signalPending`).
    /// A doorbell is in flight (`cpu/idle.rs` step 2): the sender hands it to the idle word's
    /// decision, which sets it when it rings.
    pub(super) kick_pending: crate::sync::AtomicBool,
    /// The soft irq mask (`irq.rs`). On its own cache line: only this CPU writes it, on every
    /// `irq_save`, and senders write the words beside it (doorbell flag, vectors, NMI reasons).
    irq: CachePadded<SoftIrqMask>,
    /// NMI reasons pending (bits, see `nmi.rs`).
    nmi_pending: AtomicU64,
    /// Dedicated IPI vectors pending (bits, see `call::VECTOR_*`), taken before the queue.
    vectors: AtomicU64,
    /// Instruction pointer sampled by the last backtrace NMI (0: none yet).
    last_ip: AtomicU64,
    /// Signal handlers of ours running on this CPU right now (IPI and NMI nesting).
    in_handler: AtomicU32,
}

impl IpiCpu {
    pub(super) fn new() -> Self {
        IpiCpu {
            kick_pending: crate::sync::AtomicBool::new(false),
            irq: CachePadded::new(SoftIrqMask::new()),
            nmi_pending: AtomicU64::new(0),
            vectors: AtomicU64::new(0),
            last_ip: AtomicU64::new(0),
            in_handler: AtomicU32::new(0),
        }
    }

    /// The soft irq mask of this CPU (`irq.rs`).
    #[inline]
    pub(crate) fn irq(&self) -> &SoftIrqMask {
        &self.irq
    }

    /// The doorbell was not sent after all (or the CPU is being prepared): none in flight.
    pub(super) fn clear_kick_pending(&self) {
        self.kick_pending.store(false, Ordering::Release);
    }

    /// The IPI handler, before it drains: a sender that marks one after this rings again.
    #[inline]
    pub(super) fn take_kick_pending(&self) {
        self.kick_pending.swap(false, Ordering::AcqRel);
    }

    /// For a report: whether a doorbell is marked in flight.
    pub(super) fn kick_pending(&self) -> bool {
        self.kick_pending.load(Ordering::Relaxed)
    }

    /// Step 1, NMI sender: sets `reason`; returns the reasons that were already pending (an
    /// NMI is in flight unless 0).
    pub(super) fn post_nmi(&self, reason: u64) -> u64 {
        self.nmi_pending.fetch_or(reason, Ordering::AcqRel)
    }

    /// Step 2: the sender could not signal; withdraws its reason.
    pub(super) fn withdraw_nmi(&self, reason: u64) {
        self.nmi_pending.fetch_and(!reason, Ordering::AcqRel);
    }

    /// Step 1, NMI handler: takes every pending reason.
    pub(super) fn take_nmi(&self) -> u64 {
        self.nmi_pending.swap(0, Ordering::AcqRel)
    }

    /// Step 1, vector sender: sets vector `v`.
    pub(super) fn post_vector(&self, v: u64) {
        self.vectors.fetch_or(v, Ordering::AcqRel);
    }

    /// Step 1, on the CPU: takes every pending vector.
    pub(super) fn take_vectors(&self) -> u64 {
        self.vectors.swap(0, Ordering::AcqRel)
    }

    /// Whether a vector is pending: a plain load, for the idle loop's polling.
    #[inline]
    pub(crate) fn vectors_pending(&self) -> bool {
        self.vectors.load(Ordering::Relaxed) != 0
    }

    /// Whether a vector is pending, read with a read-modify-write: ordered with the idle
    /// word's own RMWs, for the last check before the CPU sleeps (`cpu/idle.rs` step 3).
    #[inline]
    pub(crate) fn vectors_pending_rmw(&self) -> bool {
        self.vectors.fetch_or(0, Ordering::AcqRel) != 0
    }

    /// The backtrace NMI's sample: cleared by the requester, stored by the handler.
    pub(super) fn set_last_ip(&self, ip: u64) {
        self.last_ip.store(ip, Ordering::Release);
    }

    pub(super) fn last_ip(&self) -> u64 {
        self.last_ip.load(Ordering::Acquire)
    }

    /// A handler of ours starts on this CPU.
    pub(super) fn enter_handler(&self) {
        self.in_handler.fetch_add(1, Ordering::Relaxed);
    }

    /// A handler of ours ends on this CPU.
    pub(super) fn leave_handler(&self) {
        self.in_handler.fetch_sub(1, Ordering::Relaxed);
    }

    /// How many handlers of ours run on this CPU (read on the CPU itself, or for a report).
    pub(crate) fn handlers_active(&self) -> u32 {
        self.in_handler.load(Ordering::Relaxed)
    }

    /// Step 3, on the way to a new thread: nothing pending from the CPU's previous life.
    pub(super) fn reset(&self) {
        self.nmi_pending.store(0, Ordering::Release);
        self.vectors.store(0, Ordering::SeqCst);
        self.last_ip.store(0, Ordering::Release);
    }

    /// On the CPU's new thread, once committed: irqs unmasked, no doorbell marked in flight,
    /// no NMI reason pending from its previous life.
    pub(super) fn reset_irq_state(&self) {
        self.clear_nmi();
        self.kick_pending.store(false, Ordering::Release);
        self.irq.reset();
    }

    /// Step 3, the PREPARE step: no stale NMI reason.
    pub(super) fn clear_nmi(&self) {
        self.nmi_pending.store(0, Ordering::Release);
    }
}
