//! Issue 8, item 6: a kexec that fails before the handover undoes itself, and an image that has
//! handed over refuses every mutating call with a typed error.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::serial;
use usmp::{
    Builder, CpuMask, HotplugError, KexecError, ParkPolicy, RuntimeError, Section, StopMachineError,
};

#[test]
fn a_refused_teardown_fails_the_kexec_and_everything_is_undone() {
    let _g = serial();
    let rt = Builder::new().cpus(4).log_events(false).build().unwrap();
    let refuse = Arc::new(AtomicBool::new(true));
    let r2 = refuse.clone();
    let id = rt
        .setup_state(
            "test:dying-refuses-on-2",
            Section::Starting,
            None,
            Some(Arc::new(move |cpu| {
                if cpu == 2 && r2.load(Ordering::Acquire) {
                    Err("CPU 2 refuses to die")
                } else {
                    Ok(())
                }
            })),
        )
        .unwrap();
    match rt.kexec(None, |_, _| ()) {
        Err(KexecError::Shutdown { cpu: 2, .. }) => {}
        Err(e) => panic!("expected Shutdown on CPU 2, got {e}"),
        Ok(_) => panic!("the kexec went through although CPU 2 refused"),
    }
    // Every CPU the shutdown took down is back, hotplug is enabled, CPU 0 is not pinned.
    assert_eq!(rt.online_mask(), "0-3".parse::<CpuMask>().unwrap());
    rt.cpu_down(1).unwrap();
    rt.cpu_up(1).unwrap();
    rt.cpu_down(0).unwrap();
    rt.cpu_up(0).unwrap();
    rt.call_many(&"0-3".parse().unwrap(), || {}, true).unwrap();
    // And a second kexec succeeds once CPU 2 agrees.
    refuse.store(false, Ordering::Release);
    let out = rt.kexec(None, |h, _| h.online_mask()).unwrap();
    assert_eq!(out.value, "0-3".parse::<CpuMask>().unwrap());
    assert!(matches!(
        rt.remove_state(id),
        Err(HotplugError::Retired { generation: 0 })
    ));
}

#[test]
fn a_crash_kexec_with_no_cpu_to_reboot_on_can_be_retried() {
    let _g = serial();
    // Every CPU parks with `spin`: the next image would have none, so the kexec fails.
    let rt = Builder::new()
        .cpus(2)
        .park_policy(ParkPolicy::Spin)
        .log_events(false)
        .build()
        .unwrap();
    for attempt in 0..2 {
        match rt.crash_kexec("test", |_, _| ()) {
            Err(KexecError::NoCpu) => {}
            Err(e) => panic!("attempt {attempt}: expected NoCpu, got {e}"),
            Ok(_) => panic!("attempt {attempt}: handed over with no CPU"),
        }
    }
}

#[test]
fn after_a_crash_kexec_the_old_image_refuses_every_change() {
    let _g = serial();
    let rt = Builder::new().cpus(3).log_events(false).build().unwrap();
    let out = rt.crash_kexec("test", |_, _| ()).unwrap();
    assert!(matches!(
        rt.cpu_up(1),
        Err(HotplugError::Retired { generation: 0 })
    ));
    assert!(matches!(rt.cpu_down(1), Err(HotplugError::Retired { .. })));
    assert!(matches!(
        rt.setup_state("x", Section::Online, None, None),
        Err(HotplugError::Retired { .. })
    ));
    assert!(matches!(
        rt.run_on(1, || ()).map(|_| ()),
        Err(RuntimeError::Retired { generation: 0 })
    ));
    assert!(matches!(
        rt.stop_machine(|_| Ok(()), &"0-2".parse().unwrap()),
        Err(StopMachineError::Retired { .. })
    ));
    assert!(matches!(
        rt.kexec(None, |_, _| ()).map(|_| ()),
        Err(KexecError::Retired { generation: 0 })
    ));
    assert!(rt.call_single(1, || {}, true).is_err());
    // The next image owns the CPUs.
    let next = out.next;
    assert_eq!(next.generation(), 1);
    next.call_many(&"0-2".parse().unwrap(), || {}, true)
        .unwrap();
}
