//! TLB shootdown with `call_many` — the kernel's `flush_tlb_mm_range` -> `flush_tlb_multi` ->
//! `smp_call_function_many(cpumask, flush_tlb_func, info, wait=true)` (arch/x86/mm/tlb.c).
//!
//! A shared "page table" maps each page to a version; every CPU caches translations in its own
//! per-CPU "TLB". Jobs on every CPU keep translating pages. The main thread remaps one page at a
//! time: it writes the new PTE, shoots the page down on every online CPU with a synchronous
//! `call_many`, and only then publishes "flushed up to version v" for that page.
//!
//! A translation is a lookup done with irqs soft-masked (a hardware TLB lookup cannot be
//! interrupted halfway, so an IPI lands between lookups, never inside one). The check, done in
//! every lookup: a TLB hit older than the page's published flush version is a stale entry read
//! after the shootdown returned, which the protocol forbids. The example exits 1 if any lookup
//! saw one.
//!
//! Run: `cargo run --release --example tlb_shootdown [-- --cpus N --rounds R]`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use usmp::{irq_restore, irq_save, CpuMask, PerCpu};

const PAGES: usize = 64;
/// Bound on every wait (jobs starting, jobs joining).
const BOUND: Duration = Duration::from_secs(10);
/// Steps between two `yield_now`s of a busy job: with more logical CPUs than host cores, a job
/// that never yields holds its core for a whole time slice while the CPU an IPI is waiting on
/// waits for one.
const YIELD_EVERY: u64 = 256;

/// The shared page table and the per-page "flushed up to" versions.
struct Mm {
    pte: Vec<AtomicU64>,
    flushed: Vec<AtomicU64>,
}

/// One CPU's TLB: a cached version per page, 0 = no entry.
struct Tlb {
    entry: Vec<AtomicU64>,
}

#[derive(Default)]
struct Tally {
    lookups: u64,
    hits: u64,
    stale: u64,
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

/// One translation of `page` on this CPU, irqs masked so a shootdown cannot land inside it.
fn translate(mm: &Mm, tlb: &Tlb, page: usize, t: &mut Tally) {
    let flags = irq_save();
    // Read the flush version first: if it says v, the shootdown for v returned before this
    // read, so its callback already ran here (it cannot run now, irqs are masked).
    let flushed = mm.flushed[page].load(Ordering::Acquire);
    let cached = tlb.entry[page].load(Ordering::Relaxed);
    t.lookups += 1;
    if cached != 0 {
        t.hits += 1;
        if cached < flushed {
            t.stale += 1;
        }
    } else {
        // Miss: walk the page table and fill.
        let v = mm.pte[page].load(Ordering::Acquire);
        tlb.entry[page].store(v, Ordering::Relaxed);
    }
    irq_restore(flags);
}

fn main() -> anyhow::Result<()> {
    let cpus = arg("--cpus", 4)?;
    let rounds = arg("--rounds", 2000)?;
    let rt = usmp::Builder::new().cpus(cpus).build()?;
    let mm = Arc::new(Mm {
        pte: (0..PAGES).map(|_| AtomicU64::new(1)).collect(),
        flushed: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
    });
    let tlbs = Arc::new(PerCpu::new(cpus, |_| Tlb {
        entry: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
    }));
    let quit = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));

    // Every CPU translates pages until told to quit.
    let mut jobs = Vec::new();
    for cpu in 0..cpus {
        let (mm, tlbs, quit, started) = (mm.clone(), tlbs.clone(), quit.clone(), started.clone());
        jobs.push(rt.run_on(cpu, move || {
            let tlb = tlbs.this().expect("a job runs on a CPU");
            let mut t = Tally::default();
            let end = Instant::now() + BOUND * 3;
            started.fetch_add(1, Ordering::SeqCst);
            let mut page = cpu;
            while !quit.load(Ordering::Relaxed) && Instant::now() < end {
                page = (page * 7 + 3) % PAGES;
                translate(&mm, tlb, page, &mut t);
                if t.lookups % YIELD_EVERY == 0 {
                    std::thread::yield_now();
                }
            }
            t
        })?);
    }
    let deadline = Instant::now() + BOUND;
    while started.load(Ordering::SeqCst) < cpus as u64 {
        if Instant::now() >= deadline {
            quit.store(true, Ordering::SeqCst);
            bail!("translation jobs did not start within {BOUND:?}");
        }
        std::thread::yield_now();
    }

    // The main thread remaps pages and shoots them down.
    let all: CpuMask = (0..cpus).collect();
    let mut lat = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let page = (r * 13) % PAGES;
        let v = mm.pte[page].load(Ordering::Relaxed) + 1;
        mm.pte[page].store(v, Ordering::Release);
        let tl = tlbs.clone();
        let t = Instant::now();
        // flush_tlb_func: runs on every online CPU in IPI context (one atomic store).
        let shootdown = move || {
            if let Some(tlb) = tl.this() {
                tlb.entry[page].store(0, Ordering::Relaxed);
            }
        };
        rt.call_many(&all, shootdown, true)?;
        lat.push(t.elapsed());
        mm.flushed[page].store(v, Ordering::Release);
    }
    quit.store(true, Ordering::SeqCst);
    let mut total = Tally::default();
    for j in jobs {
        let t = j.join_timeout(BOUND)?;
        total.lookups += t.lookups;
        total.hits += t.hits;
        total.stale += t.stale;
    }
    let stats = rt.shutdown();
    lat.sort();
    let pct = |p: usize| lat[(lat.len() - 1) * p / 100].as_secs_f64() * 1e6;
    println!(
        "tlb_shootdown: {cpus} CPUs, {rounds} shootdowns (call_many p50 {:.1} us, p99 {:.1} us), \
         {} lookups ({} hits), {} stale, {} calls lost",
        pct(50),
        pct(99),
        total.lookups,
        total.hits,
        total.stale,
        stats.lost_calls
    );
    if total.stale != 0 || stats.lost_calls != 0 {
        bail!(
            "FAILED: {} lookups hit a stale TLB entry after its shootdown returned",
            total.stale
        );
    }
    if total.hits == 0 {
        bail!("FAILED: no TLB hits, so the check never looked at a cached entry");
    }
    println!("tlb_shootdown: OK");
    Ok(())
}
