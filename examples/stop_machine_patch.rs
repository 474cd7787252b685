//! Live patching a table of function pointers under `stop_machine` — the kernel's
//! `stop_machine(__apply_alternatives_multi_stop, ...)` / `aarch64_insn_patch_text` /
//! ftrace's `ftrace_run_stop_machine` (kernel/stop_machine.c, `multi_cpu_stop`).
//!
//! An "ops table" of four function pointers is in use by every CPU: jobs on every CPU call all
//! four entries, again and again, each call inside one irq-masked section (the kernel's
//! non-preemptible region around code that uses the patched text). The main thread swaps the
//! whole table between version 1 and version 2 under `stop_machine`: the patch function runs on
//! CPU 0 while every other online CPU spins in `multi_cpu_stop` with irqs masked, so no CPU can
//! be between two entries of the table while it changes.
//!
//! The check, in every pass of every CPU: the four entries it called all report the same
//! version. The example exits 1 if any pass saw a half-patched table, or if a patch did not run
//! exactly once.
//!
//! Run: `cargo run --release --example stop_machine_patch [-- --cpus N --patches P]`

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use usmp::{irq_restore, irq_save, CpuMask};

/// Bound on every wait (jobs starting, jobs joining).
const BOUND: Duration = Duration::from_secs(10);
/// Steps between two `yield_now`s of a busy job: with more logical CPUs than host cores, a job
/// that never yields holds its core for a whole time slice while the CPU an IPI is waiting on
/// waits for one.
const YIELD_EVERY: u64 = 256;

/// An op takes an input and returns (its version, a result).
type Op = fn(u64) -> (u64, u64);

fn add_v1(x: u64) -> (u64, u64) {
    (1, x.wrapping_add(1))
}
fn mul_v1(x: u64) -> (u64, u64) {
    (1, x.wrapping_mul(3))
}
fn xor_v1(x: u64) -> (u64, u64) {
    (1, x ^ 0x55)
}
fn rot_v1(x: u64) -> (u64, u64) {
    (1, x.rotate_left(7))
}
fn add_v2(x: u64) -> (u64, u64) {
    (2, x.wrapping_add(2))
}
fn mul_v2(x: u64) -> (u64, u64) {
    (2, x.wrapping_mul(5))
}
fn xor_v2(x: u64) -> (u64, u64) {
    (2, x ^ 0xAA)
}
fn rot_v2(x: u64) -> (u64, u64) {
    (2, x.rotate_left(11))
}

const V1: [Op; 4] = [add_v1, mul_v1, xor_v1, rot_v1];
const V2: [Op; 4] = [add_v2, mul_v2, xor_v2, rot_v2];

/// The live table: each slot holds an `Op` as a `usize`.
///
/// Invariant: every value ever stored in a slot is an `Op` from `V1` or `V2` cast to `usize`.
struct OpsTable {
    slot: [AtomicUsize; 4],
}

impl OpsTable {
    fn new(ops: &[Op; 4]) -> Self {
        OpsTable {
            slot: [0, 1, 2, 3].map(|i| AtomicUsize::new(ops[i] as usize)),
        }
    }

    fn get(&self, i: usize) -> Op {
        let p = self.slot[i].load(Ordering::Acquire);
        // SAFETY: by the table's invariant `p` came from casting an `Op` (a non-null function
        // pointer of exactly this type) to `usize`, so casting it back yields that `Op`.
        unsafe { std::mem::transmute::<usize, Op>(p) }
    }

    /// The patch: writes all four slots (in IPI context on one CPU: atomics only).
    fn patch(&self, ops: &[Op; 4]) {
        for (s, op) in self.slot.iter().zip(ops) {
            s.store(*op as usize, Ordering::Release);
        }
    }
}

#[derive(Default)]
struct Tally {
    passes: u64,
    torn: u64,
    sum: u64,
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

/// One pass: call every entry inside one irq-masked section; true if the versions disagree.
fn pass(table: &OpsTable, x: &mut u64) -> bool {
    let flags = irq_save();
    let mut versions = [0u64; 4];
    for (i, v) in versions.iter_mut().enumerate() {
        let (ver, r) = table.get(i)(*x);
        *v = ver;
        *x = r;
    }
    irq_restore(flags);
    versions.iter().any(|&v| v != versions[0])
}

fn main() -> anyhow::Result<()> {
    let cpus = arg("--cpus", 4)?;
    let patches = arg("--patches", 1000)?;
    let rt = usmp::Builder::new().cpus(cpus).build()?;
    let table = Arc::new(OpsTable::new(&V1));
    let quit = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));

    let mut jobs = Vec::new();
    for cpu in 0..cpus {
        let (table, quit, started) = (table.clone(), quit.clone(), started.clone());
        jobs.push(rt.run_on(cpu, move || {
            let mut t = Tally::default();
            let mut x = cpu as u64;
            let end = Instant::now() + BOUND * 3;
            started.fetch_add(1, Ordering::SeqCst);
            while !quit.load(Ordering::Relaxed) && Instant::now() < end {
                t.passes += 1;
                if pass(&table, &mut x) {
                    t.torn += 1;
                }
                if t.passes % YIELD_EVERY == 0 {
                    std::thread::yield_now();
                }
            }
            t.sum = x;
            t
        })?);
    }
    let deadline = Instant::now() + BOUND;
    while started.load(Ordering::SeqCst) < cpus as u64 {
        if Instant::now() >= deadline {
            quit.store(true, Ordering::SeqCst);
            bail!("worker jobs did not start within {BOUND:?}");
        }
        std::thread::yield_now();
    }

    // The patcher: alternate the whole table between V1 and V2, once per stop_machine.
    let ran = Arc::new(AtomicU64::new(0));
    let on_cpu0: CpuMask = "0".parse()?;
    let mut pauses = Vec::with_capacity(patches);
    for p in 0..patches {
        let next = if p % 2 == 0 { &V2 } else { &V1 };
        let (tb, r) = (table.clone(), ran.clone());
        let t = Instant::now();
        rt.stop_machine(
            move |_cpu| {
                tb.patch(next);
                r.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
            &on_cpu0,
        )?;
        pauses.push(t.elapsed());
    }
    quit.store(true, Ordering::SeqCst);
    let mut total = Tally::default();
    for j in jobs {
        let t = j.join_timeout(BOUND)?;
        total.passes += t.passes;
        total.torn += t.torn;
        total.sum ^= t.sum;
    }
    rt.shutdown();
    pauses.sort();
    let pct = |q: usize| pauses[(pauses.len() - 1) * q / 100].as_secs_f64() * 1e6;
    let ran = ran.load(Ordering::Relaxed);
    println!(
        "stop_machine_patch: {cpus} CPUs, {patches} patches ({ran} ran; stop_machine p50 \
         {:.0} us, p99 {:.0} us), {} passes over the table, {} saw a half-patched table",
        pct(50),
        pct(99),
        total.passes,
        total.torn
    );
    if total.torn != 0 {
        bail!("FAILED: {} passes saw a half-patched table", total.torn);
    }
    if ran != patches as u64 {
        bail!("FAILED: {patches} patches requested, {ran} ran");
    }
    println!("stop_machine_patch: OK");
    Ok(())
}
