//! Helpers shared by the integration tests: bounded waits, a per-binary serial lock (these
//! tests measure timing on a 2-core machine, so they do not run concurrently), and a job that
//! holds a CPU's irqs soft-masked until the test releases it.

#![allow(dead_code)]

pub mod alloc;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long to wait for something that should happen promptly. Generous on purpose: under
/// load (parallel builds) this shared 2-core VM stalls threads for several seconds at a time.
/// Only a failing test waits this long.
pub const PATIENCE: Duration = Duration::from_secs(10);

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises the tests of one binary (a failed test must not poison the others).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Shared between the test thread and a job that masks irqs and spins.
#[derive(Default)]
pub struct MaskCtl {
    /// Set by the job once its irqs are masked.
    pub masked: AtomicBool,
    /// Set by the test to let the job restore its irqs.
    pub release: AtomicBool,
    /// Set by IPI callbacks the tests send.
    pub flag: AtomicBool,
    /// How many times such callbacks ran.
    pub runs: AtomicU32,
    /// Bumped by the job on every turn of its spin loop (see [`MaskCtl::wait_job_ran`]).
    pub beats: AtomicU64,
}

impl MaskCtl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// In the job: spin (really spin, so the CPU is busy in user code) until released, for at
    /// most `timeout`. Returns whether it was released.
    pub fn spin_until_released(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut i = 0u32;
        while !self.release.load(Ordering::Acquire) {
            self.beats.fetch_add(1, Ordering::SeqCst);
            usmp::cpu_relax();
            i = i.wrapping_add(1);
            if i % 1024 == 0 && Instant::now() >= deadline {
                return false;
            }
        }
        true
    }

    /// Waits until the spinning job has run its own code again after this call. A signal
    /// handler runs on the job's thread, so one that had started by now (one whose effect the
    /// caller has already seen, such as a `deferred` count) has returned by then, and whatever
    /// it did is visible: a handshake instead of sleeping and hoping. Panics after `PATIENCE`.
    pub fn wait_job_ran(&self, after: &str) {
        let b0 = self.beats.load(Ordering::SeqCst);
        assert!(
            wait_until(PATIENCE, || self.beats.load(Ordering::SeqCst) > b0),
            "the masked job did not get back to its own code after {after}"
        );
    }

    /// An IPI callback: sets `flag` and counts the run.
    pub fn setter(self: &Arc<Self>) -> impl FnOnce() + Send + Clone + 'static {
        let c = self.clone();
        move || {
            c.runs.fetch_add(1, Ordering::SeqCst);
            c.flag.store(true, Ordering::SeqCst);
        }
    }
}

/// What a masking job saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskReport {
    pub masked_inside: bool,
    pub released: bool,
    pub flag_before_restore: bool,
    pub flag_after_restore: bool,
    pub masked_after_restore: bool,
}

/// Runs a job on `cpu` that soft-masks irqs, reports it, spins until released (bounded),
/// restores and reports what it saw. Returns once the job has masked.
pub fn start_masked_spinner(
    h: &usmp::Handle,
    cpu: usmp::CpuId,
    ctl: &Arc<MaskCtl>,
) -> usmp::JobHandle<MaskReport> {
    let c = ctl.clone();
    let job = h
        .run_on(cpu, move || {
            let f = usmp::irq_save();
            let masked_inside = usmp::irqs_disabled();
            c.masked.store(true, Ordering::SeqCst);
            let released = c.spin_until_released(3 * PATIENCE);
            let flag_before_restore = c.flag.load(Ordering::SeqCst);
            usmp::irq_restore(f);
            MaskReport {
                masked_inside,
                released,
                flag_before_restore,
                flag_after_restore: c.flag.load(Ordering::SeqCst),
                masked_after_restore: usmp::irqs_disabled(),
            }
        })
        .expect("run_on");
    assert!(
        wait_until(PATIENCE, || ctl.masked.load(Ordering::SeqCst)),
        "job on CPU {cpu} never masked irqs"
    );
    job
}

/// One user hotplug step per section (PREPARE, STARTING, ONLINE), each keeping a per-CPU
/// balance: +1 on startup, -1 on teardown. After any sequence of hotplug operations, a CPU's
/// balances are 1 if it is up and 0 if it is down, or a step ran twice or not at all.
pub struct StateBalances(Vec<Arc<Vec<std::sync::atomic::AtomicI64>>>);

impl StateBalances {
    pub fn install(rt: &usmp::Runtime) -> Self {
        use std::sync::atomic::AtomicI64;
        let mut out = vec![];
        for (name, sec) in [
            ("test:prepare", usmp::Section::Prepare),
            ("test:starting", usmp::Section::Starting),
            ("test:online", usmp::Section::Online),
        ] {
            let bal: Arc<Vec<AtomicI64>> =
                Arc::new((0..rt.cpus()).map(|_| AtomicI64::new(0)).collect());
            let (b1, b2) = (bal.clone(), bal.clone());
            rt.setup_state(
                name,
                sec,
                Some(Arc::new(move |c| {
                    b1[c].fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })),
                Some(Arc::new(move |c| {
                    b2[c].fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                })),
            )
            .unwrap();
            out.push(bal);
        }
        StateBalances(out)
    }

    /// CPU `cpu`'s balance in each section, PREPARE, STARTING, ONLINE.
    pub fn of(&self, cpu: usize) -> Vec<i64> {
        self.0
            .iter()
            .map(|b| b[cpu].load(Ordering::SeqCst))
            .collect()
    }
}

/// Runs a job on `cpu` that spins with irqs *enabled* until released (bounded), so only the
/// doorbell signal can reach the CPU and callbacks run in its signal handler. Returns once the
/// job is spinning; release it with `ctl.release`, then join the handle (true: released).
pub fn start_busy_spinner(
    h: &usmp::Handle,
    cpu: usmp::CpuId,
) -> (Arc<MaskCtl>, usmp::JobHandle<bool>) {
    let ctl = MaskCtl::new();
    let c = ctl.clone();
    let job = h
        .run_on(cpu, move || {
            c.masked.store(true, Ordering::Release);
            c.spin_until_released(3 * PATIENCE)
        })
        .expect("run_on");
    assert!(
        wait_until(PATIENCE, || ctl.masked.load(Ordering::Acquire)),
        "job on CPU {cpu} never started spinning"
    );
    (ctl, job)
}
