//! Issue 19, item 3: Ctrl-Z. `usmp run` stopped (SIGSTOP, as SIGTSTP does) for longer than its
//! call timeout and continued finishes its workload and exits 0: the time the process was
//! stopped does not count against the calls in flight. The old code failed with
//! `non-responsive CSD lock after ...` to a healthy CPU.
//!
//! The child announces its phases on stderr (`USMP_ANNOUNCE_PHASES`); the stop is sent once the
//! workload has started, so it lands while calls flow.

use std::time::Duration;

#[path = "common/cli.rs"]
mod cli;
use cli::{run_reacting, usmp};

const BOUND: Duration = Duration::from_secs(60);

#[test]
fn a_run_stopped_longer_than_its_call_timeout_and_continued_succeeds() {
    for round in 0..2 {
        let mut cmd = usmp();
        cmd.args([
            "run",
            "--workload",
            "demo",
            "--cpus",
            "4",
            "--duration",
            "3s",
            "--call-timeout",
            "500ms",
            "--json",
        ])
        .env("USMP_ANNOUNCE_PHASES", "1")
        .env("RUST_LOG", "error");
        let r = run_reacting(&mut cmd, BOUND, |line, pid| {
            if line != "usmp: phase: workload" {
                return false;
            }
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
            // The stimulus, not a synchronisation: stopped for three call timeouts.
            std::thread::sleep(Duration::from_millis(1500));
            // SAFETY: as above.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
            true
        });
        let (status, stdout, stderr) = (r.status, r.stdout, r.stderr);
        assert!(r.acted, "round {round}: never announced; stderr: {stderr}");
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: exit {status:?}; stderr: {stderr}; stdout: {stdout}"
        );
    }
}
