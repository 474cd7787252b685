//! The command line on pipes and files: a closed stdout ends the output without a panic, log
//! lines carry no colour off a terminal, empty masks print as "(none)", usage errors are one line.

use std::process::Stdio;
use std::time::{Duration, Instant};

#[path = "common/cli.rs"]
mod cli;
use cli::{run_bounded, usmp, wait_bounded};

const BOUND: Duration = Duration::from_secs(30);

/// Every command, with stdout a pipe whose reader has already gone: exit 0, no panic.
#[test]
fn a_closed_stdout_ends_the_output_without_a_panic() {
    let cases: &[&[&str]] = &[
        &["kexec", "--cpus", "2"],
        &["kexec", "--cpus", "2", "--json"],
        &["kexec", "--crash", "--cpus", "2"],
        &["kexec", "--crash", "--cpus", "2", "--json"],
        &["kexec", "--crash", "--exec", "--cpus", "2"],
        &[
            "run",
            "--cpus",
            "2",
            "--duration",
            "20ms",
            "--workload",
            "demo",
        ],
        &["run", "--cpus", "4", "--duration", "200ms"],
        &["run", "--cpus", "4", "--duration", "200ms", "--json"],
        &[
            "run",
            "--cpus",
            "4",
            "--duration",
            "20ms",
            "--workload",
            "crash",
        ],
    ];
    for args in cases {
        let t = Instant::now();
        let mut child = usmp()
            .args(*args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the child writes anything.
        drop(child.stdout.take());
        let out = wait_bounded(child, t, BOUND);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {:?}\n{}",
            out.status,
            out.stderr
        );
        assert!(
            !out.stderr.contains("panicked") && !out.stderr.contains("Broken pipe"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

/// Log lines go to stderr; off a terminal (here a pipe) they carry no ANSI escape codes.
#[test]
fn log_lines_are_not_coloured_off_a_terminal() {
    let out = run_bounded(
        usmp()
            .args(["kexec", "--cpus", "2"])
            .env("RUST_LOG", "debug"),
        BOUND,
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.lines().count() > 3,
        "no log lines: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains('\x1b'),
        "colour codes in a pipe: {:?}",
        &out.stderr[..out.stderr.len().min(300)]
    );
}

/// On a terminal (a pty), log lines are coloured unless `NO_COLOR` is set.
#[test]
fn log_colour_on_a_terminal_honours_no_color() {
    for (no_color, want_colour) in [(None, true), (Some("1"), false), (Some(""), true)] {
        let err = on_pty_stderr(no_color);
        assert!(err.lines().count() > 3, "no log lines: {err}");
        assert_eq!(
            err.contains('\x1b'),
            want_colour,
            "NO_COLOR={no_color:?}: {:?}",
            &err[..err.len().min(300)]
        );
    }
}

/// Runs `usmp kexec --cpus 2` with RUST_LOG=debug and stderr on a fresh pty; returns what it
/// wrote there.
fn on_pty_stderr(no_color: Option<&str>) -> String {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into the given out-pointers; the name, termios and winsize
    // pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created by openpty and are owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = usmp();
    cmd.args(["kexec", "--cpus", "2"])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave));
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let mut child = cmd.spawn().unwrap();
    // The parent's copy of the slave went into the Command, which is dropped with it: once the
    // child exits, reading the master ends with EIO.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match f.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf
    });
    let status = child.wait().unwrap();
    assert!(status.success());
    String::from_utf8_lossy(&reader.join().unwrap()).into_owned()
}

/// Empty masks print as "(none)", never as nothing.
#[test]
fn empty_masks_print_as_none() {
    for cpus in ["1", "2"] {
        let out = run_bounded(
            usmp()
                .args(["kexec", "--crash", "--cpus", cpus])
                .env("RUST_LOG", "error"),
            BOUND,
        );
        assert!(out.status.success(), "{}", out.stderr);
        for l in out.stdout.lines() {
            let empty = l.contains("  in ")
                || l.contains(": ;")
                || l.contains("()")
                || l.trim_end().ends_with(':');
            assert!(
                !empty,
                "--cpus {cpus}: an empty mask printed as nothing: {l:?}"
            );
        }
        assert!(out.stdout.contains("(none)"), "{}", out.stdout);
    }
}

/// Usage errors are one line and exit 2, like every other bad input; `--cpus -1` says what is
/// wrong with the value. Help still prints in full (exit 0).
#[test]
fn usage_errors_are_one_line() {
    for args in [
        &["run", "--cpus", "-1"][..],
        &["run", "--cpus", "x"],
        &["run", "--bogus"],
        &["kexec", "--cpus"],
        &["frobnicate"],
    ] {
        let out = run_bounded(usmp().args(args), BOUND);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.lines().count(),
            1,
            "{args:?}: not one line: {}",
            out.stderr
        );
        assert!(out.stderr.starts_with("usmp: error: "), "{}", out.stderr);
    }
    let out = run_bounded(usmp().args(["run", "--cpus", "-1"]), BOUND);
    assert!(out.stderr.contains("invalid value '-1'"), "{}", out.stderr);
    let help = run_bounded(usmp().args(["run", "--help"]), BOUND);
    assert_eq!(help.status.code(), Some(0));
    assert!(help.stdout.lines().count() > 5);
}

/// Issue 19, item 10: an error line names each cause once. A missing trace directory is an
/// io error under the CLI's context; the library's and workloads' errors that embed their
/// source are covered by `error_line`'s unit test in `main.rs`.
#[test]
fn an_error_line_names_each_cause_once() {
    let out = run_bounded(
        usmp().args([
            "run",
            "--cpus",
            "2",
            "--duration",
            "10ms",
            "--trace",
            "/nonexistent-usmp-dir/t.json",
        ]),
        BOUND,
    );
    let err = &out.stderr;
    assert_eq!(out.status.code(), Some(2), "stderr:\n{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("usmp: error: "))
        .unwrap_or_else(|| panic!("no error line; stderr:\n{err}"));
    assert_eq!(
        line,
        "usmp: error: cannot create trace file /nonexistent-usmp-dir/t.json: No such file or directory (os error 2)"
    );
}
