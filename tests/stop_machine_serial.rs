//! Issue 8, item 5: `stop_machine` calls are serialized (the kernel's `stop_cpus_mutex`). Two at
//! once used to each hold some CPUs in PREPARE and both time out after the call timeout.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::serial;
use usmp::{Builder, CpuMask, IpiError, StopMachineError};

/// Counts the runs of `f` on CPU 0 (each call runs it exactly once there).
fn bump(n: &Arc<AtomicU64>) -> impl Fn(usize) -> Result<(), i32> + Send + Sync + 'static {
    let n = n.clone();
    move |_| {
        n.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn concurrent_stop_machine_calls_and_hotplug_all_succeed() {
    let _g = serial();
    let rt = Builder::new()
        .cpus(4)
        .call_timeout(Duration::from_secs(3))
        .log_events(false)
        .build()
        .unwrap();
    let t = Arc::new(AtomicU64::new(0));
    const ROUNDS: u64 = 40;
    let start = Arc::new(Barrier::new(4));
    let mut threads = Vec::new();
    // Two outside callers.
    for _ in 0..2 {
        let (h, t, start) = (rt.handle(), t.clone(), start.clone());
        threads.push(std::thread::spawn(move || {
            start.wait();
            for i in 0..ROUNDS {
                let r = h.stop_machine(bump(&t), &"0".parse::<CpuMask>().unwrap());
                if let Err(e) = r {
                    panic!("outside stop_machine round {i}: {e}");
                }
            }
        }));
    }
    // A caller that is itself a CPU (a job on CPU 3).
    {
        let (h, t, start) = (rt.handle(), t.clone(), start.clone());
        let job = rt
            .run_on(3, move || {
                start.wait();
                for i in 0..ROUNDS {
                    if let Err(e) = h.stop_machine(bump(&t), &"0".parse::<CpuMask>().unwrap()) {
                        return Err(format!("CPU 3 stop_machine round {i}: {e}"));
                    }
                }
                Ok(())
            })
            .unwrap();
        threads.push(std::thread::spawn(move || job.join().unwrap().unwrap()));
    }
    // Hotplug (its cpu_down runs stop_machine too) racing them.
    start.wait();
    for i in 0..10 {
        match rt.cpu_down(2) {
            Ok(()) => {}
            Err(e) => panic!("cpu_down round {i}: {e}"),
        }
        rt.cpu_up(2).unwrap();
    }
    for th in threads {
        th.join().unwrap();
    }
    assert_eq!(t.load(Ordering::SeqCst), 3 * ROUNDS);
}

#[test]
fn stop_machine_with_irqs_masked_is_refused_not_deadlocked() {
    let _g = serial();
    let rt = Builder::new().cpus(2).log_events(false).build().unwrap();
    let h = rt.handle();
    let r = rt
        .run_on(1, move || {
            let f = usmp::irq_save();
            let r = h.stop_machine(|_| Ok(()), &"0-1".parse::<CpuMask>().unwrap());
            usmp::irq_restore(f);
            r
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(
        matches!(
            r,
            Err(StopMachineError::Ipi(IpiError::IrqsDisabled { cpu: 1 }))
        ),
        "{r:?}"
    );
}
