//! The logical CPU's thread: start-up (TLS, tid, pinning), the boot hook, the idle loop that
//! runs jobs and serves the call queue, and exit.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::rt::Shared;
use crate::cpu::context::{irq_restore, irq_save};
use crate::cpu::mask::CpuId;
use crate::cpu::state::{CpuRunState, CpuState};

/// Spawns CPU `cpu`'s thread. The caller (hotplug's bring-up) has reset its per-CPU state.
pub(crate) fn spawn_cpu(shared: &Arc<Shared>, cpu: CpuId) -> std::io::Result<()> {
    let s = shared.clone();
    let handle = std::thread::Builder::new()
        .name(format!("{}-cpu{}", shared.cfg.name, cpu))
        .spawn(move || cpu_main(s, cpu))?;
    let st = &shared.machine().cpus()[cpu];
    let old = st.set_thread(handle);
    // A previous thread of this CPU has already been joined or reported by whoever took it down.
    drop(old);
    Ok(())
}

/// The thread of a logical CPU (`secondary_start_kernel` + `cpu_startup_entry`): the AP side of
/// the bring-up handshake, the idle loop, and the exit report that hotplug waits for.
fn cpu_main(shared: Arc<Shared>, cpu: CpuId) {
    let layers: &crate::stop::layer::StopLayer = shared.stop();
    // SAFETY: this frame holds an Arc to `shared`, which contains `layers`, until after the
    // pointers are cleared below.
    unsafe { crate::stop::layer::set_current(Some(layers), cpu) };
    let st = &shared.machine().cpus()[cpu];
    // Whatever mask the thread inherited (the caller of `build()` or `cpu_up` may block the
    // real-time signals), this CPU takes its IPIs and NMIs.
    crate::ipi::signal::unblock_on_cpu_thread(&shared.cfg.signals);
    st.set_tid(crate::ipi::signal::gettid());
    shared.pin_current(st);
    // Before anything can signal this thread: IPI callbacks run on this stack.
    let altstack = match crate::ipi::signal::AltStack::install(shared.cfg.signal_stack) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::error!(
                "usmp: CPU{cpu}: no alternate signal stack ({e}); IPI callbacks run on the thread's default one"
            );
            None
        }
    };
    if crate::hotplug::ap::ap_boot(shared.hotplug(), st) {
        idle_loop(&shared, st);
    }
    if shared.stop().stop_cpu(st.id()).is_powered_off() {
        // Powered off by a stop: tear down after it has finished (bounded; see there).
        shared.stop().wait_for_stop_done();
    }
    drop(altstack);
    st.set_tid(0);
    // SAFETY: clearing the pointers; nothing uses them afterwards on this thread.
    unsafe { crate::stop::layer::set_current(None, 0) };
    // Last: DEAD. A controller that sees it may start a new thread for this CPU.
    crate::hotplug::ap::ap_exit(shared.hotplug(), st);
}

fn idle_loop(shared: &Shared, st: &CpuState) {
    loop {
        shared.machine().faults().preempt_point();
        if st.exit_requested() {
            finish(shared, st);
            return;
        }
        // `take_job` marks the CPU as holding a job before it looks, so a CPU being
        // deactivated is never seen idle while it holds a job it just took.
        while let Some(job) = st.take_job() {
            if st.idle().enter_running() {
                // idle.rs step 4: leaving POLLING for a job, which may be long.
                serve_if_queued(shared, st);
            }
            if shared.stop().stop_cpu(st.id()).is_powered_off() {
                // A stop powered this CPU off just before it took the job: drop it (its handle
                // reports `JobLost`); nothing of this image runs here any more.
                drop(job);
                st.set_in_job(false);
                break;
            }
            run_job(shared, st, job);
            if st.exit_requested() {
                break;
            }
        }
        if st.queue().peek() || shared.ipi().ipi_cpu(st.id()).vectors_pending() {
            serve_calls(shared, st);
            continue;
        }
        st.idle().wait_for_work(
            shared.cfg.idle,
            || {
                st.queue().peek()
                    || st.jobs_or_exit_hint()
                    || shared.ipi().ipi_cpu(st.id()).vectors_pending()
            },
            || {
                st.queue().has_work()
                    || st.jobs_or_exit_rmw()
                    || shared.ipi().ipi_cpu(st.id()).vectors_pending_rmw()
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
        serve_if_queued(shared, st);
    }
}

/// Serves the queue and vectors if an RMW read finds anything (idle.rs step 4).
fn serve_if_queued(shared: &Shared, st: &CpuState) {
    if st.queue().has_work() || shared.ipi().ipi_cpu(st.id()).vectors_pending_rmw() {
        serve_calls(shared, st);
    }
}

/// Takes pending vectors and queued calls from thread context, as IPI context (irqs masked).
/// The idle loop is a safe point: a CPU powered off here leaves its loop at once.
fn serve_calls(shared: &Shared, st: &CpuState) {
    let f = irq_save();
    if !crate::ipi::handler::take_vectors(shared.ipi(), st, std::ptr::null(), true) {
        crate::ipi::handler::flush_queue(shared.ipi(), st);
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
        st.set_running_job(false);
    }
}

fn run_job(shared: &Shared, st: &CpuState, job: crate::cpu::state::Job) {
    st.set_in_job(true);
    st.set_running_job(true);
    // A stop that came before `running_job` was set powered the CPU off at a safe point and
    // returned here: the job must not start. One that comes after it parks the CPU in the job.
    if shared.stop().stop_cpu(st.id()).is_powered_off() {
        st.set_running_job(false);
        return;
    }
    // Job wrappers report panics to their handles; this catch keeps the CPU alive whatever a
    // job does (ipi/fatal.rs states the policy).
    let _ = catch_unwind(AssertUnwindSafe(job.run));
    st.set_running_job(false);
    st.set_resume_on_release(false);
    // A job that unwound (or returned) between irq_save and irq_restore must not leave every
    // later job and IPI of this CPU masked; the kernel warns likewise when a softirq or
    // workqueue item returns with irqs disabled.
    if crate::cpu::context::irq_unmask_after_job() {
        st.stats().irq_leaks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "usmp: CPU{}: a job ended with irqs masked (it panicked or forgot irq_restore); unmasked",
            st.id()
        );
    }
    st.set_in_job(false);
    st.stats().jobs.fetch_add(1, Ordering::Relaxed);
}

/// Leaving the idle loop (shutdown, or after the dying steps of `cpu_down`): run the jobs still
/// queued, close the call queue and run what it held, then mark the CPU offline.
fn finish(shared: &Shared, st: &CpuState) {
    st.set_job_gate(false);
    if shared.stop().stop_cpu(st.id()).is_powered_off() {
        // Stopped and powered off: nothing of this image may run here any more. Queued jobs
        // are dropped, so their handles report `JobLost`; queued calls stay unrun (their
        // synchronous senders time out).
        while st.drain_job().is_some() {}
        return;
    }
    while let Some(job) = st.drain_job() {
        run_job(shared, st, job);
    }
    let f = irq_save();
    // Re-checked with irqs masked: a stop that powered the CPU off after the check at the top
    // returned here, and nothing of this image may run any more.
    if !shared.stop().stop_cpu(st.id()).is_powered_off()
        && !shared
            .machine()
            .faults()
            .is_broken(crate::inject::Broken::SkipDyingFlush)
    {
        crate::ipi::handler::close_and_flush(shared.ipi(), st);
    }
    irq_restore(f);
    shared.machine().online().clear(st.id());
    shared.machine().active().clear(st.id());
    if !matches!(
        st.run_state(),
        CpuRunState::Offline | CpuRunState::PoweredOff | CpuRunState::Parked
    ) {
        st.set_run_state(CpuRunState::Offline);
    }
}
