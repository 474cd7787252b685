//! One CPU's part of the stop layer's state: its crash note, its park word, and whether a stop
//! powered it off. The fields are private; the receiver (`receive.rs`) writes them through the
//! methods below, on the stopped CPU's own thread, in signal-handler context.
//!
//! 1. A crash-stop receiver saves the registers, then publishes them with a Release store of
//!    `crash_saved`; a reader that sees it with Acquire sees the registers (`crash_note`).
//! 2. A parked CPU sleeps on `park_word` until the runtime's teardown stores `RELEASE` and
//!    wakes it (`release`); only a CPU parked at a safe point then leaves.
//! 3. `powered_off` is set once, before the CPU's thread leaves its idle loop; the loop, the
//!    job runner and the thread's exit path check it so nothing of the image runs after it.
//! 4. `in_stop_call` is set while the CPU's own job is inside `send_stop`/`crash_stop` (from
//!    its entry until it parks itself or returns as the winner): a stop that parks the CPU
//!    there has interrupted runtime code that only goes on to park the CPU itself, so the
//!    teardown's release may resume it (it then unwinds its job and leaves, step 2).
//! 5. The controller clears all of it before a new thread starts for the CPU (`reset`).
//! 6. `deferred` is raised by a receiver that declined to park because the CPU was inside the
//!    C library (`parkable.rs`); the stopping CPU takes it (`take_deferred`) and sends the stop
//!    again. A flag, not a count: two deferrals before one re-send need one re-send.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::cpu::futex;
use crate::ipi::signal::SavedRegs;

/// `park_word` value that lets a parked CPU go (runtime shutdown).
const RELEASE: u32 = 1;

/// The stop layer's state of one CPU.
pub(crate) struct StopCpu {
    crash_ip: AtomicU64,
    crash_sp: AtomicU64,
    crash_fp: AtomicU64,
    crash_saved: AtomicBool,
    park_word: AtomicU32,
    powered_off: AtomicBool,
    in_stop_call: AtomicBool,
    deferred: AtomicBool,
}

impl StopCpu {
    pub(super) fn new() -> Self {
        StopCpu {
            crash_ip: AtomicU64::new(0),
            crash_sp: AtomicU64::new(0),
            crash_fp: AtomicU64::new(0),
            crash_saved: AtomicBool::new(false),
            park_word: AtomicU32::new(0),
            powered_off: AtomicBool::new(false),
            in_stop_call: AtomicBool::new(false),
            deferred: AtomicBool::new(false),
        }
    }

    /// Step 1 (`crash_save_cpu`). Async-signal-safe.
    pub(super) fn save_crash_regs(&self, regs: SavedRegs) {
        self.crash_ip.store(regs.ip, Ordering::Relaxed);
        self.crash_sp.store(regs.sp, Ordering::Relaxed);
        self.crash_fp.store(regs.fp, Ordering::Relaxed);
        self.crash_saved.store(true, Ordering::Release);
    }

    /// Step 1, the reader: the saved registers, if a crash stop saved them.
    pub(super) fn crash_regs(&self) -> Option<SavedRegs> {
        self.crash_saved.load(Ordering::Acquire).then(|| SavedRegs {
            ip: self.crash_ip.load(Ordering::Relaxed),
            sp: self.crash_sp.load(Ordering::Relaxed),
            fp: self.crash_fp.load(Ordering::Relaxed),
        })
    }

    /// Step 2, the parked CPU: sleeps until released, if `safe` (parked at a safe point), or
    /// forever. Unbounded by design: a parked CPU never runs again in this image; only the
    /// runtime's teardown releases it. Async-signal-safe (a futex wait).
    pub(super) fn wait_for_release(&self, safe: bool) {
        loop {
            let w = self.park_word.load(Ordering::Acquire);
            if w == RELEASE && safe {
                return;
            }
            futex::wait(&self.park_word, w, None);
        }
    }

    /// Step 2, the runtime's teardown: lets a parked CPU go.
    pub(crate) fn release(&self) {
        self.park_word.store(RELEASE, Ordering::SeqCst);
        futex::wake(&self.park_word, 1);
    }

    /// Step 3: marks the CPU powered off. Async-signal-safe.
    pub(super) fn set_powered_off(&self) {
        self.powered_off.store(true, Ordering::SeqCst);
    }

    /// Step 3: whether a stop powered this CPU off (its thread is leaving).
    pub(crate) fn is_powered_off(&self) -> bool {
        self.powered_off.load(Ordering::SeqCst)
    }

    /// Step 4, on the CPU itself: its job enters (`true`) or leaves a stop call. SeqCst: read by
    /// this CPU's own stop handler, which may interrupt it anywhere.
    pub(super) fn set_in_stop_call(&self, on: bool) {
        self.in_stop_call.store(on, Ordering::SeqCst);
    }

    /// Step 4: whether the CPU's job is inside its own stop call. Async-signal-safe.
    pub(super) fn in_stop_call(&self) -> bool {
        self.in_stop_call.load(Ordering::SeqCst)
    }

    /// Step 6, the receiver: it declined this stop signal. Async-signal-safe.
    pub(super) fn defer(&self) {
        self.deferred.store(true, Ordering::SeqCst);
    }

    /// Step 6, the stopping CPU: whether the CPU declined since the last look (and clears it).
    pub(super) fn take_deferred(&self) -> bool {
        self.deferred.load(Ordering::Relaxed) && self.deferred.swap(false, Ordering::SeqCst)
    }

    /// Step 5: before a new thread starts for the CPU (the controller, under the hotplug
    /// lock). A CPU powered off by a stop can come back (best-effort mode): start it clean.
    pub(super) fn reset(&self) {
        self.powered_off.store(false, Ordering::SeqCst);
        self.crash_saved.store(false, Ordering::SeqCst);
        self.park_word.store(0, Ordering::SeqCst);
        self.in_stop_call.store(false, Ordering::SeqCst);
        self.deferred.store(false, Ordering::SeqCst);
    }
}
