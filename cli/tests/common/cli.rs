//! Running the `usmp` binary from a test: bounded waits, never a hang. Included with
//! `#[path = "common/cli.rs"] mod cli;` by the CLI tests only.

#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn usmp() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_usmp"));
    c.env_remove("NO_COLOR").env_remove("USMP_ANNOUNCE_PHASES");
    c
}

/// What a bounded run produced.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From spawn to exit.
    pub took: Duration,
}

/// Spawns `cmd` with piped stdout and stderr, waits for it at most `bound` (then kills it and
/// panics: a hang is a failure, not a stuck test suite).
pub fn run_bounded(cmd: &mut Command, bound: Duration) -> Finished {
    let t = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, t, bound)
}

/// Waits for `child` (stdout and stderr piped) at most `bound` from `t`.
pub fn wait_bounded(mut child: Child, t: Instant, bound: Duration) -> Finished {
    let pid = child.id() as libc::pid_t;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut o = Vec::new();
        let mut e = Vec::new();
        let eh = std::thread::spawn(move || {
            if let Some(err) = err.as_mut() {
                let _ = err.read_to_end(&mut e);
            }
            e
        });
        if let Some(out) = out.as_mut() {
            let _ = out.read_to_end(&mut o);
        }
        let e = eh.join().unwrap_or_default();
        let status = child.wait().unwrap();
        let _ = tx.send((status, o, e, t.elapsed()));
    });
    let got = rx.recv_timeout(bound);
    let (status, o, e, took) = match got {
        Ok(v) => v,
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped (the waiter
            // thread has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = waiter.join();
            panic!("usmp (pid {pid}) did not exit within {bound:?}");
        }
    };
    let _ = waiter.join();
    Finished {
        status,
        stdout: String::from_utf8_lossy(&o).into_owned(),
        stderr: String::from_utf8_lossy(&e).into_owned(),
        took,
    }
}

/// What [`run_reacting`] saw.
pub struct Reacted {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Whether `on_line` acted on some line.
    pub acted: bool,
}

/// Spawns `cmd` (stdout and stderr piped), reads its stderr line by line as it runs and calls
/// `on_line(line, pid)` on each until it returns true (it has acted: sent a signal on an
/// announced phase, say). The run ends at the child's EOF; past `bound` the child is killed and
/// the test panics.
pub fn run_reacting(
    cmd: &mut Command,
    bound: Duration,
    mut on_line: impl FnMut(&str, libc::pid_t) -> bool,
) -> Reacted {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
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
    let (mut stderr, mut line, mut acted) = (String::new(), String::new(), false);
    let started = Instant::now();
    while err.read_line(&mut line).unwrap_or(0) > 0 {
        stderr.push_str(&line);
        if !acted {
            acted = on_line(line.trim_end(), pid);
        }
        line.clear();
        if started.elapsed() > bound {
            let _ = child.kill();
            panic!("the run did not end within {bound:?}; stderr: {stderr}");
        }
    }
    let status = child.wait().unwrap();
    Reacted {
        status,
        stdout: out_reader.join().unwrap(),
        stderr,
        acted,
    }
}
