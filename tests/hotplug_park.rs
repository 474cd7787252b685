//! A CPU's thread outlives its offline time (issue 22 item 1, `hotplug/thread.rs`): `cpu_down`
//! parks it and `cpu_up` wakes the same OS thread, so hotplug cycles neither spawn nor leak
//! threads; shutdown still ends parked threads.

use usmp::Builder;

/// Threads of this process whose name starts with `prefix` (`/proc/self/task/*/comm`): the
/// CPU threads of the runtime named so, whatever other tests run beside.
fn threads(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with(prefix))
        .count()
}

/// The OS thread that runs CPU `cpu`'s jobs.
fn job_tid(rt: &usmp::Runtime, cpu: usize) -> i64 {
    // SAFETY: gettid has no preconditions.
    rt.run_on(cpu, || unsafe { libc::syscall(libc::SYS_gettid) })
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn cpu_up_wakes_the_same_thread_and_cycles_do_not_add_threads() {
    let rt = Builder::new().cpus(2).name("pkcycle").build().unwrap();
    let tid = job_tid(&rt, 1);
    assert_eq!(threads("pkcycle-cpu"), 2);
    for i in 0..10_000 {
        rt.cpu_down(1).unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        // Offline and parked: no tid to signal, and the thread is still there.
        assert_eq!(
            rt.cpu_tid(1),
            None,
            "cycle {i}: a parked CPU must have no tid"
        );
        rt.cpu_up(1).unwrap_or_else(|e| panic!("cycle {i}: {e}"));
    }
    assert_eq!(job_tid(&rt, 1), tid, "cpu_up started a new thread");
    assert_eq!(rt.cpu_tid(1), Some(tid as i32));
    // One thread per CPU after 10,000 cycles.
    assert_eq!(
        threads("pkcycle-cpu"),
        2,
        "hotplug cycles changed the thread count"
    );
}

#[test]
fn shutdown_ends_a_parked_thread() {
    let rt = Builder::new().cpus(3).name("pkshut").build().unwrap();
    rt.cpu_down(2).unwrap();
    rt.cpu_down(1).unwrap();
    assert_eq!(
        threads("pkshut-cpu"),
        3,
        "cpu_down ended a thread instead of parking it"
    );
    let stats = rt.shutdown();
    assert_eq!(stats.lost_calls, 0);
    // Every CPU thread, parked ones included, has been joined.
    assert_eq!(
        threads("pkshut-cpu"),
        0,
        "a parked CPU thread outlived shutdown"
    );
}
