//! Signal plumbing: the only file in the crate that calls `sigaction`, `tgkill` and
//! `pthread_sigmask`.
//!
//! Signal numbers are computed at run time from `SIGRTMIN()` (glibc reserves the first few
//! real-time signals for itself, so the number is not a constant). A handler is installed once
//! per process and signal; several runtimes share it, and the handler finds the interrupted CPU
//! through a thread-local (see `ipi/layer.rs`), never through a global runtime.
//!
//! nix's `Signal` cannot name `SIGRTMIN()+n`, so everything that takes a signal number
//! (`sigaction`, `sigaddset`, `tgkill`) stays raw `libc`; nix builds the action, applies the
//! mask, maps the alternate stack and reads errno.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::mman::{mmap_anonymous, mprotect, munmap, MapFlags, ProtFlags};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet};
use nix::unistd::{sysconf, SysconfVar};

use super::IpiError;
use crate::cpu::lock::LockUnpoisoned;

/// The two signals a runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signals {
    /// The maskable IPI doorbell.
    pub ipi: i32,
    /// The NMI: its handler runs even when the CPU has irqs soft-masked.
    pub nmi: i32,
}

impl Signals {
    /// The default pair: `SIGRTMIN()+2` (IPI) and `SIGRTMIN()+3` (NMI). The first two real-time
    /// signals above glibc's reserved ones are left to the application, as many libraries assume.
    pub fn default_pair() -> Self {
        // Raw libc: nix has no SIGRTMIN.
        let base = libc::SIGRTMIN();
        Signals {
            ipi: base + 2,
            nmi: base + 3,
        }
    }

    /// Checks that both are distinct real-time signals.
    pub fn validate(&self) -> Result<(), IpiError> {
        for s in [self.ipi, self.nmi] {
            if s < libc::SIGRTMIN() || s > libc::SIGRTMAX() {
                return Err(IpiError::BadSignal {
                    sig: s,
                    min: libc::SIGRTMIN(),
                    max: libc::SIGRTMAX(),
                });
            }
        }
        if self.ipi == self.nmi {
            return Err(IpiError::BadSignal {
                sig: self.nmi,
                min: libc::SIGRTMIN(),
                max: libc::SIGRTMAX(),
            });
        }
        Ok(())
    }
}

/// A handler with the `SA_SIGINFO` signature.
pub(crate) type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Serializes installs so two runtimes built at once cannot both see "no handler" and race.
static INSTALL: Mutex<()> = Mutex::new(());

/// What `install` did: found our handler already there, or replaced this previous action
/// (`SIG_DFL`/`SIG_IGN`), which `uninstall` puts back.
pub(crate) enum Installed {
    Already,
    New(libc::sigaction),
}

/// Puts back the action `install` replaced (undoing a partial install).
pub(crate) fn uninstall(sig: i32, how: Installed) {
    let _g = INSTALL.lock_unpoisoned();
    if let Installed::New(old) = how {
        // Raw libc: nix's `sigaction` takes a `Signal`, which cannot name SIGRTMIN+n.
        // SAFETY: `old` is the action the kernel returned for `sig` in `install`.
        unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
    }
}

/// The current action of `sig`, changing nothing. Async-signal-safe (sigaction is).
fn current_action(sig: i32) -> Result<libc::sigaction, Errno> {
    // SAFETY: an all-zero sigaction is a valid "empty" value for the out-parameter.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // Raw libc: nix's `sigaction` takes a `Signal` (no SIGRTMIN+n) and cannot query only.
    // SAFETY: querying (null new action) with a valid out-pointer has no side effects.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut cur) } != 0 {
        return Err(Errno::last());
    }
    Ok(cur)
}

/// `sigs` as a `SigSet`. Async-signal-safe.
fn rt_sigset(sigs: &[i32]) -> SigSet {
    // SAFETY: a zeroed sigset_t is then initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // Raw libc: nix's `SigSet::add` takes a `Signal`, which cannot name SIGRTMIN+n.
        // SAFETY: as above; `s` was validated as a real-time signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: `set` was initialised by sigemptyset above.
    unsafe { SigSet::from_sigset_t_unchecked(set) }
}

/// Whether `handler` is still the installed handler of `sig` (another library may have
/// replaced it after `build()`). Async-signal-safe (sigaction is).
pub(crate) fn is_installed(sig: i32, handler: Handler) -> bool {
    current_action(sig).is_ok_and(|cur| cur.sa_sigaction == handler as usize)
}

/// Installs `handler` for `sig`, blocking `also_block` while it runs. Succeeds if `handler` is
/// already installed; fails with `IpiError::SignalInUse` if any other handler is.
pub(crate) fn install(
    sig: i32,
    handler: Handler,
    also_block: &[i32],
) -> Result<Installed, IpiError> {
    let _g = INSTALL.lock_unpoisoned();
    let old = current_action(sig).map_err(|e| IpiError::Sys {
        op: "sigaction(query)",
        errno: e as i32,
    })?;
    if old.sa_sigaction == handler as usize {
        return Ok(Installed::Already);
    }
    if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
        return Err(IpiError::SignalInUse { sig });
    }
    // SA_SIGINFO (implied by `SigHandler::SigAction`): the handler gets the ucontext.
    // SA_RESTART: a job blocked in a restartable syscall resumes after the IPI instead of
    // seeing EINTR. SA_ONSTACK: use an alternate stack if the application set one.
    let act = libc::sigaction::from(SigAction::new(
        SigHandler::SigAction(handler),
        SaFlags::SA_RESTART | SaFlags::SA_ONSTACK,
        rt_sigset(also_block),
    ));
    // Raw libc: nix's `sigaction` takes a `Signal`, which cannot name SIGRTMIN+n.
    // SAFETY: `act` is fully initialised and `handler` is an extern "C" fn that lives for the
    // whole program, so the kernel may call it at any time from now on.
    if unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) } != 0 {
        return Err(IpiError::Sys {
            op: "sigaction(install)",
            errno: Errno::last_raw(),
        });
    }
    Ok(Installed::New(old))
}

/// Whether `sig` currently has a handler that is not `SIG_DFL`/`SIG_IGN` (for tests).
pub fn has_handler(sig: i32) -> bool {
    current_action(sig)
        .is_ok_and(|old| old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN)
}

/// The kernel thread id of the calling thread. Async-signal-safe.
#[inline]
pub(crate) fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// Sends `sig` to thread `tid` of this process. Async-signal-safe (a raw syscall).
/// Returns the errno on failure (ESRCH: the thread is gone; EAGAIN: RLIMIT_SIGPENDING hit).
#[inline]
pub(crate) fn tgkill(tid: i32, sig: i32) -> Result<(), i32> {
    // Raw libc: the IPI send path, and nix has no tgkill (its `Signal` cannot name SIGRTMIN+n).
    // SAFETY: tgkill takes plain integers; targeting our own pid means the signal can only reach
    // a thread of this process, whose handler is installed before any CPU thread exists.
    let r = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid() as libc::c_long,
            tid as libc::c_long,
            sig as libc::c_long,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last_raw())
    }
}

/// Fault injection: blocks (`true`) or unblocks both of its runtime's signals on the calling
/// logical CPU, making it "wedged": not even the NMI reaches it. Returns false (and does
/// nothing) on a thread that is not a logical CPU. Call it from a job; unblock before the job
/// returns if the CPU is to work normally again.
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
pub(crate) fn wedge_this_cpu(block: bool) -> bool {
    match super::layer::current() {
        Some((shared, _)) => {
            let s = shared.signals;
            set_blocked(&[s.ipi, s.nmi], block);
            true
        }
        None => false,
    }
}

/// Unblocks both of the runtime's signals on the calling thread: a logical CPU's thread calls
/// it at start. A thread inherits its creator's signal mask, so a program that blocked the
/// real-time signals before `build()` (or before a `cpu_up`) would otherwise get CPUs that
/// never take an IPI or NMI while busy.
pub(crate) fn unblock_on_cpu_thread(sigs: &Signals) {
    set_blocked(&[sigs.ipi, sigs.nmi], false);
}

fn set_blocked(sigs: &[i32], block: bool) {
    let set = rt_sigset(sigs);
    // pthread_sigmask cannot fail with a valid `how` and set, so the result is not inspected.
    let _ = if block {
        set.thread_block()
    } else {
        set.thread_unblock()
    };
}

/// Registers of the interrupted thread, read from the signal's `ucontext` (the user-space
/// `crash_save_cpu(regs)`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedRegs {
    /// Instruction pointer (RIP / pc).
    pub ip: u64,
    /// Stack pointer (RSP / sp).
    pub sp: u64,
    /// Frame pointer (RBP / x29).
    pub fp: u64,
}

impl SavedRegs {
    /// Reads the registers from a handler's third argument. Async-signal-safe.
    ///
    /// # Safety
    /// `uc` must be the `ucontext_t` pointer the kernel passed to an `SA_SIGINFO` handler that
    /// is still running.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    pub(crate) unsafe fn from_ucontext(uc: *const libc::c_void) -> SavedRegs {
        if uc.is_null() {
            return SavedRegs::default();
        }
        // SAFETY: per the contract, `uc` points at the live ucontext_t of this handler.
        let g = unsafe { &(*(uc as *const libc::ucontext_t)).uc_mcontext.gregs };
        SavedRegs {
            ip: g[libc::REG_RIP as usize] as u64,
            sp: g[libc::REG_RSP as usize] as u64,
            fp: g[libc::REG_RBP as usize] as u64,
        }
    }

    /// Reads the registers from a handler's third argument. Async-signal-safe.
    ///
    /// # Safety
    /// `uc` must be the `ucontext_t` pointer the kernel passed to an `SA_SIGINFO` handler that
    /// is still running.
    #[cfg(all(target_os = "linux", target_arch = "aarch64"))]
    pub(crate) unsafe fn from_ucontext(uc: *const libc::c_void) -> SavedRegs {
        if uc.is_null() {
            return SavedRegs::default();
        }
        // SAFETY: per the contract, `uc` points at the live ucontext_t of this handler.
        let m = unsafe { &(*(uc as *const libc::ucontext_t)).uc_mcontext };
        SavedRegs {
            ip: m.pc,
            sp: m.sp,
            fp: m.regs[29],
        }
    }
}

/// A logical CPU's own alternate signal stack, with a `PROT_NONE` guard page below it.
///
/// IPI callbacks, stop and NMI handlers run on it (the handlers are installed with
/// `SA_ONSTACK`). Without it they would run on whatever alternate stack the thread has: std's
/// stack-overflow stack of a few KiB, on which a callback using 6 KiB of stack crashed the
/// process. Installed by the CPU's thread at start; dropping it (on the same thread, outside any
/// handler) puts the previous alternate stack back and returns the mapping to `STACK_POOL`.
pub(crate) struct AltStack {
    map: NonNull<libc::c_void>,
    map_len: usize,
    old: libc::stack_t,
}

/// The smallest alternate stack `Builder::signal_stack` accepts.
pub const MIN_SIGNAL_STACK: usize = 16 * 1024;
/// The largest.
pub const MAX_SIGNAL_STACK: usize = 64 * 1024 * 1024;

fn page_size() -> usize {
    match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) if p > 0 => p as usize,
        _ => 4096,
    }
}

/// Mapped alternate stacks (guard page already `PROT_NONE`) not in use by any thread.
///
/// A kexec retires every CPU thread of the old image while the next image starts its own, and a
/// hotplug cycle ends one thread and starts another: without the pool each of those is an
/// `munmap` + `mmap` + `mprotect`, which serialise on the process's mmap lock against the new
/// threads' own stack mappings (`clone3`). Bounded: it keeps at most twice the peak number of
/// live alternate stacks (and at most `POOL_MAX`); a stack beyond that is unmapped.
struct StackPool {
    /// `(address, map_len)` of free mappings.
    free: Vec<(usize, usize)>,
    live: usize,
    peak: usize,
}

static STACK_POOL: Mutex<StackPool> = Mutex::new(StackPool {
    free: Vec::new(),
    live: 0,
    peak: 0,
});

/// Upper bound on pooled stacks, whatever the peak (a runtime may have thousands of CPUs).
const POOL_MAX: usize = 256;

impl StackPool {
    /// A free mapping of exactly `map_len` bytes, counted live.
    fn take(map_len: usize) -> Option<NonNull<libc::c_void>> {
        let mut p = STACK_POOL.lock_unpoisoned();
        let i = p.free.iter().rposition(|&(_, l)| l == map_len)?;
        let (addr, _) = p.free.swap_remove(i);
        p.note_live();
        NonNull::new(addr as *mut libc::c_void)
    }

    fn note_live(&mut self) {
        self.live += 1;
        self.peak = self.peak.max(self.live);
    }

    /// Counts a freshly mapped stack live.
    fn mapped() {
        STACK_POOL.lock_unpoisoned().note_live();
    }

    /// Takes back a stack no thread uses any more; unmaps it if the pool is full.
    fn give(map: NonNull<libc::c_void>, map_len: usize) {
        let keep = {
            let mut p = STACK_POOL.lock_unpoisoned();
            p.live = p.live.saturating_sub(1);
            let cap = (2 * p.peak).min(POOL_MAX);
            if p.free.len() < cap {
                p.free.push((map.as_ptr() as usize, map_len));
                true
            } else {
                false
            }
        };
        if !keep {
            // SAFETY: the caller hands over a mapping of `map_len` bytes that nothing uses.
            let _ = unsafe { munmap(map, map_len) };
        }
    }
}

impl AltStack {
    /// Makes a stack of `size` bytes (rounded up to whole pages) above a guard page the calling
    /// thread's alternate signal stack: a pooled one if there is one of that size, else a new
    /// mapping.
    pub(crate) fn install(size: usize) -> Result<AltStack, IpiError> {
        let page = page_size();
        let size = size.div_ceil(page) * page;
        let map_len = size + page;
        let map = match StackPool::take(map_len) {
            Some(map) => map,
            None => Self::map(page, map_len)?,
        };
        let ss = libc::stack_t {
            // SAFETY: `page` is inside the mapping of `map_len > page` bytes.
            ss_sp: unsafe { map.cast::<u8>().add(page) }.as_ptr().cast(),
            ss_flags: 0,
            ss_size: size,
        };
        // SAFETY: zeroed stack_t is a valid out-parameter.
        let mut old: libc::stack_t = unsafe { std::mem::zeroed() };
        // Raw libc: nix has no sigaltstack wrapper.
        // SAFETY: `ss` describes memory that stays mapped until `drop` has switched it out; we
        // are not running on an alternate stack (thread start), so the switch is allowed.
        if unsafe { libc::sigaltstack(&ss, &mut old) } != 0 {
            let e = Errno::last();
            StackPool::give(map, map_len);
            return Err(IpiError::Sys {
                op: "sigaltstack",
                errno: e as i32,
            });
        }
        Ok(AltStack { map, map_len, old })
    }

    /// A new mapping of `map_len` bytes whose lowest `page` is the `PROT_NONE` guard.
    fn map(page: usize, map_len: usize) -> Result<NonNull<libc::c_void>, IpiError> {
        let len = NonZeroUsize::new(map_len).expect("the guard page alone is not empty");
        // SAFETY: an anonymous private mapping with no address hint aliases nothing.
        let map = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_STACK,
            )
        }
        .map_err(|e| IpiError::Sys {
            op: "mmap(signal stack)",
            errno: e as i32,
        })?;
        let unmap = |op, e: Errno| {
            // SAFETY: `map` is the mapping made above, not yet shared with anyone.
            let _ = unsafe { munmap(map, map_len) };
            IpiError::Sys {
                op,
                errno: e as i32,
            }
        };
        // The stack grows down: the guard is the lowest page.
        // SAFETY: the first page of our own fresh mapping.
        unsafe { mprotect(map, page, ProtFlags::PROT_NONE) }
            .map_err(|e| unmap("mprotect(signal stack guard)", e))?;
        StackPool::mapped();
        Ok(map)
    }
}

impl Drop for AltStack {
    fn drop(&mut self) {
        // Put the previous stack back (std's, which std frees at thread exit), or disable.
        let restore = if self.old.ss_sp.is_null() || self.old.ss_flags & libc::SS_DISABLE != 0 {
            libc::stack_t {
                ss_sp: std::ptr::null_mut(),
                ss_flags: libc::SS_DISABLE,
                ss_size: 0,
            }
        } else {
            libc::stack_t {
                ss_flags: 0,
                ..self.old
            }
        };
        // Raw libc: nix has no sigaltstack wrapper.
        // SAFETY: called on the installing thread outside any handler (the CPU thread's exit
        // path), so no frame lives on our stack; `restore` is std's live stack or a disable.
        let r = unsafe { libc::sigaltstack(&restore, std::ptr::null_mut()) };
        if r == 0 {
            // No longer the thread's alternate stack, and nothing else points into it.
            StackPool::give(self.map, self.map_len);
        }
        // If the switch failed (we are somehow still on it), leak the mapping rather than
        // unmap a stack in use.
    }
}
