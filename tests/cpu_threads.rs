//! `Handle::cpu_tid`: the OS thread behind a logical CPU, for perf, gdb and `/proc`.

mod common;

use std::time::Duration;

use common::serial;
use usmp::Builder;

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

#[test]
fn cpu_tid_is_the_thread_that_runs_the_cpus_jobs_and_goes_with_it() {
    let _g = serial();
    let rt = Builder::new()
        .cpus(3)
        .log_events(false)
        .call_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for cpu in 0..3 {
        let tid = rt.cpu_tid(cpu).expect("an online CPU has a thread");
        let inside = rt.run_on(cpu, gettid).unwrap().join().unwrap();
        assert_eq!(tid, inside, "CPU {cpu}");
        assert!(std::path::Path::new(&format!("/proc/self/task/{tid}")).exists());
    }
    assert_eq!(rt.cpu_tid(7), None, "no such CPU");
    rt.cpu_down(2).unwrap();
    assert_eq!(rt.cpu_tid(2), None, "an offline CPU has no thread");
    rt.cpu_up(2).unwrap();
    let tid = rt.cpu_tid(2).expect("back online");
    assert_eq!(rt.run_on(2, gettid).unwrap().join().unwrap(), tid);
}
