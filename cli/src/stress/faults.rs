//! `--faults LIST` -> the library's fault injector (`usmp::fault::Faults`) plus the faults a
//! scenario injects itself.
//!
//! | name | what | who injects it |
//! |---|---|---|
//! | `doorbell-delay[=MAX]` | senders wait 0..=MAX before ringing (default 200us) | library |
//! | `doorbell-drop[=N]` | 1 in N doorbell signals lost (default 4) | library |
//! | `preempt[=N]` | CPU threads yield or sleep up to 2 ms at 1 in N serve points (default 256) | library |
//! | `stop-call-delay[=D]` | a CPU whose job calls `send_stop`/`crash_stop` sleeps D at the call's entry, 1 call in 2 (default 2ms) | library |
//! | `slow-boot[=D]` | bring-ups sleep up to D before ALIVE (default 50ms) | scenario, via `Faults::set_boot_delay` |
//! | `irq-spin[=D]` | jobs spin up to D with irqs masked (default 2ms) | scenario |
//! | `nmi-block` | a CPU blocks its NMI too (wedged) | scenario, via `wedge_this_cpu` |
//!
//! `none` is the empty list. The library's four apply to every runtime a scenario builds; the
//! others are read by the scenarios that have a use for them (see each one's `--help` line).

use std::fmt;
use std::time::Duration;

/// Host-level preemption sleeps at most this long.
const PREEMPT_MAX_SLEEP: Duration = Duration::from_millis(2);

/// A parsed fault list. `None` / `false`: that fault is off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultSet {
    pub doorbell_delay: Option<Duration>,
    pub doorbell_drop: Option<u32>,
    pub preempt: Option<u32>,
    pub stop_call_delay: Option<Duration>,
    pub slow_boot: Option<Duration>,
    pub irq_spin: Option<Duration>,
    pub nmi_block: bool,
}

/// Why a fault list was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FaultListError {
    #[error("--faults: unknown fault '{0}' (valid: doorbell-delay, doorbell-drop, preempt, stop-call-delay, slow-boot, irq-spin, nmi-block, none)")]
    Unknown(String),
    #[error("--faults: {name}={value}: {why}")]
    BadValue {
        name: String,
        value: String,
        why: String,
    },
}

fn duration(name: &str, v: &str) -> Result<Duration, FaultListError> {
    humantime::parse_duration(v).map_err(|e| FaultListError::BadValue {
        name: name.into(),
        value: v.into(),
        why: format!("{e} (examples: 200us, 5ms)"),
    })
}

fn one_in(name: &str, v: &str) -> Result<u32, FaultListError> {
    match v.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(FaultListError::BadValue {
            name: name.into(),
            value: v.into(),
            why: "expected a whole number N >= 1 (one in N)".into(),
        }),
    }
}

impl FaultSet {
    /// Parses "doorbell-drop=8,preempt" (see the module doc); "none" or "" is the empty set.
    pub fn parse(list: &str) -> Result<FaultSet, FaultListError> {
        let mut f = FaultSet::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (item, None),
            };
            match (name, value) {
                ("none", None) => {}
                ("doorbell-delay", v) => {
                    f.doorbell_delay =
                        Some(v.map_or(Ok(Duration::from_micros(200)), |v| duration(name, v))?)
                }
                ("doorbell-drop", v) => {
                    f.doorbell_drop = Some(v.map_or(Ok(4), |v| one_in(name, v))?)
                }
                ("preempt", v) => f.preempt = Some(v.map_or(Ok(256), |v| one_in(name, v))?),
                ("stop-call-delay", v) => {
                    f.stop_call_delay =
                        Some(v.map_or(Ok(Duration::from_millis(2)), |v| duration(name, v))?)
                }
                ("slow-boot", v) => {
                    f.slow_boot =
                        Some(v.map_or(Ok(Duration::from_millis(50)), |v| duration(name, v))?)
                }
                ("irq-spin", v) => {
                    f.irq_spin =
                        Some(v.map_or(Ok(Duration::from_millis(2)), |v| duration(name, v))?)
                }
                ("nmi-block", None) => f.nmi_block = true,
                _ => return Err(FaultListError::Unknown(item.into())),
            }
        }
        Ok(f)
    }

    /// Switches the library-level faults on for one runtime (the others are the scenario's).
    pub fn apply(&self, faults: &usmp::fault::Faults<'_>, seed: u64) {
        faults.set_seed(seed);
        if let Some(d) = self.doorbell_delay {
            faults.set_doorbell_delay(d);
        }
        if let Some(n) = self.doorbell_drop {
            faults.set_doorbell_drop(n);
        }
        if let Some(n) = self.preempt {
            faults.set_preempt(n, PREEMPT_MAX_SLEEP);
        }
        if let Some(d) = self.stop_call_delay {
            faults.set_stop_call_delay(d);
        }
    }
}

/// The list in `--faults` syntax, with every value spelled out (for the replay command).
impl fmt::Display for FaultSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items = Vec::new();
        let us = |d: Duration| format!("{}us", d.as_micros());
        if let Some(d) = self.doorbell_delay {
            items.push(format!("doorbell-delay={}", us(d)));
        }
        if let Some(n) = self.doorbell_drop {
            items.push(format!("doorbell-drop={n}"));
        }
        if let Some(n) = self.preempt {
            items.push(format!("preempt={n}"));
        }
        if let Some(d) = self.stop_call_delay {
            items.push(format!("stop-call-delay={}", us(d)));
        }
        if let Some(d) = self.slow_boot {
            items.push(format!("slow-boot={}", us(d)));
        }
        if let Some(d) = self.irq_spin {
            items.push(format!("irq-spin={}", us(d)));
        }
        if self.nmi_block {
            items.push("nmi-block".into());
        }
        if items.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&items.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_print_parse_is_the_same_set() {
        let f = FaultSet::parse("doorbell-drop=8, preempt,slow-boot=1ms,nmi-block").unwrap();
        assert_eq!(f.doorbell_drop, Some(8));
        assert_eq!(f.preempt, Some(256));
        assert_eq!(f.slow_boot, Some(Duration::from_millis(1)));
        assert!(f.nmi_block);
        assert_eq!(FaultSet::parse(&f.to_string()).unwrap(), f);
        assert_eq!(FaultSet::parse("none").unwrap().to_string(), "none");
        assert!(FaultSet::parse("doorbell-drop=0").is_err());
        assert!(FaultSet::parse("gremlins").is_err());
    }
}
