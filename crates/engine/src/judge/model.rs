//! Analysis models: what to judge, how strictly, and the rollout stages with their gates.
//!
//! A model is read from TOML by the daemon (`models/*.toml`) into `Model`, then `validate`d, which
//! names the field of any value that cannot work. Omitting a check's table turns that check off;
//! every number has a default that suits a typical HTTP service.

use serde::{Deserialize, Serialize};

use super::traffic::Traffic;

/// How a verdict is acted on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Events carry traffic actions and actions are taken.
    #[default]
    Enforce,
    /// Everything is judged, stored and sent, marked `dry_run`, and no traffic moves.
    Shadow,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Set from the file's stem by the loader.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub decision: Decision,
    #[serde(default)]
    pub checks: Checks,
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// The environments a version is promoted through, in order (e.g. test, beta, prod): in each
    /// of them after the first, a version that failed in an earlier one fails on sight, and one
    /// not yet promoted in the one before is not promoted. Empty: no chain.
    #[serde(default)]
    pub promotion: Vec<String>,
    /// The traffic plan of its rollouts (sticky key, header rules, allow-list); a declared
    /// rollout may give its own. Stage percentages are the stages' weights.
    #[serde(default, skip_serializing_if = "Traffic::is_empty")]
    pub traffic: Traffic,
}

/// How evidence becomes a decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Decision {
    /// The level of the trailing windows' own tests per hour of analysis, over every check,
    /// window and look (Bonferroni): shown beside the sequential evidence, and the level at which
    /// a window must be able to show the smallest effect worth acting on before a check passes.
    /// It fails nothing.
    pub false_alarm_rate: f64,
    /// The chance that the comparisons with the stable (every check but the baseline band) ever
    /// fail a healthy canary, over its whole analysis however long, looked at every second
    /// (anytime-valid sequential evidence).
    pub false_failure_rate: f64,
    /// Trailing windows each check is evaluated on, at every closed second.
    pub horizons_s: Vec<u64>,
    /// How much of the stable version's recent traffic its counts' dispersion (quasi-Poisson) is
    /// measured on, and the timeline's mix and call graph shown over. Checks always compare the
    /// canary with the stable over the same span: a longer window of the stable's lags any ramp.
    pub reference_s: u64,
    /// Looks in a row a check must fail before it counts, unless the evidence is gross.
    pub confirm_looks: u32,
    /// Evidence this many times stronger than the threshold decides at the first look.
    pub gross_factor: f64,
    /// Canary requests a window needs before any request check can decide.
    pub min_requests: u64,
    /// Scores below these make an analysis marginal or failing.
    pub marginal_score: f64,
    pub fail_score: f64,
    /// A failed canary with no traffic for this long is taken as rolled back.
    pub rolled_back_after_s: u64,
    /// Confidence of the bounds that pass or fail a stage gate.
    pub gate_confidence: f64,
}

impl Default for Decision {
    fn default() -> Self {
        Decision {
            false_alarm_rate: 0.05,
            false_failure_rate: 0.01,
            horizons_s: vec![5, 10, 30, 120, 600],
            reference_s: 300,
            confirm_looks: 1,
            gross_factor: 100.0,
            min_requests: 40,
            marginal_score: 80.0,
            fail_score: 50.0,
            rolled_back_after_s: 60,
            gate_confidence: 0.95,
        }
    }
}

/// The check groups. A missing table turns its group off.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    pub error_ratio: Option<ErrorRatioCheck>,
    pub latency: Option<LatencyCheck>,
    pub operation_mix: Option<OperationMixCheck>,
    pub call_graph: Option<CallGraphCheck>,
    pub exceptions: Option<RateCheck>,
    pub error_logs: Option<RateCheck>,
    pub metrics: Option<MetricsCheck>,
    pub baseline: Option<BaselineCheck>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorRatioCheck {
    pub weight: f64,
    pub critical: bool,
    /// Smallest change worth acting on: the canary's ratio must be at least this many times the
    /// stable's and at least `min_increase` (absolute) above it.
    pub min_ratio: f64,
    pub min_increase: f64,
    pub per_operation: bool,
}

impl Default for ErrorRatioCheck {
    fn default() -> Self {
        ErrorRatioCheck {
            weight: 40.0,
            critical: true,
            min_ratio: 2.0,
            min_increase: 0.005,
            per_operation: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatencyCheck {
    pub weight: f64,
    pub critical: bool,
    /// The stable's quantiles whose exceedance by the canary is tested (location, tail, spread).
    pub quantiles: Vec<f64>,
    /// The canary's quantile must be this many times the stable's, and `min_increase_ms` above it.
    pub min_ratio: f64,
    pub min_increase_ms: f64,
    pub per_operation: bool,
}

impl Default for LatencyCheck {
    fn default() -> Self {
        LatencyCheck {
            weight: 30.0,
            critical: true,
            quantiles: vec![0.5, 0.95, 0.99],
            min_ratio: 1.2,
            min_increase_ms: 5.0,
            per_operation: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OperationMixCheck {
    pub weight: f64,
    pub critical: bool,
    /// Smallest total variation distance between the mixes worth acting on.
    pub min_distance: f64,
}

impl Default for OperationMixCheck {
    fn default() -> Self {
        OperationMixCheck {
            weight: 10.0,
            critical: false,
            min_distance: 0.08,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallGraphCheck {
    pub weight: f64,
    pub critical: bool,
    /// Calls per request must change by this factor (either way) and by `min_change` absolute.
    pub min_ratio: f64,
    pub min_change: f64,
}

impl Default for CallGraphCheck {
    fn default() -> Self {
        CallGraphCheck {
            weight: 10.0,
            critical: true,
            min_ratio: 1.5,
            min_change: 0.05,
        }
    }
}

/// Events per request (exceptions by type, error logs), which must not grow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateCheck {
    pub weight: f64,
    pub critical: bool,
    pub min_ratio: f64,
    /// Smallest increase in events per request worth acting on.
    pub min_increase: f64,
}

impl Default for RateCheck {
    fn default() -> Self {
        RateCheck {
            weight: 5.0,
            critical: true,
            min_ratio: 2.0,
            min_increase: 0.01,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsCheck {
    pub weight: f64,
    pub critical: bool,
    /// Counter increments per request must change by this factor (either way).
    pub min_ratio: f64,
    /// Trailing windows shorter than this are not used: metrics arrive every few seconds.
    pub min_horizon_s: u64,
}

impl Default for MetricsCheck {
    fn default() -> Self {
        MetricsCheck {
            weight: 10.0,
            critical: true,
            min_ratio: 1.5,
            min_horizon_s: 60,
        }
    }
}

/// The canary against the app's learned baseline (seasonal band of the stable's history).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineCheck {
    pub weight: f64,
    pub critical: bool,
    /// Band half-widths outside the learned band that fail.
    pub max_deviation: f64,
    /// App-level features compared (names as in the API: `error_ratio`, `latency_p99_ms`...).
    pub features: Vec<String>,
}

impl Default for BaselineCheck {
    fn default() -> Self {
        BaselineCheck {
            weight: 10.0,
            critical: false,
            max_deviation: 3.0,
            features: vec!["error_ratio".into(), "latency_p99_ms".into()],
        }
    }
}

/// One rollout stage: the canary's traffic weight, how long it is watched, and its gates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    #[serde(default)]
    pub name: String,
    /// Percent of traffic on the canary during this stage.
    pub weight: f64,
    pub observe_s: u64,
    #[serde(default)]
    pub gates: Vec<Gate>,
    /// A person approves before the canary enters this stage: once the stage before it passes,
    /// the analysis waits (still judged, and failed if it fails) for an approval or an abort.
    #[serde(default)]
    pub approval: bool,
}

/// A limit on what the canary measures. A gate fails when the limit is broken with confidence,
/// passes when it is met with confidence, and is pending in between.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    pub metric: GateMetric,
    pub max: Option<f64>,
    pub min: Option<f64>,
    /// Trailing window the gate looks at; 0 (the default) is the whole stage so far.
    #[serde(default)]
    pub window_s: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMetric {
    ErrorRate,
    Availability,
    LatencyP50Ms,
    LatencyP95Ms,
    LatencyP99Ms,
}

impl GateMetric {
    pub const ALL: [GateMetric; 5] = [
        GateMetric::ErrorRate,
        GateMetric::Availability,
        GateMetric::LatencyP50Ms,
        GateMetric::LatencyP95Ms,
        GateMetric::LatencyP99Ms,
    ];

    /// The metric `name` names.
    pub fn named(name: &str) -> Option<GateMetric> {
        GateMetric::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            GateMetric::ErrorRate => "error_rate",
            GateMetric::Availability => "availability",
            GateMetric::LatencyP50Ms => "latency_p50_ms",
            GateMetric::LatencyP95Ms => "latency_p95_ms",
            GateMetric::LatencyP99Ms => "latency_p99_ms",
        }
    }
}

/// A model value that cannot work, with the field it is in.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ModelError {
    pub field: String,
    pub message: String,
}

pub(crate) fn bad(field: impl Into<String>, message: impl Into<String>) -> ModelError {
    ModelError {
        field: field.into(),
        message: message.into(),
    }
}

fn positive(field: &str, v: f64) -> Result<(), ModelError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(bad(field, format!("must be a positive number, not {v}")))
    }
}

fn at_least_one(field: &str, v: f64) -> Result<(), ModelError> {
    if v.is_finite() && v >= 1.0 {
        Ok(())
    } else {
        Err(bad(field, format!("must be at least 1, not {v}")))
    }
}

fn weight(field: &str, v: f64) -> Result<(), ModelError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(bad(field, format!("must be 0 or more, not {v}")))
    }
}

impl Model {
    /// Checks every value; the error names the first field that cannot work.
    pub fn validate(&self) -> Result<(), ModelError> {
        let d = &self.decision;
        if !(d.false_failure_rate > 0.0 && d.false_failure_rate < 1.0) {
            return Err(bad(
                "decision.false_failure_rate",
                format!("must be in (0, 1), not {}", d.false_failure_rate),
            ));
        }
        if !(d.false_alarm_rate > 0.0 && d.false_alarm_rate < 1.0) {
            return Err(bad(
                "decision.false_alarm_rate",
                format!("must be in (0, 1), not {}", d.false_alarm_rate),
            ));
        }
        if d.horizons_s.is_empty() {
            return Err(bad("decision.horizons_s", "needs at least one window"));
        }
        for (i, h) in d.horizons_s.iter().enumerate() {
            if !(1..=3600).contains(h) {
                return Err(bad(
                    format!("decision.horizons_s[{i}]"),
                    format!("must be 1 to 3600 seconds, not {h}"),
                ));
            }
        }
        if !(10..=3600).contains(&d.reference_s) {
            return Err(bad(
                "decision.reference_s",
                format!("must be 10 to 3600 seconds, not {}", d.reference_s),
            ));
        }
        if !(1..=60).contains(&d.confirm_looks) {
            return Err(bad(
                "decision.confirm_looks",
                format!("must be 1 to 60, not {}", d.confirm_looks),
            ));
        }
        at_least_one("decision.gross_factor", d.gross_factor)?;
        if d.min_requests == 0 {
            return Err(bad("decision.min_requests", "must be at least 1"));
        }
        for (field, v) in [
            ("decision.marginal_score", d.marginal_score),
            ("decision.fail_score", d.fail_score),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return Err(bad(field, format!("must be 0 to 100, not {v}")));
            }
        }
        if d.fail_score > d.marginal_score {
            return Err(bad(
                "decision.fail_score",
                format!("{} is above marginal_score {}", d.fail_score, d.marginal_score),
            ));
        }
        if !(1..=86_400).contains(&d.rolled_back_after_s) {
            return Err(bad(
                "decision.rolled_back_after_s",
                format!("must be 1 to 86400 seconds, not {}", d.rolled_back_after_s),
            ));
        }
        if !(d.gate_confidence >= 0.5 && d.gate_confidence < 1.0) {
            return Err(bad(
                "decision.gate_confidence",
                format!("must be in [0.5, 1), not {}", d.gate_confidence),
            ));
        }
        let c = &self.checks;
        if let Some(e) = &c.error_ratio {
            weight("checks.error_ratio.weight", e.weight)?;
            at_least_one("checks.error_ratio.min_ratio", e.min_ratio)?;
            weight("checks.error_ratio.min_increase", e.min_increase)?;
        }
        if let Some(l) = &c.latency {
            weight("checks.latency.weight", l.weight)?;
            at_least_one("checks.latency.min_ratio", l.min_ratio)?;
            weight("checks.latency.min_increase_ms", l.min_increase_ms)?;
            if l.quantiles.is_empty() {
                return Err(bad("checks.latency.quantiles", "needs at least one quantile"));
            }
            for (i, q) in l.quantiles.iter().enumerate() {
                if !(*q > 0.0 && *q < 1.0) {
                    return Err(bad(
                        format!("checks.latency.quantiles[{i}]"),
                        format!("must be in (0, 1), not {q}"),
                    ));
                }
            }
        }
        if let Some(m) = &c.operation_mix {
            weight("checks.operation_mix.weight", m.weight)?;
            if !(m.min_distance > 0.0 && m.min_distance <= 1.0) {
                return Err(bad(
                    "checks.operation_mix.min_distance",
                    format!("must be in (0, 1], not {}", m.min_distance),
                ));
            }
        }
        if let Some(g) = &c.call_graph {
            weight("checks.call_graph.weight", g.weight)?;
            at_least_one("checks.call_graph.min_ratio", g.min_ratio)?;
            positive("checks.call_graph.min_change", g.min_change)?;
        }
        for (name, r) in [("exceptions", &c.exceptions), ("error_logs", &c.error_logs)] {
            if let Some(r) = r {
                weight(&format!("checks.{name}.weight"), r.weight)?;
                at_least_one(&format!("checks.{name}.min_ratio"), r.min_ratio)?;
                positive(&format!("checks.{name}.min_increase"), r.min_increase)?;
            }
        }
        if let Some(m) = &c.metrics {
            weight("checks.metrics.weight", m.weight)?;
            at_least_one("checks.metrics.min_ratio", m.min_ratio)?;
        }
        if let Some(b) = &c.baseline {
            weight("checks.baseline.weight", b.weight)?;
            positive("checks.baseline.max_deviation", b.max_deviation)?;
            for (i, f) in b.features.iter().enumerate() {
                if crate::features::Feature::from_name(f).is_none() {
                    return Err(bad(
                        format!("checks.baseline.features[{i}]"),
                        format!("unknown feature {f:?}"),
                    ));
                }
            }
        }
        for (i, env) in self.promotion.iter().enumerate() {
            if env.trim().is_empty() || env.len() > 256 {
                return Err(bad(
                    format!("promotion[{i}]"),
                    "an environment name of 1 to 256 characters is needed",
                ));
            }
            if self.promotion[..i].contains(env) {
                return Err(bad(format!("promotion[{i}]"), format!("{env:?} is named twice")));
            }
        }
        let mut last_weight = 0.0;
        for (i, s) in self.stages.iter().enumerate() {
            let at = |f: &str| format!("stages[{i}].{f}");
            if i == 0 && s.approval {
                return Err(bad(
                    at("approval"),
                    "the first stage starts when the canary does: approval applies to the stages after it",
                ));
            }
            if !(s.weight > 0.0 && s.weight <= 100.0) {
                return Err(bad(
                    at("weight"),
                    format!("must be in (0, 100], not {}", s.weight),
                ));
            }
            if s.weight < last_weight {
                return Err(bad(
                    at("weight"),
                    format!("{} is below the previous stage's {last_weight}", s.weight),
                ));
            }
            last_weight = s.weight;
            if !(1..=7 * 86_400).contains(&s.observe_s) {
                return Err(bad(
                    at("observe_s"),
                    format!("must be 1 s to 7 days, not {}", s.observe_s),
                ));
            }
            for (j, g) in s.gates.iter().enumerate() {
                let at = |f: &str| format!("stages[{i}].gates[{j}].{f}");
                match (g.max, g.min) {
                    (None, None) => return Err(bad(at("max"), "a gate needs max or min")),
                    (Some(_), Some(_)) => return Err(bad(at("min"), "a gate has max or min, not both")),
                    _ => {}
                }
                let limit = g.max.or(g.min).unwrap_or_default();
                let (field, ok) = match g.metric {
                    GateMetric::ErrorRate | GateMetric::Availability => {
                        ("limit", (0.0..=1.0).contains(&limit))
                    }
                    _ => ("limit", limit.is_finite() && limit > 0.0),
                };
                if !ok {
                    let f = if g.max.is_some() { "max" } else { "min" };
                    return Err(bad(
                        at(f),
                        format!("{limit} is not a usable {field} for {}", g.metric.name()),
                    ));
                }
                if g.window_s > 3600 {
                    return Err(bad(
                        at("window_s"),
                        format!("must be at most 3600 seconds, not {}", g.window_s),
                    ));
                }
            }
        }
        self.traffic.validate("traffic")?;
        Ok(())
    }

    /// The longest trailing window anything in the model looks at, in seconds.
    pub fn longest_window_s(&self) -> u64 {
        let horizons = self.decision.horizons_s.iter().copied().max().unwrap_or(0);
        let gates = self
            .stages
            .iter()
            .flat_map(|s| s.gates.iter().map(|g| g.window_s))
            .max()
            .unwrap_or(0);
        horizons.max(gates).max(self.decision.reference_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        Model {
            name: "t".into(),
            description: String::new(),
            mode: Mode::Enforce,
            decision: Decision::default(),
            checks: Checks {
                error_ratio: Some(ErrorRatioCheck::default()),
                latency: Some(LatencyCheck::default()),
                ..Checks::default()
            },
            stages: vec![Stage {
                name: "a".into(),
                weight: 10.0,
                observe_s: 60,
                approval: false,
                gates: vec![Gate {
                    metric: GateMetric::ErrorRate,
                    max: Some(0.01),
                    min: None,
                    window_s: 0,
                }],
            }],
            promotion: vec![],
            traffic: Default::default(),
        }
    }

    #[test]
    fn a_sound_model_validates() {
        assert_eq!(model().validate(), Ok(()));
    }

    #[test]
    fn approval_and_the_promotion_chain_are_checked() {
        let mut m = model();
        m.stages[0].approval = true;
        assert_eq!(m.validate().unwrap_err().field, "stages[0].approval");
        let mut m = model();
        m.stages.push(Stage {
            approval: true,
            ..m.stages[0].clone()
        });
        assert_eq!(m.validate(), Ok(()));
        m.promotion = vec!["test".into(), "beta".into(), "test".into()];
        let e = m.validate().unwrap_err();
        assert_eq!(e.field, "promotion[2]");
        assert!(e.message.contains("named twice"), "{}", e.message);
        m.promotion = vec!["test".into(), " ".into()];
        assert_eq!(m.validate().unwrap_err().field, "promotion[1]");
    }

    #[test]
    fn errors_name_the_field() {
        let mut m = model();
        m.decision.horizons_s = vec![10, 0];
        assert_eq!(m.validate().unwrap_err().field, "decision.horizons_s[1]");
        let mut m = model();
        m.checks.latency.as_mut().expect("set").quantiles = vec![0.5, 1.5];
        assert_eq!(m.validate().unwrap_err().field, "checks.latency.quantiles[1]");
        let mut m = model();
        m.stages[0].gates[0].max = Some(2.0);
        assert_eq!(m.validate().unwrap_err().field, "stages[0].gates[0].max");
        let mut m = model();
        m.stages.push(Stage {
            name: "b".into(),
            weight: 5.0,
            observe_s: 60,
            approval: false,
            gates: vec![],
        });
        assert_eq!(m.validate().unwrap_err().field, "stages[1].weight");
    }
}
