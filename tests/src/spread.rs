//! Bench verdicts that hold on a noisy machine: a figure measured over several rounds is its
//! median and range, and a control (the baseline measured against itself in the same rounds)
//! says how far noise alone moves a ratio. A verdict is given only when the median is farther
//! from the target than that noise.

/// A figure over several rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// The middle round (the upper middle for an even count).
    pub median: f64,
    /// The lowest round.
    pub min: f64,
    /// The highest round.
    pub max: f64,
    /// How many rounds.
    pub rounds: usize,
}

impl Spread {
    /// The spread of `values`; `None` when there are none (or one is NaN).
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Self {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
            rounds: v.len(),
        })
    }

    /// How far noise alone moves a median ratio, read off a control (a baseline against
    /// itself, the same statistic): how far its median is from 1, and at least half its range
    /// over the square root of its rounds (about the median's own uncertainty; a control
    /// whose median lands on 1 by chance does not make a noisy run look quiet).
    pub fn noise(&self) -> f64 {
        let spread = (self.max - self.min) / 2.0 / (self.rounds.max(1) as f64).sqrt();
        (self.median - 1.0).abs().max(spread)
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} [{:.3}–{:.3}]", self.median, self.min, self.max)
    }
}

/// Which side of a bound a ratio must be on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    /// The ratio is at least this (throughput).
    AtLeast(f64),
    /// The ratio is at most this (latency, CPU).
    AtMost(f64),
}

impl Bound {
    fn value(self) -> f64 {
        match self {
            Bound::AtLeast(v) | Bound::AtMost(v) => v,
        }
    }

    fn holds(self, ratio: f64) -> bool {
        match self {
            Bound::AtLeast(v) => ratio >= v,
            Bound::AtMost(v) => ratio <= v,
        }
    }
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::AtLeast(v) => write!(f, ">= {v}"),
            Bound::AtMost(v) => write!(f, "<= {v}"),
        }
    }
}

/// A target's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The median is inside the target, by more than the noise.
    Met,
    /// The median is outside the target, by more than the noise.
    Missed,
    /// The median is within the noise of the target: this run cannot tell.
    Undecided,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::Undecided => "undecided",
        })
    }
}

/// The verdict of `ratio` (per-round ratios of the agent against its baseline) on `bound`,
/// with `control` (per-round ratios of the baseline against itself) as the noise floor;
/// without a control the median alone decides.
pub fn verdict(ratio: &Spread, bound: Bound, control: Option<&Spread>) -> Verdict {
    let margin = (ratio.median - bound.value()).abs();
    if control.is_some_and(|c| c.noise() > margin) {
        return Verdict::Undecided;
    }
    if bound.holds(ratio.median) {
        Verdict::Met
    } else {
        Verdict::Missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_is_the_median_and_range_of_its_rounds() {
        let s = Spread::of(&[0.9, 1.1, 0.95, 1.0, 0.8]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.rounds), (0.95, 0.8, 1.1, 5));
        assert_eq!(s.to_string(), "0.950 [0.800–1.100]");
        // Half the range over √5 (0.067) is more than the median's 0.05 from 1.
        assert!(
            (s.noise() - 0.15 / 5f64.sqrt()).abs() < 1e-12,
            "{}",
            s.noise()
        );
        let off = Spread::of(&[1.08, 1.1, 1.12]).unwrap();
        assert!((off.noise() - 0.1).abs() < 1e-12, "{}", off.noise());
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[1.0, f64::NAN]), None);
        assert_eq!(Spread::of(&[2.0]).unwrap().median, 2.0);
    }

    #[test]
    fn a_verdict_is_given_only_beyond_the_noise_of_the_control() {
        let quiet = Spread::of(&[0.99, 1.0, 1.01]).unwrap();
        let noisy = Spread::of(&[0.87, 1.13, 1.15]).unwrap();
        let at = |m: f64| Spread {
            median: m,
            min: m,
            max: m,
            rounds: 5,
        };
        // Throughput at least 0.95 of the baseline.
        let bound = Bound::AtLeast(0.95);
        assert_eq!(verdict(&at(0.99), bound, Some(&quiet)), Verdict::Met);
        assert_eq!(verdict(&at(0.90), bound, Some(&quiet)), Verdict::Missed);
        // 0.99 is 0.04 above the bound, the control strays 0.13: it cannot tell.
        assert_eq!(verdict(&at(0.99), bound, Some(&noisy)), Verdict::Undecided);
        assert_eq!(verdict(&at(0.80), bound, Some(&noisy)), Verdict::Missed);
        // Without a control, the median decides.
        assert_eq!(verdict(&at(0.951), bound, None), Verdict::Met);
        // Latency at most 1.3 times the baseline.
        let bound = Bound::AtMost(1.3);
        assert_eq!(verdict(&at(1.1), bound, Some(&quiet)), Verdict::Met);
        assert_eq!(verdict(&at(1.5), bound, Some(&noisy)), Verdict::Missed);
        assert_eq!(verdict(&at(1.25), bound, Some(&noisy)), Verdict::Undecided);
        assert_eq!(bound.to_string(), "<= 1.3");
    }
}
