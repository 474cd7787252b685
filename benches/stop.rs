//! `send_stop()` latency against N idle logical CPUs, beside its floor.
//!
//! Group `send_stop`, one `BenchmarkId` per N in 4, 16, 64, 256:
//! - `usmp`: each iteration builds a runtime with N idle CPUs (untimed), times only
//!   `send_stop()` (one maskable attempt: every idle CPU takes the stop vector, leaves the
//!   online mask and powers off), then drops the runtime (untimed).
//! - `tgkill_broadcast`: the floor. N plain threads blocked in `pause()`; one iteration sends
//!   each a real-time signal with `tgkill` and waits until all N handlers have bumped an atomic
//!   (`common::floors::Broadcast`, shared with the `call_many` rows of `ipi.rs`).
//!
//! Every timed iteration (warm-up included) is also recorded here, and after criterion's own
//! report a summary prints the medians, the ratio to the floor, the per-CPU slope between
//! N = 4 and N = 256, and whether N = 64 stops in under 2 ms.
//!
//! The medians and the slope are taken from p50s of every timed iteration, and the p50/p99 of
//! each (line, N) are written beside criterion's output (`common/mod.rs`). With
//! `USMP_BENCH_GUARD=1` criterion is skipped and the regression guard runs instead.
//!
//! Group `stop_machine`, one `BenchmarkId` per N in 64, 256, 1024:
//! - `usmp`: one runtime with N idle CPUs, built once per N; an iteration is one
//!   `stop_machine` over every CPU (the function runs on CPU 0), called from outside the
//!   runtime: the IPI to N CPUs, their rendezvous through PREPARE -> DISABLE_IRQ -> RUN ->
//!   EXIT, and the wait for the last to leave.
//! - `tgkill_broadcast`: the same floor as above, N threads.
//!
//! Flat sampling, 10 samples, short warm-up and measurement: the whole bench takes a few
//! minutes on a 2-core VM (runtime builds and drops dominate and are not timed).

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::floors::Broadcast;
use common::{Guard, Percentiles};
use criterion::{BenchmarkId, Criterion, SamplingMode};

const NS: [usize; 4] = [4, 16, 64, 256];
/// The stop_machine group's sizes (1024 CPUs on 2 cores is the oversubscription users run).
const SM_NS: [usize; 3] = [64, 256, 1024];
const USMP: &str = "usmp";
const FLOOR: &str = "tgkill_broadcast";

/// Every timed iteration of a group, by (line, N).
type Samples = Mutex<BTreeMap<(&'static str, usize), Vec<Duration>>>;

/// The `send_stop` group's iterations.
static SAMPLES: Samples = Mutex::new(BTreeMap::new());
/// The `stop_machine` group's iterations.
static SM_SAMPLES: Samples = Mutex::new(BTreeMap::new());

/// `iters` runs of `one` (each returns its own timed span), each recorded in `map`; returns
/// their sum for criterion's `iter_custom`.
fn timed(
    map: &Samples,
    line: &'static str,
    n: usize,
    iters: u64,
    mut one: impl FnMut() -> Duration,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let d = one();
        map.lock().unwrap().entry((line, n)).or_default().push(d);
        total += d;
    }
    total
}

fn one_stop(n: usize) -> Duration {
    let rt = usmp::Builder::new()
        .cpus(n)
        .log_events(false)
        .build()
        .expect("runtime");
    let t0 = Instant::now();
    let out = rt.send_stop().expect("send_stop");
    let took = t0.elapsed();
    assert!(out.failed.is_empty(), "N={n}: failed {}", out.failed);
    drop(rt);
    took
}

fn bench_stop(c: &mut Criterion) {
    let mut g = c.benchmark_group("send_stop");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for n in NS {
        g.bench_with_input(BenchmarkId::new(USMP, n), &n, |b, &n| {
            b.iter_custom(|iters| timed(&SAMPLES, USMP, n, iters, || one_stop(n)))
        });
        let sleepers = Broadcast::sleepers(n);
        g.bench_with_input(BenchmarkId::new(FLOOR, n), &n, |b, &n| {
            b.iter_custom(|iters| timed(&SAMPLES, FLOOR, n, iters, || sleepers.broadcast()))
        });
        drop(sleepers);
    }
    g.finish();
}

fn bench_stop_machine(c: &mut Criterion) {
    let mut g = c.benchmark_group("stop_machine");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(2000));
    for n in SM_NS {
        let rt = usmp::Builder::new()
            .cpus(n)
            .log_events(false)
            .build()
            .expect("runtime");
        let all = rt.online_mask();
        g.bench_with_input(BenchmarkId::new(USMP, n), &n, |b, &n| {
            b.iter_custom(|iters| {
                timed(&SM_SAMPLES, USMP, n, iters, || {
                    let t0 = Instant::now();
                    rt.stop_machine(|_| Ok(()), &usmp::CpuMask::single(0))
                        .expect("stop_machine");
                    t0.elapsed()
                })
            })
        });
        assert_eq!(rt.online_mask(), all);
        drop(rt);
        let sleepers = Broadcast::sleepers(n);
        g.bench_with_input(BenchmarkId::new(FLOOR, n), &n, |b, &n| {
            b.iter_custom(|iters| timed(&SM_SAMPLES, FLOOR, n, iters, || sleepers.broadcast()))
        });
        drop(sleepers);
    }
    g.finish();
}

fn print_stop_machine_summary() {
    let s = SM_SAMPLES.lock().unwrap();
    if s.is_empty() {
        return;
    }
    for (&(line, n), v) in s.iter() {
        common::write_percentiles(
            "stop_machine",
            &format!("{line}/{n}"),
            &Percentiles::from_durations(v),
        );
    }
    println!("\nstop_machine summary (medians over every timed iteration, warm-up included):");
    println!(
        "{:>5} {:>14} {:>22} {:>7}",
        "N", "usmp (us)", "tgkill_broadcast (us)", "ratio"
    );
    for n in SM_NS {
        let med = |line| s.get(&(line, n)).and_then(|v| median(v));
        let (u, f) = (med(USMP), med(FLOOR));
        let fmt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
        let ratio = match (u, f) {
            (Some(u), Some(f)) if f > 0.0 => format!("{:.1}x", u / f),
            _ => "-".into(),
        };
        println!("{n:>5} {:>14} {:>22} {:>7}", fmt(u), fmt(f), ratio);
    }
}

fn median(v: &[Duration]) -> Option<f64> {
    let mut us: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(|a, b| a.total_cmp(b));
    let k = us.len();
    match k {
        0 => None,
        _ if k % 2 == 1 => Some(us[k / 2]),
        _ => Some((us[k / 2 - 1] + us[k / 2]) / 2.0),
    }
}

fn print_summary() {
    let s = SAMPLES.lock().unwrap();
    if s.is_empty() {
        return;
    }
    for (&(line, n), v) in s.iter() {
        common::write_percentiles(
            "send_stop",
            &format!("{line}/{n}"),
            &Percentiles::from_durations(v),
        );
    }
    let med = |line, n| s.get(&(line, n)).and_then(|v| median(v));
    println!("\nsend_stop summary (medians over every timed iteration, warm-up included):");
    println!(
        "{:>5} {:>14} {:>4} {:>22} {:>4} {:>7}",
        "N", "usmp (us)", "n", "tgkill_broadcast (us)", "n", "ratio"
    );
    for n in NS {
        let count = |line| s.get(&(line, n)).map_or(0, |v| v.len());
        let (u, f) = (med(USMP, n), med(FLOOR, n));
        let fmt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
        let ratio = match (u, f) {
            (Some(u), Some(f)) if f > 0.0 => format!("{:.1}x", u / f),
            _ => "-".into(),
        };
        println!(
            "{n:>5} {:>14} {:>4} {:>22} {:>4} {:>7}",
            fmt(u),
            count(USMP),
            fmt(f),
            count(FLOOR),
            ratio
        );
    }
    let slope = |line| match (med(line, 4), med(line, 256)) {
        (Some(a), Some(b)) => format!("{:.2} us/CPU", (b - a) / 252.0),
        _ => "-".into(),
    };
    println!(
        "slope 4->256: usmp {}, tgkill_broadcast {}",
        slope(USMP),
        slope(FLOOR)
    );
    if let Some(u64_) = med(USMP, 64) {
        println!(
            "N=64 send_stop median {:.1} us: {} 2 ms",
            u64_,
            if u64_ < 2000.0 { "below" } else { "NOT below" }
        );
    }
}

/// Median of `k` timed runs of `f`, in ns.
fn median_of(k: usize, mut f: impl FnMut() -> Duration) -> f64 {
    let v: Vec<Duration> = (0..k).map(|_| f()).collect();
    median(&v).expect("samples") * 1e3
}

fn guard() -> ! {
    let mut gd = Guard::default();
    let mut at256 = Vec::new();
    let (r, u, p) = common::alternating(
        3,
        || {
            let (a, b) = (median_of(5, || one_stop(4)), median_of(5, || one_stop(256)));
            at256.push(b);
            (b - a) / 252.0
        },
        || {
            let (s4, s256) = (Broadcast::sleepers(4), Broadcast::sleepers(256));
            let a = median_of(10, || s4.broadcast());
            let b = median_of(10, || s256.broadcast());
            (b - a) / 252.0
        },
    );
    gd.check(
        "send_stop_slope",
        r,
        &format!("{u:.0} ns/CPU vs {p:.0} ns/CPU"),
    );
    let m = common::median(&mut at256);
    gd.check("send_stop_256", m, &format!("median {:.2} ms", m / 1e6));
    let rt = usmp::Builder::new()
        .cpus(1024)
        .log_events(false)
        .build()
        .expect("runtime");
    let m = median_of(5, || {
        let t0 = Instant::now();
        rt.stop_machine(|_| Ok(()), &usmp::CpuMask::single(0))
            .expect("stop_machine");
        t0.elapsed()
    });
    drop(rt);
    gd.check("stop_machine_1024", m, &format!("median {:.1} ms", m / 1e6));
    gd.finish("stop")
}

fn main() {
    if common::guard_mode() {
        guard();
    }
    let mut c = Criterion::default().configure_from_args();
    bench_stop(&mut c);
    bench_stop_machine(&mut c);
    c.final_summary();
    print_summary();
    print_stop_machine_summary();
}
