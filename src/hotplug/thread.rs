//! The logical CPU's thread (the kernel's smpboot: `secondary_start_kernel` +
//! `cpu_startup_entry`): start-up (TLS, tid, pinning, signal stack), the AP side of the
//! bring-up handshake (`ap.rs`), the idle loop that runs jobs and serves the call queue, the
//! dying CPU's last flush, and the exit report that bring-up and tear-down wait for.
//!
//! Hotplug starts it (`bringup.rs`) and reaps it; the thread holds an `Arc` to the hotplug
//! layer, which holds every layer below, so the state outlives every thread that points at it.
//! From the runtime it needs only [`ThreadConfig`].
//!
//! A CPU taken down by `cpu_down` keeps its thread, parked on its `parking.rs` word, as the
//! kernel keeps each CPU's idle task across hotplug.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use super::parking::Parking;
use std::sync::Arc;

use super::layer::HotplugLayer;
use crate::cpu::idle::IdlePolicy;
use crate::cpu::mask::CpuId;
use crate::cpu::state::{CpuRunState, CpuState};
use crate::ipi::irq::{irq_restore, irq_save};
use crate::ipi::signal::Signals;

/// What a CPU thread takes from the runtime's configuration.
#[derive(Debug, Clone)]
pub(crate) struct ThreadConfig {
    /// Thread names are `{name}-cpu{N}`.
    pub name: String,
    /// Pin each CPU thread to a host core, round-robin over the allowed ones.
    pub pin: bool,
    /// The IPI and NMI signals the thread must not block.
    pub signals: Signals,
    /// Size of the alternate signal stack IPI callbacks run on.
    pub signal_stack: usize,
    /// How the idle loop waits for work.
    pub idle: IdlePolicy,
}

/// The thread side of the hotplug layer: its configuration, each CPU's parking word, and the
/// flags CPU threads share.
#[derive(Debug)]
pub(crate) struct Threads {
    pub(super) config: ThreadConfig,
    parking: Box<[Parking]>,
    /// Warned once that pinning failed.
    pin_warned: AtomicBool,
    /// No thread may start any more (the runtime is shutting down).
    closed: AtomicBool,
}

impl Threads {
    pub(super) fn new(config: ThreadConfig, cpus: usize) -> Self {
        Threads {
            config,
            parking: (0..cpus).map(|_| Parking::new()).collect(),
            pin_warned: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }
}

impl HotplugLayer {
    /// The CPU threads' configuration.
    pub(crate) fn thread_config(&self) -> &ThreadConfig {
        &self.threads.config
    }

    /// From now on no CPU thread starts: a `cpu_up` that raced with shutdown fails with
    /// `Spawn` instead of starting a thread nobody joins. Parked threads end.
    pub(crate) fn close_threads(&self) {
        self.threads.closed.store(true, Ordering::SeqCst);
        self.end_parked_threads();
    }

    /// Every thread parked on an offline CPU, or asked to park, ends (shutdown; a kexec's
    /// retire, after which no CPU of this image comes back). Does not wait for them: whoever
    /// joins the CPU threads (`Runtime`'s drop) does.
    pub(crate) fn end_parked_threads(&self) {
        for p in self.threads.parking.iter() {
            p.end();
        }
    }

    /// `cpu_down`, before `take_cpu_down` asks the thread to leave its idle loop: it parks
    /// instead of ending.
    pub(super) fn keep_thread(&self, cpu: CpuId) {
        self.threads.parking[cpu].request_keep();
    }

    /// `cpu_down`'s `take_cpu_down` failed and the CPU stays online: a later exit ends it.
    pub(super) fn unkeep_thread(&self, cpu: CpuId) {
        self.threads.parking[cpu].cancel_keep();
    }

    /// Whether CPU `cpu`'s thread is parked (read after its DEAD report): it is not joined.
    pub(super) fn thread_parked(&self, cpu: CpuId) -> bool {
        self.threads.parking[cpu].is_parked()
    }

    /// Pins the calling CPU thread round-robin over the allowed host cores; warns once and runs
    /// unpinned if the host refuses.
    fn pin_current(&self, st: &CpuState) {
        let cores = self.machine().cores();
        if !self.threads.config.pin || cores.is_empty() {
            return;
        }
        let core = cores[st.id() % cores.len()];
        if crate::cpu::affinity::pin_current(core) {
            st.identity().set_core(core.id);
        } else if !self.threads.pin_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "usmp: cannot pin CPU threads to host cores (restricted cpuset?); running unpinned"
            );
        }
    }
}

/// Starts CPU `cpu`'s thread, after the handshake's kick: wakes its parked thread, or reaps a
/// previous one (which has reported DEAD) and spawns a new one. The caller (bring-up) has
/// reset the CPU's per-CPU state.
pub(super) fn start(hp: &Arc<HotplugLayer>, cpu: CpuId) -> std::io::Result<()> {
    if hp.threads.closed.load(Ordering::SeqCst) {
        return Err(std::io::Error::other("the runtime has shut down"));
    }
    if hp.threads.parking[cpu].unpark() {
        return Ok(());
    }
    // Not parked (or ending): a thread that reported DEAD and is leaving, or none.
    if let Some(old) = hp.machine().cpus()[cpu].identity().take_thread() {
        let _ = old.join();
    }
    let me = hp.clone();
    let handle = std::thread::Builder::new()
        .name(format!("{}-cpu{}", hp.threads.config.name, cpu))
        .spawn(move || cpu_main(me, cpu))?;
    let st = &hp.machine().cpus()[cpu];
    let old = st.identity().set_thread(handle);
    // A previous thread of this CPU has already been joined or reported by whoever took it down.
    drop(old);
    Ok(())
}

/// The thread of a logical CPU: the AP side of the bring-up handshake, the idle loop, and the
/// exit report that hotplug waits for.
fn cpu_main(hp: Arc<HotplugLayer>, cpu: CpuId) {
    let cfg = &hp.threads.config;
    // SAFETY: this frame holds an Arc to the hotplug layer, which contains the stop layer,
    // until after the pointers are cleared below.
    unsafe { crate::stop::layer::set_current(Some(hp.stop()), cpu) };
    let st = &hp.machine().cpus()[cpu];
    // Whatever mask the thread inherited (the caller of `build()` or `cpu_up` may block the
    // real-time signals), this CPU takes its IPIs and NMIs.
    crate::ipi::signal::unblock_on_cpu_thread(&cfg.signals);
    st.identity().set_tid(crate::ipi::signal::gettid());
    hp.pin_current(st);
    // Before anything can signal this thread: IPI callbacks run on this stack.
    let altstack = match crate::ipi::signal::AltStack::install(cfg.signal_stack) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::error!(
                "usmp: CPU{cpu}: no alternate signal stack ({e}); IPI callbacks run on the thread's default one"
            );
            None
        }
    };
    let parking = &hp.threads.parking[cpu];
    let reported = loop {
        if super::ap::ap_boot(&hp, st) {
            idle_loop(&hp, st);
        }
        if hp.stop().stop_cpu(st.id()).is_powered_off() {
            // Powered off by a stop: tear down after it has finished (bounded; see there).
            hp.stop().wait_for_stop_done();
            break false;
        }
        if !parking.begin_park() {
            break false;
        }
        // Parked (the protocol at the top): no signals to an offline CPU, DEAD for the
        // controller, then sleep until cpu_up or the end.
        st.identity().set_tid(0);
        super::ap::ap_exit(&hp, st);
        // Polls first for as long as the idle loop would (a `cpu_up` soon after the
        // `cpu_down`, as in rcutorture's onoff, then finds it running: a wake-up of a thread
        // whose vCPU went idle took 14-15 us of a 17 us `cpu_up` here), then sleeps.
        if !parking.wait(cfg.idle.poll_window()) {
            break true;
        }
        // Unparked after the kick: signals may come once the controller commits, after ALIVE.
        st.identity().set_tid(crate::ipi::signal::gettid());
    };
    drop(altstack);
    st.identity().set_tid(0);
    // SAFETY: clearing the pointers; nothing uses them afterwards on this thread.
    unsafe { crate::stop::layer::set_current(None, 0) };
    // Last: DEAD (a parked thread reported it before it parked). A controller that sees it may
    // start a new thread for this CPU.
    if !reported {
        super::ap::ap_exit(&hp, st);
    }
}

fn idle_loop(hp: &HotplugLayer, st: &CpuState) {
    loop {
        hp.machine().faults().preempt_point();
        if st.exit_requested() {
            finish(hp, st);
            return;
        }
        // `jobs().take()` marks the CPU as holding a job before it looks, so a CPU being
        // deactivated is never seen idle while it holds a job it just took.
        while let Some(job) = st.jobs().take() {
            if st.idle().enter_running() {
                // idle.rs step 4: leaving POLLING for a job, which may be long.
                serve_if_queued(hp, st);
            }
            if hp.stop().stop_cpu(st.id()).is_powered_off() {
                // A stop powered this CPU off just before it took the job: drop it (its handle
                // reports `JobLost`); nothing of this image runs here any more.
                drop(job);
                st.jobs().set_holds_job(false);
                break;
            }
            run_job(hp, st, job);
            if st.exit_requested() {
                break;
            }
        }
        if st.queue().peek() || hp.ipi().ipi_cpu(st.id()).vectors_pending() {
            serve_calls(hp, st);
            continue;
        }
        st.idle().wait_for_work(
            hp.thread_config().idle,
            || {
                st.queue().peek()
                    || st.jobs_or_exit_hint()
                    || hp.ipi().ipi_cpu(st.id()).vectors_pending()
            },
            || {
                st.queue().has_work()
                    || st.jobs_or_exit_rmw()
                    || hp.ipi().ipi_cpu(st.id()).vectors_pending_rmw()
            },
            || {
                st.stats().polled.fetch_add(1, Ordering::Relaxed);
            },
            || {
                st.stats().sleeps.fetch_add(1, Ordering::Relaxed);
            },
        );
        // idle.rs step 4: a sleep ended in RUNNING, and a sender that saw SLEEPING or WAKING
        // (its job's wake-up in flight) rang no doorbell: serve before the next job starts.
        // (After a poll hit the CPU is still POLLING and the job loop's `enter_running` does it.)
        serve_if_queued(hp, st);
    }
}

/// Serves the queue and vectors if an RMW read finds anything (idle.rs step 4).
fn serve_if_queued(hp: &HotplugLayer, st: &CpuState) {
    if st.queue().has_work() || hp.ipi().ipi_cpu(st.id()).vectors_pending_rmw() {
        serve_calls(hp, st);
    }
}

/// Takes pending vectors and queued calls from thread context, as IPI context (irqs masked).
/// The idle loop is a safe point: a CPU powered off here leaves its loop at once.
fn serve_calls(hp: &HotplugLayer, st: &CpuState) {
    let f = irq_save();
    if !crate::ipi::handler::take_vectors(hp.ipi(), st, std::ptr::null(), true) {
        crate::ipi::handler::flush_queue(hp.ipi(), st);
    }
    irq_restore(f);
}

/// Called by a job wrapper once the user's code has returned, before it delivers the result:
/// from here to the end of the job only runtime code runs, so a stop landing now may power the
/// CPU off as at a safe point. Without this, a caller that saw the result and at once
/// crash-kexeced could catch the CPU "inside" a job that had already finished, and the CPU was
/// parked and lost (tests/kexec_resources.rs, about one cycle in a thousand).
pub(crate) fn job_user_code_done() {
    if let Some((_, st)) = crate::cpu::context::current() {
        st.jobs().set_in_job_code(false);
    }
}

fn run_job(hp: &HotplugLayer, st: &CpuState, job: crate::cpu::jobs::Job) {
    st.jobs().set_holds_job(true);
    st.jobs().set_in_job_code(true);
    // A stop that came before `in_job_code` was set powered the CPU off at a safe point and
    // returned here: the job must not start. One that comes after it parks the CPU in the job.
    if hp.stop().stop_cpu(st.id()).is_powered_off() {
        st.jobs().set_in_job_code(false);
        return;
    }
    // Job wrappers report panics to their handles; this catch keeps the CPU alive whatever a
    // job does (ipi/fatal.rs states the policy).
    let _ = catch_unwind(AssertUnwindSafe(job.run));
    st.jobs().set_in_job_code(false);
    st.jobs().set_resume_on_release(false);
    // A job that unwound (or returned) between irq_save and irq_restore must not leave every
    // later job and IPI of this CPU masked; the kernel warns likewise when a softirq or
    // workqueue item returns with irqs disabled.
    if crate::ipi::irq::irq_unmask_after_job() {
        st.stats().irq_leaks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "usmp: CPU{}: a job ended with irqs masked (it panicked or forgot irq_restore); unmasked",
            st.id()
        );
    }
    st.jobs().set_holds_job(false);
    st.stats().jobs.fetch_add(1, Ordering::Relaxed);
}

/// Leaving the idle loop (shutdown, or after the dying steps of `cpu_down`): run the jobs still
/// queued, close the call queue and run what it held, then mark the CPU offline.
fn finish(hp: &HotplugLayer, st: &CpuState) {
    st.jobs().set_gate(false);
    if hp.stop().stop_cpu(st.id()).is_powered_off() {
        // Stopped and powered off: nothing of this image may run here any more. Queued jobs
        // are dropped, so their handles report `JobLost`; queued calls stay unrun (their
        // synchronous senders time out).
        while st.jobs().drain().is_some() {}
        return;
    }
    while let Some(job) = st.jobs().drain() {
        run_job(hp, st, job);
    }
    let f = irq_save();
    // Re-checked with irqs masked: a stop that powered the CPU off after the check at the top
    // returned here, and nothing of this image may run any more.
    if !hp.stop().stop_cpu(st.id()).is_powered_off()
        && !hp
            .machine()
            .faults()
            .is_broken(crate::inject::Broken::SkipDyingFlush)
    {
        crate::ipi::handler::close_and_flush(hp.ipi(), st);
    }
    irq_restore(f);
    hp.machine().online().clear(st.id());
    hp.machine().active().clear(st.id());
    if !matches!(
        st.run_state(),
        CpuRunState::Offline | CpuRunState::PoweredOff | CpuRunState::Parked
    ) {
        st.set_run_state(CpuRunState::Offline);
    }
}
