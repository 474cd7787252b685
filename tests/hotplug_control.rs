//! Hotplug control: the refusals of the kernel's cpu-on-off-test.sh, and rollback with a forced
//! failure at every step, in both directions.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{serial, wait_until, StateBalances, PATIENCE};
use usmp::{Builder, CpuRunState, HotplugError, Section};

fn rt(n: usize) -> usmp::Runtime {
    Builder::new()
        .cpus(n)
        .log_events(false)
        .boot_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[test]
fn refusals_leave_state_unchanged() {
    let _g = serial();
    let rt = rt(3);
    assert!(matches!(
        rt.cpu_up(1),
        Err(HotplugError::AlreadyOnline { cpu: 1 })
    ));
    assert_eq!(rt.online_mask().to_string(), "0-2");
    rt.cpu_down(1).unwrap();
    assert!(matches!(
        rt.cpu_down(1),
        Err(HotplugError::AlreadyOffline { cpu: 1 })
    ));
    assert_eq!(rt.online_mask().to_string(), "0,2");
    assert_eq!(rt.cpu_state(1), Some(CpuRunState::Offline));
    assert!(matches!(
        rt.cpu_up(9),
        Err(HotplugError::InvalidCpu { cpu: 9, cpus: 3 })
    ));
    rt.cpu_down(2).unwrap();
    assert!(matches!(
        rt.cpu_down(0),
        Err(HotplugError::LastCpu { cpu: 0 })
    ));
    assert_eq!(rt.online_mask().to_string(), "0");
    rt.hotplug_disable();
    assert!(matches!(
        rt.cpu_up(1),
        Err(HotplugError::Disabled { cpu: 1 })
    ));
    rt.hotplug_enable().unwrap();
    assert!(matches!(
        rt.hotplug_enable(),
        Err(HotplugError::UnbalancedEnable)
    ));
    rt.cpu_up(1).unwrap();
    rt.cpu_up(2).unwrap();
    assert_eq!(rt.online_mask().to_string(), "0-2");
    assert_eq!(rt.active_mask().to_string(), "0-2");
    assert_eq!(rt.init_mm_refs(), 3);
    // The CPU really works after coming back.
    let v = rt.run_on(2, usmp::this_cpu).unwrap().join().unwrap();
    assert_eq!(v, Some(2));
    assert!(rt.call_single(1, || {}, true).is_ok());
}

#[test]
fn setup_state_runs_on_online_cpus_and_remove_undoes_it() {
    let _g = serial();
    let rt = rt(3);
    let states = StateBalances::install(&rt);
    for c in 0..3 {
        assert_eq!(states.of(c), [1, 1, 1], "cpu {c}");
    }
    rt.cpu_down(2).unwrap();
    assert_eq!(states.of(2), [0, 0, 0]);
    rt.cpu_up(2).unwrap();
    assert_eq!(states.of(2), [1, 1, 1]);
    let steps = rt.hotplug_steps().unwrap();
    assert_eq!(
        steps,
        [
            "smpcfd:prepare",
            "test:prepare",
            "bringup:cpu",
            "test:starting",
            "ap:online",
            "test:online",
            "sched:active"
        ]
    );
}

#[test]
fn forced_failure_at_every_step_rolls_back_both_ways() {
    let _g = serial();
    let rt = rt(3);
    let states = StateBalances::install(&rt);
    for step in rt.hotplug_steps().unwrap() {
        // Down: the CPU stays up and consistent, and the error names the step.
        rt.faults().fail_step(1, &step).unwrap();
        match rt.cpu_down(1) {
            Err(HotplugError::StepFailed {
                cpu: 1,
                step: s,
                up: false,
                ..
            }) => assert_eq!(s, step),
            Ok(()) if step == "smpcfd:prepare" => {
                // Its teardown does nothing, so it cannot fail; the CPU went down. Restore.
                rt.cpu_up(1).unwrap();
                continue;
            }
            other => panic!("cpu_down with {step} failing: {other:?}"),
        }
        assert!(rt.is_online(1), "{step}: CPU went down despite the failure");
        assert_eq!(rt.cpu_state(1), Some(CpuRunState::Online), "{step}");
        assert_eq!(states.of(1), [1, 1, 1], "{step}: down rollback unbalanced");
        assert!(
            rt.call_single(1, || {}, true).is_ok(),
            "{step}: CPU dead after rollback"
        );
        assert_eq!(rt.init_mm_refs(), 3);

        // Up: the CPU ends offline, every step undone.
        rt.cpu_down(1).unwrap();
        rt.faults().fail_step(1, &step).unwrap();
        match rt.cpu_up(1) {
            Err(HotplugError::StepFailed {
                cpu: 1,
                step: s,
                up: true,
                ..
            }) => assert_eq!(s, step),
            other => panic!("cpu_up with {step} failing: {other:?}"),
        }
        assert!(!rt.is_online(1), "{step}: CPU half up");
        assert_eq!(rt.cpu_state(1), Some(CpuRunState::Offline), "{step}");
        assert_eq!(states.of(1), [0, 0, 0], "{step}: up rollback unbalanced");
        assert_eq!(rt.init_mm_refs(), 2, "{step}: init_mm reference leaked");
        rt.cpu_up(1).unwrap();
        assert_eq!(states.of(1), [1, 1, 1]);
    }
}

#[test]
fn setup_state_failure_is_undone_everywhere() {
    let _g = serial();
    let rt = rt(3);
    let ran = Arc::new(AtomicI64::new(0));
    let (r1, r2) = (ran.clone(), ran.clone());
    let e = rt
        .setup_state(
            "test:flaky",
            Section::Online,
            Some(Arc::new(move |c| {
                if c == 2 {
                    return Err("cpu 2 says no");
                }
                r1.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })),
            Some(Arc::new(move |_| {
                r2.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })),
        )
        .unwrap_err();
    assert!(matches!(e, HotplugError::SetupFailed { cpu: 2, .. }), "{e}");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    assert!(!rt
        .hotplug_steps()
        .unwrap()
        .iter()
        .any(|s| s == "test:flaky"));
}

#[test]
fn jobs_queued_on_a_dying_cpu_move_and_none_is_dropped() {
    let _g = serial();
    let rt = rt(3);
    // Block CPU 2 with one job, queue more behind it, and take CPU 2 down. The first job holds
    // CPU 2 until every queued job has run, which only a move to another CPU can make happen,
    // so cpu_down surely starts while it runs and the others are queued.
    const QUEUED: usize = 20;
    let gate = Arc::new(std::sync::Barrier::new(2));
    let moved_ran = Arc::new(AtomicUsize::new(0));
    let (g, m) = (gate.clone(), moved_ran.clone());
    let first = rt
        .run_on(2, move || {
            g.wait();
            let all_ran = wait_until(PATIENCE, || m.load(Ordering::SeqCst) == QUEUED);
            (usmp::this_cpu(), all_ran)
        })
        .unwrap();
    gate.wait();
    let queued: Vec<_> = (0..QUEUED)
        .map(|_| {
            let m = moved_ran.clone();
            rt.run_on(2, move || {
                m.fetch_add(1, Ordering::SeqCst);
                usmp::this_cpu()
            })
            .unwrap()
        })
        .collect();
    rt.cpu_down(2).unwrap();
    assert_eq!(
        first.join().unwrap(),
        (Some(2), true),
        "the running job finishes where it started, after the queued ones ran elsewhere"
    );
    for j in queued {
        let ran_on = j.join_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            matches!(ran_on, Some(0) | Some(1)),
            "moved job ran on {ran_on:?}"
        );
    }
    assert!(matches!(
        rt.run_on(2, || ()),
        Err(usmp::RuntimeError::Offline { cpu: 2 })
    ));
}
