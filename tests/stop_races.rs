//! Races around the stop routine: two CPUs stopping at the same instant, and CPUs that come
//! online while a stop runs (seed 000).

use std::sync::{Arc, Barrier};
use std::time::Duration;

mod common;

use common::{serial, wait_until, PATIENCE};
use usmp::{Builder, CpuRunState, StopError, StopMode};

/// Two CPUs call `send_stop` and `crash_stop` at the same instant: exactly one winner every
/// round, and the stop always ends as a crash (the crash caller either won or upgraded before
/// it parked). Both callers mask irqs first, so the winner's maskable attempt cannot stop the
/// other before it has called.
#[test]
fn concurrent_send_stop_and_crash_stop_one_winner_crash_outcome() {
    let _g = serial();
    for round in 0..1000 {
        let rt = Builder::new()
            .cpus(3)
            .log_events(false)
            .pin(false)
            .stop_waits(Duration::from_secs(2), Duration::from_millis(50))
            .build()
            .unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let call = |cpu: usize, crash: bool| {
            let (h, b) = (rt.handle(), barrier.clone());
            rt.run_on(cpu, move || {
                let f = usmp::irq_save();
                b.wait();
                let r = if crash { h.crash_stop() } else { h.send_stop() };
                usmp::irq_restore(f);
                r
            })
            .unwrap()
        };
        let plain = call(1, false);
        let crash = call(2, true);
        let results = [
            plain.join_timeout(Duration::from_secs(10)),
            crash.join_timeout(Duration::from_secs(10)),
        ];
        let mut winners = 0;
        for r in &results {
            match r {
                Ok(Ok(out)) => {
                    winners += 1;
                    assert!(out.crash, "round {round}: outcome was not a crash: {out:?}");
                    assert!(out.failed.is_empty(), "round {round}: {out:?}");
                }
                Ok(Err(StopError::InProgress { .. })) => {}
                // The loser parked itself; powering off unwound its job.
                Err(usmp::RuntimeError::JobPanicked { message, .. }) => {
                    assert!(message.contains("parked"), "round {round}: {message}")
                }
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(winners, 1, "round {round}: {results:?}");
    }
}

/// CPUs brought up while a stop runs, with injected boot delays spread around the stop's
/// duration. Returns (escaped, failed): escaped CPUs are online after the stop returned
/// without the stop reporting them (the seed-000 escape); failed ones were targeted but did not
/// stop within the attempts' 5 ms waits and are reported in `StopOutcome::failed` (under host
/// starvation even an idle CPU can be that slow; that is an honest, reported failure).
fn escapes(mode: StopMode, rounds: usize) -> (usize, usize) {
    let mut escaped = 0;
    let mut failed = 0;
    for round in 0..rounds {
        let rt = Builder::new()
            .cpus(4)
            .log_events(false)
            .pin(false)
            .stop_mode(mode)
            .stop_waits(Duration::from_millis(5), Duration::from_millis(5))
            .stop_max_retries(2)
            .build()
            .unwrap();
        rt.cpu_down(2).unwrap();
        rt.cpu_down(3).unwrap();
        // Delays from 0 to ~24 ms against a stop that lasts ~10-15 ms.
        rt.faults()
            .set_boot_delay(2, Duration::from_millis((round % 5) as u64 * 3))
            .unwrap();
        rt.faults()
            .set_boot_delay(3, Duration::from_millis(12 + (round % 4) as u64 * 4))
            .unwrap();
        let ups: Vec<_> = [2, 3]
            .into_iter()
            .map(|c| {
                let h = rt.handle();
                std::thread::spawn(move || h.cpu_up(c))
            })
            .collect();
        // Stop once the first bring-up has begun (they take the hotplug lock in turn), so the
        // boot delays run against the stop.
        let began = wait_until(PATIENCE, || {
            [2, 3]
                .iter()
                .any(|&c| rt.cpu_state(c) != Some(CpuRunState::Offline))
        });
        let out = rt.send_stop().unwrap();
        let ups: Vec<_> = ups.into_iter().map(|u| u.join().unwrap()).collect();
        assert!(began, "round {round}: no cpu_up began within {PATIENCE:?}");
        let online = rt.online_mask();
        if mode == StopMode::Deterministic {
            for (c, r) in [2, 3].iter().zip(&ups) {
                if let Err(e) = r {
                    assert!(
                        !rt.is_online(*c),
                        "round {round}: CPU {c} failed to come up ({e}) yet is online"
                    );
                }
            }
        }
        let unreported = online.and_not(&out.failed);
        escaped += unreported.weight();
        failed += out.failed.weight();
        if mode == StopMode::Deterministic {
            assert!(
                unreported.is_empty(),
                "round {round}: CPUs {unreported} escaped a deterministic stop (failed: {})",
                out.failed
            );
        }
    }
    (escaped, failed)
}

#[test]
fn deterministic_stop_lets_no_starting_cpu_escape() {
    let _g = serial();
    let (escaped, failed) = escapes(StopMode::Deterministic, 40);
    eprintln!("deterministic stop: {escaped} escapes, {failed} reported failed to stop");
    assert_eq!(escaped, 0);
}

#[test]
fn best_effort_stop_counts_escapes() {
    let _g = serial();
    // The same scenario without the stopping flag: CPUs whose boot delay outlasts the stop come
    // online after its last attempt and escape. This is what the deterministic test would see
    // if the flag check were missing, so it proves that test can fail.
    let (escaped, failed) = escapes(StopMode::BestEffort, 40);
    let n = escaped + failed;
    eprintln!("best-effort stop: {n} escapes in 40 rounds (deterministic: 0)");
    assert!(
        n > 0,
        "best effort caught every starting CPU: the scenario does not race"
    );
}
