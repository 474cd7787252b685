//! Exec mode end to end: the crash record crosses a real `execve`, and a corrupt record is
//! rejected with one clear line and exit code 2.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::Command;

mod common;

use common::serial;

fn usmp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_usmp"))
}

#[test]
fn crash_record_crosses_execve() {
    let _g = serial();
    let out = usmp()
        .args(["kexec", "--crash", "--exec", "--cpus", "4"])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = stdout.lines().next().unwrap_or("");
    assert!(
        first.contains("crash record from generation 0"),
        "report must come first: {stdout}"
    );
    assert!(stdout.contains("reason: usmp kexec --crash"));
    assert!(
        stdout.contains("generation 1 booted in a new process: CPUs 0-3 online"),
        "{stdout}"
    );
}

/// Passes `bytes` to `usmp kexec --resume-fd` as an inherited fd.
fn resume_with(bytes: &[u8]) -> std::process::Output {
    let mut f = tempfile();
    f.write_all(bytes).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on an fd this test owns, so the child inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let out = usmp()
        .args(["kexec", "--cpus", "2", "--resume-fd", &fd.to_string()])
        .output()
        .unwrap();
    drop(f);
    out
}

fn tempfile() -> std::fs::File {
    let p = std::env::temp_dir().join(format!(
        "usmp-record-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let _ = std::fs::remove_file(&p);
    f
}

#[test]
fn corrupt_truncated_or_hostile_records_exit_2_with_one_line() {
    let _g = serial();
    let rec = usmp::CrashRecord {
        reason: "test".into(),
        crashing_cpu: Some(1),
        cpus: 2,
        generation: 0,
        notes: vec![],
        failed: String::new(),
        lost: String::new(),
        park: usmp::ParkPolicy::PowerOff,
        crashed_at_ns: 1,
        handoff_at_ns: 2,
    };
    let good = rec.encode();
    let ok = resume_with(&good);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let mut corrupt = good.clone();
    let n = corrupt.len();
    corrupt[n - 3] ^= 0x55;
    let mut hostile = rec.clone();
    hostile.lost = "0-4000".into();
    for (what, bytes) in [
        ("corrupt", corrupt),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("hostile", hostile.encode()),
        ("empty", vec![]),
    ] {
        let out = resume_with(&bytes);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: not one line: {err}");
        assert!(err.starts_with("usmp: error: "), "{what}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{what}: printed a report from a bad record"
        );
    }
}
