//! The `demo` workload: a thread outside the runtime (the caller) and jobs on the CPUs send every
//! kind of IPI while other jobs run with irqs soft-masked, then the workload checks that every
//! accepted callback ran exactly once.
//!
//! 1. The caller loops until `stop` is set or `duration` has passed, each round picking one of:
//!    `call_single` (sync), `call_single_async`, `call_many` (sync, to a random subset), or
//!    queueing a job on a random CPU (at most two jobs in flight per CPU).
//! 2. A job either sends calls to other CPUs (sync, async, `call_many`: CPU-to-CPU IPIs), or
//!    masks irqs, spins 20-200 µs and unmasks, so IPIs that arrive meanwhile are deferred and
//!    replayed by `irq_restore`.
//! 3. At the end the caller joins every job, waits until every callback has run and dropped its
//!    closure (the last reference to the shared counters is then the caller's, so nothing is freed
//!    in IPI context), and compares callbacks run with callbacks accepted.
//!
//! The sequence of operations comes from a fixed-seed xorshift, so two runs make the same
//! choices in the same order; their interleaving on the CPUs is up to the host.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::rng::Rng;
use usmp::{
    cpu_relax, irq_restore, irq_save, this_cpu, CpuId, Handle, IpiError, JobHandle, RuntimeError,
};

/// Jobs in flight per CPU before the caller waits for the oldest.
const JOBS_PER_CPU: usize = 2;
/// Calls one CPU-to-CPU job sends.
const CALLS_PER_JOB: u32 = 8;
/// Bound on joining a job and on the final quiescence wait.
const SETTLE: Duration = Duration::from_secs(10);
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// What the demo did. Counts are operations that succeeded.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DemoReport {
    /// Wall time of the sending phase.
    pub elapsed_ms: u64,
    /// The stop flag ended the run before `duration` did.
    pub interrupted: bool,
    /// `call_single` with wait, sent from outside the runtime.
    pub single_sync: u64,
    /// `call_single_async`, sent from outside the runtime.
    pub single_async: u64,
    /// `call_many` with wait, sent from outside the runtime.
    pub many_sync: u64,
    /// Calls sent by jobs on one CPU to other CPUs (any kind).
    pub cpu_to_cpu: u64,
    /// Irq-masked sections run by jobs.
    pub masked_sections: u64,
    /// Jobs run.
    pub jobs: u64,
    /// Callbacks the runtime accepted (one per target CPU).
    pub callbacks_expected: u64,
    /// Callbacks that ran.
    pub callbacks_run: u64,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A call failed (the first failure; the run still drained before returning it).
    #[error("demo: {op}: {source}")]
    Ipi {
        op: &'static str,
        #[source]
        source: IpiError,
    },
    /// Queueing or joining a job failed.
    #[error("demo: job: {0}")]
    Job(#[from] RuntimeError),
    /// Callbacks were accepted but did not run exactly once.
    #[error("demo: {expected} callbacks accepted, {ran} ran")]
    Mismatch { expected: u64, ran: u64 },
    /// Some callback closures were still alive after the settle time.
    #[error("demo: callbacks still pending after {}s", SETTLE.as_secs())]
    Unsettled,
}

/// State shared by the caller, the jobs and the callbacks. Callbacks only touch atomics.
struct Shared {
    ran: AtomicU64,
}

/// What one job did.
#[derive(Default)]
struct Tally {
    calls: u64,
    masked: u64,
    expected: u64,
}

/// Runs the demo workload on `h` until `stop` is set or `duration` has passed, then drains it.
///
/// Call it from a thread outside the runtime. Every call it makes is checked: the first error is
/// returned after the run has drained, as is a callback count that does not match.
pub fn demo(h: &Handle, duration: Duration, stop: &AtomicBool) -> Result<DemoReport, DemoError> {
    let n = h.cpus();
    let shared = Arc::new(Shared {
        ran: AtomicU64::new(0),
    });
    let mut rng = Rng::new(SEED);
    let mut rep = DemoReport::default();
    let mut first_err: Option<DemoError> = None;
    let mut jobs: VecDeque<JobHandle<Result<Tally, DemoError>>> = VecDeque::new();
    let start = Instant::now();

    // 1. The sending phase.
    while first_err.is_none() {
        if stop.load(Ordering::Relaxed) {
            rep.interrupted = true;
            break;
        }
        if start.elapsed() >= duration {
            break;
        }
        let cpu = rng.below(n);
        match rng.below(8) {
            0 | 1 => {
                let d = shared.clone();
                match h.call_single(cpu, move || bump(&d), true) {
                    Ok(()) => {
                        rep.single_sync += 1;
                        rep.callbacks_expected += 1;
                    }
                    Err(e) => first_err = Some(ipi("call_single", e)),
                }
            }
            2 | 3 => {
                let d = shared.clone();
                match h.call_single_async(cpu, move || bump(&d)) {
                    Ok(()) => {
                        rep.single_async += 1;
                        rep.callbacks_expected += 1;
                    }
                    Err(e) => first_err = Some(ipi("call_single_async", e)),
                }
            }
            4 => {
                let mask = rng.mask(n);
                let d = shared.clone();
                match h.call_many(&mask, move || bump(&d), true) {
                    Ok(()) => {
                        rep.many_sync += 1;
                        rep.callbacks_expected += mask.weight() as u64;
                    }
                    Err(e) => first_err = Some(ipi("call_many", e)),
                }
            }
            _ => {
                if jobs.len() >= JOBS_PER_CPU * n {
                    if let Some(j) = jobs.pop_front() {
                        if let Err(e) = settle_job(j, &mut rep) {
                            first_err = Some(e);
                        }
                    }
                }
                let masked = rng.below(3) == 0;
                let seed = rng.next();
                let (hh, d) = (h.clone(), shared.clone());
                let job = move || {
                    if masked {
                        masked_job(&hh, &d, seed)
                    } else {
                        cpu_to_cpu_job(&hh, &d, seed)
                    }
                };
                match h.run_on(cpu, job) {
                    Ok(j) => jobs.push_back(j),
                    Err(e) => first_err = Some(e.into()),
                }
            }
        }
    }
    rep.elapsed_ms = start.elapsed().as_millis() as u64;

    // 3. Drain: join every job, then wait until no callback holds the shared state.
    while let Some(j) = jobs.pop_front() {
        if let Err(e) = settle_job(j, &mut rep) {
            first_err.get_or_insert(e);
        }
    }
    let deadline = Instant::now() + SETTLE;
    let mut shared = shared;
    let last = loop {
        match Arc::try_unwrap(shared) {
            Ok(s) => break Some(s),
            Err(back) if Instant::now() < deadline => {
                shared = back;
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(back) => {
                // A callback still owns a reference: dropping ours could leave it to free the
                // state in IPI context. Leak these few bytes instead.
                std::mem::forget(back);
                break None;
            }
        }
    };
    if let Some(e) = first_err {
        return Err(e);
    }
    let Some(last) = last else {
        return Err(DemoError::Unsettled);
    };
    rep.callbacks_run = last.ran.load(Ordering::Relaxed);
    if rep.callbacks_run != rep.callbacks_expected {
        return Err(DemoError::Mismatch {
            expected: rep.callbacks_expected,
            ran: rep.callbacks_run,
        });
    }
    Ok(rep)
}

/// The callback every IPI runs. IPI context: one atomic add.
fn bump(d: &Shared) {
    d.ran.fetch_add(1, Ordering::Relaxed);
}

fn ipi(op: &'static str, source: IpiError) -> DemoError {
    DemoError::Ipi { op, source }
}

fn settle_job(
    j: JobHandle<Result<Tally, DemoError>>,
    rep: &mut DemoReport,
) -> Result<(), DemoError> {
    let t = j.join_timeout(SETTLE)??;
    rep.jobs += 1;
    rep.cpu_to_cpu += t.calls;
    rep.masked_sections += t.masked;
    rep.callbacks_expected += t.expected;
    Ok(())
}

/// A CPU other than `me`, or `me` itself on a one-CPU runtime.
fn other(rng: &mut Rng, me: CpuId, n: usize) -> CpuId {
    if n < 2 {
        return me;
    }
    (me + 1 + rng.below(n - 1)) % n
}

/// Step 2: a job that sends calls to other CPUs (CPU-to-CPU IPIs, sync and async).
fn cpu_to_cpu_job(h: &Handle, d: &Arc<Shared>, seed: u64) -> Result<Tally, DemoError> {
    let me = this_cpu().unwrap_or(0);
    let n = h.cpus();
    let mut rng = Rng::new(seed);
    let mut t = Tally::default();
    for i in 0..CALLS_PER_JOB {
        let to = other(&mut rng, me, n);
        let dd = d.clone();
        let targets = match i % 4 {
            0 | 1 => h
                .call_single(to, move || bump(&dd), true)
                .map(|()| 1)
                .map_err(|e| ipi("CPU-to-CPU call_single", e))?,
            2 => h
                .call_single_async(to, move || bump(&dd))
                .map(|()| 1)
                .map_err(|e| ipi("CPU-to-CPU call_single_async", e))?,
            _ => {
                let mask = rng.mask(n);
                // `call_many` skips the calling CPU.
                let w = mask.weight() as u64 - u64::from(mask.contains(me));
                h.call_many(&mask, move || bump(&dd), true)
                    .map(|()| w)
                    .map_err(|e| ipi("CPU-to-CPU call_many", e))?
            }
        };
        t.calls += 1;
        t.expected += targets;
    }
    Ok(t)
}

/// Step 2: a job that masks irqs for 20-200 µs; IPIs that arrive meanwhile are replayed at the
/// restore. It also queues one async call from inside the masked section (allowed; a sync call
/// would be refused with `IrqsDisabled`).
fn masked_job(h: &Handle, d: &Arc<Shared>, seed: u64) -> Result<Tally, DemoError> {
    let me = this_cpu().unwrap_or(0);
    let mut rng = Rng::new(seed);
    let spin = Duration::from_micros(20 + rng.below(181) as u64);
    let to = other(&mut rng, me, h.cpus());
    let mut t = Tally {
        masked: 1,
        ..Tally::default()
    };
    let flags = irq_save();
    let start = Instant::now();
    let dd = d.clone();
    let sent = h.call_single_async(to, move || bump(&dd));
    while start.elapsed() < spin {
        cpu_relax();
    }
    irq_restore(flags);
    sent.map_err(|e| ipi("call_single_async with irqs masked", e))?;
    t.calls += 1;
    t.expected += 1;
    Ok(t)
}

/// `--workload demo`.
pub struct Demo;

impl super::Workload for Demo {
    fn name(&self) -> &'static str {
        "demo"
    }

    fn about(&self) -> &'static str {
        "every kind of IPI, CPU-to-CPU calls, irq-masked sections; each callback runs once"
    }

    fn run(
        &self,
        h: &Handle,
        duration: Duration,
        stop: &AtomicBool,
    ) -> Result<Box<dyn super::Outcome>, super::WorkloadError> {
        Ok(Box::new(demo(h, duration, stop)?))
    }
}

impl super::Outcome for DemoReport {
    fn write_json(&self, out: &mut dyn std::io::Write, json: &super::Json) -> std::io::Result<()> {
        json.write(out, "demo", self)
    }

    /// The table, then what was sent and how many callbacks ran.
    fn write_text(
        &self,
        out: &mut dyn std::io::Write,
        table: &super::Table,
    ) -> std::io::Result<()> {
        table.write(out, self.elapsed_ms, self.interrupted)?;
        let d = self;
        writeln!(
            out,
            "demo: {} call_single, {} call_single_async, {} call_many, {} CPU-to-CPU calls, \
             {} irq-masked sections, {} jobs; {} of {} callbacks ran",
            d.single_sync,
            d.single_async,
            d.many_sync,
            d.cpu_to_cpu,
            d.masked_sections,
            d.jobs,
            d.callbacks_run,
            d.callbacks_expected
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short run on two CPUs: every callback sent ran exactly once. (Was a doctest while
    /// this file was in the library; a binary's doctests do not run.)
    #[test]
    fn short_run_counts_match() {
        let rt = usmp::Builder::new().cpus(2).build().unwrap();
        let r = demo(&rt, Duration::from_millis(50), &AtomicBool::new(false)).unwrap();
        assert_eq!(r.callbacks_run, r.callbacks_expected);
    }
}
