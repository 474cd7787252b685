//! CPUs that do not answer: jobs that spin with irqs soft-masked (and, wedged, with the NMI
//! signal blocked too) until released, for the stop scenarios (`irqs-off`, `wedged`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usmp::{cpu_relax, irq_restore, irq_save, CpuId, Handle, JobHandle};

/// A spinner gives up by itself after this long, so a lost release never leaves a CPU stuck.
const SPIN_BOUND: Duration = Duration::from_secs(5);

/// Spinners started on some CPUs, and the flag that releases them.
pub struct Spinners {
    release: Arc<AtomicBool>,
    masked: Vec<(CpuId, Arc<AtomicBool>)>,
    jobs: Vec<JobHandle<()>>,
}

impl Spinners {
    /// Starts one spinner on each of `cpus` (wedged: NMI blocked too) and waits, at most
    /// `bound`, until each has masked. Returns the spinners and the CPUs that never masked
    /// (their job did not start in time). `resumable`: a spinner a stop parks leaves with its
    /// runtime (`usmp::fault::resume_on_release`); otherwise its thread stays behind for good,
    /// as any job's would.
    pub fn start(
        h: &Handle,
        cpus: &[CpuId],
        wedged: bool,
        resumable: bool,
        bound: Duration,
    ) -> (Spinners, Vec<CpuId>) {
        let release = Arc::new(AtomicBool::new(false));
        let mut s = Spinners {
            release: release.clone(),
            masked: Vec::new(),
            jobs: Vec::new(),
        };
        for &cpu in cpus {
            let masked = Arc::new(AtomicBool::new(false));
            let (m, r) = (masked.clone(), release.clone());
            let job = h.run_on(cpu, move || {
                if resumable {
                    // Parked in here by a stop, this thread leaves when the runtime is torn
                    // down: it only returns.
                    usmp::fault::resume_on_release();
                }
                let wedge = wedged && usmp::fault::wedge_this_cpu(true);
                let f = irq_save();
                m.store(true, Ordering::SeqCst);
                let t = Instant::now();
                while !r.load(Ordering::SeqCst) && t.elapsed() < SPIN_BOUND {
                    cpu_relax();
                }
                irq_restore(f);
                if wedge {
                    usmp::fault::wedge_this_cpu(false);
                }
            });
            if let Ok(j) = job {
                s.jobs.push(j);
                s.masked.push((cpu, masked));
            }
        }
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline && !s.masked.iter().all(|(_, m)| m.load(Ordering::SeqCst)) {
            std::thread::sleep(Duration::from_micros(200));
        }
        let missing = cpus
            .iter()
            .copied()
            .filter(|c| {
                !s.masked
                    .iter()
                    .any(|(m, f)| m == c && f.load(Ordering::SeqCst))
            })
            .collect();
        (s, missing)
    }

    /// Releases every spinner (a stopped CPU's job never resumes; the others end).
    pub fn release(self) {
        self.release.store(true, Ordering::SeqCst);
        drop(self.jobs);
    }
}

/// A CPU stopped inside a job is parked at an unsafe point: by the runtime's design it never
/// leaves, so its thread, and through it its runtime's memory, outlive the runtime. The
/// spinners above opt out (`resumable`), so a long run's thread count stays bounded; one
/// round of `irqs-off` keeps the user-facing case. The stop scenarios build a runtime per
/// round, so they keep each runtime small: short event rings (a round's trace is short) and a
/// small csd pool (stops use vectors, not csds).
pub const STOP_ROUND_RING: usize = 256;
pub const STOP_ROUND_CSDS: usize = 64;

/// Threads a stop scenario may leave above its first count: a round's worth of runtime (its
/// CPU threads, on their way out) and the one user-facing case `irqs-off` keeps.
pub fn thread_allowance(cpus: usize) -> u64 {
    2 * cpus as u64 + MAX_KEPT
}

/// `irqs-off`'s first round strands at most this many threads on purpose.
const MAX_KEPT: u64 = 3;

/// After a round: `threads_last`, and a `threads_grew` violation (once) when the process holds
/// more than `threads_first` plus [`thread_allowance`] plus `documented` (threads the scenario
/// knows a stop stranded inside a user job, the runtime's documented case): CPU threads left
/// behind round after round (a 10-minute 16-CPU run once went from 3 to 1,803).
pub fn check_threads(ctx: &super::Ctx, cpus: usize, documented: u64) {
    let now = process_threads();
    ctx.set("threads_last", now);
    let first = ctx.get("threads_first");
    let allowed = thread_allowance(cpus) + documented;
    if now > first + allowed && ctx.get("threads_grew") == 0 {
        ctx.violation(
            "threads_grew",
            None,
            format!(
                "{now} threads after a round, {first} at the start: CPU threads stopped inside jobs are left behind (allowed {allowed}, {documented} of them stranded user jobs)"
            ),
        );
    }
}

/// Threads of this process now (`/proc/self/status`), to report stranded CPU threads.
pub fn process_threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
