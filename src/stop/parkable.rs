//! Where a stop may park a CPU for good: not while the CPU holds a lock that other threads of the
//! process need.
//!
//! A stop parks a CPU caught in a job (or with irqs masked) where the signal found it, and it
//! never runs again in this image (`receive.rs`). The kernel can afford that: the next kernel
//! shares no lock with the stopped one. Here every image shares the process's C library, so a
//! CPU parked inside `malloc` with its arena lock held hangs every later allocation from that
//! arena (the next image's bring-up, the runtime's teardown, the caller's own `println!`), which
//! is how a 10-minute `usmp stress` once hung silently for 20 minutes. So:
//!
//! 1. At build (`init`, thread context), the executable text ranges of the loaded C library,
//!    the dynamic loader and the unwinder library are recorded in a fixed table (they take
//!    process-wide locks: the malloc arenas, the loader lock, the unwinder's object list).
//! 2. The stop receiver, about to park a CPU at a point that is not safe, asks
//!    [`holds_foreign_locks`] about the interrupted context: the interrupted instruction is in
//!    one of those ranges and the thread was not blocked in a system call there. If so it does
//!    not park: it counts the deferral, raises the CPU's `deferred` flag and returns, and the
//!    CPU runs on until it leaves the library (microseconds: a lock is held around short code).
//! 3. The stopping CPU re-sends the stop to CPUs that deferred, by the attempt's own means,
//!    every `DEFER_POLL` while the attempt waits (`routine.rs` step 3); a CPU that stays in the
//!    library for a whole attempt is reported as failed to stop, never parked holding the lock.
//!
//! A thread blocked in a system call inside the library (a `read`, a futex wait for a lock that
//! someone else holds) is parkable: the signal interrupted the call, and a blocked thread is
//! waiting, not in a critical section. On x86_64 that thread's instruction pointer is at the
//! `syscall` instruction (a restarted call, `SA_RESTART`) or just past it with `-EINTR` in
//! `rax`; on aarch64 the same with `svc #0` and `x0`.
//!
//! Locks that user code takes itself (a `std::sync::Mutex`, the stdout lock) are not seen here:
//! as in the kernel, a job stopped inside its own critical section leaves that lock held for
//! good (the `README`'s "stopping a job" rules). A statically linked C library (musl) has no
//! separate text range, so nothing is deferred there.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;
use std::time::Duration;

/// How often the stopping CPU re-sends the stop to CPUs that deferred (step 3).
pub(crate) const DEFER_POLL: Duration = Duration::from_micros(50);

/// Text ranges recorded (step 1): the C library, the loader and the unwinder have one
/// executable segment each; a few spare slots for other libraries of the same names.
const MAX_RANGES: usize = 8;

/// The libraries whose locks a parked CPU must not hold, by file-name prefix.
const LIBRARIES: &[&str] = &[
    "libc.so",
    "ld-linux",
    "ld64.so",
    "libgcc_s.so",
    "libpthread.so",
];

struct Ranges {
    start: [AtomicU64; MAX_RANGES],
    end: [AtomicU64; MAX_RANGES],
    len: AtomicUsize,
    /// Set once the table is complete (Release; the handler reads it with Acquire).
    done: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);

static RANGES: Ranges = Ranges {
    start: [ZERO; MAX_RANGES],
    end: [ZERO; MAX_RANGES],
    len: AtomicUsize::new(0),
    done: AtomicBool::new(false),
};

/// Step 1 runs once per process; a second runtime built meanwhile waits for the first's walk.
static INIT: Once = Once::new();

/// Step 1: records the libraries' text ranges, once per process. Thread context (it walks the
/// loader's list, which takes the loader's lock). Libraries loaded later (`dlopen`) are not
/// seen; the C library and the loader are always loaded before `main`.
pub(crate) fn init() {
    INIT.call_once(|| {
        // SAFETY: `collect` only reads the `dl_phdr_info` the loader passes for the duration
        // of the callback and writes atomics; it never unwinds (no panicking operations).
        unsafe { libc::dl_iterate_phdr(Some(collect), std::ptr::null_mut()) };
        RANGES.done.store(true, Ordering::Release);
    });
}

unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    _data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: the loader passes a valid `dl_phdr_info` for the duration of this call.
    let info = unsafe { &*info };
    if info.dlpi_name.is_null() {
        return 0;
    }
    // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the loader.
    let path = unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes();
    let file = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    if !LIBRARIES.iter().any(|l| file.starts_with(l.as_bytes())) {
        return 0;
    }
    for i in 0..info.dlpi_phnum as usize {
        // SAFETY: `dlpi_phdr` points at `dlpi_phnum` program headers.
        let ph = unsafe { &*info.dlpi_phdr.add(i) };
        if ph.p_type != libc::PT_LOAD || ph.p_flags & libc::PF_X == 0 {
            continue;
        }
        let n = RANGES.len.load(Ordering::Relaxed);
        if n == MAX_RANGES {
            return 1;
        }
        let start = info.dlpi_addr.wrapping_add(ph.p_vaddr);
        RANGES.start[n].store(start, Ordering::Relaxed);
        RANGES.end[n].store(start.wrapping_add(ph.p_memsz), Ordering::Relaxed);
        RANGES.len.store(n + 1, Ordering::Relaxed);
    }
    0
}

/// Whether `ip` is in the recorded text of a library that takes process-wide locks.
/// Async-signal-safe (atomic loads).
fn in_locking_library(ip: u64) -> bool {
    if !RANGES.done.load(Ordering::Acquire) {
        return false;
    }
    let n = RANGES.len.load(Ordering::Relaxed);
    (0..n).any(|i| {
        ip >= RANGES.start[i].load(Ordering::Relaxed) && ip < RANGES.end[i].load(Ordering::Relaxed)
    })
}

/// Step 2: whether the context a stop signal interrupted may hold a lock of the C library, the
/// loader or the unwinder (it is running their code, not blocked in a system call there).
/// False for a null context (no interrupted code: the CPU parks itself in runtime code).
/// Async-signal-safe.
///
/// # Safety
/// `uc` is null or the `ucontext_t` pointer the kernel passed to an `SA_SIGINFO` handler that
/// is still running.
pub(crate) unsafe fn holds_foreign_locks(uc: *const libc::c_void) -> bool {
    if uc.is_null() {
        return false;
    }
    // SAFETY: per the contract.
    let (ip, ret) = unsafe { ip_and_return(uc) };
    if !in_locking_library(ip) {
        return false;
    }
    // SAFETY: `ip` is inside a mapped, readable executable segment of a loaded library (just
    // checked), and so are the bytes read around it: `blocked_in_syscall` reads only within
    // the same range.
    !unsafe { blocked_in_syscall(ip, ret) }
}

#[cfg(target_arch = "x86_64")]
unsafe fn ip_and_return(uc: *const libc::c_void) -> (u64, i64) {
    // SAFETY: the caller's contract: `uc` is this handler's live ucontext_t.
    let g = unsafe { &(*(uc as *const libc::ucontext_t)).uc_mcontext.gregs };
    (g[libc::REG_RIP as usize] as u64, g[libc::REG_RAX as usize])
}

#[cfg(target_arch = "aarch64")]
unsafe fn ip_and_return(uc: *const libc::c_void) -> (u64, i64) {
    // SAFETY: the caller's contract: `uc` is this handler's live ucontext_t.
    let m = unsafe { &(*(uc as *const libc::ucontext_t)).uc_mcontext };
    (m.pc, m.regs[0] as i64)
}

/// Whether the interrupted thread was blocked in a system call at `ip`: a restarted call sits
/// at the system-call instruction; an interrupted one returns `-EINTR` just past it.
///
/// # Safety
/// The instruction bytes just before and at `ip` are readable (`ip` inside a recorded range).
#[cfg(target_arch = "x86_64")]
unsafe fn blocked_in_syscall(ip: u64, ret: i64) -> bool {
    const SYSCALL: [u8; 2] = [0x0f, 0x05];
    let at = |addr: u64| -> Option<[u8; 2]> {
        (in_locking_library(addr) && in_locking_library(addr + 1)).then(|| {
            // SAFETY: per the contract: both bytes at `addr` lie in a mapped text range.
            unsafe { std::ptr::read_unaligned(addr as *const [u8; 2]) }
        })
    };
    if at(ip) == Some(SYSCALL) {
        return true;
    }
    ip >= 2 && ret == -(libc::EINTR as i64) && at(ip - 2) == Some(SYSCALL)
}

#[cfg(target_arch = "aarch64")]
unsafe fn blocked_in_syscall(ip: u64, ret: i64) -> bool {
    const SVC0: u32 = 0xd400_0001;
    let at = |addr: u64| -> Option<u32> {
        (in_locking_library(addr) && in_locking_library(addr + 3)).then(|| {
            // SAFETY: per the contract: the four bytes at `addr` lie in a mapped text range.
            unsafe { std::ptr::read_unaligned(addr as *const u32) }
        })
    };
    if at(ip) == Some(SVC0) {
        return true;
    }
    ip >= 4 && ret == -(libc::EINTR as i64) && at(ip - 4) == Some(SVC0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_c_library_text_is_recorded() {
        init();
        let malloc = libc::malloc as *const () as usize as u64;
        assert!(
            in_locking_library(malloc),
            "malloc at {malloc:#x} is not in the recorded ranges"
        );
        let here = the_c_library_text_is_recorded as *const () as usize as u64;
        assert!(
            !in_locking_library(here),
            "this test's own code was recorded"
        );
    }

    #[test]
    fn a_null_context_holds_nothing() {
        init();
        // SAFETY: null is allowed by the contract.
        assert!(!unsafe { holds_foreign_locks(std::ptr::null()) });
    }
}
