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

use crate::baseline::Score;
use crate::observation::EventTime;

/// The thresholds of anomaly detection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnomalyRules {
    pub detect_score: f64,
    pub detect_windows: u32,
    pub gross_score: f64,
    pub resolve_score: f64,
    pub resolve_windows: u32,
    pub min_support: u64,
}

impl Default for AnomalyRules {
    fn default() -> Self {
        AnomalyRules {
            detect_score: 3.0,
            detect_windows: 2,
            gross_score: 10.0,
            resolve_score: 1.0,
            resolve_windows: 3,
            min_support: 20,
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
        if self.active {
            self.streak = if score < rules.resolve_score {
                self.streak + 1
            } else {
                0
            };
            if self.streak >= rules.resolve_windows {
                *self = AnomalyState::default();
                return Some(Transition::Resolved);
            }
        } else {
            self.streak = if score >= rules.detect_score {
                self.streak + 1
            } else {
                0
            };
            if self.streak >= rules.detect_windows || score >= rules.gross_score {
                *self = AnomalyState {
                    active: true,
                    streak: 0,
                    since: time,
                };
                return Some(Transition::Detected);
            }
        }
        None
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
        let windows = [
            (4.0, 100),
            (4.0, 100),
            (2.0, 100),
            (0.2, 100),
            (0.2, 100),
            (0.2, 100),
        ];
        assert_eq!(
            check(&windows),
            vec![(1, Transition::Detected), (5, Transition::Resolved)]
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

    #[test]
    fn a_young_baseline_decides_nothing() {
        let mut state = AnomalyState::default();
        assert_eq!(
            state.update(Score::InsufficientData, 1_000, 0, &AnomalyRules::default()),
            None
        );
    }
}
