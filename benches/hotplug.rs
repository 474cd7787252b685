//! Hotplug cost beside its floor, measured in one run: one `cpu_down(1)` + `cpu_up(1)` cycle
//! on a 2-CPU runtime against spawning and joining an empty thread (a CPU's bring-up spawns its
//! thread and its takedown joins it, so that is the least a cycle can cost).
//!
//! Target: the cycle within 2x the floor.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

fn hotplug_cycle(c: &mut Criterion) {
    let rt = usmp::Builder::new()
        .cpus(2)
        .log_events(false)
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("hotplug_cycle");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("cpu_down_up", |b| {
        b.iter(|| {
            rt.cpu_down(1).expect("cpu_down");
            rt.cpu_up(1).expect("cpu_up");
        })
    });
    g.bench_function("thread_spawn_join", |b| {
        b.iter(|| std::thread::spawn(|| {}).join().expect("join"))
    });
    g.finish();
    assert_eq!(rt.init_mm_refs(), 2);
    let fin = rt.shutdown();
    assert_eq!(fin.lost_calls, 0);
}

criterion_group!(benches, hotplug_cycle);
criterion_main!(benches);
