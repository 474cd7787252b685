//! Exec mode: the crash record crosses a real `execve` of the same binary in a sealed memfd.
//!
//! 1. `seal_record` writes the framed record into a `memfd_create` file (no close-on-exec) and
//!    seals it against writes, shrinking and growing, so the next image reads exactly what the
//!    crashed one wrote.
//! 2. The caller `execve`s itself with `--resume-fd N`.
//! 3. `read_record` in the new process takes ownership of the fd, refuses anything that is not
//!    a memfd sealed against writing, growing and shrinking (before reading a byte: an eventfd,
//!    a pipe or a timerfd could block a read forever, a file or an unsealed memfd could change
//!    under the reader), reads it with one bounded `pread`, and decodes it; any problem is one
//!    typed error.
//! 4. `boot_next_image` boots the next image from the record, as the in-process handover does:
//!    the record's CPU count, its next generation, the CPUs it reports lost left absent (never
//!    brought up: the old image may still spin on them), the crashing CPU first.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::memfd::{memfd_create, MFdFlags};

use super::record::{CrashRecord, RecordError, MAX_FRAME};
use crate::runtime::builder::Builder;
use crate::runtime::error::RuntimeError;
use crate::runtime::rt::Runtime;

/// The seals a crash record must carry: nobody can change its contents or size any more.
const REQUIRED_SEALS: SealFlag = SealFlag::F_SEAL_WRITE
    .union(SealFlag::F_SEAL_SHRINK)
    .union(SealFlag::F_SEAL_GROW);
/// Bound on waiting for the fd to be readable (a sealed memfd always is, at once).
const READ_TIMEOUT: Duration = Duration::from_millis(50);

/// Why a record could not be passed or read.
#[derive(Debug, thiserror::Error)]
pub enum ExecRecordError {
    /// Reading or inspecting the fd failed (see `source`).
    #[error("crash record fd {fd}")]
    Io {
        /// The fd holding the record.
        fd: i32,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The fd is not a memfd (`F_GET_SEALS` is refused): a file, pipe, socket, eventfd, ...
    #[error("crash record fd {fd} is not a memfd (only a sealed memfd holds a crash record)")]
    NotMemfd {
        /// The fd passed.
        fd: i32,
    },
    /// The memfd can still be written, grown or shrunk.
    #[error(
        "crash record fd {fd} is not sealed against write, grow and shrink (seals {seals:#x})"
    )]
    NotSealed {
        /// The memfd.
        fd: i32,
        /// The seals it has (`F_GET_SEALS`).
        seals: i32,
    },
    /// The memfd is larger than any valid record.
    #[error("crash record fd {fd} holds {len} bytes, more than the {MAX_FRAME} a record may have")]
    TooLarge {
        /// The memfd.
        fd: i32,
        /// Its size, in bytes.
        len: u64,
    },
    /// The fd did not become readable in time.
    #[error("crash record fd {fd} is not readable within {} ms", READ_TIMEOUT.as_millis())]
    NotReadable {
        /// The memfd.
        fd: i32,
    },
    /// The record was read but is not valid.
    #[error(transparent)]
    Record(#[from] RecordError),
}
/// Step 1: the record in a sealed memfd that survives `execve`.
pub fn seal_record(rec: &CrashRecord) -> std::io::Result<OwnedFd> {
    // No MFD_CLOEXEC: the fd must survive the execve.
    let mut f = File::from(memfd_create(
        c"usmp-crash-record",
        MFdFlags::MFD_ALLOW_SEALING,
    )?);
    f.write_all(&rec.encode())?;
    fcntl(
        f.as_fd(),
        FcntlArg::F_ADD_SEALS(REQUIRED_SEALS | SealFlag::F_SEAL_SEAL),
    )?;
    Ok(OwnedFd::from(f))
}

/// Step 3: reads and validates the record in `fd`, which it takes ownership of (and closes).
///
/// Only a memfd sealed with `F_SEAL_WRITE`, `F_SEAL_GROW` and `F_SEAL_SHRINK` is accepted;
/// anything else is refused before any read, so no fd can make this block. The read itself is
/// one `pread` of at most `MAX_FRAME` bytes from memory, after a bounded readiness check.
pub fn read_record(fd: OwnedFd) -> Result<CrashRecord, ExecRecordError> {
    let raw = fd.as_raw_fd();
    let io = |source| ExecRecordError::Io { fd: raw, source };
    let seals = match fcntl(fd.as_fd(), FcntlArg::F_GET_SEALS) {
        Ok(seals) => seals,
        Err(Errno::EINVAL) => return Err(ExecRecordError::NotMemfd { fd: raw }),
        Err(e) => return Err(io(e.into())),
    };
    if !SealFlag::from_bits_retain(seals).contains(REQUIRED_SEALS) {
        return Err(ExecRecordError::NotSealed { fd: raw, seals });
    }
    let f = File::from(fd);
    let meta = f.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(ExecRecordError::NotMemfd { fd: raw });
    }
    if meta.len() > MAX_FRAME as u64 {
        return Err(ExecRecordError::TooLarge {
            fd: raw,
            len: meta.len(),
        });
    }
    let timeout = PollTimeout::try_from(READ_TIMEOUT).unwrap_or(PollTimeout::MAX);
    let ready = poll(&mut [PollFd::new(f.as_fd(), PollFlags::POLLIN)], timeout)
        .map_err(|e| io(e.into()))?;
    if ready == 0 {
        return Err(ExecRecordError::NotReadable { fd: raw });
    }
    // The seals fix the size, so this reads the whole record or fails.
    let mut buf = vec![0u8; meta.len() as usize];
    f.read_exact_at(&mut buf, 0).map_err(io)?;
    Ok(CrashRecord::decode(&buf)?)
}

/// Step 4: boots the image that follows `rec` in this process, configured by `builder`
/// except for what the record decides: the CPU count (`rec.cpus`), the generation
/// (`rec.next_generation()`) and the CPUs: every CPU in `rec.lost` stays absent (not present,
/// never brought up), and the crashing CPU, which handed over, boots first.
pub fn boot_next_image(builder: Builder, rec: &CrashRecord) -> Result<Runtime, RuntimeError> {
    let lost = rec.lost_mask();
    let first = rec
        .crashing_cpu
        .filter(|&c| !lost.contains(c))
        .or_else(|| (0..rec.cpus).find(|&c| !lost.contains(c)))
        .ok_or_else(|| {
            RuntimeError::BadConfig(
                "crash record: every CPU was lost, none is left to boot the next image".into(),
            )
        })?;
    let mut cfg = builder.cpus(rec.cpus).resolve()?;
    cfg.generation = rec.next_generation();
    Runtime::start_image(cfg, first, &lost)
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;
    use crate::stop::ParkPolicy;

    fn record() -> CrashRecord {
        CrashRecord {
            reason: "test".into(),
            crashing_cpu: None,
            cpus: 2,
            generation: 3,
            notes: vec![],
            failed: String::new(),
            lost: "1".into(),
            park: ParkPolicy::Spin,
            crashed_at_ns: 1,
            handoff_at_ns: 2,
        }
    }

    fn memfd(flags: MFdFlags) -> File {
        File::from(memfd_create(c"usmp-test", flags).unwrap())
    }

    #[test]
    fn a_sealed_memfd_round_trips() {
        let fd = seal_record(&record()).unwrap();
        assert_eq!(read_record(fd).unwrap(), record());
    }

    #[test]
    fn unsealed_or_non_memfd_fds_are_refused_without_reading() {
        let bytes = record().encode();
        // A memfd that can still be written (no seals at all, or sealing never allowed).
        for flags in [MFdFlags::MFD_ALLOW_SEALING, MFdFlags::empty()] {
            let mut f = memfd(flags);
            f.write_all(&bytes).unwrap();
            let r = read_record(OwnedFd::from(f));
            assert!(
                matches!(r, Err(ExecRecordError::NotSealed { .. })),
                "flags {flags:?}: {r:?}"
            );
        }
        // Sealed against writes only: it could still shrink or grow.
        let mut f = memfd(MFdFlags::MFD_ALLOW_SEALING);
        f.write_all(&bytes).unwrap();
        fcntl(f.as_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).unwrap();
        assert!(matches!(
            read_record(OwnedFd::from(f)),
            Err(ExecRecordError::NotSealed { .. })
        ));
        // An eventfd would block a read forever: refused before any read.
        // Raw libc: test-only, not worth nix's `event` feature in the library build.
        // SAFETY: eventfd with valid flags; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(efd >= 0);
        // SAFETY: `efd` was just created and is owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let t = std::time::Instant::now();
        assert!(matches!(
            read_record(efd),
            Err(ExecRecordError::NotMemfd { .. })
        ));
        assert!(t.elapsed() < Duration::from_secs(1));
        // A regular file.
        let f = File::open("/proc/self/exe").unwrap();
        assert!(matches!(
            read_record(OwnedFd::from(f)),
            Err(ExecRecordError::NotMemfd { .. })
        ));
    }

    #[test]
    fn an_oversized_sealed_memfd_is_refused_before_reading() {
        let f = memfd(MFdFlags::MFD_ALLOW_SEALING);
        f.set_len(MAX_FRAME as u64 + 1).unwrap();
        fcntl(f.as_fd(), FcntlArg::F_ADD_SEALS(REQUIRED_SEALS)).unwrap();
        assert!(matches!(
            read_record(OwnedFd::from(f)),
            Err(ExecRecordError::TooLarge { .. })
        ));
    }
}
