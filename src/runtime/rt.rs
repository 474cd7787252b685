//! `Runtime` (owns the CPUs; dropping it shuts them down), `Handle` (a cheap clone that jobs
//! and other threads use), and `Shared`, the state every thread of one runtime points at.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::builder::Config;
use super::error::RuntimeError;
use super::liveness::Gone;
use super::logger::Logger;
use crate::cpu::events::Event;
use crate::cpu::lock::LockUnpoisoned;
use crate::cpu::machine::Machine;
use crate::cpu::mask::{CpuId, CpuMask};
use crate::cpu::state::CpuRunState;
use crate::cpu::wait::{Deadline, Policy, Waiter};
use crate::hotplug::layer::HotplugLayer;
use crate::hotplug::HotplugError;
use crate::ipi::layer::IpiLayer;
use crate::stop::layer::StopLayer;

static NEXT_RUNTIME_ID: AtomicU64 = AtomicU64::new(1);

/// State shared by all threads of one runtime. Lives as long as any of them. The runtime's own
/// part; the layers' parts are below it, each reached by name: [`Shared::hotplug`],
/// [`Shared::stop`], [`Shared::ipi`], [`Shared::machine`].
pub(crate) struct Shared {
    /// Held by every CPU thread too (`hotplug/thread.rs`).
    hotplug_layer: Arc<HotplugLayer>,
    pub(super) cfg: Config,
    shut: AtomicBool,
    logger: Mutex<Option<Logger>>,
    /// A kexec or crash-kexec has started in this image (exactly one proceeds).
    kexec_in_progress: AtomicBool,
    /// The process that built this runtime, and its fork epoch then (`liveness.rs`).
    builder_pid: u32,
    fork_epoch: u64,
}

impl Shared {
    /// The configuration this image was built with.
    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    /// `Ok` while a handle can reach this runtime's CPUs: not after shutdown, not in a fork
    /// child. Every call of the public API that acts on CPUs checks it first.
    #[inline]
    pub(crate) fn usable(&self) -> Result<(), Gone> {
        if self.forked() {
            return Err(Gone::Forked {
                builder_pid: self.builder_pid,
                pid: std::process::id(),
            });
        }
        if self.shut.load(Ordering::Acquire) {
            return Err(Gone::ShutDown);
        }
        Ok(())
    }

    /// Whether this process is a fork child of the one that built the runtime.
    #[inline]
    fn forked(&self) -> bool {
        super::liveness::epoch() != self.fork_epoch
    }

    /// A kexec starts: true for exactly one caller per image, until `end_kexec`.
    pub(crate) fn begin_kexec(&self) -> bool {
        !self.kexec_in_progress.swap(true, Ordering::SeqCst)
    }

    /// A kexec failed before its handover and was undone: another may start.
    pub(crate) fn end_kexec(&self) {
        self.kexec_in_progress.store(false, Ordering::SeqCst);
    }
}

impl Shared {
    /// The `hotplug` layer: step table, handshakes, `cpu_up`/`cpu_down`.
    #[inline]
    pub(crate) fn hotplug(&self) -> &Arc<HotplugLayer> {
        &self.hotplug_layer
    }

    /// The `stop` layer, through the hotplug layer (a field projection, not a call chain:
    /// every use names its layer, and no hop passes through the layers in between).
    #[inline]
    pub(crate) fn stop(&self) -> &StopLayer {
        &self.hotplug_layer.stop_layer
    }

    /// The `ipi` layer, through the hotplug and stop layers' fields.
    #[inline]
    pub(crate) fn ipi(&self) -> &IpiLayer {
        &self.hotplug_layer.stop_layer.ipi_layer
    }

    /// The `cpu` layer, through the hotplug layer.
    #[inline]
    pub(crate) fn machine(&self) -> &Machine {
        &self.hotplug_layer.stop_layer.ipi_layer.machine
    }
}

impl Shared {
    pub(crate) fn drain_events(&self) -> Vec<Event> {
        match &*self.logger.lock_unpoisoned() {
            Some(l) => l.take_trace(),
            None => Vec::new(),
        }
    }

    /// Stops every CPU thread (running their remaining jobs and calls first), bounded by the
    /// shutdown timeout per CPU. Idempotent.
    fn shutdown(&self) {
        if self.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        self.hotplug().close_threads();
        if self.forked() {
            // A fork child has none of the CPU or logger threads: nothing to stop or join, and
            // their join handles and locks are the parent's (a lock held by one of its threads
            // at the fork stays held here). `Runtime::drop` leaks the state instead.
            return;
        }
        for st in self.machine().cpus().iter() {
            self.machine().request_exit(st.id());
            // Let parked CPUs go: one parked at a safe point leaves; one parked inside a job
            // or IPI context cannot, and is left behind below.
            self.stop().stop_cpu(st.id()).release();
        }
        let deadline = Deadline::after(self.cfg.shutdown_timeout);
        for st in self.machine().cpus().iter() {
            let handle = st.identity().take_thread();
            let Some(h) = handle else { continue };
            // A CPU still parked after its release is lost for good: do not wait for it.
            let lost = || {
                st.run_state() == crate::cpu::state::CpuRunState::Parked
                    && !self.stop().stop_cpu(st.id()).is_powered_off()
            };
            let mut park_deadline = Deadline::after(Duration::from_millis(50));
            // A thread's exit wakes nobody: nap. Each nap ends with a fresh wake, for a CPU
            // that went to sleep after the one `request_exit` sent.
            let mut w = Waiter::new(deadline, Policy::SLEEP.nap(Duration::from_micros(200)));
            while !h.is_finished() {
                if lost() && park_deadline.passed() {
                    break;
                }
                st.idle().wake_for_job();
                if w.snooze().timed_out() {
                    break;
                }
            }
            if h.is_finished() {
                let _ = h.join();
            } else if lost() {
                tracing::debug!(
                    "usmp: CPU{} stays parked in this image (stopped inside a job or with irqs masked); its thread is left behind",
                    st.id()
                );
            } else {
                tracing::error!(
                    "usmp: CPU{} did not stop within {:?} (state {:?}); its thread is left detached",
                    st.id(),
                    self.cfg.shutdown_timeout,
                    st.run_state()
                );
            }
        }
        if let Some(l) = self.logger.lock_unpoisoned().as_mut() {
            l.stop();
        }
    }
}

/// A handle to a running runtime: send IPIs, queue jobs, read masks and statistics. Cheap to
/// clone; does not keep the CPUs running (the [`Runtime`] does).
#[derive(Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

/// A running runtime. Dropping it shuts every CPU down and joins their threads.
pub struct Runtime {
    handle: Handle,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.shared.cfg.name)
            .field("generation", &self.generation())
            .field("cpus", &self.cpus())
            .field("online", &self.online_mask())
            .finish()
    }
}

impl<R> std::fmt::Debug for JobHandle<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle")
            .field("cpu", &self.at.load(std::sync::atomic::Ordering::Relaxed))
            .field("done", &!self.rx.is_empty())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Runtime").field(&self.handle).finish()
    }
}

impl std::ops::Deref for Runtime {
    type Target = Handle;
    fn deref(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.handle.shared.shutdown();
        if self.handle.shared.forked() {
            // Dropping the state would detach the join handles of threads that exist only in
            // the parent; in a fork child, leak it.
            std::mem::forget(self.handle.shared.clone());
        }
    }
}

impl Runtime {
    /// A builder with defaults.
    pub fn builder() -> super::builder::Builder {
        super::builder::Builder::new()
    }

    pub(crate) fn start(cfg: Config) -> Result<Runtime, RuntimeError> {
        Self::start_image(cfg, 0, &CpuMask::new())
    }

    /// Starts an image: every possible CPU but `lost` is present and brought up, `first` first
    /// (a kexec's next image boots on the reboot CPU).
    pub(crate) fn start_image(
        cfg: Config,
        first: CpuId,
        lost: &CpuMask,
    ) -> Result<Runtime, RuntimeError> {
        crate::ipi::handler::install(&cfg.signals)?;
        let fork_epoch = super::liveness::register();
        let cores = crate::cpu::affinity::allowed_cores();
        let n = cfg.cpus;
        if cfg.pin && n > cores.len().max(1) {
            tracing::info!(
                "usmp: {} logical CPUs on {} host cores: oversubscribed",
                n,
                cores.len()
            );
        }
        let log = cfg.log_events || cfg.collect_trace;
        let machine = Machine::new(
            NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed),
            n,
            cfg.event_ring,
            log,
            cores,
            cfg.generation,
        );
        let ipi = IpiLayer::new(
            machine,
            cfg.csd_pool,
            cfg.signals,
            cfg.call_timeout,
            cfg.irq_accounting,
        );
        let stop = StopLayer::new(ipi, cfg.park, cfg.stop.clone());
        let threads = crate::hotplug::thread::ThreadConfig {
            name: cfg.name.clone(),
            pin: cfg.pin,
            signals: cfg.signals,
            signal_stack: cfg.signal_stack,
            idle: cfg.idle,
        };
        let shared = Arc::new(Shared {
            hotplug_layer: Arc::new(HotplugLayer::new(stop, cfg.boot_timeout, threads)),
            shut: AtomicBool::new(false),
            logger: Mutex::new(None),
            kexec_in_progress: AtomicBool::new(false),
            builder_pid: std::process::id(),
            fork_epoch,
            cfg,
        });
        for c in 0..n {
            shared.machine().possible().set(c);
            if !lost.contains(c) {
                shared.machine().present().set(c);
            }
        }
        if shared.cfg.log_events || shared.cfg.collect_trace {
            let l = Logger::start(&shared);
            *shared.logger.lock_unpoisoned() = Some(l);
        }
        let rt = Runtime {
            handle: Handle { shared },
        };
        crate::hotplug::boot_all(rt.handle.shared.hotplug(), first).map_err(|e| match e {
            HotplugError::BootTimeout { cpu, timeout_ms } => {
                RuntimeError::BootTimeout { cpu, timeout_ms }
            }
            HotplugError::Spawn { cpu, source } => RuntimeError::Spawn { cpu, source },
            other => RuntimeError::BadConfig(other.to_string()),
        })?;
        Ok(rt)
    }

    /// Shuts the runtime down now: every CPU runs its remaining jobs and calls, then its thread
    /// is joined (bounded by the shutdown timeout). Returns the final statistics, in which
    /// `lost_calls` must be 0.
    pub fn shutdown(self) -> RuntimeStats {
        self.handle.shared.shutdown();
        self.handle.stats()
    }

    /// A cloneable handle.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

/// One CPU's counters, as the summary table shows them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CpuStats {
    /// The CPU.
    pub cpu: CpuId,
    /// Its run state when the stats were taken.
    pub state: CpuRunState,
    /// Host core it is pinned to, if pinned.
    pub core: Option<usize>,
    /// Calls queued to this CPU.
    pub calls_queued: u64,
    /// Callbacks it ran.
    pub calls_handled: u64,
    /// Calls it sent to other CPUs.
    pub calls_sent: u64,
    /// Doorbell signals rung at it.
    pub doorbells: u64,
    /// IPI handler entries.
    pub irqs: u64,
    /// Handler entries deferred by the soft mask.
    pub deferred: u64,
    /// Queue serves by the idle poller (no signal).
    pub polled: u64,
    /// Futex wake-ups from idle sleep.
    pub idle_wakes: u64,
    /// Times the idle loop went to sleep (announced SLEEPING).
    pub sleeps: u64,
    /// NMIs received.
    pub nmis: u64,
    /// Time irq-masked (µs), when accounting is on.
    pub masked_us: u64,
    /// Jobs run.
    pub jobs: u64,
    /// Jobs that ended with irqs still masked (the runtime unmasked them).
    pub irq_leaks: u64,
}

/// Runtime-wide statistics (`usmp run --json` prints these).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuntimeStats {
    /// Number of logical CPUs.
    pub cpus: usize,
    /// Number of host cores this process may run on (its affinity mask).
    pub host_cores: usize,
    /// Generation of this image (0 for the first; each kexec adds one).
    pub generation: u64,
    /// Calls accepted into some CPU's queue.
    pub ipis_sent: u64,
    /// Callbacks that ran.
    pub ipis_handled: u64,
    /// Calls cancelled before running because their sender timed out (the sender got an error).
    pub ipis_cancelled: u64,
    /// Call API invocations that succeeded / returned an error.
    pub calls_completed: u64,
    /// Call API invocations that returned an error.
    pub calls_failed: u64,
    /// Accepted calls neither run nor cancelled. Calls in flight count here while the runtime
    /// runs; after shutdown it must be 0.
    pub lost_calls: u64,
    /// Doorbell signals sent.
    pub doorbell_signals: u64,
    /// IPIs refused because the target was offline / out of range.
    pub offline_ipis: u64,
    /// IPIs refused because the target id was out of range.
    pub invalid_ipis: u64,
    /// Calls found on a CPU after it went offline ("IPI on offline CPU"); still run once.
    pub ipi_on_offline: u64,
    /// Synchronous calls that timed out.
    pub csd_timeouts: u64,
    /// csds allocated now, and the pool size.
    pub csd_in_use: u64,
    /// Size of the csd pool.
    pub csd_pool: usize,
    /// Each CPU's counters, by CPU id.
    pub per_cpu: Vec<CpuStats>,
}

impl Handle {
    /// Number of logical CPUs (possible).
    pub fn cpus(&self) -> usize {
        self.shared.machine().cpus().len()
    }

    /// This runtime's generation (0 for the first image, +1 per kexec).
    pub fn generation(&self) -> u64 {
        self.shared.cfg.generation
    }

    /// `cpu_possible_mask`.
    pub fn possible_mask(&self) -> CpuMask {
        self.shared.machine().possible().load()
    }
    /// `cpu_present_mask`.
    pub fn present_mask(&self) -> CpuMask {
        self.shared.machine().present().load()
    }
    /// `cpu_online_mask`.
    pub fn online_mask(&self) -> CpuMask {
        self.shared.machine().online().load()
    }
    /// `cpu_active_mask`.
    pub fn active_mask(&self) -> CpuMask {
        self.shared.machine().active().load()
    }

    /// Whether `cpu` is online.
    pub fn is_online(&self, cpu: CpuId) -> bool {
        self.shared.machine().online().contains(cpu)
    }

    /// Where CPU `cpu` is in its life, or `None` if it does not exist.
    pub fn cpu_state(&self, cpu: CpuId) -> Option<CpuRunState> {
        self.shared.machine().cpu(cpu).map(|c| c.run_state())
    }

    /// The OS thread id (`gettid`) of CPU `cpu`'s current thread, or `None` if it has none
    /// (offline, or not started). For `perf record -t`, `gdb` or `/proc/self/task/<tid>`: a
    /// CPU keeps its thread across `cpu_down`/`cpu_up` (parked while offline); a kexec's new
    /// image, or a CPU whose boot failed, gets new ones.
    pub fn cpu_tid(&self, cpu: CpuId) -> Option<i32> {
        self.shared
            .machine()
            .cpu(cpu)
            .map(|c| c.identity().tid())
            .filter(|&t| t > 0)
    }

    /// Runs `f` as an ordinary job on `cpu` (it may allocate and block). The job runs after
    /// the jobs already queued there; if the CPU is taken down first, the job moves to an online
    /// CPU. Returns a handle to wait for its result.
    pub fn run_on<R, F>(&self, cpu: CpuId, f: F) -> Result<JobHandle<R>, RuntimeError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.shared.usable()?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let at = Arc::new(std::sync::atomic::AtomicUsize::new(cpu));
        let mut job = crate::cpu::jobs::Job::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            crate::hotplug::thread::job_user_code_done();
            let _ = tx.send(r.map_err(|p| {
                p.downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into())
            }));
        });
        job.at = Some(at.clone());
        self.shared
            .machine()
            .queue_job(cpu, job)
            .map_err(|(e, _)| RuntimeError::from(e))?;
        Ok(JobHandle {
            at,
            rx,
            shared: self.shared.clone(),
        })
    }

    /// Snapshot of every counter.
    pub fn stats(&self) -> RuntimeStats {
        let s = &self.shared;
        let t = s.ipi().totals();
        let (csd_in_use, csd_pool) = s.ipi().csd_usage();
        let per_cpu = s
            .machine()
            .cpus()
            .iter()
            .map(|c| {
                let st = &c.stats();
                CpuStats {
                    cpu: c.id(),
                    state: c.run_state(),
                    core: c.identity().core(),
                    calls_queued: st.calls_queued.load(Ordering::Relaxed),
                    calls_handled: st.calls_handled.load(Ordering::Relaxed),
                    calls_sent: st.calls_sent.load(Ordering::Relaxed),
                    doorbells: st.doorbells.load(Ordering::Relaxed),
                    irqs: st.irqs.load(Ordering::Relaxed),
                    deferred: st.deferred.load(Ordering::Relaxed),
                    polled: st.polled.load(Ordering::Relaxed),
                    idle_wakes: st.idle_wakes.load(Ordering::Relaxed),
                    sleeps: st.sleeps.load(Ordering::Relaxed),
                    nmis: st.nmis.load(Ordering::Relaxed),
                    masked_us: st.masked_ns.load(Ordering::Relaxed) / 1000,
                    jobs: st.jobs.load(Ordering::Relaxed),
                    irq_leaks: st.irq_leaks.load(Ordering::Relaxed),
                }
            })
            .collect();
        let queued = t.queued.load(Ordering::SeqCst);
        let handled = t.handled.load(Ordering::SeqCst);
        let cancelled = t.cancelled.load(Ordering::SeqCst);
        RuntimeStats {
            cpus: s.machine().cpus().len(),
            host_cores: s.machine().cores().len(),
            generation: s.cfg.generation,
            ipis_sent: queued,
            ipis_handled: handled,
            ipis_cancelled: cancelled,
            calls_completed: t.api_ok.load(Ordering::Relaxed),
            calls_failed: t.api_err.load(Ordering::Relaxed),
            lost_calls: queued.saturating_sub(handled + cancelled),
            doorbell_signals: t.signals.load(Ordering::Relaxed),
            offline_ipis: t.offline_ipis.load(Ordering::Relaxed),
            invalid_ipis: t.invalid_ipis.load(Ordering::Relaxed),
            ipi_on_offline: t.ipi_on_offline.load(Ordering::Relaxed),
            csd_timeouts: t.csd_timeouts.load(Ordering::Relaxed),
            csd_in_use,
            csd_pool,
            per_cpu,
        }
    }

    /// Every event logged since the last call (needs `Builder::collect_trace(true)`), for
    /// [`crate::trace::write_chrome_trace`].
    pub fn take_trace(&self) -> Vec<Event> {
        self.shared.drain_events()
    }
}

/// Waits for a job's result.
pub struct JobHandle<R> {
    /// The CPU the job is queued on or runs on (moved jobs update it).
    at: Arc<std::sync::atomic::AtomicUsize>,
    rx: crossbeam_channel::Receiver<Result<R, String>>,
    shared: Arc<Shared>,
}

/// How often a waiting `join` looks at whether the job's CPU was stopped.
const JOIN_POLL: Duration = Duration::from_millis(10);

impl<R> JobHandle<R> {
    /// Waits for the job. Unbounded while the job runs (a job may block as long as it likes;
    /// use [`JobHandle::join_timeout`] to bound it), but a job whose CPU a stop parked or
    /// powered off returns `JobStopped` instead of waiting forever. A job that joins a job
    /// still queued on its own CPU gets `JoinOnOwnCpu` at once (the joined job could only
    /// start after the caller returned).
    pub fn join(self) -> Result<R, RuntimeError> {
        self.wait(Deadline::forever())
    }

    /// Waits at most `d`. Like [`JobHandle::join`], refuses at once with `JoinOnOwnCpu` a
    /// wait that could never end: a job joining a job still queued on its own CPU.
    pub fn join_timeout(self, d: Duration) -> Result<R, RuntimeError> {
        self.wait(Deadline::after(d)).map_err(|e| match e {
            RuntimeError::JobTimeout { cpu, .. } => RuntimeError::JobTimeout {
                cpu,
                timeout_ms: d.as_millis() as u64,
            },
            e => e,
        })
    }

    /// Whether the caller runs on `cpu` of this job's runtime.
    fn is_own_cpu(&self, cpu: CpuId) -> bool {
        crate::cpu::context::current()
            .is_some_and(|(_, st)| std::ptr::eq(st, &*self.shared.machine().cpus()[cpu]))
    }

    /// The receive is the sleep (the job's end sends); the `JOIN_POLL` naps are for a stop,
    /// which sends nothing.
    fn wait(self, mut deadline: Deadline) -> Result<R, RuntimeError> {
        loop {
            let cpu = self.at.load(Ordering::SeqCst);
            if self.rx.is_empty() && self.is_own_cpu(cpu) {
                // The caller is a job on `cpu` itself: the joined job cannot start until the
                // caller returns (jobs are not preemptible), nor move while the caller runs.
                return Err(RuntimeError::JoinOnOwnCpu { cpu });
            }
            let nap = deadline.remaining().map_or(JOIN_POLL, |r| r.min(JOIN_POLL));
            match self.rx.recv_timeout(nap) {
                Ok(r) => {
                    return r.map_err(|message| RuntimeError::JobPanicked { cpu, message });
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(RuntimeError::JobLost { cpu });
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    // The result may have been sent just before the stop: look once more.
                    if self.shared.machine().cpus()[cpu].is_stopped() && self.rx.is_empty() {
                        return Err(RuntimeError::JobStopped { cpu });
                    }
                    if deadline.passed() {
                        return Err(RuntimeError::JobTimeout { cpu, timeout_ms: 0 });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod boot_all_tests {
    //! The parallel bring-up of `hotplug::boot_all` (an image's start), with an error in each
    //! of its two phases: the CPUs kicked before the error still come up, none is left half up
    //! or in limbo, and a second call finishes the job.

    use std::time::Duration;

    use crate::cpu::mask::CpuMask;
    use crate::hotplug::HotplugError;
    use crate::Builder;

    fn rt_with_offline(n: usize, down: &[usize], boot_timeout: Duration) -> super::Runtime {
        let rt = Builder::new()
            .cpus(n)
            .log_events(false)
            .boot_timeout(boot_timeout)
            .build()
            .unwrap();
        for &c in down {
            rt.cpu_down(c).unwrap();
        }
        rt
    }

    fn fail(rt: &super::Runtime, cpu: usize, step: &str) {
        rt.handle.shared.hotplug().fail_next_step(cpu, step);
    }

    /// A second `boot_all` brings every CPU up, and each takes a call: nothing was left half up.
    fn boots_the_rest(rt: &super::Runtime) {
        crate::hotplug::boot_all(rt.handle.shared.hotplug(), 0).unwrap();
        assert_eq!(rt.online_mask().weight(), rt.cpus());
        rt.call_many(&rt.online_mask(), || {}, true).unwrap();
    }

    fn all_dead_or_online(rt: &super::Runtime) {
        for c in 0..rt.cpus() {
            assert!(
                rt.is_online(c) || rt.handle.shared.hotplug().handshake_dead(c),
                "CPU{c} neither online nor dead"
            );
        }
    }

    #[test]
    fn a_kick_phase_error_stops_the_kicking_and_finishes_the_kicked() {
        let rt = rt_with_offline(6, &[2, 3, 4, 5], Duration::from_secs(10));
        fail(&rt, 4, "smpcfd:prepare");
        match crate::hotplug::boot_all(rt.handle.shared.hotplug(), 0) {
            Err(HotplugError::StepFailed {
                cpu: 4,
                step,
                up: true,
                ..
            }) => {
                assert_eq!(step, "smpcfd:prepare")
            }
            other => panic!("boot_all with CPU4's PREPARE failing: {other:?}"),
        }
        // 2 and 3 were kicked before the error and came up; 5 was never tried.
        assert_eq!(rt.online_mask(), "0-3".parse::<CpuMask>().unwrap());
        all_dead_or_online(&rt);
        boots_the_rest(&rt);
    }

    #[test]
    fn a_sync_phase_error_rolls_back_that_cpu_only() {
        let rt = rt_with_offline(6, &[2, 3, 4, 5], Duration::from_secs(10));
        // CPU2 fails on the AP after the commit, CPU3 in an ONLINE-section step after the
        // handshake: both roll back to offline, and the CPUs kicked after them still come up.
        fail(&rt, 2, "ap:online");
        fail(&rt, 3, "sched:active");
        match crate::hotplug::boot_all(rt.handle.shared.hotplug(), 0) {
            Err(HotplugError::StepFailed {
                cpu: 2, up: true, ..
            }) => {}
            other => panic!("boot_all with CPU2's ap:online failing: {other:?}"),
        }
        assert_eq!(rt.online_mask(), "0-1,4-5".parse::<CpuMask>().unwrap());
        all_dead_or_online(&rt);
        boots_the_rest(&rt);
    }

    // The boot delay is a fault hook: inert without the feature.
    #[cfg(feature = "fault-injection")]
    #[test]
    fn a_slow_ap_times_out_and_the_cpus_kicked_after_it_come_up() {
        let rt = rt_with_offline(5, &[1, 2, 3, 4], Duration::from_millis(200));
        // Ten times the boot timeout: the controller, which checks the handshake before its
        // deadline, must not find CPU2 ALIVE however late the host lets it look (400 ms was
        // beaten by a controller descheduled that long beside a second runtime and CPU hogs).
        rt.handle
            .shared
            .machine()
            .faults()
            .set_boot_delay(2, Duration::from_secs(2));
        match crate::hotplug::boot_all(rt.handle.shared.hotplug(), 0) {
            Err(HotplugError::BootTimeout { cpu: 2, .. }) => {}
            other => panic!("boot_all with CPU2 booting too slowly: {other:?}"),
        }
        assert_eq!(rt.online_mask(), "0-1,3-4".parse::<CpuMask>().unwrap());
        // CPU2 is in limbo until its thread wakes and leaves; then it can come up.
        // Nothing to wake on: the Waiter backs off, then naps, for at most 10 s.
        use crate::cpu::wait::{Deadline, Policy, Waiter};
        let mut w = Waiter::new(
            Deadline::after(Duration::from_secs(10)),
            Policy::BACKOFF.nap(Duration::from_millis(1)),
        );
        loop {
            match rt.cpu_up(2) {
                Ok(()) => break,
                Err(HotplugError::Limbo { cpu: 2 }) => {
                    assert!(!w.snooze().timed_out(), "CPU2 still in limbo after 10 s");
                }
                other => panic!("cpu_up(2) after its timeout: {other:?}"),
            }
        }
        assert_eq!(rt.online_mask().weight(), 5);
    }
}
