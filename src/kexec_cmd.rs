//! `usmp kexec`: an orderly or crash kexec with a timeline and a final table; `--exec` hands
//! the crash record to a real new process image through a sealed memfd.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;

use anyhow::{anyhow, Context};
use clap::Args;
use usmp::{Builder, KexecReport, ParkPolicy, MAX_CPUS};

#[derive(Args)]
pub struct KexecArgs {
    /// Crash-kexec (crash-stop with retries and the NMI fallback) instead of an orderly kexec.
    #[arg(long)]
    crash: bool,
    /// Logical CPUs, 1 to 1024 [default: max(host cores, 4)].
    #[arg(long, value_name = "N")]
    cpus: Option<usize>,
    /// What stopped CPUs do: power-off (the next image can use them) or spin (lost).
    #[arg(long, value_name = "POLICY", default_value = "power-off")]
    park: String,
    /// Hand over to a real new process (execve of this binary) with the crash record.
    #[arg(long)]
    exec: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// (internal) the fd holding a crash record from the previous process image.
    #[arg(long, value_name = "FD", hide = true)]
    resume_fd: Option<i32>,
}

pub fn kexec(a: KexecArgs) -> anyhow::Result<()> {
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = a.cpus.unwrap_or(host.max(4));
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(anyhow!(
            "--cpus must be between 1 and {MAX_CPUS}, got {cpus}"
        ));
    }
    let park = match a.park.as_str() {
        "power-off" => ParkPolicy::PowerOff,
        "spin" => ParkPolicy::Spin,
        p => return Err(anyhow!("--park must be power-off or spin, got '{p}'")),
    };
    if let Some(fd) = a.resume_fd {
        return resume(fd, cpus, a.json);
    }
    let rt = Builder::new().cpus(cpus).park_policy(park).build()?;
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
        let fd = usmp::kexec::exec::seal_record(&rec).context("sealing the crash record")?;
        let exe = std::env::current_exe().context("finding this binary")?;
        eprintln!(
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
    print_report(&report, next.cpus(), a.json);
    Ok(())
}

fn resume(fd: i32, cpus: usize, json: bool) -> anyhow::Result<()> {
    let rec = usmp::kexec::exec::read_record(fd)?;
    if !json {
        println!(
            "== crash record from generation {} (previous process image)",
            rec.generation
        );
        println!("reason: {}", rec.reason);
        println!(
            "crashing CPU: {}; failed to stop: {}; lost: {}; park policy: {:?}",
            rec.crashing_cpu.map_or("none".into(), |c| c.to_string()),
            if rec.failed.is_empty() {
                "none"
            } else {
                &rec.failed
            },
            if rec.lost.is_empty() {
                "none"
            } else {
                &rec.lost
            },
            rec.park
        );
        for n in &rec.notes {
            println!(
                "  CPU{}: ip={:#x} sp={:#x} fp={:#x}",
                n.cpu, n.regs.ip, n.regs.sp, n.regs.fp
            );
        }
    }
    let rt = Builder::new().cpus(cpus).build()?;
    if json {
        let v = serde_json::json!({
            "generation": rec.generation + 1,
            "cpus_online_after": rt.online_mask().weight(),
            "cpus_lost": rec.lost,
            "handoff_us": (rec.handoff_at_ns.saturating_sub(rec.crashed_at_ns)) / 1000,
            "record": rec,
        });
        println!("{v}");
    } else {
        println!(
            "== generation {} booted in a new process: CPUs {} online",
            rec.generation + 1,
            rt.online_mask()
        );
    }
    Ok(())
}

fn print_report(r: &KexecReport, cpus: usize, json: bool) {
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
        println!("{v}");
        return;
    }
    println!("== kexec timeline");
    for e in &r.timeline {
        let who = e.cpu.map_or("   -".into(), |c| format!("CPU{c}"));
        println!("{:>9} us  {who:>6}  {}", e.t_us, e.what);
    }
    println!("== handoff to generation {}", r.generation);
    println!("  reboot CPU:       {}", r.reboot_cpu);
    println!(
        "  CPUs handed over: {} ({})",
        r.handed_over.weight(),
        r.handed_over
    );
    println!(
        "  CPUs lost:        {} ({})",
        r.lost.weight(),
        if r.lost.is_empty() {
            "none".to_string()
        } else {
            r.lost.to_string()
        }
    );
    println!("  handoff time:     {} us", r.handoff_us);
    if let Some(rec) = &r.record {
        println!(
            "  crash record:     {} notes, reason {:?}",
            rec.notes.len(),
            rec.reason
        );
    }
}
