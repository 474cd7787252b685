//! Sending calls: `call_single`, `call_single_async`, `call_many`, `call_all_but_self`,
//! `on_each_cpu`, and NMIs.
//!
//! Protocol of one call (see `csd.rs` for the slot, `cpu/call_queue.rs` for the list, `cpu/idle.rs`
//! for the doorbell decision):
//! 1. Validate the target; a self-call runs at once, locally, with irqs masked.
//! 2. Take a csd from the pool and store the closure in it (bounded wait if the pool is empty).
//! 3. Push it on the target's queue (Release). A closed queue means the target is offline or
//!    dying: the closure is dropped here and the sender gets `Offline`.
//! 4. Ring: nothing if the target polls, a futex wake if it sleeps, the doorbell signal if it
//!    runs (coalesced by `kick_pending`, so the kernel's signal queue never grows).
//! 5. A synchronous sender spins briefly, then sleeps on the csd's state word; every
//!    millisecond it re-rings (a merged or lost signal costs latency, never the call). At the
//!    call timeout it cancels the call if it has not started (it then never runs) or reports it
//!    as started-but-stuck; either way the caller gets `IpiError::Timeout`.
//!
//! Nothing on this path allocates (the allocation-counting test checks it).

use std::sync::atomic::Ordering;

use crate::inject::Broken;
use std::time::Duration;

use super::csd::{GiveUp, DONE};
use super::irq::{irq_restore, irq_save, irqs_disabled};
use super::nmi::{self, NmiReason};
use super::IpiError;
use crate::cpu::clock::now_ns;
use crate::cpu::events::{EventKind, NO_CPU};
use crate::cpu::idle::Kick;
use crate::cpu::mask::{CpuId, CpuMask};
use crate::cpu::state::CpuState;
use crate::cpu::wait::{Deadline, Policy, Wait, Waiter};

use super::layer::IpiLayer;

/// The stop vector (x86's `REBOOT_VECTOR`, arm64's `IPI_CPU_STOP`): maskable, taken before
/// the call queue, carrying no csd.
pub(crate) const VECTOR_STOP: u64 = 1;

/// Raises a dedicated vector on `cpu` and rings it. Async-signal-safe.
pub(crate) fn send_vector(s: &IpiLayer, cpu: CpuId, v: u64) {
    if let Some(st) = s.machine().cpu(cpu) {
        s.ipi_cpu(cpu).post_vector(v);
        ring(s, st);
    }
}

/// How long a synchronous sender spins before sleeping (about two signal round trips).
const SPIN: Duration = Duration::from_micros(20);
/// A sleeping synchronous sender wakes this often to ring again (step 5).
const RERING: Duration = Duration::from_millis(1);
/// Waits for what nobody futex-wakes (a free csd, an NMI sample): crossbeam's backoff, then
/// naps short enough for an NMI round trip.
const NO_WAKE_POLICY: Policy = Policy::BACKOFF.nap(Duration::from_micros(20));
/// Targets handled per batch by `call_many` (a stack array of 8-byte entries, 2 KiB, so the
/// path does not allocate; the smallest signal stack is 16 KiB). Each batch is rung, then
/// waited for: with 64 a call to 256 busy CPUs on 2 cores waited for four rounds of the
/// scheduler instead of one (30 ms p50 against 9.6 ms for the tgkill broadcast floor).
const BATCH: usize = 256;

impl IpiLayer {
    /// Implements [`Handle::call_single`](crate::Handle::call_single).
    pub(crate) fn call_single<F>(&self, cpu: CpuId, f: F, wait: bool) -> Result<(), IpiError>
    where
        F: FnOnce() + Send + 'static,
    {
        let r = self.call_single_inner(cpu, f, wait);
        self.account(&r);
        r
    }

    /// Implements [`Handle::call_single_async`](crate::Handle::call_single_async).
    pub(crate) fn call_single_async<F>(&self, cpu: CpuId, f: F) -> Result<(), IpiError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.call_single(cpu, f, false)
    }

    /// Implements [`Handle::call_many`](crate::Handle::call_many).
    pub(crate) fn call_many<F>(&self, mask: &CpuMask, f: F, wait: bool) -> Result<(), IpiError>
    where
        F: FnOnce() + Clone + Send + 'static,
    {
        let r = self.call_many_inner(Some(mask), f, wait, false);
        self.account(&r);
        r
    }

    /// Implements [`Handle::call_all_but_self`](crate::Handle::call_all_but_self).
    pub(crate) fn call_all_but_self<F>(&self, f: F, wait: bool) -> Result<(), IpiError>
    where
        F: FnOnce() + Clone + Send + 'static,
    {
        let r = self.call_many_inner(None, f, wait, false);
        self.account(&r);
        r
    }

    /// Implements [`Handle::on_each_cpu`](crate::Handle::on_each_cpu).
    pub(crate) fn on_each_cpu<F>(&self, f: F, wait: bool) -> Result<(), IpiError>
    where
        F: FnOnce() + Clone + Send + 'static,
    {
        let r = self.call_many_inner(None, f, wait, true);
        self.account(&r);
        r
    }

    /// Implements [`Handle::nmi_backtrace`](crate::Handle::nmi_backtrace).
    pub(crate) fn nmi_backtrace(&self, cpu: CpuId, timeout: Duration) -> Result<u64, IpiError> {
        let s = self;
        let st = self.target(cpu)?;
        let before = st.stats().nmis.load(Ordering::Acquire);
        let me = s.ipi_cpu(cpu);
        me.set_last_ip(0);
        if !nmi::send(s, st, NmiReason::Backtrace) {
            return Err(IpiError::Offline { cpu });
        }
        // A process stopped and continued meanwhile does not time out (`Deadline`). The NMI
        // handler wakes nobody: back off, then nap.
        let mut w = Waiter::new(Deadline::after_running(timeout), NO_WAKE_POLICY);
        // Check before the deadline test: a caller descheduled past the deadline must still
        // see a sample that arrived meanwhile.
        loop {
            if st.stats().nmis.load(Ordering::Acquire) != before {
                let ip = me.last_ip();
                if ip != 0 {
                    return Ok(ip);
                }
            }
            if w.snooze().timed_out() {
                break;
            }
        }
        if !super::handler::nmi_handler_installed(&s.signals) {
            // As for the IPI signal (`csd_timeout`): name the cause, not a bare timeout.
            tracing::error!(
                "usmp: signal {} no longer has usmp's NMI handler (replaced after build?): NMIs cannot reach CPUs",
                s.signals.nmi
            );
            return Err(IpiError::HandlerReplaced {
                cpu,
                sig: s.signals.nmi,
                waited_ms: timeout.as_millis() as u64,
            });
        }
        Err(IpiError::Timeout {
            cpu,
            waited_ms: timeout.as_millis() as u64,
            started: false,
        })
    }

    fn account(&self, r: &Result<(), IpiError>) {
        let t = &self.totals;
        match r {
            Ok(()) => t.api_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => t.api_err.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn target(&self, cpu: CpuId) -> Result<&CpuState, IpiError> {
        match self.machine().cpu(cpu) {
            Some(st) => Ok(st),
            None => {
                self.totals.invalid_ipis.fetch_add(1, Ordering::Relaxed);
                Err(IpiError::InvalidCpu {
                    cpu,
                    cpus: self.machine().cpus().len(),
                })
            }
        }
    }

    fn call_single_inner<F>(&self, cpu: CpuId, f: F, wait: bool) -> Result<(), IpiError>
    where
        F: FnOnce() + Send + 'static,
    {
        let s = self;
        let st = self.target(cpu)?;
        let me = s.machine().this_cpu_here();
        if me == Some(cpu) {
            run_local(s, st, f);
            return Ok(());
        }
        if wait {
            if let Some(me) = me.filter(|_| irqs_disabled()) {
                return Err(IpiError::IrqsDisabled { cpu: me });
            }
        }
        let idx = publish(s, st, me, f, wait, true)?;
        ring(s, st);
        if wait {
            wait_done(s, st, idx, None)
        } else {
            Ok(())
        }
    }

    /// `mask == None`: every CPU. (Not `possible_mask()`: building a mask allocates, and this
    /// path must not.)
    fn call_many_inner<F>(
        &self,
        mask: Option<&CpuMask>,
        f: F,
        wait: bool,
        incl_self: bool,
    ) -> Result<(), IpiError>
    where
        F: FnOnce() + Clone + Send + 'static,
    {
        let s = self;
        if let Some(bad) = mask.and_then(|m| m.iter().find(|&c| c >= s.machine().cpus().len())) {
            s.totals.invalid_ipis.fetch_add(1, Ordering::Relaxed);
            return Err(IpiError::InvalidCpu {
                cpu: bad,
                cpus: s.machine().cpus().len(),
            });
        }
        let me = s.machine().this_cpu_here();
        if wait && me.is_some() && irqs_disabled() {
            return Err(IpiError::IrqsDisabled {
                cpu: me.unwrap_or(0),
            });
        }
        let mut deadline = Deadline::after_running(s.call_timeout);
        // In IPI context an error must not allocate (a mask and a box would): the other targets
        // still get the call, and the error is the first failing CPU's own, not `Partial`.
        let atomic = irqs_disabled();
        let mut first_atomic: Option<IpiError> = None;
        let mut failed: Option<(CpuMask, IpiError)> = None;
        let mut fail = |cpu: CpuId, e: IpiError| {
            if atomic {
                first_atomic.get_or_insert(e);
                return;
            }
            match &mut failed {
                Some((m, _)) => m.set(cpu),
                None => failed = Some((CpuMask::single(cpu), e)),
            }
        };
        let in_mask = |c: CpuId| mask.map_or(true, |m| m.contains(c));
        let mut targets = (0..s.machine().cpus().len())
            .filter(|&c| in_mask(c) && Some(c) != me && s.machine().online().contains(c))
            .peekable();
        // Batches of queued (cpu, slot): push a batch, ring it, then wait for it. A batch also
        // ends when the pool runs dry: its calls, published but not yet rung, hold slots that
        // only their targets can free, so waiting for a slot before ringing them waited the
        // whole call timeout on ourselves (a pool smaller than the targets ran nothing). Only
        // the first call of a batch waits for a slot; then the caller holds none.
        while targets.peek().is_some() {
            // (cpu, csd slot); a CPU id fits in u16 (at most `MAX_CPUS`, 1024, CPUs).
            let mut batch = [(0u16, 0u32); BATCH];
            let mut n = 0;
            while let Some(&cpu) = targets.peek() {
                let st = &s.machine().cpus()[cpu];
                match publish(s, st, me, f.clone(), wait, n == 0) {
                    Ok(idx) => {
                        batch[n] = (cpu as u16, idx);
                        n += 1;
                    }
                    // Pool dry: ring (and wait for) this batch, then this CPU starts the next.
                    Err(IpiError::NoCsd { .. }) if n > 0 => break,
                    Err(e) => fail(cpu, e),
                }
                targets.next();
                if n == BATCH {
                    break;
                }
            }
            for &(cpu, _) in &batch[..n] {
                ring(s, &s.machine().cpus()[usize::from(cpu)]);
            }
            if wait {
                for &(cpu, idx) in &batch[..n] {
                    let cpu = usize::from(cpu);
                    if let Err(e) = wait_done(s, &s.machine().cpus()[cpu], idx, Some(&mut deadline))
                    {
                        fail(cpu, e);
                    }
                }
            }
        }
        if incl_self {
            if let Some(me) = me.filter(|&c| in_mask(c)) {
                run_local(s, &s.machine().cpus()[me], f);
            }
        }
        if let Some(e) = first_atomic {
            return Err(e);
        }
        match failed {
            None => Ok(()),
            Some((failed, first)) => Err(IpiError::Partial {
                failed,
                first: Box::new(first),
            }),
        }
    }
}

/// Step 1 for a self-call: run now with irqs masked, counted like a delivered IPI.
fn run_local<F: FnOnce()>(s: &IpiLayer, st: &CpuState, f: F) {
    let fl = irq_save();
    super::fatal::run(st.id(), "IPI callback", std::any::type_name::<F>(), f);
    irq_restore(fl);
    s.totals.queued.fetch_add(1, Ordering::Relaxed);
    s.totals.handled.fetch_add(1, Ordering::Relaxed);
    st.stats().calls_queued.fetch_add(1, Ordering::Relaxed);
    st.stats().calls_handled.fetch_add(1, Ordering::Relaxed);
}

/// Steps 2 and 3. Returns the queued slot. `wait_for_slot`: if the pool is empty, wait for a
/// free csd (up to the call timeout) instead of failing with `NoCsd` at once.
fn publish<F>(
    s: &IpiLayer,
    st: &CpuState,
    me: Option<CpuId>,
    f: F,
    sync: bool,
    wait_for_slot: bool,
) -> Result<u32, IpiError>
where
    F: FnOnce() + Send + 'static,
{
    let cpu = st.id();
    if !s.machine().online().contains(cpu) {
        s.totals.offline_ipis.fetch_add(1, Ordering::Relaxed);
        return Err(IpiError::Offline { cpu });
    }
    let idx = alloc_slot(s, cpu, wait_for_slot)?;
    // The push's CAS comes after the closure is written into the slot: fetch the queue's line
    // meanwhile (see `prefetch_write`).
    crate::cpu::call_queue::prefetch_write(st.queue());
    // The call id and sender exist for the event log only (every ring records or none does):
    // without it, skip the shared counter's locked increment on every call.
    let id = if s.machine().ext_ring().is_enabled() {
        let id = s.next_call_id.fetch_add(1, Ordering::Relaxed);
        let slot = s.pool.slot(idx);
        slot.sender
            .store(me.map_or(NO_CPU, |c| c as u64), Ordering::Relaxed);
        slot.id.store(id, Ordering::Relaxed);
        id
    } else {
        0
    };
    s.pool.arm(idx, f, sync);
    if st.queue().push(idx, &s.pool).is_err() {
        s.pool.disarm_unpublished(idx);
        s.totals.offline_ipis.fetch_add(1, Ordering::Relaxed);
        return Err(IpiError::Offline { cpu });
    }
    s.totals.queued.fetch_add(1, Ordering::Relaxed);
    st.stats().calls_queued.fetch_add(1, Ordering::Relaxed);
    if let Some(me) = me {
        s.machine().cpus()[me]
            .stats()
            .calls_sent
            .fetch_add(1, Ordering::Relaxed);
    }
    s.machine()
        .ring_here()
        .record(EventKind::IpiSend, cpu as u64, id);
    Ok(idx)
}

/// A free csd, waiting (yielding) up to the call timeout if the pool is empty and `wait`. In
/// IPI context (or with irqs masked) it fails at once: a handler must not wait for other CPUs
/// to free slots, and the CPU it interrupted may be the one holding them.
fn alloc_slot(s: &IpiLayer, cpu: CpuId, wait: bool) -> Result<u32, IpiError> {
    if let Some(i) = s.pool.alloc() {
        return Ok(i);
    }
    if !wait || irqs_disabled() {
        return Err(IpiError::NoCsd { cpu });
    }
    // Freeing a slot wakes nobody: back off, then nap.
    let mut w = Waiter::new(Deadline::after_running(s.call_timeout), NO_WAKE_POLICY);
    while !w.snooze().timed_out() {
        if let Some(i) = s.pool.alloc() {
            return Ok(i);
        }
    }
    Err(IpiError::NoCsd { cpu })
}

/// Step 4. Async-signal-safe.
///
/// On a CPU the decision and the act it calls for run with irqs soft-masked: `kick_pending`
/// (and a WAKING idle word) is a token that stops every other sender from ringing the target,
/// so the thread that took it must not be interrupted before it rings. An IPI handler that
/// ran `stop_machine`'s rendezvous in that window spun waiting for the very CPU whose doorbell
/// it held, and the stop timed out after 5 s (issue 18 item 1). Masked, the IPI waits the few
/// hundred nanoseconds until the doorbell is out and is replayed at the restore.
pub(crate) fn ring(s: &IpiLayer, st: &CpuState) {
    if s.machine().faults().is_broken(Broken::DoorbellNeverRings) {
        return;
    }
    let fl = irq_save();
    ring_masked(s, st);
    irq_restore(fl);
}

/// A sender that has waited and still sees its call unserved rings again even if a doorbell
/// is marked in flight: the mark may belong to a signal the host lost or merged, or to a
/// sender that is itself descheduled. Costs a spurious signal at worst. Async-signal-safe.
pub(crate) fn ring_again(s: &IpiLayer, st: &CpuState) {
    s.ipi_cpu(st.id()).clear_kick_pending();
    ring(s, st);
}

fn ring_masked(s: &IpiLayer, st: &CpuState) {
    match st.idle().kick_for_call(&s.ipi_cpu(st.id()).kick_pending) {
        Kick::Signal => {
            // Injected delay while the sender holds the token (`kick_pending`): the window in
            // which an interrupted sender once stalled every other sender's doorbell.
            s.machine().faults().doorbell_delay();
            if s.machine().faults().drop_doorbell() {
                // Injected loss: as if the kernel dropped the signal. `kick_pending` stays
                // set, so only a waiting sender's forced re-ring (step 5) or the CPU's own
                // idle loop gets the call served.
                return;
            }
            let tid = st.identity().tid();
            if tid != 0 && super::signal::tgkill(tid, s.signals.ipi).is_ok() {
                s.totals.signals.fetch_add(1, Ordering::Relaxed);
                st.stats().doorbells.fetch_add(1, Ordering::Relaxed);
                s.machine()
                    .ring_here()
                    .record(EventKind::Doorbell, st.id() as u64, 0);
            } else {
                // No thread to signal (it is exiting; its dying flush runs the call) or the
                // signal was refused: let the next sender ring again.
                s.ipi_cpu(st.id()).clear_kick_pending();
            }
        }
        Kick::Wake => {
            // Likewise while it holds the WAKING token.
            s.machine().faults().doorbell_delay();
            st.idle().wake();
            st.stats().idle_wakes.fetch_add(1, Ordering::Relaxed);
            s.machine()
                .ring_here()
                .record(EventKind::IdleWake, st.id() as u64, 0);
        }
        Kick::None | Kick::Coalesced => {}
    }
}

/// Step 5. `deadline`: `None` for the call timeout from now (read lazily, see below). Time
/// the process spent stopped (SIGTSTP, SIGSTOP, a debugger) does not count (`Deadline`).
fn wait_done(
    s: &IpiLayer,
    st: &CpuState,
    idx: u32,
    deadline: Option<&mut Deadline>,
) -> Result<(), IpiError> {
    let slot = s.pool.slot(idx);
    let timeout_ns = s.call_timeout.as_nanos() as u64;
    // Look at the state after every spin hint (`Waiter::spin`): a PAUSE costs ~140 cycles on
    // recent x86, so batching hints (this once did 32 per check) adds a microsecond of
    // latency. The clock is first read after 64 hints: a polling target answers before that,
    // and two clock reads were a tenth of its round trip. So the spin phase and the timeout
    // start a few microseconds late, which nothing depends on.
    let mut policy = Policy::spin(SPIN).nap(RERING);
    let shared = match deadline {
        Some(d) => {
            // A `call_many`: its other targets may need this core (more CPUs than host cores,
            // or busy ones that must be scheduled to take their doorbell). Spinning on held
            // it from them: 4 busy CPUs on 2 cores answered in 100 us p50 against 21 us for a
            // tgkill broadcast whose sender yields. With nothing else runnable the yield
            // returns at once. Its deadline is shared by all targets: a stop since its last
            // look (while the caller published and rang, or waited for an earlier target)
            // counts as one.
            policy = policy.yielding();
            Some(d)
        }
        None => None,
    };
    let mut w = Waiter::new(
        shared
            .as_deref()
            .copied()
            .unwrap_or(Deadline::running_from_first_look(s.call_timeout)),
        policy,
    );
    let mut announced = false;
    let done = loop {
        if slot.state.load(Ordering::Acquire) == DONE {
            break true;
        }
        if w.spin() {
            continue;
        }
        if !announced {
            // Past the spin: ask the target for a futex wake, then look once more.
            slot.waiter.store(1, Ordering::SeqCst);
            announced = true;
            continue;
        }
        let v = slot.state.load(Ordering::SeqCst);
        if v == DONE {
            break true;
        }
        match w.sleep_on(&slot.state, v) {
            Wait::TimedOut => break false,
            _ => {
                if slot.state.load(Ordering::Acquire) != DONE {
                    // A merged or lost doorbell costs a millisecond, never the call: ring
                    // again even if a doorbell is marked in flight (a lost signal would leave
                    // it marked forever).
                    ring_again(s, st);
                }
            }
        }
    };
    let deadline = *w.deadline();
    if let Some(d) = shared {
        *d = deadline;
    }
    if done {
        s.pool.complete(idx);
        return Ok(());
    }
    // Timed out: "csd: Detected non-responsive CSD lock". When the call began, pauses not
    // counted: a `call_many`'s later targets share the first one's deadline, so their own spin
    // start says nothing of how long the call has waited.
    let begun = deadline.at().saturating_sub(timeout_ns);
    let waited = now_ns().saturating_sub(begun);
    s.totals.csd_timeouts.fetch_add(1, Ordering::Relaxed);
    s.machine()
        .ring_here()
        .record(EventKind::CsdTimeout, st.id() as u64, waited);
    // The kernel's CSD_LOCK_WAIT_DEBUG prints the target's state beside the timeout: what a
    // user needs to tell a starved host core from a stuck CPU or a lost call.
    let (irq_depth, irq_pending) = s.ipi_cpu(st.id()).irq().report();
    tracing::warn!(
        "csd: non-responsive CSD lock: CPU {} ({:?}, {}online, idle word {}, queue {}, \
         irq depth {}{}, {}in a job, {} handler(s) active, doorbell {}marked in flight) after {} ms",
        st.id(),
        st.run_state(),
        if s.machine().online().contains(st.id()) { "" } else { "not " },
        st.idle().state_name(),
        st.queue().state_name(),
        irq_depth,
        if irq_pending { " with an IPI deferred" } else { "" },
        if st.jobs().holds_job() { "" } else { "not " },
        s.ipi_cpu(st.id()).handlers_active(),
        if s.ipi_cpu(st.id()).kick_pending() { "" } else { "not " },
        waited / 1_000_000
    );
    let started = match s.pool.give_up(idx) {
        GiveUp::Cancelled => {
            s.totals.cancelled.fetch_add(1, Ordering::Relaxed);
            false
        }
        GiveUp::Abandoned => true,
        GiveUp::Done => return Ok(()),
    };
    if !started && !super::handler::ipi_handler_installed(&s.signals) {
        tracing::error!(
            "usmp: signal {} no longer has usmp's handler (replaced after build?): IPIs cannot reach busy CPUs",
            s.signals.ipi
        );
        return Err(IpiError::HandlerReplaced {
            cpu: st.id(),
            sig: s.signals.ipi,
            waited_ms: waited / 1_000_000,
        });
    }
    Err(IpiError::Timeout {
        cpu: st.id(),
        waited_ms: waited / 1_000_000,
        started,
    })
}
