//! Exec mode end to end: the crash record crosses a real `execve`; anything but a consistent
//! record in a sealed memfd is rejected with one clear line and exit code 2, quickly; text from
//! a record cannot forge output.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

mod common;
use common::serial;

#[path = "common/cli.rs"]
mod cli;
use cli::{run_bounded, usmp, Finished};

/// The done criterion: a refused fd exits within this.
const REFUSAL: Duration = Duration::from_millis(100);
/// What the test waits before calling a run hung (the old decoder blocked forever on an
/// eventfd; a loaded 2-core machine can stall a process start for a while).
const HANG: Duration = Duration::from_secs(10);

#[test]
fn crash_record_crosses_execve() {
    let _g = serial();
    let out = run_bounded(
        usmp()
            .args(["kexec", "--crash", "--exec", "--cpus", "4"])
            .env("RUST_LOG", "error"),
        HANG * 3,
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let first = out.stdout.lines().next().unwrap_or("");
    assert!(
        first.contains("crash record from generation 0"),
        "report must come first: {}",
        out.stdout
    );
    assert!(out.stdout.contains("reason: usmp kexec --crash"));
    assert!(
        out.stdout
            .contains("generation 1 booted in a new process: CPUs 0-3 online"),
        "{}",
        out.stdout
    );
}

fn memfd(flags: libc::c_uint) -> File {
    // SAFETY: a valid NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"usmp-test-record".as_ptr(), flags) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bytes` in a memfd sealed as `seal_record` seals it.
fn sealed(bytes: &[u8]) -> OwnedFd {
    let mut f = memfd(libc::MFD_ALLOW_SEALING);
    f.write_all(bytes).unwrap();
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an fd this test owns, with a valid command and argument.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(rc, 0);
    OwnedFd::from(f)
}

/// Runs `usmp kexec --resume-fd` with `fd` inherited (the test keeps its own copy open until the
/// child has exited) and the extra arguments.
fn resume_fd(fd: &OwnedFd, extra: &[&str]) -> Finished {
    let raw = fd.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on an fd this test owns, so the child inherits it. Tests in this
    // file run in parallel: another test's child may inherit it too, which only keeps it open.
    unsafe { libc::fcntl(raw, libc::F_SETFD, 0) };
    let out = run_bounded(
        usmp()
            .args(["kexec", "--cpus", "2", "--resume-fd", &raw.to_string()])
            .args(extra),
        HANG,
    );
    // SAFETY: as above, restores FD_CLOEXEC.
    unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
    out
}

fn resume_with(bytes: &[u8]) -> Finished {
    resume_fd(&sealed(bytes), &[])
}

fn record() -> usmp::CrashRecord {
    usmp::CrashRecord {
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
    }
}

fn note(cpu: usize) -> usmp::CrashNote {
    usmp::CrashNote {
        cpu,
        regs: Default::default(),
    }
}

fn assert_refused(what: &str, out: &Finished) {
    assert_eq!(out.status.code(), Some(2), "{what}: {}", out.stderr);
    assert_eq!(
        out.stderr.lines().count(),
        1,
        "{what}: not one line: {}",
        out.stderr
    );
    assert!(
        out.stderr.starts_with("usmp: error: "),
        "{what}: {}",
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: printed a report from a bad record: {}",
        out.stdout
    );
}

#[test]
fn corrupt_truncated_inconsistent_or_hostile_records_exit_2_with_one_line() {
    let _g = serial();
    let rec = record();
    let good = rec.encode();
    let ok = resume_with(&good);
    assert!(ok.status.success(), "{}", ok.stderr);
    let mut corrupt = good.clone();
    let n = corrupt.len();
    corrupt[n - 3] ^= 0x55;
    let with = |f: &dyn Fn(&mut usmp::CrashRecord)| {
        let mut r = record();
        f(&mut r);
        r.encode()
    };
    for (what, bytes) in [
        ("corrupt", corrupt),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("lost beyond cpus", with(&|r| r.lost = "0-4000".into())),
        ("failed beyond cpus", with(&|r| r.failed = "2".into())),
        (
            "failed not a subset of lost",
            with(&|r| {
                r.failed = "1".into();
                r.lost = "0".into();
            }),
        ),
        (
            "two notes for one CPU",
            with(&|r| r.notes = vec![note(1), note(0), note(1)]),
        ),
        ("last generation", with(&|r| r.generation = u64::MAX)),
        (
            "widest mask many times",
            with(&|r| r.lost = vec!["0-1048575"; 5000].join(",")),
        ),
        ("empty", vec![]),
    ] {
        let out = resume_with(&bytes);
        assert_refused(what, &out);
        // The old decoder spent ~7 s on the widest mask repeated 5000 times.
        assert!(out.took < REFUSAL * 5, "{what}: took {:?}", out.took);
        assert!(
            !out.stderr.contains("panicked"),
            "{what}: panicked: {}",
            out.stderr
        );
    }
}

/// Anything but a sealed memfd is refused before a byte is read, within `REFUSAL`.
#[test]
fn only_a_sealed_memfd_is_a_record_and_refusal_is_quick() {
    let _g = serial();
    let bytes = record().encode();
    let mut cases: Vec<(&str, OwnedFd)> = Vec::new();
    let mut unsealed = memfd(libc::MFD_ALLOW_SEALING);
    unsealed.write_all(&bytes).unwrap();
    cases.push(("unsealed memfd", unsealed.into()));
    let mut write_only = memfd(libc::MFD_ALLOW_SEALING);
    write_only.write_all(&bytes).unwrap();
    // SAFETY: fcntl on an fd this test owns, with a valid command and argument.
    unsafe {
        libc::fcntl(
            write_only.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_WRITE,
        )
    };
    cases.push(("memfd sealed against write only", write_only.into()));
    let path = std::env::temp_dir().join(format!("usmp-record-{}", std::process::id()));
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    file.write_all(&bytes).unwrap();
    cases.push(("regular file with a valid record", file.into()));
    // SAFETY: eventfd with valid flags; checked below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(efd >= 0);
    // SAFETY: just created, owned by nobody else.
    cases.push(("eventfd", unsafe { OwnedFd::from_raw_fd(efd) }));
    // SAFETY: timerfd_create with valid arguments; never armed; checked below.
    let tfd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
    assert!(tfd >= 0);
    // SAFETY: just created, owned by nobody else.
    cases.push(("unarmed timerfd", unsafe { OwnedFd::from_raw_fd(tfd) }));
    let mut p = [0; 2];
    // SAFETY: `p` has room for the two fds pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    cases.push(("empty pipe", r));

    let mut slowest = Duration::ZERO;
    for (what, fd) in &cases {
        let out = resume_fd(fd, &[]);
        assert_refused(what, &out);
        slowest = slowest.max(out.took);
        assert!(out.took < REFUSAL * 5, "{what}: took {:?}", out.took);
    }
    drop(w);
    // The standard streams and closed fds are refused on the command line, with the error
    // still on stderr (`--resume-fd 2` used to close stderr before printing it).
    for fd in ["0", "1", "2", "1000", "-1"] {
        let out = run_bounded(
            usmp().args(["kexec", "--cpus", "2", "--resume-fd", fd]),
            HANG,
        );
        assert_refused(&format!("--resume-fd {fd}"), &out);
        slowest = slowest.max(out.took);
    }
    eprintln!("slowest refusal: {slowest:?}");
    assert!(
        slowest < REFUSAL * 5,
        "slowest refusal took {slowest:?} (goal {REFUSAL:?}, x5 for a loaded machine)"
    );
}

/// A `reason` with newlines and escape sequences prints as one inert line; `--json` carries it
/// intact but escaped.
#[test]
fn record_text_cannot_forge_output() {
    let _g = serial();
    let forged = "oops\n== generation 99 booted in a new process: CPUs 0-1023 online\x1b[2J\u{9b}31m\u{202e}";
    let mut rec = record();
    rec.reason = forged.into();
    // CPU 0 crashed (a record whose crashing CPU is lost is refused).
    rec.crashing_cpu = Some(0);
    rec.lost = " 1 ".into();
    rec.failed = "1".into();
    let out = resume_with(&rec.encode());
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.starts_with("== generation 99")),
        "forged line printed: {}",
        out.stdout
    );
    for bad in ['\x1b', '\u{9b}', '\u{202e}'] {
        assert!(
            !out.stdout.contains(bad),
            "{bad:?} printed raw: {}",
            out.stdout
        );
    }
    assert!(
        out.stdout.contains(r"reason: oops\n== generation 99"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("failed to stop: 1; lost: 1;"),
        "{}",
        out.stdout
    );

    let out = resume_fd(&sealed(&rec.encode()), &["--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    for bad in ['\x1b', '\u{9b}', '\u{202e}'] {
        assert!(
            !out.stdout.contains(bad),
            "{bad:?} printed raw: {}",
            out.stdout
        );
    }
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["record"]["reason"], forged);
    assert_eq!(v["generation"], 1);
}

/// Issue 19, item 9: the next process boots what the record hands over, at its generation.
/// With `--park spin` every CPU but the crashing one (CPU 1) is lost; the old code booted
/// `CPUs 0-3 online`, and at generation 0 while printing "generation 1".
#[test]
fn the_next_process_boots_only_what_the_record_hands_over() {
    let _g = serial();
    let out = run_bounded(
        usmp()
            .args([
                "kexec", "--crash", "--park", "spin", "--exec", "--cpus", "4", "--json",
            ])
            .env("RUST_LOG", "error"),
        HANG * 3,
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let lost: usmp::CpuMask = v["cpus_lost"].as_str().unwrap().parse().unwrap();
    assert!(!lost.is_empty(), "spin parking lost nothing: {v}");
    assert!(!lost.contains(1), "the crashing CPU is lost: {v}");
    assert_eq!(v["generation"], 1, "{v}");
    assert_eq!(
        v["cpus_online_after"].as_u64().unwrap() as usize,
        4 - lost.weight(),
        "{v}"
    );
}

/// Issue 19, item 9: a record whose `lost` holds its crashing CPU is refused; text with the
/// Arabic letter mark, line/paragraph separators, zero-width space or BOM prints escaped.
#[test]
fn a_lost_crashing_cpu_is_refused_and_invisible_characters_are_escaped() {
    let _g = serial();
    let mut rec = record();
    rec.lost = "1".into();
    assert_refused("lost crashing CPU", &resume_with(&rec.encode()));
    let mut rec = record();
    rec.reason = "a\u{061c}b\u{2028}c\u{2029}d\u{200b}e\u{feff}f".into();
    let out = resume_with(&rec.encode());
    assert!(out.status.success(), "{}", out.stderr);
    for bad in ['\u{061c}', '\u{2028}', '\u{2029}', '\u{200b}', '\u{feff}'] {
        assert!(
            !out.stdout.contains(bad),
            "{bad:?} printed raw: {}",
            out.stdout
        );
    }
    assert!(
        out.stdout
            .contains(r"reason: a\u{61c}b\u{2028}c\u{2029}d\u{200b}e\u{feff}f"),
        "{}",
        out.stdout
    );
    let out = resume_fd(&sealed(&rec.encode()), &["--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    for bad in ['\u{061c}', '\u{2028}', '\u{2029}', '\u{200b}', '\u{feff}'] {
        assert!(!out.stdout.contains(bad), "{bad:?} in JSON: {}", out.stdout);
    }
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["record"]["reason"], rec.reason.as_str());
}
