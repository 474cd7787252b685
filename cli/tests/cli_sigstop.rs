//! Issue 19, item 3: Ctrl-Z. `usmp run` stopped (SIGSTOP, as SIGTSTP does) for longer than its
//! call timeout and continued finishes its workload and exits 0: the time the process was
//! stopped does not count against the calls in flight. The old code failed with
//! `non-responsive CSD lock after ...` to a healthy CPU.
//!
//! The child announces its phases on stderr (`USMP_ANNOUNCE_PHASES`); the stop is sent once the
//! workload has started, so it lands while calls flow.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[path = "common/cli.rs"]
mod cli;
use cli::usmp;

const BOUND: Duration = Duration::from_secs(60);

#[test]
fn a_run_stopped_longer_than_its_call_timeout_and_continued_succeeds() {
    for round in 0..2 {
        let mut child = usmp()
            .args([
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
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let mut stdout = child.stdout.take().unwrap();
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut stderr = String::new();
        let started = Instant::now();
        let mut line = String::new();
        let mut sent = false;
        // The run is bounded by its workload: reading stops at EOF.
        while err.read_line(&mut line).unwrap_or(0) > 0 {
            stderr.push_str(&line);
            if !sent && line.trim_end() == "usmp: phase: workload" {
                // SAFETY: kill(2) on our own child, which has not been reaped yet.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
                // The stimulus, not a synchronisation: stopped for three call timeouts.
                std::thread::sleep(Duration::from_millis(1500));
                // SAFETY: as above.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
                sent = true;
            }
            line.clear();
            if started.elapsed() > BOUND {
                let _ = child.kill();
                panic!("round {round}: run did not end; stderr: {stderr}");
            }
        }
        let status = child.wait().unwrap();
        let stdout = out_reader.join().unwrap();
        assert!(sent, "round {round}: never announced; stderr: {stderr}");
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: exit {status:?}; stderr: {stderr}; stdout: {stdout}"
        );
    }
}
