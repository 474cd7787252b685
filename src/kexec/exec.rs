//! Exec mode: the crash record crosses a real `execve` of the same binary in a sealed memfd.
//!
//! 1. `seal_record` writes the framed record into a `memfd_create` file (no close-on-exec) and
//!    seals it against writes, shrinking and growing, so the next image reads exactly what the
//!    crashed one wrote.
//! 2. The caller `execve`s itself with `--resume-fd N`.
//! 3. `read_record` in the new process reads the fd (bounded by `MAX_RECORD`) and decodes it;
//!    any problem is one typed error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::record::{CrashRecord, RecordError, MAX_RECORD};

/// Why a record could not be passed or read.
#[derive(Debug, thiserror::Error)]
pub enum ExecRecordError {
    #[error("crash record fd {fd}")]
    Io {
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Step 1: the record in a sealed memfd that survives `execve`.
pub fn seal_record(rec: &CrashRecord) -> std::io::Result<OwnedFd> {
    let name = c"usmp-crash-record";
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid for memfd_create.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = File::from(owned);
    f.write_all(&rec.encode())?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an fd we own, with a valid command and argument.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(f))
}

/// Step 3: reads and validates the record passed as `fd`.
pub fn read_record(fd: i32) -> Result<CrashRecord, ExecRecordError> {
    let io = |source| ExecRecordError::Io { fd, source };
    if fd < 0 {
        return Err(io(std::io::Error::from_raw_os_error(libc::EBADF)));
    }
    // SAFETY: fcntl(F_GETFD) only queries; it fails with EBADF if `fd` is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is open (checked above) and handed to this process for us to own (the
    // `--resume-fd` contract); nothing else in the process uses it.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut buf = Vec::new();
    (&mut f)
        .take(MAX_RECORD as u64 + 64)
        .read_to_end(&mut buf)
        .map_err(io)?;
    Ok(CrashRecord::decode(&buf)?)
}
