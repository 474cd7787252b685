//! `usmp kexec`: an orderly or crash kexec with a timeline and a final table; `--exec` hands
//! the crash record to a real new process image through a sealed memfd.
//!
//! Output goes through one locked stdout with `?`, so a closed pipe ends the command with an
//! `io::ErrorKind::BrokenPipe` error that `main` treats as the end of output. Every string that
//! came from a crash record is printed through [`printable`] (or [`write_json`]), so a record
//! cannot forge lines or send escape sequences to the terminal. SIGINT and SIGQUIT keep their
//! default actions.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use usmp::{Builder, KexecReport};

use crate::args::{cpus, host_cores, Park};
use crate::output::{printable, write_json};
use crate::signals::Signals;

/// `usmp kexec`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Crash-kexec (crash-stop with retries and the NMI fallback) instead of an orderly kexec.
    #[arg(long)]
    crash: bool,
    /// Logical CPUs, 1 to 1024 [default: max(host cores, 4)].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = cpus::<1>)]
    cpus: Option<usize>,
    /// What stopped CPUs do: power-off (the next image can use them) or spin (lost).
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = Park::PowerOff)]
    park: Park,
    /// Hand over to a real new process (execve of this binary) with the crash record.
    #[arg(long)]
    exec: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// (internal) the fd holding a crash record from the previous process image: a memfd
    /// sealed against write, grow and shrink, 3 or above.
    #[arg(long, value_name = "FD", hide = true, allow_negative_numbers = true)]
    resume_fd: Option<i32>,
}

/// Runs `usmp kexec`. With `--exec` this process becomes the next image (execve) instead of
/// returning.
pub fn run(a: Args, signals: Signals) -> anyhow::Result<ExitCode> {
    // Pending signals are delivered (with their default action) once unblocked.
    signals.restore_default();
    let cpus = a.cpus.unwrap_or(host_cores().max(4));
    if let Some(fd) = a.resume_fd {
        return resume(fd, a.json).map(|()| ExitCode::SUCCESS);
    }
    let rt = Builder::new()
        .cpus(cpus)
        .park_policy(a.park.into())
        .build()?;
    let image = |h: &usmp::Handle, _: &usmp::Handoff| h.generation();
    let (report, next) = if a.crash {
        // The panic happens on a CPU (CPU 1 when there is one), which then reboots.
        let h = rt.handle();
        rt.run_on(1.min(cpus - 1), move || {
            h.crash_kexec("usmp kexec --crash", image)
                .map(|o| (o.report, o.next))
        })?
        .join()??
    } else {
        // From outside the runtime: the path migrates to the reboot CPU (0) itself.
        let o = rt.kexec(None, image)?;
        (o.report, o.next)
    };
    if a.exec {
        let rec = report.record.clone().ok_or_else(|| {
            anyhow!("--exec needs --crash (an orderly kexec has no crash record)")
        })?;
        drop(next);
        let fd = usmp::exec::seal_record(&rec).context("sealing the crash record")?;
        let exe = std::env::current_exe().context("finding this binary")?;
        // A closed stderr must not stop the handoff.
        let _ = writeln!(
            std::io::stderr(),
            "kexec: exec {} with the crash record in fd {}",
            exe.display(),
            fd.as_raw_fd()
        );
        let mut cmd = std::process::Command::new(exe);
        cmd.args([
            "kexec",
            "--cpus",
            &cpus.to_string(),
            "--resume-fd",
            &fd.as_raw_fd().to_string(),
        ]);
        if a.json {
            cmd.arg("--json");
        }
        let err = cmd.exec();
        return Err(anyhow!("execve failed: {err}"));
    }
    print_report(&mut std::io::stdout().lock(), &report, next.cpus(), a.json)
        .context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// Takes ownership of the `--resume-fd` argument: 3 or above, and open.
fn resume_fd(fd: i32) -> anyhow::Result<OwnedFd> {
    if fd <= 2 {
        return Err(anyhow!(
            "--resume-fd {fd}: must be an open fd of 3 or more (0-2 are stdin, stdout and stderr)"
        ));
    }
    // SAFETY: F_GETFD only queries the descriptor flags; it fails with EBADF if `fd` is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(anyhow!(
            "--resume-fd {fd}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is open (checked above) and above the standard streams; by the
    // `--resume-fd` contract the previous image handed it to this process to own, and nothing
    // in this process has opened or used it (this runs before the runtime or any file).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The next process image: prints the record, then boots what it hands over (its CPU count
/// wins over `--cpus`).
fn resume(fd: i32, json: bool) -> anyhow::Result<()> {
    let rec = usmp::exec::read_record(resume_fd(fd)?)?;
    let mut out = std::io::stdout().lock();
    let (failed, lost) = (rec.failed_mask(), rec.lost_mask());
    if !json {
        writeln!(
            out,
            "== crash record from generation {} (previous process image)",
            rec.generation
        )?;
        writeln!(out, "reason: {}", printable(&rec.reason))?;
        writeln!(
            out,
            "crashing CPU: {}; failed to stop: {}; lost: {}; park policy: {:?}",
            rec.crashing_cpu.map_or("none".into(), |c| c.to_string()),
            or_none(&failed),
            or_none(&lost),
            rec.park
        )?;
        for n in &rec.notes {
            writeln!(
                out,
                "  CPU{}: ip={:#x} sp={:#x} fp={:#x}",
                n.cpu, n.regs.ip, n.regs.sp, n.regs.fp
            )?;
        }
        out.flush()?;
    }
    // The record decides what boots: its CPUs minus the lost ones, at its next generation.
    let rt = usmp::exec::boot_next_image(Builder::new(), &rec)?;
    if json {
        let v = serde_json::json!({
            "generation": rt.generation(),
            "cpus_online_after": rt.online_mask().weight(),
            "cpus_lost": lost.to_string(),
            "handoff_us": (rec.handoff_at_ns.saturating_sub(rec.crashed_at_ns)) / 1000,
            "record": rec,
        });
        write_json(&mut out, &v)?;
    } else {
        writeln!(
            out,
            "== generation {} booted in a new process: CPUs {} online",
            rt.generation(),
            or_none(&rt.online_mask())
        )?;
    }
    Ok(())
}

/// A mask for people: the list, or "(none)" rather than nothing.
fn or_none(m: &usmp::CpuMask) -> String {
    m.to_list_or_none()
}

/// "3 (0-2)", or "(none)".
fn count_and_list(m: &usmp::CpuMask) -> String {
    if m.is_empty() {
        or_none(m)
    } else {
        format!("{} ({m})", m.weight())
    }
}

fn print_report(
    out: &mut impl Write,
    r: &KexecReport,
    cpus: usize,
    json: bool,
) -> std::io::Result<()> {
    if json {
        let v = serde_json::json!({
            "generation": r.generation,
            "cpus": cpus,
            "cpus_online_after": r.handed_over.weight(),
            "cpus_lost": r.lost.weight(),
            "lost": r.lost.to_string(),
            "handoff_us": r.handoff_us,
            "reboot_cpu": r.reboot_cpu,
            "timeline": r.timeline,
            "record": r.record,
        });
        return write_json(out, &v);
    }
    writeln!(out, "== kexec timeline")?;
    for e in &r.timeline {
        let who = e.cpu.map_or("   -".into(), |c| format!("CPU{c}"));
        writeln!(out, "{:>9} us  {who:>6}  {}", e.t_us, e.what)?;
    }
    writeln!(out, "== handoff to generation {}", r.generation)?;
    writeln!(out, "  reboot CPU:       {}", r.reboot_cpu)?;
    writeln!(
        out,
        "  CPUs handed over: {}",
        count_and_list(&r.handed_over)
    )?;
    writeln!(out, "  CPUs lost:        {}", count_and_list(&r.lost))?;
    writeln!(out, "  handoff time:     {} us", r.handoff_us)?;
    if let Some(rec) = &r.record {
        writeln!(
            out,
            "  crash record:     {} notes, reason \"{}\"",
            rec.notes.len(),
            printable(&rec.reason)
        )?;
    }
    Ok(())
}
