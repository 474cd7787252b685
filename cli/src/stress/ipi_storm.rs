//! `ipi-storm`: every kind of call at once, from outside threads and from CPUs, while other
//! CPUs sit in irq-masked sections or busy jobs. Catches `--broken doorbell-never-rings`.
//!
//! 1. Two outside threads loop sending `call_single` (sync), `call_single_async` and
//!    `call_many` (sync or async, to a random mask) to random CPUs. Every callback hits a
//!    ledger token (`calls.rs`): one per target CPU, and a `call_many` files the CPUs outside
//!    its mask as "never", so a callback on the wrong CPU is a `refused_runs`.
//! 2. The scenario thread keeps one job queued on each CPU: a CPU-to-CPU sender (sync and
//!    async calls and `call_many` to other CPUs), an irq-masked section (spins up to
//!    `irq-spin`, sending async calls meanwhile, so IPIs to it are deferred and replayed), or a
//!    busy spin with irqs on (reached only through its doorbell signal). A job hands its
//!    tokens back with its result.
//! 3. Checked while it runs: a synchronous call that returned `Ok` ran exactly once by then;
//!    an accepted call runs within `LOST_AFTER` (`lost_calls`) and only once (`double_runs`);
//!    a refused call never runs (`refused_runs`); no call times out within the generous
//!    `CALL_TIMEOUT` (`call_timeouts`: the doorbell must reach a busy or sleeping CPU).
//! 4. At the end every job is joined (bounded), every ledger drained (bounded) and the
//!    runtime's own books must balance at shutdown (`lost_calls`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usmp::{
    cpu_relax, irq_restore, irq_save, this_cpu, CpuId, CpuMask, Handle, IpiError, JobHandle,
};

use super::calls::{Expect, Ledger, Token};
use super::{Ctx, Scenario, ScenarioError};
use crate::rng::Rng;

/// A synchronous call gives up after this long: far beyond any signal latency, even with 16
/// CPUs on one core.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// An accepted call that has not run after this long is lost.
const LOST_AFTER: Duration = Duration::from_secs(3);
/// Bound on joining a job and on draining the ledgers at the end.
const SETTLE: Duration = Duration::from_secs(10);
/// Outside sender threads.
const OUTSIDE_SENDERS: u64 = 2;
/// Calls one CPU-to-CPU job sends.
const CALLS_PER_JOB: u32 = 8;
/// Irq-masked sections spin up to this long without the `irq-spin` fault.
const DEFAULT_SPIN: Duration = Duration::from_micros(200);
/// Busy jobs (irqs on) spin up to this long.
const BUSY_SPIN: Duration = Duration::from_millis(5);

/// A call's token, its target, and what must happen to it.
type Filed = (Arc<Token>, CpuId, Expect);

/// A violation found where no `Ctx` is at hand (in a job): counter, CPU, message.
type Found = (&'static str, Option<CpuId>, String);

/// What one send did, for the counters.
#[derive(Clone, Copy)]
enum Op {
    SingleSync,
    SingleAsync,
    Many,
}

impl Op {
    fn counter(self) -> &'static str {
        match self {
            Op::SingleSync => "calls_single_sync",
            Op::SingleAsync => "calls_single_async",
            Op::Many => "calls_many",
        }
    }
}

/// What a refused or failed call means for its tokens; a timeout is also a violation.
fn failed(e: &IpiError, cpu: CpuId, found: &mut Vec<Found>) -> Expect {
    match e {
        IpiError::Offline { .. } => Expect::Never,
        IpiError::Timeout { started, .. } => {
            found.push((
                "call_timeouts",
                Some(cpu),
                format!("no answer within {} ms: {e}", CALL_TIMEOUT.as_millis()),
            ));
            if *started {
                Expect::AtMostOnce
            } else {
                Expect::Never
            }
        }
        _ => {
            found.push(("call_errors", Some(cpu), e.to_string()));
            Expect::AtMostOnce
        }
    }
}

/// Step 1's send, also used by CPU-to-CPU jobs (`me`: the sending CPU, excluded from targets;
/// `masked`: irqs are off, so only async sends are allowed).
fn send_one(
    h: &Handle,
    rng: &mut Rng,
    me: Option<CpuId>,
    masked: bool,
    filed: &mut Vec<Filed>,
    found: &mut Vec<Found>,
) -> Op {
    let n = h.cpus();
    let mut targets = CpuMask::first_n(n);
    if let Some(me) = me {
        targets.clear(me);
    }
    let op = match rng.below(3) {
        0 if !masked => Op::SingleSync,
        1 | 0 => Op::SingleAsync,
        _ => Op::Many,
    };
    match op {
        Op::SingleSync | Op::SingleAsync => {
            let Some(cpu) = rng.pick(&targets) else {
                return op;
            };
            let tok = Ledger::token();
            let t = tok.clone();
            let wait = matches!(op, Op::SingleSync);
            let expect = match h.call_single(cpu, move || t.hit(), wait) {
                Ok(()) => {
                    if wait && tok.runs() != 1 {
                        found.push((
                            "lost_calls",
                            Some(cpu),
                            format!(
                                "call_single(wait) returned Ok, callback ran {} times",
                                tok.runs()
                            ),
                        ));
                    }
                    Expect::Once
                }
                Err(e) => failed(&e, cpu, found),
            };
            filed.push((tok, cpu, expect));
        }
        Op::Many => {
            let mask = rng.mask(n).and(&targets);
            if mask.is_empty() {
                return op;
            }
            let wait = !masked && rng.one_in(2);
            let toks: Arc<Vec<Arc<Token>>> = Arc::new((0..n).map(|_| Ledger::token()).collect());
            let t = toks.clone();
            let r = h.call_many(
                &mask,
                move || {
                    if let Some(c) = this_cpu() {
                        if let Some(tok) = t.get(c) {
                            tok.hit();
                        }
                    }
                },
                wait,
            );
            let failed_mask = match &r {
                Ok(()) => CpuMask::new(),
                Err(IpiError::Partial { failed: f, first }) => {
                    let _ = failed(first, f.first().unwrap_or(0), found);
                    f.clone()
                }
                Err(e) => {
                    let _ = failed(e, mask.first().unwrap_or(0), found);
                    mask.clone()
                }
            };
            for (cpu, tok) in toks.iter().enumerate() {
                let expect = if !mask.contains(cpu) {
                    Expect::Never
                } else if failed_mask.contains(cpu) {
                    Expect::AtMostOnce
                } else {
                    Expect::Once
                };
                if wait && expect == Expect::Once && tok.runs() != 1 {
                    found.push((
                        "lost_calls",
                        Some(cpu),
                        format!(
                            "call_many(wait) returned, callback ran {} times here",
                            tok.runs()
                        ),
                    ));
                }
                filed.push((tok.clone(), cpu, expect));
            }
        }
    }
    op
}

/// What a job hands back.
#[derive(Default)]
struct JobOut {
    filed: Vec<Filed>,
    found: Vec<Found>,
    calls: u64,
    masked: bool,
    busy: bool,
}

/// Step 2: one job's body, on CPU `me`.
fn cpu_job(h: Handle, seed: u64, me: CpuId, spin_max: Duration) -> JobOut {
    let mut rng = Rng::new(seed);
    let mut out = JobOut::default();
    match rng.below(3) {
        0 => {
            for _ in 0..CALLS_PER_JOB {
                send_one(
                    &h,
                    &mut rng,
                    Some(me),
                    false,
                    &mut out.filed,
                    &mut out.found,
                );
                out.calls += 1;
            }
        }
        1 => {
            let spin = Duration::from_nanos(rng.next() % (spin_max.as_nanos() as u64 + 1));
            let flags = irq_save();
            let t = Instant::now();
            // A few async sends with irqs off, then spin out the rest of the section.
            for _ in 0..rng.below(3) {
                send_one(&h, &mut rng, Some(me), true, &mut out.filed, &mut out.found);
                out.calls += 1;
            }
            while t.elapsed() < spin {
                cpu_relax();
            }
            irq_restore(flags);
            out.masked = true;
        }
        _ => {
            let spin = Duration::from_nanos(rng.next() % (BUSY_SPIN.as_nanos() as u64 + 1));
            let t = Instant::now();
            while t.elapsed() < spin {
                cpu_relax();
            }
            out.busy = true;
        }
    }
    out
}

pub struct IpiStorm;

impl Scenario for IpiStorm {
    fn name(&self) -> &'static str {
        "ipi-storm"
    }

    fn about(&self) -> &'static str {
        "call_single/_async/call_many from CPUs and outside threads, irq-masked and busy CPUs; lost_calls, double_runs, refused_runs, call_timeouts stay 0"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "lost_calls",
            "double_runs",
            "refused_runs",
            "call_timeouts",
            "calls_single_sync",
            "calls_single_async",
            "calls_many",
            "cpu_to_cpu",
            "masked_sections",
            "busy_jobs",
            "deferred",
            "doorbells_dropped",
            "doorbells_delayed",
        ]
    }

    fn default_faults(&self) -> &'static str {
        "doorbell-delay,doorbell-drop,preempt,irq-spin"
    }

    fn run(&self, ctx: &Ctx) -> Result<(), ScenarioError> {
        let rt = ctx.build(|b| b.call_timeout(CALL_TIMEOUT))?;
        let h = rt.handle();
        let n = h.cpus();
        let spin_max = ctx.faults.irq_spin.unwrap_or(DEFAULT_SPIN);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| -> Result<(), ScenarioError> {
            let mut senders = Vec::new();
            for i in 0..OUTSIDE_SENDERS {
                let (h, done) = (&h, &done);
                let mut rng = ctx.rng(1 + i);
                senders.push(
                    std::thread::Builder::new()
                        .name(format!("ipi-storm-sender{i}"))
                        .spawn_scoped(s, move || {
                            let mut ledger = Ledger::new(LOST_AFTER);
                            let (mut filed, mut found) = (Vec::new(), Vec::new());
                            let mut k = 0u64;
                            while !done.load(Ordering::Relaxed) && ctx.running() {
                                let op = send_one(h, &mut rng, None, false, &mut filed, &mut found);
                                ctx.count(op.counter(), 1);
                                ctx.iteration();
                                file_all(ctx, &mut ledger, &mut filed, &mut found);
                                k += 1;
                                if k % 64 == 0 {
                                    ledger.check(ctx, false);
                                }
                            }
                            drain(ctx, &mut ledger);
                        })?,
                );
            }

            // Step 2.
            let mut rng = ctx.rng(100);
            let mut ledger = Ledger::new(LOST_AFTER);
            let mut jobs: VecDeque<(CpuId, JobHandle<JobOut>)> = VecDeque::new();
            let mut next_cpu = 0;
            while ctx.running() {
                while jobs.len() < n {
                    let cpu = next_cpu;
                    next_cpu = (next_cpu + 1) % n;
                    let (hh, seed) = (h.clone(), rng.next());
                    match h.run_on(cpu, move || cpu_job(hh, seed, cpu, spin_max)) {
                        Ok(j) => jobs.push_back((cpu, j)),
                        Err(e) => ctx.violation("call_errors", Some(cpu), format!("run_on: {e}")),
                    }
                }
                if let Some((cpu, j)) = jobs.pop_front() {
                    take_job(ctx, &mut ledger, cpu, j);
                    ledger.check(ctx, false);
                }
            }
            done.store(true, Ordering::Relaxed);
            for (cpu, j) in jobs {
                take_job(ctx, &mut ledger, cpu, j);
            }
            drain(ctx, &mut ledger);
            for t in senders {
                if t.join().is_err() {
                    ctx.violation("panics", None, "an outside sender panicked");
                }
            }
            Ok(())
        })?;
        let st = h.stats();
        ctx.set("deferred", st.per_cpu.iter().map(|c| c.deferred).sum());
        let fc = h.faults().counters();
        ctx.set("doorbells_dropped", fc.doorbells_dropped);
        ctx.set("doorbells_delayed", fc.doorbells_delayed);
        // A broken doorbell leaves calls stranded; shutdown must not wait on them forever.
        h.faults()
            .set_broken(usmp::fault::Broken::DoorbellNeverRings, false);
        ctx.shutdown_checked(rt);
        Ok(())
    }
}

fn file_all(ctx: &Ctx, ledger: &mut Ledger, filed: &mut Vec<Filed>, found: &mut Vec<Found>) {
    for (tok, cpu, expect) in filed.drain(..) {
        ledger.file(tok, cpu, expect);
    }
    for (counter, cpu, msg) in found.drain(..) {
        ctx.violation(counter, cpu, msg);
    }
}

/// Joins a job (bounded) and files what it sent.
fn take_job(ctx: &Ctx, ledger: &mut Ledger, cpu: CpuId, j: JobHandle<JobOut>) {
    match j.join_timeout(SETTLE) {
        Ok(mut out) => {
            ctx.iteration();
            if out.calls > 0 && !out.masked {
                ctx.count("cpu_to_cpu", out.calls);
            }
            if out.masked {
                ctx.count("masked_sections", 1);
            }
            if out.busy {
                ctx.count("busy_jobs", 1);
            }
            file_all(ctx, ledger, &mut out.filed, &mut out.found);
        }
        Err(e) => ctx.violation("call_errors", Some(cpu), format!("job: {e}")),
    }
}

/// Waits (bounded) until every accepted call of `ledger` ran, then judges it all.
fn drain(ctx: &Ctx, ledger: &mut Ledger) {
    let deadline = Instant::now() + LOST_AFTER.min(SETTLE);
    while !ledger.drained() && Instant::now() < deadline {
        ctx.heartbeat();
        std::thread::sleep(Duration::from_millis(1));
    }
    ledger.check(ctx, true);
}
