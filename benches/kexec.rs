//! Kexec handoff latency: from the start of `crash_kexec` (or `kexec`) to every CPU online in
//! the next image, beside the floor of starting and joining as many threads (the least that
//! replacing that many CPU threads can cost; `common::floors::spawn_join`).
//!
//! - Group `kexec_handoff`: 8 logical CPUs, `crash_kexec` and orderly `kexec`.
//! - Group `crash_kexec`: `usmp/N` is `crash_kexec` with N CPUs, `thread_spawn_join/N` the
//!   floor, N in 64, 256, 1024 (1024 CPUs on 2 cores is the oversubscription `usmp kexec
//!   --crash --cpus 1024` runs). Flat sampling, 10 samples: at 1024 a handoff is tens of
//!   milliseconds and building and dropping the images around it (untimed) more.
//!
//! Every timed handoff (warm-up included) is also recorded, and its p50/p99 written beside
//! criterion's output (`common/mod.rs`). Targets (`common/targets.rs`): `crash_kexec` within
//! 2x the floor by p50 at every N. With `USMP_BENCH_GUARD=1` criterion is skipped and the
//! regression guard runs instead.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::floors::spawn_join;
use common::{Guard, Percentiles};
use criterion::{BenchmarkId, Criterion, SamplingMode};
use usmp::Builder;

const CPUS: usize = 8;
const G: &str = "kexec_handoff";
/// The `crash_kexec` group's sizes.
const NS: [usize; 3] = [64, 256, 1024];
const GN: &str = "crash_kexec";

fn rt(n: usize) -> usmp::Runtime {
    Builder::new().cpus(n).log_events(false).build().unwrap()
}

/// Times `iters` floor iterations (spawn + join of `n` threads) one by one, keeping each in
/// `all`.
fn floor(n: usize, iters: u64, all: &mut Vec<Duration>) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t0 = Instant::now();
        spawn_join(n);
        let d = t0.elapsed();
        all.push(d);
        total += d;
    }
    total
}

/// Handoffs after which the next image had fewer than `CPUS` CPUs online.
static SHORT_HANDOFFS: AtomicU64 = AtomicU64::new(0);

/// Times `iters` handoffs in a chain of images of `n` CPUs (each image kexecs into the next),
/// keeping each in `all`. A handoff that loses a CPU is a runtime bug, not a figure: it is
/// counted (reported at the end), left out of `all`, and the chain restarts from a fresh
/// runtime so every timed handoff starts with `n` CPUs. The old image is dropped (its threads
/// joined) after the clock stops.
fn handoffs(n: usize, iters: u64, crash: bool, all: &mut Vec<Duration>) -> Duration {
    let mut total = Duration::ZERO;
    let mut cur = rt(n);
    for _ in 0..iters {
        let t0 = Instant::now();
        let out = if crash {
            cur.crash_kexec("bench", |_, _| ()).unwrap()
        } else {
            cur.kexec(None, |_, _| ()).unwrap()
        };
        let d = t0.elapsed();
        total += d;
        if out.report.handed_over.weight() == n {
            all.push(d);
            cur = out.next;
        } else {
            if SHORT_HANDOFFS.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!(
                    "[{G}] a handoff lost CPUs {} (online next: {}); timeline {:?}",
                    out.report.lost, out.report.handed_over, out.report.timeline
                );
            }
            drop(out);
            cur = rt(n);
        }
    }
    total
}

fn report_short() {
    let n = SHORT_HANDOFFS.load(Ordering::Relaxed);
    if n > 0 {
        eprintln!("[{G}] {n} handoffs lost a CPU (not in the percentiles)");
    }
}

fn handoff(c: &mut Criterion) {
    let mut g = c.benchmark_group(G);
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    let mut all = Vec::new();
    g.bench_function("thread_spawn_join_x8", |b| {
        b.iter_custom(|iters| floor(CPUS, iters, &mut all))
    });
    common::write_percentiles(
        G,
        "thread_spawn_join_x8",
        &Percentiles::from_durations(&all),
    );
    for (id, crash) in [("crash_kexec_8cpus", true), ("kexec_8cpus", false)] {
        all.clear();
        g.bench_function(id, |b| {
            b.iter_custom(|iters| handoffs(CPUS, iters, crash, &mut all))
        });
        common::write_percentiles(G, id, &Percentiles::from_durations(&all));
    }
    g.finish();
    report_short();
}

fn crash_kexec_by_n(c: &mut Criterion) {
    let mut g = c.benchmark_group(GN);
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let mut all = Vec::new();
    for n in NS {
        // Each figure's percentiles are written only if criterion ran it (a filter may skip
        // it), so a skipped figure keeps the ones that match its estimates.
        for (line, crash) in [("thread_spawn_join", false), ("usmp", true)] {
            all.clear();
            g.bench_with_input(BenchmarkId::new(line, n), &n, |b, &n| {
                b.iter_custom(|iters| {
                    if crash {
                        handoffs(n, iters, true, &mut all)
                    } else {
                        floor(n, iters, &mut all)
                    }
                })
            });
            let id = format!("{line}/{n}");
            common::write_percentiles(GN, &id, &Percentiles::from_durations(&all));
        }
    }
    g.finish();
    report_short();
}

fn guard() -> ! {
    let mut gd = Guard::default();
    let p50 = |all: &[Duration]| Percentiles::from_durations(all).p50 as f64;
    let (r, u, p) = common::alternating(
        5,
        || {
            let mut all = Vec::new();
            handoffs(CPUS, 30, true, &mut all);
            p50(&all)
        },
        || {
            let mut all = Vec::new();
            floor(CPUS, 30, &mut all);
            p50(&all)
        },
    );
    gd.check("crash_kexec", r, &format!("p50 {u:.0} ns vs {p:.0} ns"));
    // One size of the `crash_kexec` group: 256 CPUs is a few seconds in all, 1024 is more.
    let (r, u, p) = common::alternating(
        3,
        || {
            let mut all = Vec::new();
            handoffs(256, 5, true, &mut all);
            p50(&all)
        },
        || {
            let mut all = Vec::new();
            floor(256, 5, &mut all);
            p50(&all)
        },
    );
    gd.check("crash_kexec_256", r, &format!("p50 {u:.0} ns vs {p:.0} ns"));
    report_short();
    gd.finish("kexec")
}

fn main() {
    if common::guard_mode() {
        guard();
    }
    let mut c = Criterion::default().configure_from_args();
    handoff(&mut c);
    crash_kexec_by_n(&mut c);
    c.final_summary();
}
