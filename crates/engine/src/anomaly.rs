//! When a version's feature has left its own baseline, and when it has come back.
//!
//! Each version baseline carries an `AnomalyState`. A window's score opens an anomaly when it is
//! at least `detect_score` for `detect_windows` windows in a row, or at once when it reaches
//! `gross_score`; an open anomaly resolves after `resolve_windows` windows in a row under
//! `resolve_score`. The gap between the two thresholds and the streaks are the hysteresis that
//! keeps one noisy window from flapping. Windows whose value rests on fewer than `min_support`
//! events (requests, calls, samples) neither open nor resolve anything: a 50% error ratio over two
//! requests is not evidence.

use serde::{Deserialize, Serialize};

use crate::observation::EventTime;
use crate::score::Score;

/// The thresholds of anomaly detection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnomalyRules {
    pub detect_score: f64,
    pub detect_windows: u32,
    pub gross_score: f64,
    pub resolve_score: f64,
    pub resolve_windows: u32,
    pub min_support: u64,
    /// Half-life, in event time, of the memory of the largest recent score (the "recent peak");
    /// 0 turns novelty gating off. A series that deviates in bursts (periodic spikes, a bursty
    /// sensor) keeps opening anomalies that say nothing new: with gating, a deviation opens one
    /// only when it is novel, that is when `1 + score` reaches `novelty_ratio` times `1 + peak`.
    /// Below 1, a deviation as large as the last one is still novel; only clearly smaller
    /// aftershocks of a recent one are held back.
    #[serde(default)]
    pub novelty_half_life_ns: u64,
    /// See `novelty_half_life_ns`: how large, against the recent peak, a new deviation must be.
    #[serde(default)]
    pub novelty_ratio: f64,
}

impl Default for AnomalyRules {
    fn default() -> Self {
        AnomalyRules {
            detect_score: 3.0,
            detect_windows: 2,
            gross_score: 10.0,
            resolve_score: 1.0,
            resolve_windows: 8,
            min_support: 20,
            novelty_half_life_ns: 0,
            novelty_ratio: 0.7,
        }
    }
}

/// Whether a feature is anomalous, and the streak towards changing that.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnomalyState {
    pub active: bool,
    /// Consecutive windows that point towards the other state.
    pub streak: u32,
    /// When the current anomaly was detected (event time of its deciding window's end).
    pub since: EventTime,
    /// The largest recent score, decayed with `novelty_half_life_ns` since `peak_time` (see
    /// `AnomalyRules::novelty_half_life_ns`). Left out of this type's serde shape, which format 1
    /// of the store froze; the store keeps it in a record of its own layout.
    #[serde(skip)]
    pub peak: f64,
    #[serde(skip)]
    pub peak_time: EventTime,
}

/// A change of anomaly state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Detected,
    Resolved,
}

impl AnomalyState {
    /// Takes one window's score into account; returns the transition it caused, if any.
    pub fn update(
        &mut self,
        score: Score,
        support: u64,
        time: EventTime,
        rules: &AnomalyRules,
    ) -> Option<Transition> {
        let Score::Scored(score) = score else {
            return None;
        };
        if support < rules.min_support {
            return None;
        }
        let novel = self.novel(score, time, rules);
        if self.active {
            self.streak = if score < rules.resolve_score {
                self.streak + 1
            } else {
                0
            };
            if self.streak >= rules.resolve_windows {
                *self = AnomalyState {
                    active: false,
                    streak: 0,
                    since: 0,
                    ..*self
                };
                return Some(Transition::Resolved);
            }
        } else {
            self.streak = if score >= rules.detect_score {
                self.streak + 1
            } else {
                0
            };
            if novel && (self.streak >= rules.detect_windows || score >= rules.gross_score) {
                *self = AnomalyState {
                    active: true,
                    streak: 0,
                    since: time,
                    ..*self
                };
                return Some(Transition::Detected);
            }
        }
        None
    }

    /// Whether `score` is novel against the recent peak (always, with gating off); then learns it
    /// into the peak. Scores are compared as `ln(1 + score)`: band scores span many orders of
    /// magnitude (a band of almost no width makes any wiggle huge), and what matters is the ratio.
    fn novel(&mut self, score: f64, time: EventTime, rules: &AnomalyRules) -> bool {
        if rules.novelty_half_life_ns == 0 {
            return true;
        }
        let elapsed = time.saturating_sub(self.peak_time) as f64;
        let decay = 0.5f64.powf(elapsed / rules.novelty_half_life_ns as f64);
        let peak = self.peak * decay;
        let score = score.max(0.0);
        let novel = score.ln_1p() >= peak.ln_1p() + rules.novelty_ratio.max(f64::MIN_POSITIVE).ln();
        self.peak = peak.max(score);
        self.peak_time = self.peak_time.max(time);
        novel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds (score, support) windows; returns the transitions with their window index.
    fn check(windows: &[(f64, u64)]) -> Vec<(usize, Transition)> {
        let mut state = AnomalyState::default();
        let rules = AnomalyRules::default();
        windows
            .iter()
            .enumerate()
            .filter_map(|(i, (score, support))| {
                state
                    .update(Score::Scored(*score), *support, i as u64, &rules)
                    .map(|t| (i, t))
            })
            .collect()
    }

    #[test]
    fn one_noisy_window_opens_nothing() {
        assert_eq!(
            check(&[(0.0, 100), (4.0, 100), (0.5, 100), (5.0, 100), (0.0, 100)]),
            vec![]
        );
    }

    #[test]
    fn a_sustained_deviation_opens_and_a_sustained_return_resolves() {
        let quiet = AnomalyRules::default().resolve_windows as usize;
        let mut windows = vec![(4.0, 100), (4.0, 100), (2.0, 100), (0.5, 100), (2.0, 100)];
        windows.extend(std::iter::repeat_n((0.2, 100), quiet));
        assert_eq!(
            check(&windows),
            vec![(1, Transition::Detected), (4 + quiet, Transition::Resolved)],
            "a window at 2 half-widths breaks the quiet streak; {quiet} quiet ones resolve"
        );
    }

    #[test]
    fn a_gross_deviation_opens_at_once() {
        assert_eq!(check(&[(0.0, 100), (25.0, 100)]), vec![(1, Transition::Detected)]);
    }

    #[test]
    fn thin_evidence_is_ignored() {
        assert_eq!(check(&[(50.0, 3), (50.0, 3), (50.0, 3)]), vec![]);
    }

    /// Rules with novelty gating: a one-hour half-life, 0.7 of the recent peak.
    fn gated() -> AnomalyRules {
        AnomalyRules {
            detect_windows: 1,
            resolve_windows: 1,
            novelty_half_life_ns: 3_600 * 1_000_000_000,
            novelty_ratio: 0.7,
            ..AnomalyRules::default()
        }
    }

    /// Feeds one score per minute; returns the indices of the detections.
    fn detections(rules: &AnomalyRules, scores: &[f64]) -> Vec<usize> {
        let mut state = AnomalyState::default();
        scores
            .iter()
            .enumerate()
            .filter(|(i, score)| {
                state.update(Score::Scored(**score), 100, *i as u64 * 60 * 1_000_000_000, rules)
                    == Some(Transition::Detected)
            })
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn aftershocks_smaller_than_a_recent_deviation_open_nothing_with_novelty_gating() {
        // A deviation of 40, then bursts of 10 every ten minutes: without gating each one opens
        // an anomaly; with it (a one-hour half-life) only the first does within this hour.
        let scores: Vec<f64> = (0..60)
            .map(|i| match i {
                5 => 40.0,
                i if i % 10 == 5 => 10.0,
                _ => 0.0,
            })
            .collect();
        let plain = AnomalyRules {
            detect_windows: 1,
            resolve_windows: 1,
            ..AnomalyRules::default()
        };
        assert_eq!(detections(&plain, &scores), vec![5, 15, 25, 35, 45, 55]);
        assert_eq!(detections(&gated(), &scores), vec![5]);
    }

    #[test]
    fn a_larger_or_later_deviation_is_novel_again() {
        let mut scores = vec![0.0; 400];
        scores[10] = 20.0;
        // Much larger than the peak: novel at once.
        scores[20] = 200.0;
        // Smaller than the peak just after it: not novel.
        scores[30] = 20.0;
        // As large, but after the peak has decayed for five hours: novel again.
        scores[320] = 20.0;
        assert_eq!(detections(&gated(), &scores), vec![10, 20, 320]);
    }

    #[test]
    fn gating_off_is_the_default() {
        let rules = AnomalyRules::default();
        assert_eq!(rules.novelty_half_life_ns, 0);
        let mut state = AnomalyState::default();
        assert!(state.novel(0.0, 0, &rules));
        assert_eq!(state.peak, 0.0, "nothing is learned while gating is off");
    }

    #[test]
    fn huge_scores_keep_the_peak_finite() {
        let mut state = AnomalyState::default();
        let rules = gated();
        assert!(state.novel(f64::MAX, 0, &rules));
        assert!(!state.novel(f64::MAX / 1e3, 1, &rules), "far below a huge peak");
        assert!(state.peak.is_finite());
    }

    #[test]
    fn a_young_baseline_decides_nothing() {
        let mut state = AnomalyState::default();
        assert_eq!(
            state.update(Score::InsufficientData, 1_000, 0, &AnomalyRules::default()),
            None
        );
    }
}
