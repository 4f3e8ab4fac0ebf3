//! `GET /metrics`: the daemon's own counters and each canary's state, score, stage and checks.

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use std::sync::atomic::AtomicU64;

use canaryd_engine::judge::{AnalysisView, Outcome, State as CanaryState};
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{ApiState, unavailable};

/// OpenMetrics when the scraper asks for it (Prometheus does), else the classic text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((
        status = 200,
        description = "The daemon's own metrics and each canary's state, score, stage weight and checks: \
            Prometheus text format, or OpenMetrics when `Accept` asks for `application/openmetrics-text`",
        content(
            (String = "text/plain; version=0.0.4"),
            (String = "application/openmetrics-text; version=1.0.0")
        )
    ))
)]
pub(super) async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| String::from_utf8_lossy(v.as_bytes()).contains("application/openmetrics-text"));
    let views = match state
        .engine
        .read_analyses(|engine| engine.judge().analyses().map(|a| a.view()).collect::<Vec<_>>())
        .await
    {
        Ok(views) => views,
        Err(e) => return unavailable(e),
    };
    let canary = canary_registry(&views);
    let (content_type, body) = if wants_openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.stats.render_openmetrics_with(&canary),
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            state.stats.render_prometheus_with(&canary),
        )
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// A label value as the text format needs it: the encoder writes values as they are, and app names,
/// versions and features come from clients (a `"` or a newline in a service name must not break
/// the exposition).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Escaped(String);

impl EncodeLabelValue for Escaped {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A gauge per label set: the analysis's and the check's own names.
type Gauges = Family<Vec<(&'static str, Escaped)>, Gauge<f64, AtomicU64>>;

/// Each app's canary analysis as gauges: state, score, stage weight, and every check's outcome
/// and statistic, so that alerts and dashboards can be built on them. Built per scrape from the
/// analyses as they are now: an analysis that ends leaves no stale series behind.
fn canary_registry(views: &[AnalysisView]) -> Registry {
    let mut registry = Registry::default();
    let mut gauges = |name: &str, help: &str| {
        let family = Gauges::default();
        registry.register(name, help, family.clone());
        family
    };
    let state = gauges(
        "canaryd_canary_state",
        "Each app's canary analysis: 1 for its current state, 0 for the others.",
    );
    let score = gauges(
        "canaryd_canary_score",
        "Each app's canary score, 0 (failing everything) to 100.",
    );
    let weight = gauges(
        "canaryd_canary_stage_weight",
        "The traffic weight (percent) of each canary's current stage.",
    );
    let failing = gauges(
        "canaryd_canary_check_failing",
        "Each check of each canary: 1 when it fails, 0 otherwise.",
    );
    let statistic = gauges(
        "canaryd_canary_check_statistic",
        "Each check's statistic (a normal deviate, or band half-widths for baseline checks).",
    );
    for v in views {
        let analysis = || {
            vec![
                ("env", Escaped(v.env.clone())),
                ("app", Escaped(v.app.clone())),
                ("canary_version", Escaped(v.canary_version.clone())),
            ]
        };
        for s in CanaryState::ALL {
            let mut labels = analysis();
            labels.push(("state", Escaped(s.name().to_owned())));
            state
                .get_or_create(&labels)
                .set(f64::from(u8::from(v.state == s)));
        }
        if let Some(value) = v.score {
            score.get_or_create(&analysis()).set(value);
        }
        if let Some(stage) = &v.stage {
            let mut labels = analysis();
            labels.push(("stage", Escaped(stage.name.clone())));
            weight.get_or_create(&labels).set(stage.weight);
        }
        for c in &v.checks {
            let mut labels = analysis();
            labels.extend([
                ("group", Escaped(c.group.to_string())),
                ("feature", Escaped(c.feature.clone())),
                ("test", Escaped(c.test.to_string())),
                ("outcome", Escaped(c.outcome.name().to_owned())),
            ]);
            failing
                .get_or_create(&labels)
                .set(f64::from(u8::from(c.outcome == Outcome::Fail)));
            if let Some(stat) = c.statistic.filter(|s| s.is_finite()) {
                statistic.get_or_create(&labels).set(stat);
            }
        }
    }
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_from_clients_are_escaped() {
        let mut text = String::new();
        let mut registry = Registry::default();
        let family = Gauges::default();
        registry.register("canaryd_canary_score", "Score.", family.clone());
        family
            .get_or_create(&vec![("app", Escaped("sh\"op\\\nx".into()))])
            .set(1.0);
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(r#"canaryd_canary_score{app="sh\"op\\\nx"} 1.0"#),
            "{text}"
        );
    }
}
