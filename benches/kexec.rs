//! Kexec handoff latency with 8 logical CPUs: from the start of `crash_kexec` (or `kexec`) to
//! every CPU online in the next image, beside the floor of starting and joining 8 threads
//! (the least that replacing 8 CPU threads can cost). Target: median below 2 ms.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use usmp::Builder;

const CPUS: usize = 8;

fn rt() -> usmp::Runtime {
    Builder::new().cpus(CPUS).log_events(false).build().unwrap()
}

fn handoff(c: &mut Criterion) {
    let mut g = c.benchmark_group("kexec_handoff");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    g.bench_function("thread_spawn_join_x8", |b| {
        b.iter(|| {
            let t: Vec<_> = (0..CPUS).map(|_| std::thread::spawn(|| {})).collect();
            for t in t {
                t.join().unwrap();
            }
        })
    });
    g.bench_function("crash_kexec_8cpus", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut cur = rt();
            for _ in 0..iters {
                let t0 = Instant::now();
                let out = cur.crash_kexec("bench", |_, _| ()).unwrap();
                assert_eq!(out.report.handed_over.weight(), CPUS);
                total += t0.elapsed();
                cur = out.next;
            }
            total
        })
    });
    g.bench_function("kexec_8cpus", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut cur = rt();
            for _ in 0..iters {
                let t0 = Instant::now();
                let out = cur.kexec(None, |_, _| ()).unwrap();
                assert_eq!(out.report.handed_over.weight(), CPUS);
                total += t0.elapsed();
                cur = out.next;
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, handoff);
criterion_main!(benches);
