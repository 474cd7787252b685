//! The kexec path: seed 001's four test cases, seed 004's reboot CPU, park policies, and
//! bounded resources across many crash-kexec cycles.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

mod common;

use common::serial;
use usmp::{Builder, CpuRunState, HotplugError, KexecError, ParkPolicy, Section};

fn b(n: usize) -> Builder {
    Builder::new().cpus(n).log_events(false).pin(false)
}

/// Seed 001, case 1: boot and reboot.
#[test]
fn boot_and_reboot() {
    let _g = serial();
    let rt = b(4).build().unwrap();
    let out = rt
        .kexec(None, |h, ho| {
            (h.generation(), h.online_mask().to_string(), ho.reboot_cpu)
        })
        .unwrap();
    assert_eq!(out.value, (1, "0-3".to_string(), 0));
    assert_eq!(out.report.handed_over.to_string(), "0-3");
    assert!(out.report.lost.is_empty());
    assert!(rt.online_mask().is_empty(), "the old image must be down");
    // And again from the new image.
    let out2 = out.next.kexec(Some(2), |h, _| h.generation()).unwrap();
    assert_eq!(out2.value, 2);
    assert_eq!(out2.report.reboot_cpu, 2);
}

/// Seed 001, cases 2 and 3: a crash on a CPU that is still starting, in a 2-CPU runtime,
/// freezes the other CPU; a crash-kexec after it loses no CPU with power-off.
#[test]
fn crash_on_a_starting_cpu_freezes_and_kexec_loses_nothing() {
    let _g = serial();
    let rt = b(2).park_policy(ParkPolicy::PowerOff).build().unwrap();
    rt.cpu_down(1).unwrap();
    let h = rt.handle();
    let crashed = Arc::new(AtomicBool::new(false));
    let c2 = crashed.clone();
    // A STARTING step on CPU 1 panics (crash-stops) while CPU 1 is still booting.
    rt.setup_state(
        "test:panic-while-starting",
        Section::Starting,
        Some(Arc::new(move |cpu| {
            if cpu == 1 && !c2.swap(true, Ordering::SeqCst) {
                let out = h.crash_stop().expect("first stop");
                assert_eq!(out.caller, Some(1));
                assert_eq!(out.stopped.to_string(), "0", "CPU 0 must freeze");
                assert!(out.failed.is_empty());
            }
            Ok(())
        })),
        None,
    )
    .unwrap();
    rt.cpu_up(1).unwrap();
    assert!(crashed.load(Ordering::SeqCst));
    assert_eq!(rt.cpu_state(0), Some(CpuRunState::PoweredOff));
    // Case 3: the crashed CPU crash-kexecs; nothing is lost.
    let h = rt.handle();
    let out = rt
        .run_on(1, move || {
            h.crash_kexec("panic on a starting CPU", |h, _| {
                h.online_mask().to_string()
            })
        })
        .unwrap()
        .join()
        .unwrap();
    let out = match out {
        Err(KexecError::Stop(_)) => {
            panic!("the stop already ran: crash_kexec must still hand over")
        }
        o => o.unwrap(),
    };
    assert_eq!(out.value, "0-1");
    assert!(out.report.lost.is_empty(), "lost {}", out.report.lost);
    let rec = out.report.record.unwrap();
    assert_eq!(rec.crashing_cpu, Some(1));
}

/// Seed 001, case 4: a crash-kexec and an orderly kexec requested at once from two CPUs:
/// exactly one proceeds, and nothing hangs.
#[test]
fn crash_kexec_racing_an_orderly_kexec_exactly_one_proceeds() {
    let _g = serial();
    for round in 0..20 {
        let rt = b(3).build().unwrap();
        let bar = Arc::new(Barrier::new(2));
        let (h1, b1) = (rt.handle(), bar.clone());
        let crash = rt
            .run_on(1, move || {
                b1.wait();
                h1.crash_kexec("panic", |h, _| h.generation())
                    .map(|o| o.value)
            })
            .unwrap();
        let (h2, b2) = (rt.handle(), bar.clone());
        let orderly = rt
            .run_on(2, move || {
                b2.wait();
                h2.kexec(Some(2), |h, _| h.generation()).map(|o| o.value)
            })
            .unwrap();
        let rc = crash.join_timeout(Duration::from_secs(20));
        let ro = orderly.join_timeout(Duration::from_secs(20));
        if matches!(ro, Err(usmp::RuntimeError::JobStopped { .. })) {
            assert!(
                matches!(&rc, Ok(Ok(1))),
                "round {round}: CPU 2 stopped but no crash-kexec: {rc:?}"
            );
        }
        let proceeded = [&rc, &ro].iter().filter(|r| matches!(r, Ok(Ok(1)))).count();
        assert_eq!(proceeded, 1, "round {round}: crash {rc:?} orderly {ro:?}");
        for r in [&rc, &ro] {
            match r {
                Ok(Ok(1)) | Ok(Err(KexecError::InProgress)) => {}
                // The orderly caller was crash-stopped before it could return: its CPU is lost
                // to the next image, and its job says so instead of hanging.
                Err(usmp::RuntimeError::JobStopped { cpu: 2 }) => {}
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
    }
}

/// Seed 004: a cpu_down aimed at the reboot CPU during kexec is refused as busy, and the
/// reboot CPU stays online until the handoff.
#[test]
fn cpu_down_of_the_reboot_cpu_is_refused_during_kexec() {
    let _g = serial();
    let rt = b(3).build().unwrap();
    let saw = Arc::new(std::sync::Mutex::new(None));
    let (h, s2) = (rt.handle(), saw.clone());
    // A PREPARE teardown runs on the kexec path while CPUs go down: aim a cpu_down at the
    // reboot CPU from another thread right then.
    rt.setup_state(
        "test:race-reboot-cpu",
        Section::Prepare,
        None,
        Some(Arc::new(move |_cpu| {
            let h = h.clone();
            let r = std::thread::spawn(move || (h.cpu_down(1), h.is_online(1)))
                .join()
                .unwrap();
            *s2.lock().unwrap() = Some(r);
            Ok(())
        })),
    )
    .unwrap();
    let out = rt
        .kexec(Some(1), |h, ho| (h.generation(), ho.reboot_cpu))
        .unwrap();
    assert_eq!(out.value, (1, 1));
    let (r, online) = saw.lock().unwrap().take().expect("the race ran");
    assert!(
        matches!(r, Err(HotplugError::RebootCpu { cpu: 1 })),
        "{r:?}"
    );
    assert!(online, "the reboot CPU went away during kexec");
}

/// `--park spin`: every parked CPU is lost to the next image, and the report says so.
#[test]
fn spin_policy_loses_every_parked_cpu() {
    let _g = serial();
    let rt = b(4).park_policy(ParkPolicy::Spin).build().unwrap();
    let h = rt.handle();
    // The panic happens on CPU 0, which reboots; the others park with `spin`.
    let out = rt
        .run_on(0, move || {
            h.crash_kexec("test", |h, ho| {
                (h.online_mask().to_string(), ho.lost.to_string())
            })
            .map(|o| (o.value, o.report, o.next))
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    let (value, report, next) = out;
    struct O {
        value: (String, String),
        report: usmp::KexecReport,
        next: usmp::Runtime,
    }
    let out = O {
        value,
        report,
        next,
    };
    assert_eq!(out.report.lost.to_string(), "1-3");
    assert_eq!(out.value, ("0".to_string(), "1-3".to_string()));
    assert!(matches!(
        out.next.cpu_up(2),
        Err(HotplugError::Parked { cpu: 2 })
    ));
    let rec = out.report.record.unwrap();
    assert_eq!(rec.lost, "1-3");
    // From outside the runtime with `spin`, every CPU parks: nothing is left to reboot on.
    let rt2 = b(2).park_policy(ParkPolicy::Spin).build().unwrap();
    assert!(matches!(
        rt2.crash_kexec("x", |_, _| ()),
        Err(KexecError::NoCpu)
    ));
    assert_eq!(rec.park, ParkPolicy::Spin);
}

/// The kexec shutdown takes the non-boot CPUs down together (one stop_machine), but every
/// CPU still goes through every teardown step exactly once.
#[test]
fn kexec_runs_every_teardown_once_per_cpu() {
    let _g = serial();
    let rt = b(4).build().unwrap();
    let states = common::StateBalances::install(&rt);
    let out = rt
        .kexec(Some(0), |h, _| h.online_mask().to_string())
        .unwrap();
    assert_eq!(out.value, "0-3");
    // The reboot CPU hands over as it is (like the kernel's); the others were torn down.
    assert_eq!(states.of(0), [1, 1, 1]);
    for cpu in 1..4 {
        assert_eq!(states.of(cpu), [0, 0, 0], "cpu {cpu}");
    }
}

/// Issue 19, item 9: an image booted from a crash record (exec mode's next process) takes the
/// record's CPU count and next generation, and brings up only the CPUs not lost, the crashing
/// CPU first; a lost CPU cannot be brought up later.
#[test]
fn the_image_booted_from_a_record_brings_up_only_what_it_hands_over() {
    let _g = serial();
    let rec = usmp::CrashRecord {
        reason: "test".into(),
        crashing_cpu: Some(1),
        cpus: 4,
        generation: 3,
        notes: vec![],
        failed: String::new(),
        lost: "0,2".into(),
        park: usmp::ParkPolicy::Spin,
        crashed_at_ns: 1,
        handoff_at_ns: 2,
    };
    let b = usmp::Builder::new().cpus(2).log_events(false);
    let rt = usmp::exec::boot_next_image(b, &rec).unwrap();
    assert_eq!(rt.generation(), 4);
    assert_eq!(rt.cpus(), 4);
    assert_eq!(rt.online_mask().to_string(), "1,3");
    assert_eq!(rt.present_mask().to_string(), "1,3");
    assert!(rt.cpu_up(0).is_err(), "a lost CPU came up");
    let mut all_lost = rec.clone();
    all_lost.crashing_cpu = None;
    all_lost.lost = "0-3".into();
    let b = usmp::Builder::new().log_events(false);
    assert!(matches!(
        usmp::exec::boot_next_image(b, &all_lost),
        Err(usmp::RuntimeError::BadConfig(_))
    ));
}
