//! Issue 19, item 7: a job that joins a job queued on its own CPU would wait forever (jobs are
//! not preemptible): `join` and `join_timeout` refuse it with `JoinOnOwnCpu`.

mod common;

use std::time::Duration;

use common::{serial, PATIENCE};
use usmp::{Builder, RuntimeError};

#[test]
fn a_job_joining_a_job_on_its_own_cpu_is_refused() {
    let _g = serial();
    let rt = Builder::new().cpus(2).log_events(false).build().unwrap();
    for timed in [false, true] {
        let h = rt.handle();
        let outer = rt
            .run_on(1, move || {
                let inner = h.run_on(1, || 5).unwrap();
                let r = if timed {
                    inner.join_timeout(Duration::from_secs(60))
                } else {
                    inner.join()
                };
                // A job on another CPU may be joined as usual.
                let other = h.run_on(0, || 6).unwrap().join();
                (r, other)
            })
            .unwrap();
        // Bounded: on the old code the outer job waited forever.
        let (r, other) = outer.join_timeout(PATIENCE).unwrap();
        assert!(
            matches!(r, Err(RuntimeError::JoinOnOwnCpu { cpu: 1 })),
            "timed={timed}: {r:?}"
        );
        assert_eq!(other.unwrap(), 6);
    }
    // The refused jobs still ran, after their joiners; CPU 1 is healthy.
    assert_eq!(rt.run_on(1, || 7).unwrap().join().unwrap(), 7);
    assert_eq!(rt.stats().per_cpu[1].jobs, 5);
}
