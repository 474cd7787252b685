//! `stop-machine`: concurrent `stop_machine` calls racing hotplug, while CPUs read the table
//! the calls update.
//!
//! The "table" is `WORDS` atomic words that must always hold one version. Each round builds a
//! runtime and runs, until the round ends:
//! 1. Two writer threads call `stop_machine` on one random online CPU; there the function takes
//!    the next version and stores it word by word, relaxing between words, so an unstopped
//!    reader would see a half-applied update.
//! 2. Readers on the CPUs: an outside thread sends synchronous calls whose callbacks read the
//!    table in IPI context, and another runs jobs that read it in irq-masked sections (what
//!    the kernel's readers do). A read whose words differ is torn: the callback bumps an atomic
//!    (no reporting from IPI context) and the scenario thread reports it (`torn_reads`).
//! 3. A hotplug thread takes random non-boot CPUs down and up (`cpu_down` runs its own
//!    stop_machine).
//! 4. Every `stop_machine` returns `Ok` or a typed error within `HANG_BOUND` of time its
//!    threads could run (`stop_machine_hangs` otherwise): the time the host kept the caller or
//!    a CPU thread runnable but off a core (`host_sched.rs`) is not counted, and an overrun
//!    only it explains is `host_starved`, not a violation. A timeout, of a `stop_machine` or of a
//!    hotplug operation, is a violation (`stop_machine_timeouts`, `hotplug_timeouts`: every
//!    CPU is healthy here); refusals are counted (`timeouts.rs`). The scenario thread counts an iteration
//!    per finished call, so a stalled caller is the watchdog's to report.
//!
//! Faults: default `doorbell-delay,preempt` (library faults apply); `slow-boot=D` slows 1 in 4
//! of the hotplug thread's bring-ups by up to D.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usmp::{
    cpu_relax, irq_restore, irq_save, CpuId, CpuMask, Handle, HotplugError, StopMachineError,
};

use super::host_sched::Window;
use super::timeouts::{self, Failure, Wait};
use super::{Ctx, Scenario, ScenarioError};
use crate::rng::Rng;

/// Words in the table.
const WORDS: usize = 8;
/// Relax iterations between two words of an update.
const WORD_GAP: u32 = 64;
/// A `stop_machine` gives up on a CPU that has not joined after this (the call timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// A `stop_machine` that has not returned after this is a hang.
const HANG_BOUND: Duration = Duration::from_secs(5);
/// Each runtime lives this long.
const ROUND: Duration = Duration::from_secs(3);
/// Reads per reader job.
const JOB_READS: u32 = 200;
/// Bound on joining a reader job.
const JOB_BOUND: Duration = Duration::from_secs(5);
/// How often the scenario thread checks.
const CHECK_EVERY: Duration = Duration::from_millis(10);
const NO_CPU: usize = usize::MAX;

/// The table and what readers saw.
struct Table {
    words: [AtomicU64; WORDS],
    version: AtomicU64,
    torn: AtomicU64,
    /// The first torn read: CPU, and two words that differed.
    torn_cpu: AtomicUsize,
    torn_a: AtomicU64,
    torn_b: AtomicU64,
    reads_ipi: AtomicU64,
    reads_job: AtomicU64,
}

impl Table {
    fn new() -> Table {
        Table {
            words: std::array::from_fn(|_| AtomicU64::new(0)),
            version: AtomicU64::new(0),
            torn: AtomicU64::new(0),
            torn_cpu: AtomicUsize::new(NO_CPU),
            torn_a: AtomicU64::new(0),
            torn_b: AtomicU64::new(0),
            reads_ipi: AtomicU64::new(0),
            reads_job: AtomicU64::new(0),
        }
    }

    /// The update, inside stop_machine (IPI context: atomics only).
    fn update(&self) {
        let v = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        for w in &self.words {
            w.store(v, Ordering::Release);
            for _ in 0..WORD_GAP {
                cpu_relax();
            }
        }
    }

    /// One read on `cpu`, with irqs masked by the caller. May run in IPI context.
    fn read(&self, cpu: CpuId) {
        let a = self.words[0].load(Ordering::Acquire);
        for w in &self.words[1..] {
            let b = w.load(Ordering::Acquire);
            if b != a {
                if self.torn.fetch_add(1, Ordering::Relaxed) == 0 {
                    self.torn_a.store(a, Ordering::Relaxed);
                    self.torn_b.store(b, Ordering::Relaxed);
                    self.torn_cpu.store(cpu, Ordering::Release);
                }
                return;
            }
        }
    }
}

pub struct StopMachine;

impl Scenario for StopMachine {
    fn name(&self) -> &'static str {
        "stop-machine"
    }

    fn about(&self) -> &'static str {
        "concurrent stop_machine updates of a multi-word table racing hotplug, read by CPUs; torn_reads, stop_machine_hangs, stop_machine_timeouts, hotplug_timeouts stay 0"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "torn_reads",
            "stop_machine_hangs",
            "stop_machine_timeouts",
            "hotplug_timeouts",
            "stop_machines",
            "sm_ok",
            "sm_ran_nowhere",
            "stop_machine_refusals",
            "sm_ipi_error",
            "sm_other_error",
            "sm_max_us",
            "reads_ipi",
            "reads_job",
            "hotplug_ups",
            "hotplug_downs",
            "hotplug_errors",
            "hotplug_refusals",
            "host_starved",
        ]
    }

    fn default_faults(&self) -> &'static str {
        "doorbell-delay,preempt"
    }

    fn run(&self, ctx: &Ctx) -> Result<(), ScenarioError> {
        let mut rng = ctx.rng(0);
        while ctx.running() {
            let rt = ctx.build(|b| b.call_timeout(CALL_TIMEOUT))?;
            let h = rt.handle();
            round(ctx, &h, &mut rng)?;
            ctx.unwatch();
            drop(rt);
        }
        Ok(())
    }
}

/// Progress of the writers, shared with the scenario thread.
#[derive(Default)]
struct Progress {
    calls: AtomicU64,
}

fn round(ctx: &Ctx, h: &Handle, rng: &mut Rng) -> Result<(), ScenarioError> {
    let table = Arc::new(Table::new());
    let done = AtomicBool::new(false);
    let progress = Progress::default();
    let streams: Vec<Rng> = (0..4).map(|i| Rng::stream(rng.next(), i)).collect();
    let slow = ctx.faults.slow_boot;
    std::thread::scope(|s| -> Result<(), ScenarioError> {
        let mut threads = Vec::new();
        for (i, r) in streams.into_iter().enumerate() {
            let (table, done, progress) = (&table, &done, &progress);
            let b = std::thread::Builder::new().name(format!("stress-sm-{i}"));
            threads.push(b.spawn_scoped(s, move || match i {
                0 | 1 => writer(ctx, h, table, r, done, progress),
                2 => readers(h, table, r, done),
                _ => hotplug(ctx, h, r, slow, done),
            })?);
        }
        // Step 4 and the reports of step 2, while the round runs.
        let start = Instant::now();
        let mut seen = Seen::default();
        let mut calls = 0;
        while ctx.running() && start.elapsed() < ROUND {
            std::thread::sleep(CHECK_EVERY);
            report(ctx, &table, &mut seen);
            let c = progress.calls.load(Ordering::Relaxed);
            for _ in calls..c {
                ctx.iteration();
            }
            calls = c;
        }
        done.store(true, Ordering::SeqCst);
        for t in threads {
            let _ = t.join();
        }
        report(ctx, &table, &mut seen);
        Ok(())
    })
}

/// What the scenario thread has reported so far.
#[derive(Default)]
struct Seen {
    torn: u64,
    reads_ipi: u64,
    reads_job: u64,
}

/// Reports new torn reads and the read counts as they grow.
fn report(ctx: &Ctx, table: &Table, seen: &mut Seen) {
    for (counter, now, was) in [
        ("reads_ipi", &table.reads_ipi, &mut seen.reads_ipi),
        ("reads_job", &table.reads_job, &mut seen.reads_job),
    ] {
        let n = now.load(Ordering::Relaxed);
        ctx.count(counter, n - *was);
        *was = n;
    }
    let torn = table.torn.load(Ordering::Relaxed);
    if torn > seen.torn {
        let cpu = table.torn_cpu.load(Ordering::Acquire);
        ctx.violation(
            "torn_reads",
            (cpu != NO_CPU).then_some(cpu),
            format!(
                "{} torn read(s) of the table; the first on CPU {cpu} saw versions {} and {} at once",
                torn - seen.torn,
                table.torn_a.load(Ordering::Relaxed),
                table.torn_b.load(Ordering::Relaxed)
            ),
        );
        seen.torn = torn;
    }
}

/// Step 1.
fn writer(
    ctx: &Ctx,
    h: &Handle,
    table: &Arc<Table>,
    mut rng: Rng,
    done: &AtomicBool,
    progress: &Progress,
) {
    while !done.load(Ordering::SeqCst) {
        let Some(cpu) = rng.pick(&h.online_mask()) else {
            std::thread::yield_now();
            continue;
        };
        let mask: CpuMask = std::iter::once(cpu).collect();
        let (t, ran) = (table.clone(), Arc::new(AtomicBool::new(false)));
        let r2 = ran.clone();
        let window = Window::open(h);
        let start = Instant::now();
        let res = h.stop_machine(
            move |_| {
                t.update();
                r2.store(true, Ordering::Relaxed);
                Ok(())
            },
            &mask,
        );
        let took = start.elapsed();
        ctx.count("stop_machines", 1);
        ctx.max("sm_max_us", took.as_micros() as u64);
        match res {
            Ok(()) if ran.load(Ordering::Relaxed) => ctx.count("sm_ok", 1),
            // Its CPU went offline before the snapshot: the function ran nowhere.
            Ok(()) => ctx.count("sm_ran_nowhere", 1),
            Err(e) => match timeouts::stop_machine_failed(
                ctx,
                Wait { h, window: &window },
                Some(cpu),
                &e,
                None,
            ) {
                Failure::Other if matches!(e, StopMachineError::Ipi(_)) => {
                    ctx.count("sm_ipi_error", 1)
                }
                Failure::Other => {
                    ctx.count("sm_other_error", 1);
                    tracing::debug!("stop-machine: {e}");
                }
                _ => {}
            },
        }
        if took > HANG_BOUND {
            let host = window.max_wait(h);
            let what = format!(
                "stop_machine on CPU {cpu} took {:.0} ms (bound {:.0} ms); the host kept a thread it waited for runnable but off a core for {:.0} ms of it",
                took.as_secs_f64() * 1e3,
                HANG_BOUND.as_secs_f64() * 1e3,
                host.as_secs_f64() * 1e3
            );
            if took.saturating_sub(host) <= HANG_BOUND {
                ctx.note("host_starved", what);
            } else {
                ctx.violation("stop_machine_hangs", Some(cpu), what);
            }
        }
        progress.calls.fetch_add(1, Ordering::Relaxed);
    }
}

/// Step 2: synchronous calls that read in IPI context, alternating with reader jobs.
fn readers(h: &Handle, table: &Arc<Table>, mut rng: Rng, done: &AtomicBool) {
    while !done.load(Ordering::SeqCst) {
        let Some(cpu) = rng.pick(&h.online_mask()) else {
            std::thread::yield_now();
            continue;
        };
        let t = table.clone();
        if rng.one_in(2) {
            let _ = h.call_single(
                cpu,
                move || {
                    if let Some(c) = usmp::this_cpu() {
                        t.read(c);
                        t.reads_ipi.fetch_add(1, Ordering::Relaxed);
                    }
                },
                true,
            );
        } else {
            let job = h.run_on(cpu, move || {
                for _ in 0..JOB_READS {
                    let f = irq_save();
                    if let Some(c) = usmp::this_cpu() {
                        t.read(c);
                    }
                    irq_restore(f);
                    t.reads_job.fetch_add(1, Ordering::Relaxed);
                }
            });
            if let Ok(j) = job {
                let _ = j.join_timeout(JOB_BOUND);
            }
        }
    }
}

/// Step 3.
fn hotplug(ctx: &Ctx, h: &Handle, mut rng: Rng, slow: Option<Duration>, done: &AtomicBool) {
    let n = h.cpus();
    while !done.load(Ordering::SeqCst) {
        let cpu = 1 + rng.below(n - 1);
        let mut delay = Duration::ZERO;
        let window = Window::open(h);
        let (op, r) = if h.is_online(cpu) {
            ("cpu_down", h.cpu_down(cpu).map(|()| "hotplug_downs"))
        } else {
            if let Some(max) = slow.filter(|_| rng.one_in(4)) {
                let d = Duration::from_micros(rng.next() % (max.as_micros() as u64 + 1));
                if h.faults().set_boot_delay(cpu, d).is_ok() {
                    delay = d;
                }
            }
            ("cpu_up", h.cpu_up(cpu).map(|()| "hotplug_ups"))
        };
        match r {
            Ok(c) => ctx.count(c, 1),
            Err(e) => {
                let excuse = matches!(&e, HotplugError::BootTimeout { timeout_ms, .. }
                    if delay.as_millis() as u64 >= *timeout_ms)
                .then_some("slow-boot delayed it past the boot timeout");
                let wait = Wait { h, window: &window };
                if timeouts::hotplug_failed(ctx, wait, op, cpu, &e, excuse) == Failure::Other {
                    ctx.count("hotplug_errors", 1);
                    tracing::debug!("stop-machine: hotplug CPU{cpu}: {e}");
                }
            }
        }
    }
}
