//! Issue 8, item 7: code that runs in IPI context allocates and frees nothing, beyond the call
//! path itself (`tests/ipi_alloc.rs`): stop_machine participants, the hotplug DYING path and its
//! flush, a failing DYING step, and a call made from inside a callback that fails.
//!
//! The allocator counts allocations *and* frees made by a thread that has irqs soft-masked
//! (`usmp::irqs_disabled()`: inside a handler, a served call, or an irq-masked section), which is
//! exactly where usmp runs code in IPI context. Its own binary.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::serial;
use usmp::{Builder, CpuMask, IpiError, Section};

#[global_allocator]
static GLOBAL: common::alloc::Counting = common::alloc::Counting::IN_IPI_CONTEXT;

fn in_irq_during(f: impl FnOnce()) -> u64 {
    common::alloc::counted_during(f)
}

fn assert_none(n: u64, what: &str) {
    assert_eq!(
        n,
        0,
        "{n} allocation(s)/free(s) in IPI context during {what} (last {} bytes)",
        common::alloc::LAST_SIZE.load(Ordering::Relaxed)
    );
}

/// The counter works: an allocation in an irq-masked section on a CPU is seen.
#[test]
fn counter_sees_an_allocation_in_ipi_context() {
    let _g = serial();
    let rt = Builder::new().cpus(2).log_events(false).build().unwrap();
    let n = in_irq_during(|| {
        rt.call_single(1, || drop(std::hint::black_box(Box::new(1u64))), true)
            .unwrap();
    });
    assert!(
        n >= 2,
        "the counter missed a Box made and freed in a callback ({n})"
    );
}

#[test]
fn stop_machine_and_hotplug_in_ipi_context_allocate_nothing() {
    let _g = serial();
    let rt = Builder::new().cpus(4).log_events(false).build().unwrap();
    let all: CpuMask = "0-3".parse().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    // A DYING step that succeeds, so the teardown walk runs a user step in IPI context.
    rt.setup_state(
        "test:dying-ok",
        Section::Starting,
        None,
        Some(Arc::new(|_| Ok(()))),
    )
    .unwrap();
    // Warm up every path once.
    for _ in 0..3 {
        let h = hits.clone();
        rt.stop_machine(
            move |_| {
                h.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
            &all,
        )
        .unwrap();
        rt.cpu_down(3).unwrap();
        rt.cpu_up(3).unwrap();
    }
    let n = in_irq_during(|| {
        for _ in 0..50 {
            let h = hits.clone();
            rt.stop_machine(
                move |_| {
                    h.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                },
                &all,
            )
            .unwrap();
        }
    });
    assert_none(n, "stop_machine");
    let n = in_irq_during(|| {
        for _ in 0..20 {
            rt.call_single_async(3, || {}).unwrap();
            rt.cpu_down(3).unwrap();
            rt.cpu_up(3).unwrap();
        }
    });
    assert_none(n, "cpu_down/cpu_up with queued calls");
}

#[test]
fn a_failing_dying_step_allocates_nothing_in_ipi_context() {
    let _g = serial();
    let rt = Builder::new().cpus(3).log_events(false).build().unwrap();
    rt.setup_state(
        "test:dying-refuses",
        Section::Starting,
        None,
        Some(Arc::new(
            |cpu| if cpu == 2 { Err("refused") } else { Ok(()) },
        )),
    )
    .unwrap();
    assert!(rt.cpu_down(2).is_err());
    let n = in_irq_during(|| {
        for _ in 0..20 {
            assert!(rt.cpu_down(2).is_err());
        }
    });
    assert_none(n, "a refused DYING step");
}

/// A callback that sends calls while the csd pool is empty fails at once (it must not wait for
/// other CPUs in IPI context), with the first CPU's own error, allocating nothing.
#[test]
fn calls_from_a_callback_fail_fast_without_allocating() {
    let _g = serial();
    // One csd: the outer call holds it while its callback runs.
    let rt = Builder::new()
        .cpus(3)
        .csd_pool(1)
        .call_timeout(Duration::from_secs(10))
        .log_events(false)
        .build()
        .unwrap();
    let h = rt.handle();
    let result = Arc::new(std::sync::Mutex::new(None));
    let (h2, r2) = (h.clone(), result.clone());
    // Allocate the mask outside IPI context; the callback only borrows it.
    let others: Arc<CpuMask> = Arc::new("0,2".parse().unwrap());
    let o2 = others.clone();
    let n = in_irq_during(|| {
        h.call_single(
            1,
            move || {
                let t = Instant::now();
                let single = h2.call_single_async(0, || {});
                let many = h2.call_many(&o2, || {}, false);
                let took = t.elapsed();
                // Stash the results for the test thread; the Mutex is uncontended and the
                // Option is preallocated, so nothing allocates here.
                if let Ok(mut g) = r2.try_lock() {
                    *g = Some((single, many, took));
                }
            },
            true,
        )
        .unwrap();
    });
    let (single, many, took) = result.lock().unwrap().take().expect("the callback ran");
    assert!(
        matches!(single, Err(IpiError::NoCsd { cpu: 0 })),
        "{single:?}"
    );
    assert!(matches!(many, Err(IpiError::NoCsd { cpu: 0 })), "{many:?}");
    assert!(
        took < Duration::from_secs(5),
        "the callback waited {took:?} for a csd (the old code waited the 10 s call timeout)"
    );
    assert_none(n, "failing calls from a callback");
}
