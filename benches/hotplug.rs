//! Hotplug cost beside its floor, measured in one run: one `cpu_down(1)` + `cpu_up(1)` cycle
//! on a 2-CPU runtime against spawning and joining an empty thread (what a cycle cost when a
//! CPU's bring-up spawned its thread and its takedown joined it; it now parks the thread and
//! wakes it, `hotplug/thread.rs`).
//!
//! Every timed cycle (warm-up included) is also recorded, and its p50/p99 written beside
//! criterion's output (`common/mod.rs`). Target (`common/targets.rs`): the cycle within 0.5x
//! the floor by p50. With `USMP_BENCH_GUARD=1` criterion is skipped and the regression guard
//! runs instead.

mod common;

use std::time::{Duration, Instant};

use common::{Guard, Percentiles};
use criterion::Criterion;

const G: &str = "hotplug_cycle";

fn runtime() -> usmp::Runtime {
    usmp::Builder::new()
        .cpus(2)
        .log_events(false)
        .build()
        .expect("runtime")
}

fn cycle(rt: &usmp::Runtime) {
    rt.cpu_down(1).expect("cpu_down");
    rt.cpu_up(1).expect("cpu_up");
}

fn spawn_join() {
    std::thread::spawn(|| {}).join().expect("join");
}

/// Times `iters` calls of `f` one by one, keeping each in `all`.
fn timed(iters: u64, all: &mut Vec<Duration>, mut f: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t = Instant::now();
        f();
        let d = t.elapsed();
        all.push(d);
        total += d;
    }
    total
}

fn hotplug_cycle(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group(G);
    g.sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let mut all = Vec::new();
    g.bench_function("cpu_down_up", |b| {
        b.iter_custom(|iters| timed(iters, &mut all, || cycle(&rt)))
    });
    common::write_percentiles(G, "cpu_down_up", &Percentiles::from_durations(&all));
    all.clear();
    g.bench_function("thread_spawn_join", |b| {
        b.iter_custom(|iters| timed(iters, &mut all, spawn_join))
    });
    common::write_percentiles(G, "thread_spawn_join", &Percentiles::from_durations(&all));
    g.finish();
    assert_eq!(rt.init_mm_refs(), 2);
    let fin = rt.shutdown();
    assert_eq!(fin.lost_calls, 0);
}

fn guard() -> ! {
    let mut gd = Guard::default();
    let p50 = |all: &[Duration]| Percentiles::from_durations(all).p50 as f64;
    let (r, u, p) = common::alternating(
        5,
        || {
            let rt = runtime();
            cycle(&rt);
            let mut all = Vec::new();
            timed(100, &mut all, || cycle(&rt));
            p50(&all)
        },
        || {
            let mut all = Vec::new();
            timed(100, &mut all, spawn_join);
            p50(&all)
        },
    );
    gd.check("hotplug_cycle", r, &format!("p50 {u:.0} ns vs {p:.0} ns"));
    gd.finish("hotplug")
}

fn main() {
    if common::guard_mode() {
        guard();
    }
    let mut c = Criterion::default().configure_from_args();
    hotplug_cycle(&mut c);
    c.final_summary();
}
