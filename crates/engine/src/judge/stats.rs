//! The statistical tests the checks are built from, exact where counts are small.
//!
//! Every test here answers one-sided "is the canary worse" questions (two-sided where a change in
//! either direction is a fault, such as calls per request) with a p-value; `z_of` turns it into the
//! equivalent normal deviate, which is what checks report as their statistic.

use statrs::distribution::{Beta, ChiSquared, ContinuousCDF, Normal};

use crate::counts::{binomial_at_least, binomial_at_most};

/// ln(n choose k), for `k <= n`.
fn ln_binomial(n: u64, k: u64) -> f64 {
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

/// Below this, ln(n!) comes from a table; from it on, from Stirling's series.
const LN_FACTORIAL_TABLE: usize = 256;

/// ln(n!): from a table of sums of logarithms, then from Stirling's series to the n^-5 term,
/// whose error from 256 on is below 1e-20 (a Fisher test's terms take six of these each, and
/// statrs' general log-gamma costs several times as much).
fn ln_factorial(n: u64) -> f64 {
    static TABLE: std::sync::LazyLock<[f64; LN_FACTORIAL_TABLE]> = std::sync::LazyLock::new(|| {
        let mut table = [0.0; LN_FACTORIAL_TABLE];
        for i in 2..LN_FACTORIAL_TABLE {
            table[i] = table[i - 1] + (i as f64).ln();
        }
        table
    });
    if let Some(&exact) = TABLE.get(n as usize) {
        return exact;
    }
    let n = n as f64;
    let (inv, inv2) = (1.0 / n, 1.0 / (n * n));
    n * n.ln() - n
        + 0.5 * (std::f64::consts::TAU * n).ln()
        + inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))
}

/// Smallest p-value reported: below it every decision is the same and the normal deviate stays finite.
pub const MIN_P: f64 = 1e-300;

/// Fisher's exact test, one-sided: the chance that the canary, holding `n_c` of the `n_c + n_s`
/// trials, would hold `x_c` or more of the `x_c + x_s` successes if both shared one rate.
///
/// Summed from `x_c` upwards with the terms' ratio recurrence, stopping once they no longer add to
/// the sum, so that it costs tens of terms, not thousands, at the counts a second of traffic gives.
pub fn fisher_greater(x_c: u64, n_c: u64, x_s: u64, n_s: u64) -> f64 {
    match fisher_tail(x_c, n_c, x_s, n_s, None) {
        Tail::Sum(p) => p,
        Tail::Below(_) => unreachable!("only asked with a level"),
    }
}

/// Whether `fisher_greater(x_c, n_c, x_s, n_s) < alpha`, summing only until that is settled: the
/// sum has reached `alpha`, or what is left of it cannot reach it. A power question asks this at
/// counts far past the data (where the sum would take thousands of terms) and needs no more.
pub fn fisher_greater_below(x_c: u64, n_c: u64, x_s: u64, n_s: u64, alpha: f64) -> bool {
    match fisher_tail(x_c, n_c, x_s, n_s, Some(alpha)) {
        Tail::Sum(p) => p < alpha,
        Tail::Below(below) => below,
    }
}

enum Tail {
    Sum(f64),
    /// Settled against the level before the sum was done.
    Below(bool),
}

/// The hypergeometric upper tail, summed from `x_c` upwards with the terms' ratio recurrence,
/// stopping once the terms no longer add to the sum or, given `level`, once the sum is known to
/// lie above or below it.
fn fisher_tail(x_c: u64, n_c: u64, x_s: u64, n_s: u64, level: Option<f64>) -> Tail {
    let population = n_c + n_s;
    let successes = x_c + x_s;
    if population == 0 || successes == 0 || n_c == 0 {
        return Tail::Sum(1.0);
    }
    let draws = n_c;
    let lowest = (draws + successes).saturating_sub(population);
    let highest = draws.min(successes);
    if x_c <= lowest {
        return Tail::Sum(1.0);
    }
    if x_c > highest {
        return Tail::Sum(0.0);
    }
    let ln_term = ln_binomial(successes, x_c) + ln_binomial(population - successes, draws - x_c)
        - ln_binomial(population, draws);
    let mut term = ln_term.exp();
    let mut sum = term;
    let mut i = x_c;
    while i < highest {
        // i >= lowest keeps the last factor at 1 or more; ordered so that no step goes below 0.
        let ratio = ((successes - i) as f64 * (draws - i) as f64)
            / ((i + 1) as f64 * (population - successes + i + 1 - draws) as f64);
        if let Some(level) = level {
            if sum >= level {
                return Tail::Below(false);
            }
            // The ratio only falls as i grows, so the terms left add up to less than a geometric
            // series from this one.
            if ratio < 1.0 && sum + term * ratio / (1.0 - ratio) < level {
                return Tail::Below(true);
            }
        }
        term *= ratio;
        sum += term;
        i += 1;
        if term <= sum * 1e-16 {
            break;
        }
    }
    Tail::Sum(sum.clamp(0.0, 1.0))
}

/// Compares two event counts per unit of exposure (calls per request, exceptions per request):
/// given `x_c + x_s` events in all, the canary's share is Binomial with the canary's share of the
/// exposure when both have the same rate. Returns (P(as many or more), P(as few or fewer)).
pub fn rate_tails(x_c: f64, exposure_c: f64, x_s: f64, exposure_s: f64) -> (f64, f64) {
    let x_c = x_c.max(0.0).round() as u64;
    let x_s = x_s.max(0.0).round() as u64;
    let total = x_c + x_s;
    if exposure_c <= 0.0 || exposure_s <= 0.0 || total == 0 {
        return (1.0, 1.0);
    }
    let share = exposure_c / (exposure_c + exposure_s);
    (
        binomial_at_least(x_c, total, share),
        binomial_at_most(x_c, total, share),
    )
}

/// Pearson's chi-square test of homogeneity: whether two samples' counts over the same categories
/// (`a[i]`, `b[i]`) come from one distribution, both samples being random (neither's shares are
/// taken as known). Categories where either sample would expect fewer than 5 are pooled, as the
/// test needs. Returns (statistic, degrees of freedom, p-value).
pub fn chi_square_homogeneity(a: &[f64], b: &[f64]) -> Option<(f64, u64, f64)> {
    let (n_a, n_b): (f64, f64) = (a.iter().sum(), b.iter().sum());
    let n = n_a + n_b;
    if a.len() != b.len() || n_a <= 0.0 || n_b <= 0.0 {
        return None;
    }
    // Per category (after pooling the thin ones): counts of a, counts of b.
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let mut pooled = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let total = x + y;
        if (n_a.min(n_b) * total / n) < 5.0 {
            pooled = (pooled.0 + x, pooled.1 + y);
        } else {
            cells.push((*x, *y));
        }
    }
    if pooled.0 + pooled.1 > 0.0 {
        cells.push(pooled);
    }
    if cells.len() < 2 {
        return None;
    }
    let statistic: f64 = cells
        .iter()
        .map(|(x, y)| {
            let total = x + y;
            let (e_a, e_b) = (n_a * total / n, n_b * total / n);
            let term = |o: f64, e: f64| if e > 0.0 { (o - e).powi(2) / e } else { 0.0 };
            term(*x, e_a) + term(*y, e_b)
        })
        .sum();
    let df = cells.len() as u64 - 1;
    let p = ChiSquared::new(df as f64).ok()?.sf(statistic);
    Some((statistic, df, p.clamp(0.0, 1.0)))
}

/// Clopper-Pearson bounds on a proportion from `x` successes in `n` trials, each one-sided at
/// `confidence`: (lower, upper).
pub fn proportion_bounds(x: u64, n: u64, confidence: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let x = x.min(n);
    let alpha = (1.0 - confidence).clamp(1e-12, 0.5);
    let lower = if x == 0 {
        0.0
    } else {
        Beta::new(x as f64, (n - x + 1) as f64).map_or(0.0, |b| b.inverse_cdf(alpha))
    };
    let upper = if x == n {
        1.0
    } else {
        Beta::new((x + 1) as f64, (n - x) as f64).map_or(1.0, |b| b.inverse_cdf(1.0 - alpha))
    };
    (lower, upper)
}

/// The normal deviate with upper-tail probability `p`: 0 at 0.5, about 4.75 at 1e-6.
pub fn z_of(p: f64) -> f64 {
    let p = p.clamp(MIN_P, 1.0);
    let normal = Normal::standard();
    -normal.inverse_cdf(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-300)
    }

    #[test]
    fn ln_factorial_agrees_with_statrs_everywhere() {
        let mut n = 0u64;
        while n < 1 << 40 {
            let ours = ln_factorial(n);
            let theirs = statrs::function::factorial::ln_factorial(n);
            assert!(
                (ours - theirs).abs() <= 1e-13 * theirs.abs().max(1.0),
                "{n}: {ours} != {theirs}"
            );
            n = if n < 1_000 { n + 1 } else { n + n / 7 };
        }
    }

    #[test]
    fn fisher_matches_the_hypergeometric_sum() {
        // 10 of 200 canary requests failed, 2 of 1800 stable ones.
        let (x_c, n_c, x_s, n_s) = (10u64, 200u64, 2u64, 1800u64);
        let (pop, succ) = (n_c + n_s, x_c + x_s);
        let direct: f64 = (x_c..=succ)
            .map(|i| (ln_binomial(succ, i) + ln_binomial(pop - succ, n_c - i) - ln_binomial(pop, n_c)).exp())
            .sum();
        assert!(close(fisher_greater(x_c, n_c, x_s, n_s), direct, 1e-9));
        assert!(direct < 1e-7, "strong evidence: {direct}");
        // The same proportion on both sides is no evidence at all.
        assert!(fisher_greater(2, 200, 18, 1800) > 0.4);
        assert_eq!(fisher_greater(0, 200, 18, 1800), 1.0);
    }

    #[test]
    fn fisher_matches_the_direct_sum_on_every_small_table() {
        for n_c in 0..7u64 {
            for n_s in 0..7u64 {
                for x_c in 0..=n_c {
                    for x_s in 0..=n_s {
                        let (pop, succ) = (n_c + n_s, x_c + x_s);
                        let direct: f64 = (x_c..=succ.min(n_c))
                            .filter(|i| succ - i <= n_s)
                            .map(|i| {
                                (ln_binomial(succ, i) + ln_binomial(pop - succ, n_c - i)
                                    - ln_binomial(pop, n_c))
                                .exp()
                            })
                            .sum();
                        let expected = if succ == 0 || n_c == 0 {
                            1.0
                        } else {
                            direct.min(1.0)
                        };
                        let got = fisher_greater(x_c, n_c, x_s, n_s);
                        assert!(
                            (got - expected).abs() < 1e-9,
                            "{x_c}/{n_c} vs {x_s}/{n_s}: {got} != {expected}"
                        );
                    }
                }
            }
        }
    }

    /// The early answer agrees with the whole sum on every table tried, small and large, at
    /// levels near the p-value and far from it.
    #[test]
    fn fisher_below_a_level_answers_as_the_whole_sum_does() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound.max(1)
        };
        for round in 0..20_000 {
            let scale = [10, 1_000, 100_000, 10_000_000][round % 4];
            let (n_c, n_s) = (next(scale) + 1, next(scale) + 1);
            let (x_c, x_s) = (next(n_c + 1), next(n_s + 1));
            let p = fisher_greater(x_c, n_c, x_s, n_s);
            // Near the p-value, down to where it loses precision to underflow (levels of 1 or more mean
            // nothing: the sum is clamped there).
            let near = if p > 1e-200 && p < 0.5 {
                [p * 0.99, p * 1.01]
            } else {
                [1e-9; 2]
            };
            for level in [1e-9, 1e-4, 0.01, 0.3].into_iter().chain(near) {
                assert_eq!(
                    fisher_greater_below(x_c, n_c, x_s, n_s, level),
                    p < level,
                    "{x_c}/{n_c} vs {x_s}/{n_s} at {level}: p = {p}"
                );
            }
        }
    }

    #[test]
    fn fisher_stays_fast_and_exact_on_large_counts() {
        // Half of the requests above the stable median: what a latency check sees each second.
        let p = fisher_greater(5_000, 10_000, 45_000, 90_000);
        assert!(p > 0.4 && p < 0.6, "{p}");
        let p = fisher_greater(6_000, 10_000, 45_000, 90_000);
        assert!(p < 1e-50, "{p}");
    }

    #[test]
    fn rate_tails_see_both_directions() {
        // 2 calls per request on the canary against 1 on the stable.
        let (up, down) = rate_tails(400.0, 200.0, 1800.0, 1800.0);
        assert!(up < 1e-20 && down > 0.99);
        let (up, down) = rate_tails(100.0, 200.0, 1800.0, 1800.0);
        assert!(down < 1e-10 && up > 0.99);
        assert_eq!(rate_tails(0.0, 10.0, 0.0, 10.0), (1.0, 1.0));
    }

    #[test]
    fn chi_square_homogeneity_takes_both_samples_as_random() {
        // A 2x2 table: 30/70 against 50/50, with 100 each: chi-square 8.33 on one degree.
        let (stat, df, p) = chi_square_homogeneity(&[30.0, 70.0], &[50.0, 50.0]).expect("a test");
        assert!(close(stat, 8.3333, 1e-4) && df == 1, "{stat} {df}");
        assert!(close(p, 0.003892, 1e-3), "{p}");
        // The same shares make no difference, whatever the sizes.
        let (_, _, p) = chi_square_homogeneity(&[10.0, 30.0, 60.0], &[100.0, 300.0, 600.0]).expect("a test");
        assert!(p > 0.999, "{p}");
        let (_, df, p) = chi_square_homogeneity(&[10.0, 30.0, 60.0], &[400.0, 300.0, 300.0]).expect("a test");
        assert!(df == 2 && p < 1e-10, "{p}");
        assert_eq!(chi_square_homogeneity(&[5.0], &[5.0]), None);
    }

    #[test]
    fn proportion_bounds_hold_the_estimate() {
        let (lo, hi) = proportion_bounds(0, 3000, 0.95);
        assert_eq!(lo, 0.0);
        assert!(close(hi, 3.0 / 3000.0, 0.01), "rule of three: {hi}");
        let (lo, hi) = proportion_bounds(50, 1000, 0.95);
        assert!(lo < 0.05 && hi > 0.05 && lo > 0.035 && hi < 0.068);
    }

    #[test]
    fn z_of_is_the_normal_deviate() {
        assert!(z_of(0.5).abs() < 1e-9);
        assert!(close(z_of(1e-6), 4.753, 1e-3));
        assert!(z_of(0.0).is_finite());
    }
}
