//! Counters and violations of one scenario run. A scenario reports through its `Ctx`
//! (`count`, `set`, `max`, `violation`); the runner, the watchdog and the report read them.
//! Ordinary threads only: a callback in IPI context bumps the scenario's own atomics, and the
//! scenario hands the totals over from a thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use usmp::CpuId;

/// How many violations are kept with their text (all are counted).
const KEEP: usize = 10;

/// One broken invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The counter it was counted in (`lost_calls`, `hangs`, ...).
    pub counter: String,
    /// The CPU it happened on or to, where there is one.
    pub cpu: Option<CpuId>,
    pub message: String,
    /// Since the scenario started.
    pub at: Duration,
    /// `CLOCK_MONOTONIC` ns, the event rings' clock (to cut the trace before it).
    pub mono_ns: u64,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.counter)?;
        if let Some(c) = self.cpu {
            write!(f, " on CPU {c}")?;
        }
        write!(f, " at {:.3}s: {}", self.at.as_secs_f64(), self.message)
    }
}

/// `CLOCK_MONOTONIC` in ns, the clock of `usmp::Event::ts_ns`.
pub fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// The counters and violations of one scenario run.
pub struct Tally {
    start: Instant,
    /// Declared counters first (in their order, shown even at 0), then the others as they come.
    counters: Mutex<Vec<(String, u64)>>,
    iterations: AtomicU64,
    violations: AtomicU64,
    first: Mutex<Vec<Violation>>,
    /// The first few notes: what the host did that is not a violation (`host_starved`).
    notes: Mutex<Vec<String>>,
    /// ns since `start` of the last progress (an iteration or a heartbeat), for the watchdog.
    progress_ns: AtomicU64,
}

impl Tally {
    pub fn new(declared: &[&str]) -> Tally {
        Tally {
            start: Instant::now(),
            counters: Mutex::new(declared.iter().map(|n| (n.to_string(), 0)).collect()),
            iterations: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            first: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
            progress_ns: AtomicU64::new(0),
        }
    }

    fn with<R>(&self, name: &str, f: impl FnOnce(&mut u64) -> R) -> R {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let i = match c.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                c.push((name.to_string(), 0));
                c.len() - 1
            }
        };
        f(&mut c[i].1)
    }

    pub fn add(&self, name: &str, n: u64) {
        self.with(name, |v| *v += n)
    }

    pub fn set(&self, name: &str, n: u64) {
        self.with(name, |v| *v = n)
    }

    pub fn max(&self, name: &str, n: u64) {
        self.with(name, |v| *v = (*v).max(n))
    }

    pub fn get(&self, name: &str) -> u64 {
        self.with(name, |v| *v)
    }

    /// Counts a violation in `counter` and in the total, keeping the first few with their text.
    pub fn violation(&self, counter: &str, cpu: Option<CpuId>, message: String) {
        self.violation_at(counter, cpu, message, mono_ns());
    }

    /// A violation that began at `mono_ns` (a stall: when progress stopped), so the failure
    /// trace shows what led to it.
    pub fn violation_at(&self, counter: &str, cpu: Option<CpuId>, message: String, mono_ns: u64) {
        self.add(counter, 1);
        self.violations.fetch_add(1, Ordering::SeqCst);
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.len() < KEEP {
            first.push(Violation {
                counter: counter.to_string(),
                cpu,
                message,
                at: self.start.elapsed(),
                mono_ns,
            });
        }
    }

    /// Counts `counter` and keeps the text of the first few: something the run reports that
    /// is not a violation (the host starved a thread).
    pub fn note(&self, counter: &str, message: String) {
        self.add(counter, 1);
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        if notes.len() < KEEP {
            notes.push(format!(
                "{counter} at {:.3}s: {message}",
                self.start.elapsed().as_secs_f64()
            ));
        }
    }

    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn iteration(&self) {
        self.iterations.fetch_add(1, Ordering::Relaxed);
        self.heartbeat();
    }

    pub fn heartbeat(&self) {
        self.progress_ns
            .store(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// How long since the last progress.
    pub fn stalled_for(&self) -> Duration {
        let last = Duration::from_nanos(self.progress_ns.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn iterations(&self) -> u64 {
        self.iterations.load(Ordering::Relaxed)
    }

    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::SeqCst)
    }

    pub fn counters(&self) -> Vec<(String, u64)> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn first_violations(&self) -> Vec<Violation> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn declared_counters_keep_their_order_and_violations_count() {
        let t = Tally::new(&["lost_calls", "double_runs"]);
        t.add("calls", 3);
        t.max("winners_max", 2);
        t.max("winners_max", 1);
        t.violation("double_runs", Some(3), "ran twice".into());
        let names: Vec<_> = t.counters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["lost_calls", "double_runs", "calls", "winners_max"]);
        assert_eq!(t.get("winners_max"), 2);
        assert_eq!(t.violations(), 1);
        let v = &t.first_violations()[0];
        assert_eq!(v.cpu, Some(3));
        assert!(v.to_string().starts_with("double_runs on CPU 3 at "));
    }
}
