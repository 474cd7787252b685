//! Flag values more than one command takes, parsed and checked in one place. A value parser's
//! refusal is a clap usage error: one line on stderr and exit 2 (`main.rs`), naming the flag.

use usmp::{ParkPolicy, StopMode, MAX_CPUS};

/// `--cpus N`: a whole number from `MIN` (the fewest the command runs on) to the library's
/// [`MAX_CPUS`]. Parsed as a signed number so `-1` says what is wrong with it, not that `-` is
/// not a digit.
pub fn cpus<const MIN: usize>(s: &str) -> Result<usize, String> {
    let n: i64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if (MIN as i64..=MAX_CPUS as i64).contains(&n) {
        Ok(n as usize)
    } else {
        Err(format!("must be between {MIN} and {MAX_CPUS}"))
    }
}

/// The host's cores (1 if unknown): `--cpus` defaults are multiples of it.
pub fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `--park`: what stopped CPUs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Park {
    /// Power off: the next image can bring them up again.
    PowerOff,
    /// Spin parked: lost to the next image.
    Spin,
}

impl From<Park> for ParkPolicy {
    fn from(p: Park) -> ParkPolicy {
        match p {
            Park::PowerOff => ParkPolicy::PowerOff,
            Park::Spin => ParkPolicy::Spin,
        }
    }
}

/// `--mode`: the stop modes a `usmp stress` scenario that stops CPUs runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `StopMode::BestEffort` only.
    BestEffort,
    /// `StopMode::Deterministic` only.
    Deterministic,
    /// Both, alternating round by round.
    Both,
}

impl Mode {
    pub fn modes(self) -> Vec<StopMode> {
        match self {
            Mode::BestEffort => vec![StopMode::BestEffort],
            Mode::Deterministic => vec![StopMode::Deterministic],
            Mode::Both => vec![StopMode::BestEffort, StopMode::Deterministic],
        }
    }

    /// The name `--mode` takes (for the replay command).
    pub fn name(self) -> &'static str {
        match self {
            Mode::BestEffort => "best-effort",
            Mode::Deterministic => "deterministic",
            Mode::Both => "both",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn cpus_takes_min_to_max_and_says_why_not() {
        assert_eq!(cpus::<1>("1"), Ok(1));
        assert_eq!(cpus::<1>(&MAX_CPUS.to_string()), Ok(MAX_CPUS));
        assert_eq!(cpus::<2>("2"), Ok(2));
        for bad in ["0", "-1", &(MAX_CPUS + 1).to_string()] {
            assert_eq!(
                cpus::<1>(bad),
                Err(format!("must be between 1 and {MAX_CPUS}")),
                "{bad}"
            );
        }
        assert_eq!(
            cpus::<2>("1"),
            Err(format!("must be between 2 and {MAX_CPUS}"))
        );
        assert!(cpus::<1>("x").unwrap_err().contains("invalid digit"));
    }

    #[test]
    fn value_names_are_the_documented_ones() {
        let names = |v: &[Mode]| -> Vec<String> {
            v.iter()
                .map(|m| m.to_possible_value().unwrap().get_name().to_string())
                .collect()
        };
        assert_eq!(
            names(Mode::value_variants()),
            ["best-effort", "deterministic", "both"]
        );
        for m in Mode::value_variants() {
            assert_eq!(m.to_possible_value().unwrap().get_name(), m.name());
        }
        let park: Vec<_> = Park::value_variants()
            .iter()
            .map(|p| p.to_possible_value().unwrap().get_name().to_string())
            .collect();
        assert_eq!(park, ["power-off", "spin"]);
    }
}
