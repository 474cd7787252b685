//! The IPI path allocates nothing: a counting global allocator, armed only around the calls,
//! sees no allocation from any thread (senders, CPU threads, signal handlers) while IPIs are
//! sent, delivered, run and completed. Its own binary, so no other test allocates meanwhile.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::serial;
use usmp::{Builder, CpuMask, Runtime};

#[global_allocator]
static GLOBAL: common::alloc::Counting = common::alloc::Counting::EVERYWHERE;

static HITS: AtomicU64 = AtomicU64::new(0);

fn hit() {
    HITS.fetch_add(1, Ordering::Relaxed);
}

/// Counts allocations (from every thread) while `f` runs.
fn allocations_during(f: impl FnOnce()) -> u64 {
    common::alloc::counted_during(f)
}

/// Spins (no allocation, no sleeping syscall that could allocate) until `cond` or `timeout`.
fn spin_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() >= timeout {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

fn quiet_runtime() -> Runtime {
    // No logger thread: it formats events (allocating) every 20 ms.
    Builder::new().cpus(2).log_events(false).build().unwrap()
}

/// Every kind of call once, so lazily initialised state exists before counting.
fn warm_up(rt: &Runtime, all: &CpuMask) {
    for _ in 0..100 {
        rt.call_single(1, hit, true).unwrap();
        rt.call_single_async(1, hit).unwrap();
        rt.call_many(all, hit, true).unwrap();
        rt.call_many(all, hit, false).unwrap();
    }
    assert!(spin_until(Duration::from_secs(20), || {
        let s = rt.stats();
        s.ipis_handled == s.ipis_sent
    }));
}

#[test]
fn ipi_path_allocates_nothing() {
    let _g = serial();
    let rt = quiet_runtime();
    let all: CpuMask = "0-1".parse().unwrap();
    warm_up(&rt, &all);
    HITS.store(0, Ordering::SeqCst);
    let n = allocations_during(|| {
        for _ in 0..1_000 {
            rt.call_single(
                1,
                || {
                    HITS.fetch_add(1, Ordering::Relaxed);
                },
                true,
            )
            .unwrap();
        }
        for _ in 0..100 {
            rt.call_many(&all, hit, true).unwrap();
        }
        for _ in 0..100 {
            rt.call_single_async(1, hit).unwrap();
            rt.call_many(&all, hit, false).unwrap();
        }
        // Wait (without allocating) for the async ones.
        assert!(spin_until(Duration::from_secs(20), || HITS
            .load(Ordering::SeqCst)
            == 1_000 + 200 + 100 + 200));
    });
    assert_eq!(
        n,
        0,
        "{n} allocation(s) on the IPI path (last one {} bytes)",
        common::alloc::LAST_SIZE.load(Ordering::Relaxed)
    );
    assert_eq!(rt.shutdown().lost_calls, 0);
}

#[test]
fn cpu_to_cpu_ipis_allocate_nothing() {
    let _g = serial();
    let rt = quiet_runtime();
    let all: CpuMask = "0-1".parse().unwrap();
    warm_up(&rt, &all);
    // The job is queued (and its box allocated) before counting starts; it waits for `go`.
    static GO: AtomicBool = AtomicBool::new(false);
    static DONE: AtomicBool = AtomicBool::new(false);
    GO.store(false, Ordering::SeqCst);
    DONE.store(false, Ordering::SeqCst);
    let h = rt.handle();
    let job = rt
        .run_on(1, move || {
            if !spin_until(Duration::from_secs(20), || GO.load(Ordering::SeqCst)) {
                return Err("never started");
            }
            let mut ok = true;
            for _ in 0..1_000 {
                ok &= h.call_single(0, hit, true).is_ok();
            }
            for _ in 0..100 {
                ok &= h.on_each_cpu(hit, true).is_ok();
            }
            DONE.store(true, Ordering::SeqCst);
            // Return (which sends the result) only once counting is over.
            spin_until(Duration::from_secs(20), || !common::alloc::armed());
            if ok {
                Ok(())
            } else {
                Err("a call failed")
            }
        })
        .unwrap();
    HITS.store(0, Ordering::SeqCst);
    let n = allocations_during(|| {
        GO.store(true, Ordering::SeqCst);
        assert!(spin_until(Duration::from_secs(20), || DONE.load(Ordering::SeqCst)));
    });
    job.join_timeout(Duration::from_secs(20)).unwrap().unwrap();
    assert_eq!(HITS.load(Ordering::SeqCst), 1_000 + 200);
    assert_eq!(
        n,
        0,
        "{n} allocation(s) on the CPU-to-CPU IPI path (last one {} bytes)",
        common::alloc::LAST_SIZE.load(Ordering::Relaxed)
    );
    assert_eq!(rt.shutdown().lost_calls, 0);
}

#[test]
fn all_but_self_allocates_nothing() {
    let _g = serial();
    let rt = quiet_runtime();
    let all: CpuMask = "0-1".parse().unwrap();
    warm_up(&rt, &all);
    rt.call_all_but_self(hit, true).unwrap();
    rt.on_each_cpu(hit, true).unwrap();
    let n = allocations_during(|| {
        for _ in 0..100 {
            rt.call_all_but_self(hit, true).unwrap();
            rt.on_each_cpu(hit, true).unwrap();
        }
    });
    assert_eq!(
        n,
        0,
        "{n} allocation(s) in call_all_but_self / on_each_cpu (last one {} bytes)",
        common::alloc::LAST_SIZE.load(Ordering::Relaxed)
    );
    assert_eq!(rt.shutdown().lost_calls, 0);
}

/// The counter works: an allocation inside the window is seen, on the test thread and on a
/// CPU thread.
#[test]
fn counter_sees_allocations() {
    let _g = serial();
    let n = allocations_during(|| {
        let v = std::hint::black_box(vec![1u8]);
        drop(v);
    });
    assert!(n > 0, "the counting allocator missed an allocation");

    let rt = quiet_runtime();
    static GO: AtomicBool = AtomicBool::new(false);
    static DONE: AtomicBool = AtomicBool::new(false);
    GO.store(false, Ordering::SeqCst);
    DONE.store(false, Ordering::SeqCst);
    let job = rt
        .run_on(1, || {
            spin_until(Duration::from_secs(20), || GO.load(Ordering::SeqCst));
            let v = std::hint::black_box(Box::new(7u64));
            drop(v);
            DONE.store(true, Ordering::SeqCst);
            spin_until(Duration::from_secs(20), || !common::alloc::armed());
        })
        .unwrap();
    let n = allocations_during(|| {
        GO.store(true, Ordering::SeqCst);
        assert!(spin_until(Duration::from_secs(20), || DONE.load(Ordering::SeqCst)));
    });
    job.join_timeout(Duration::from_secs(20)).unwrap();
    assert!(
        n > 0,
        "the counting allocator missed an allocation on a CPU thread"
    );
    assert_eq!(rt.shutdown().lost_calls, 0);
}
