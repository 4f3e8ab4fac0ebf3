//! Counts and how unlikely they are: the counts a ratio or a rate was made of (`Counts`), and the
//! exact binomial and Poisson tails that say whether they could have come from a given rate. A
//! leaf of pure math, shared by the features, the baselines and the judge's tests.

use statrs::function::beta::beta_reg;
use statrs::function::gamma::{gamma_lr, gamma_ur};

/// The counts behind a ratio or a rate. One failed request among thirty is a ratio of 3.3%, and
/// also a count that is entirely ordinary at a 0.1% rate: a count-aware score counts a value
/// outside its band only when its counts could hardly have come from the band's edge (`beyond`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Counts {
    /// `events` of `trials` (failed requests of all requests, an operation's requests of the
    /// app's): a binomial proportion.
    Of { events: u64, trials: u64 },
    /// `events` over an `exposure` (calls per request, exceptions per second): a Poisson rate.
    Per { events: u64, exposure: f64 },
}

/// A rate judged above its baseline must rest on at least this many events: below it, no window
/// is evidence of a rise, whatever its ratio (one failure among a handful of requests).
pub const MIN_EVENTS: u64 = 3;

impl Counts {
    /// The events counted.
    pub fn events(self) -> u64 {
        match self {
            Counts::Of { events, .. } | Counts::Per { events, .. } => events,
        }
    }

    /// Whether these counts could hardly have come from `rate` (a proportion, or events per
    /// unit of exposure): `above` it, at least `MIN_EVENTS` events with a chance under `alpha`
    /// of as many or more; below it, a chance under `alpha` of as few or fewer.
    pub fn beyond(self, rate: f64, above: bool, alpha: f64) -> bool {
        let rate = rate.max(0.0);
        let chance = match (self, above) {
            (_, true) if self.events() < MIN_EVENTS => return false,
            (Counts::Of { events, trials }, true) => binomial_at_least(events, trials, rate.min(1.0)),
            (Counts::Of { events, trials }, false) => binomial_at_most(events, trials, rate.min(1.0)),
            (Counts::Per { events, exposure }, true) => poisson_at_least(events, rate * exposure),
            (Counts::Per { events, exposure }, false) => poisson_at_most(events, rate * exposure),
        };
        chance < alpha
    }
}

/// P(X >= k) for X ~ Binomial(n, p).
pub fn binomial_at_least(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    beta_reg(k as f64, (n - k + 1) as f64, p).clamp(0.0, 1.0)
}

/// P(X <= k) for X ~ Binomial(n, p).
pub fn binomial_at_most(k: u64, n: u64, p: f64) -> f64 {
    if k >= n || p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    beta_reg((n - k) as f64, (k + 1) as f64, 1.0 - p).clamp(0.0, 1.0)
}

/// P(X >= k) for X ~ Poisson(mean).
pub fn poisson_at_least(k: u64, mean: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if mean <= 0.0 {
        return 0.0;
    }
    gamma_lr(k as f64, mean).clamp(0.0, 1.0)
}

/// P(X <= k) for X ~ Poisson(mean).
pub fn poisson_at_most(k: u64, mean: f64) -> f64 {
    if mean <= 0.0 {
        return 1.0;
    }
    gamma_ur(k as f64 + 1.0, mean).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use statrs::function::factorial::ln_binomial;

    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-300)
    }

    #[test]
    fn binomial_tails_match_direct_sums() {
        let (n, p) = (20u64, 0.1f64);
        let pmf = |k: u64| (ln_binomial(n, k) + k as f64 * p.ln() + (n - k) as f64 * (1.0 - p).ln()).exp();
        for k in 0..=n {
            let at_least: f64 = (k..=n).map(pmf).sum();
            let at_most: f64 = (0..=k).map(pmf).sum();
            assert!(close(binomial_at_least(k, n, p), at_least, 1e-9), "k={k}");
            assert!(close(binomial_at_most(k, n, p), at_most, 1e-9), "k={k}");
        }
    }

    #[test]
    fn poisson_tails_match_direct_sums() {
        let pmf = |k: u64, mean: f64| (0..k).fold((-mean).exp(), |p, i| p * mean / (i + 1) as f64);
        for mean in [0.3, 2.0, 17.5] {
            for k in 0..30u64 {
                let below: f64 = (0..=k).map(|i| pmf(i, mean)).sum();
                let above: f64 = (k + 1..k + 200).map(|i| pmf(i, mean)).sum();
                assert!(close(poisson_at_most(k, mean), below, 1e-9), "{k} {mean}");
                assert!(close(poisson_at_least(k + 1, mean), above, 1e-9), "{k} {mean}");
            }
        }
        assert_eq!(poisson_at_least(0, 0.0), 1.0);
        assert_eq!(poisson_at_least(1, 0.0), 0.0);
    }

    #[test]
    fn a_rise_needs_enough_events_and_a_small_enough_chance() {
        let one_in_thirty = Counts::Of {
            events: 1,
            trials: 30,
        };
        assert!(!one_in_thirty.beyond(0.0, true, 0.001), "fewer than MIN_EVENTS");
        let four_in_thirty = Counts::Of {
            events: 4,
            trials: 30,
        };
        assert!(four_in_thirty.beyond(0.001, true, 0.001));
        assert!(!four_in_thirty.beyond(0.05, true, 0.001));
        // None in a minute where ten a second were the band's floor: a drop needs no events.
        let none = Counts::Per {
            events: 0,
            exposure: 60.0,
        };
        assert!(none.beyond(10.0, false, 0.001));
        assert!(!none.beyond(0.05, false, 0.001));
    }
}
