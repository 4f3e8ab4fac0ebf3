//! What a baseline says of one value: scored (half-widths outside its learned band), or too young
//! to say. Baselines produce it; anomaly rules and the judge read it.

use serde::{Deserialize, Serialize};

/// The result of scoring one value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Score {
    /// The baseline is too young to judge.
    InsufficientData,
    /// Half-widths outside the learned band: 0 inside it.
    Scored(f64),
}

impl Score {
    pub fn value(self) -> Option<f64> {
        match self {
            Score::Scored(v) => Some(v),
            Score::InsufficientData => None,
        }
    }
}
