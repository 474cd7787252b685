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
    /// (their job did not start in time).
    pub fn start(
        h: &Handle,
        cpus: &[CpuId],
        wedged: bool,
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

/// A CPU stopped inside a job (every spinner above, and a CPU caller stopped while it waits)
/// is parked at an unsafe point: by the runtime's design it never leaves, so its thread, and
/// through it its runtime's memory, outlive the runtime. The stop scenarios build a runtime
/// per round, so they keep each runtime small: short event rings (a round's trace is short)
/// and a small csd pool (stops use vectors, not csds).
pub const STOP_ROUND_RING: usize = 256;
pub const STOP_ROUND_CSDS: usize = 64;

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
