//! A panic in IPI context is fatal (the kernel's "Fatal exception in interrupt").
//!
//! Policy, for every place user code runs on a CPU:
//! - **IPI context** (call callbacks, STARTING/DYING steps, `stop_machine` functions): the code
//!   may be running inside a signal handler that interrupted anything, even `malloc`, so it can
//!   be neither unwound through the handler nor caught and resumed safely. A panic there aborts
//!   the process after one line on stderr naming the CPU, the kind of code and its type name,
//!   written with `write(2)` from a stack buffer. This holds whether the callback happened to be
//!   delivered by signal or served by an idle CPU, so a callback behaves the same everywhere.
//! - **Jobs** (thread context): the panic is caught, the job's handle reports
//!   `JobPanicked`, the CPU keeps running, and an irq mask the job left on is restored
//!   (`runtime/thread.rs`).
//!
//! Mechanism: [`run`] marks the thread as "in IPI code" (a const thread-local, no allocation)
//! around the user code. A process-wide panic hook, chained in front of the previous one at the
//! first `build()`, aborts at once when the marker is set, before std's default hook could
//! allocate, lock stderr or capture a backtrace on the small signal stack. If the application
//! replaced the hook afterwards, the unwind still reaches [`run`]'s guard, which aborts the same
//! way. Either way: no unwinding out of a signal handler, no SIGSEGV, no CPU left half-dead.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::Once;

/// What user code the thread is running in IPI context.
#[derive(Clone, Copy)]
struct IrqCode {
    cpu: usize,
    what: &'static str,
    /// Valid while the marker is set: [`run`] borrows it for exactly that long.
    name: *const str,
}

thread_local! {
    static IN_IRQ_CODE: Cell<Option<IrqCode>> = const { Cell::new(None) };
}

/// Aborts the process if dropped while unwinding out of the user code it guards (the hook was
/// replaced after ours).
struct Guard {
    prev: Option<IrqCode>,
    /// Set once the user code has returned: a drop without it is an unwind out of that code.
    ///
    /// Not `std::thread::panicking()`: that is true whenever the *thread* is panicking, and an
    /// IPI handler that ran a callback on top of a job's panic (the job's panic hook or unwind
    /// was interrupted) saw it and aborted, reporting the job's panic as an IPI-context one.
    returned: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.returned {
            if let Some(c) = IN_IRQ_CODE.with(|m| m.get()) {
                die(c, None, None);
            }
        }
        IN_IRQ_CODE.with(|m| m.set(self.prev));
    }
}

/// Runs user code `f` on CPU `cpu` in IPI context: a panic in it aborts the process with one
/// line naming `what` (e.g. "IPI callback") and `name` (its type name). Async-signal-safe as far
/// as `f` is (two thread-local stores).
#[inline]
pub(crate) fn run<R>(cpu: usize, what: &'static str, name: &str, f: impl FnOnce() -> R) -> R {
    let g = enter(cpu, what, name);
    let r = f();
    g.returned();
    r
}

/// [`run`] without a closure, for a caller whose user code is one call: marks the thread as
/// in IPI code until [`Entered::returned`]; dropped without it (an unwind), it aborts as `run`
/// does. Async-signal-safe (two thread-local stores).
#[inline]
pub(crate) fn enter<'a>(cpu: usize, what: &'static str, name: &'a str) -> Entered<'a> {
    let name: *const str = name;
    let prev = IN_IRQ_CODE.with(|m| m.replace(Some(IrqCode { cpu, what, name })));
    Entered {
        guard: Guard {
            prev,
            returned: false,
        },
        _name: std::marker::PhantomData,
    }
}

/// The mark [`enter`] set, borrowing the name it points at for as long.
pub(crate) struct Entered<'a> {
    guard: Guard,
    _name: std::marker::PhantomData<&'a str>,
}

impl Entered<'_> {
    /// The user code returned: clear the mark.
    #[inline]
    pub(crate) fn returned(mut self) {
        self.guard.returned = true;
    }
}

/// Chains the fatal hook in front of the current panic hook, once per process. Called at
/// `build()` (thread context).
pub(crate) fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(c) = IN_IRQ_CODE.with(|m| m.get()) {
                let p = info.payload();
                let msg = p
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| p.downcast_ref::<String>().map(String::as_str));
                die(c, info.location(), msg);
            }
            prev(info)
        }));
    });
}

/// A `fmt::Write` into a fixed stack buffer that drops what does not fit.
struct StackLine {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for StackLine {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                break;
            }
            // One line: a newline or control byte in the message must not start another.
            self.buf[self.len] = if b < 0x20 || b == 0x7f { b' ' } else { b };
            self.len += 1;
        }
        Ok(())
    }
}

/// The one line, then abort. Async-signal-safe: formats into a stack buffer, `write(2)`,
/// `abort(3)`.
fn die(c: IrqCode, loc: Option<&std::panic::Location<'_>>, msg: Option<&str>) -> ! {
    let mut l = StackLine {
        buf: [0; 512],
        len: 0,
    };
    // SAFETY: the marker is set only inside `run`, which borrows `name` for that whole time,
    // and we are inside it (the hook or the guard of that same `run` called us).
    let name = unsafe { &*c.name };
    let _ = write!(
        l,
        "usmp: fatal: CPU{}: {} `{}` panicked in IPI context",
        c.cpu, c.what, name
    );
    if let Some(loc) = loc {
        let _ = write!(l, " at {}:{}", loc.file(), loc.line());
    }
    if let Some(m) = msg {
        let _ = write!(l, ": {m}");
    }
    let _ = l.write_str("; aborting (a panic in IPI context is fatal, as in the kernel)");
    let n = l.len.min(l.buf.len() - 1);
    l.buf[n] = b'\n';
    // Raw libc: may run in handler context, where std's stderr lock could deadlock.
    // SAFETY: writes our own initialised stack buffer to fd 2; write(2) is async-signal-safe.
    unsafe { libc::write(2, l.buf.as_ptr().cast(), n + 1) };
    std::process::abort()
}
