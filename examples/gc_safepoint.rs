//! A stop-the-world collector: every CPU is brought to a safe point, the per-CPU roots are
//! scanned, the world resumes. The user-space counterparts are bdwgc's `GC_stop_world`
//! (a suspend signal to every mutator thread, which parks in its handler) and a VM's safepoint
//! (HotSpot's `SafepointSynchronize::begin`); the kernel mechanism it runs on here is
//! `stop_machine` (`multi_cpu_stop`: every online CPU spins with irqs masked while one runs
//! the function).
//!
//! Mutators, one job per CPU, keep "allocating": each step pushes a root into the CPU's root
//! set (or drops them all when it is full) and bumps the CPU's epoch, inside one irq-masked
//! section, so between two steps the root set is consistent — that gap is the safe point.
//! The collector (the main thread) runs `stop_machine` with a scan that runs on CPU 0 and reads
//! every CPU's roots; it then waits until every mutator has moved on (the world resumed).
//!
//! The checks: every scanned root is one its CPU really pushed at that index; no CPU's epoch
//! moved during the scan (the world was stopped); every mutator makes progress after each
//! collection. Pause p50/p99 (the `stop_machine` call, from the collector's side) are reported
//! for the CPU count. The example exits 1 if a check fails.
//!
//! The options add what a real runtime does beside its safepoints: `--sync-calls` makes every
//! mutator `call_single` the next one synchronously every few hundred steps (mutators that
//! hand work to each other), `--churn K` adds K CPUs without mutators that a thread takes down
//! and brings up without pause (hotplug), and `--seconds S` collects every 5 ms for S seconds
//! instead of a fixed count. Any failed call, hotplug operation or safepoint fails the run.
//!
//! Run: `cargo run --release --example gc_safepoint [-- --cpus N --collections C]`,
//! or `[-- --cpus 4 --sync-calls --churn 2 --seconds 60]` for the concurrent pattern.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use usmp::{irq_restore, irq_save, CpuMask, PerCpu};

/// Roots per CPU before the mutator drops them all (a minor collection of its own).
const CAP: usize = 256;
/// Bound on every wait (jobs starting, the world resuming, jobs joining).
const BOUND: Duration = Duration::from_secs(10);
/// Steps between two `yield_now`s of a busy job: with more logical CPUs than host cores, a job
/// that never yields holds its core for a whole time slice while the CPU an IPI is waiting on
/// waits for one.
const YIELD_EVERY: u64 = 256;
/// `stop_machine` error code for "bad root" / "the world moved".
const BAD_ROOT: i32 = 1;
const WORLD_MOVED: i32 = 2;

/// One CPU's roots. Slots `0..len` are valid between mutator steps.
struct Roots {
    len: AtomicU64,
    slot: Vec<AtomicU64>,
    epoch: AtomicU64,
}

/// The root a mutator on `cpu` pushes at `index` in its `round`th fill: the scan recomputes it.
fn root(cpu: usize, round: u64, index: usize) -> u64 {
    ((cpu as u64 + 1) << 48) | ((round & 0xFFFF) << 32) | (index as u64 + 1)
}

/// One mutator step, irqs masked: push a root, or drop all and start a new round.
fn mutate(r: &Roots, cpu: usize, round: &mut u64) {
    let flags = irq_save();
    let len = r.len.load(Ordering::Relaxed) as usize;
    if len == CAP {
        *round += 1;
        r.len.store(0, Ordering::Relaxed);
    } else {
        r.slot[len].store(root(cpu, *round, len), Ordering::Relaxed);
        r.len.store(len as u64 + 1, Ordering::Relaxed);
    }
    r.epoch.fetch_add(1, Ordering::Release);
    irq_restore(flags);
}

/// The scan, on one CPU in IPI context while the world is stopped: atomics only.
/// Returns the number of live roots, or an error code.
fn scan(roots: &PerCpu<Roots>, before: &[AtomicU64], live: &AtomicU64) -> Result<(), i32> {
    let mut n = 0u64;
    for (cpu, r) in roots.iter() {
        before[cpu].store(r.epoch.load(Ordering::Acquire), Ordering::Relaxed);
        let len = r.len.load(Ordering::Acquire) as usize;
        for i in 0..len {
            let v = r.slot[i].load(Ordering::Relaxed);
            // The round is not known here, but the CPU and the index are.
            if v >> 48 != cpu as u64 + 1 || v & 0xFFFF_FFFF != i as u64 + 1 {
                return Err(BAD_ROOT);
            }
        }
        n += len as u64;
    }
    // The world was stopped for the whole scan: no epoch moved.
    for (cpu, r) in roots.iter() {
        if r.epoch.load(Ordering::Acquire) != before[cpu].load(Ordering::Relaxed) {
            return Err(WORLD_MOVED);
        }
    }
    live.store(n, Ordering::Relaxed);
    Ok(())
}

fn arg(name: &str, default: usize) -> anyhow::Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn main() -> anyhow::Result<()> {
    let cpus = arg("--cpus", 4)?;
    let seconds = arg("--seconds", 0)?;
    let collections = if seconds > 0 {
        usize::MAX
    } else {
        arg("--collections", 1000)?
    };
    let sync_calls = flag("--sync-calls");
    let churn = arg("--churn", 0)?;
    let run_for = Duration::from_secs(seconds as u64);
    let rt = usmp::Builder::new().cpus(cpus + churn).build()?;
    let roots = Arc::new(PerCpu::new(cpus, |_| Roots {
        len: AtomicU64::new(0),
        slot: (0..CAP).map(|_| AtomicU64::new(0)).collect(),
        epoch: AtomicU64::new(0),
    }));
    let quit = Arc::new(AtomicBool::new(false));

    let mut mutators = Vec::new();
    for cpu in 0..cpus {
        let (roots, quit, h) = (roots.clone(), quit.clone(), rt.handle());
        mutators.push(rt.run_on(cpu, move || {
            let r = roots.get(cpu).expect("cpu in range");
            let (mut round, mut steps) = (0, 0u64);
            let end = Instant::now() + run_for + BOUND * 3;
            while !quit.load(Ordering::Relaxed) && Instant::now() < end {
                mutate(r, cpu, &mut round);
                steps += 1;
                if steps % YIELD_EVERY == 0 {
                    if sync_calls && cpus > 1 {
                        h.call_single((cpu + 1) % cpus, || {}, true)?;
                    }
                    std::thread::yield_now();
                }
            }
            Ok::<(), usmp::IpiError>(())
        })?);
    }
    let churner = (churn > 0).then(|| {
        let (h, quit) = (rt.handle(), quit.clone());
        std::thread::spawn(move || -> Result<u64, usmp::HotplugError> {
            let mut ops = 0;
            while !quit.load(Ordering::Relaxed) {
                for cpu in cpus..cpus + churn {
                    h.cpu_down(cpu)?;
                    h.cpu_up(cpu)?;
                    ops += 2;
                }
            }
            Ok(ops)
        })
    });
    let started = Instant::now();

    let before: Arc<Vec<AtomicU64>> = Arc::new((0..cpus).map(|_| AtomicU64::new(0)).collect());
    let live = Arc::new(AtomicU64::new(0));
    let on_cpu0: CpuMask = "0".parse()?;
    let mut pauses = Vec::with_capacity(collections.min(1 << 16));
    let mut live_total = 0u64;
    let result = (|| -> anyhow::Result<()> {
        for _ in 0..collections {
            if seconds > 0 {
                if started.elapsed() >= run_for {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            // The world resumed after the last collection: every mutator took a step since.
            let epochs: Vec<u64> = (0..cpus)
                .map(|c| roots.get(c).map_or(0, |r| r.epoch.load(Ordering::Acquire)))
                .collect();
            let deadline = Instant::now() + BOUND;
            while (0..cpus).any(|c| {
                roots
                    .get(c)
                    .is_some_and(|r| r.epoch.load(Ordering::Acquire) == epochs[c])
            }) {
                if Instant::now() >= deadline {
                    bail!("FAILED: a mutator made no progress for {BOUND:?} after a collection");
                }
                std::thread::yield_now();
            }
            let (r, b, l) = (roots.clone(), before.clone(), live.clone());
            let t = Instant::now();
            match rt.stop_machine(move |_cpu| scan(&r, &b, &l), &on_cpu0) {
                Ok(()) => {}
                Err(usmp::StopMachineError::Failed { code: BAD_ROOT, .. }) => {
                    bail!("FAILED: the scan found a root its CPU never pushed")
                }
                Err(usmp::StopMachineError::Failed {
                    code: WORLD_MOVED, ..
                }) => bail!("FAILED: a mutator ran during the scan (the world was not stopped)"),
                Err(e) => return Err(e.into()),
            }
            pauses.push(t.elapsed());
            live_total += live.load(Ordering::Relaxed);
        }
        Ok(())
    })();
    quit.store(true, Ordering::SeqCst);
    for j in mutators {
        j.join_timeout(BOUND)?
            .context("FAILED: a mutator's call to the next CPU")?;
    }
    let hotplug_ops = match churner {
        Some(t) => t
            .join()
            .map_err(|_| anyhow::anyhow!("the hotplug thread panicked"))?
            .context("FAILED: hotplug churn")?,
        None => 0,
    };
    rt.shutdown();
    result?;
    let collections = pauses.len();
    pauses.sort();
    let pct = |q: usize| pauses[(pauses.len() - 1) * q / 100].as_secs_f64() * 1e6;
    println!(
        "gc_safepoint: {cpus} CPUs, {collections} collections, pause p50 {:.0} us, p99 {:.0} us, \
         max {:.0} us; {:.0} live roots scanned per collection",
        pct(50),
        pct(99),
        pct(100),
        live_total as f64 / collections.max(1) as f64
    );
    if sync_calls || churn > 0 {
        println!(
            "gc_safepoint: beside mutator sync calls: {sync_calls}; {hotplug_ops} hotplug operations on {churn} CPU(s)"
        );
    }
    println!("gc_safepoint: OK");
    Ok(())
}
