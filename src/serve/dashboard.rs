//! The dashboard: a page at `/` that shows the apps, their canaries and the evidence, and the JSON
//! it needs beyond the rest of the API (`GET /api/v1/apps/{app}/timeline`).
//!
//! The page's files (`assets/dashboard/`) are compiled into the binary, so the daemon serves it
//! with no network and no files beside it; the page draws its charts itself (SVG, no library) and
//! polls the JSON API every two seconds. Like `api`, this module defines the JSON shape it serves
//! (the timeline's); the engine's types are converted here, at the edge.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use canaryd_engine::EventTime;
use canaryd_engine::baseline::Baseline;
use canaryd_engine::features::{Feature, FeatureKey};
use canaryd_engine::judge::SeriesPoint;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiState, CanaryStateSchema, Env, EnvQuery, ErrorBody, error};
use crate::events::format_event_time;

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../assets/dashboard/style.css");

const SECOND: EventTime = 1_000_000_000;

/// Adds the dashboard's page, its files and the timeline endpoint (described in the API's OpenAPI
/// document; the page and files are not) to `router`.
pub fn add_routes(router: OpenApiRouter<ApiState>) -> OpenApiRouter<ApiState> {
    router
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .routes(routes!(timeline))
}

/// An embedded file. `no-cache` makes the browser revalidate, so a new binary's page is seen at
/// once; the page loads nothing from elsewhere (the policy says so to the browser too).
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                 connect-src 'self'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /api/v1/apps/{app}/timeline?env=`: both versions' recent series in 10-second blocks, the
/// app's learned band for each charted feature, the operation mix and the call graph.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TimelineView {
    env: String,
    app: String,
    stable_version: String,
    canary_version: String,
    #[schema(value_type = CanaryStateSchema)]
    state: &'static str,
    block_s: u64,
    /// The end of the last closed second the series cover (event time).
    evaluated_at: String,
    canary: Vec<PointView>,
    stable: Vec<PointView>,
    /// The app's learned baseline (from its stable version, per `window_secs` window) of each
    /// charted feature; a feature not learned yet is left out.
    baseline: Vec<BandView>,
    /// The stable's reference window the mix and the call graph are taken over.
    window_s: u64,
    operations: Vec<OperationMix>,
    calls: Vec<CallEdge>,
}

/// One 10-second block of one version. The first and the last block may be partly covered (the
/// analysis started within it, or it is still being filled): `seconds` says how much, and the rate
/// is per second of that.
#[derive(Debug, PartialEq, Serialize, ToSchema)]
pub(super) struct PointView {
    start: String,
    seconds: u64,
    requests: u64,
    errors: u64,
    /// Requests per second.
    request_rate: f64,
    /// Failed / all requests; null without requests.
    error_ratio: Option<f64>,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BandView {
    feature: &'static str,
    /// The EWMA level and the band around it (level +- 3 robust standard deviations) a value is
    /// judged against.
    mean: f64,
    lo: f64,
    hi: f64,
    samples: u64,
    /// The current hour-of-week slot's quantiles, when it has data.
    slot: Option<SlotQuantiles>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SlotQuantiles {
    q05: f64,
    q50: f64,
    q95: f64,
    q99: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct OperationMix {
    operation: String,
    canary_requests: u64,
    stable_requests: u64,
    /// This operation's share of the version's requests, 0..1.
    canary_share: f64,
    stable_share: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CallEdge {
    downstream: String,
    /// Calls per request; null when the version did not call it in the window.
    canary_per_request: Option<f64>,
    stable_per_request: Option<f64>,
    /// `new` (only the canary calls it), `vanished` (only the stable does) or `both`.
    status: &'static str,
}

/// The features charted, as the baselines name them.
const CHARTED: [Feature; 4] = [
    Feature::RequestRate,
    Feature::ErrorRatio,
    Feature::LatencyP50,
    Feature::LatencyP99,
];

#[utoipa::path(
    get,
    path = "/api/v1/apps/{app}/timeline",
    tag = "apps",
    params(("app" = String, Path, description = "The app"), EnvQuery),
    responses(
        (status = 200, description = "The analysis's recent series, the learned bands, the operation mix and the call graph", body = TimelineView),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 404, description = "Unknown app, or no analysis", body = ErrorBody)
    )
)]
pub(super) async fn timeline(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    Env(env): Env,
) -> Response {
    state
        .read_app(env.clone(), app.clone(), move |engine| {
            timeline_of(engine, env, app)
        })
        .await
}

/// The timeline's answer, read on the engine's thread.
fn timeline_of(engine: &canaryd_engine::Engine, env: String, app: String) -> Response {
    if engine.catalog().app(&env, &app).is_none() {
        return error(StatusCode::NOT_FOUND, &format!("no app {app:?} in env {env:?}"));
    }
    let (Some(analysis), Some(timeline)) = (engine.analysis(&env, &app), engine.timeline(&env, &app)) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("app {app:?} in env {env:?} has no canary analysis, so no timeline"),
        );
    };
    let baseline = engine
        .baselines(&env, &app, None)
        .map(|view| {
            CHARTED
                .iter()
                .filter_map(|f| band(*f, view.baselines.get(&FeatureKey::app(*f))?))
                .collect()
        })
        .unwrap_or_default();

    let block = timeline.block_s.max(1).saturating_mul(SECOND);
    let covered = |p: &SeriesPoint| {
        let from = p.start.max(analysis.started_at);
        let to = p.start.saturating_add(block).min(analysis.evaluated_at);
        to.saturating_sub(from) / SECOND
    };
    let points = |series: &[SeriesPoint]| -> Vec<PointView> {
        series.iter().filter_map(|p| point(p, covered(p))).collect()
    };
    let body = TimelineView {
        canary: points(&timeline.canary),
        stable: points(&timeline.stable),
        env,
        app,
        stable_version: analysis.stable_version,
        canary_version: analysis.canary_version,
        state: analysis.state.name(),
        block_s: timeline.block_s,
        evaluated_at: format_event_time(analysis.evaluated_at),
        baseline,
        window_s: timeline.window_s,
        operations: operation_mix(&timeline.canary_operations, &timeline.stable_operations),
        calls: call_edges(&timeline.canary_calls, &timeline.stable_calls),
    };
    Json(body).into_response()
}

/// A block as charted; none for a block no closed second of the analysis covers.
fn point(p: &SeriesPoint, seconds: u64) -> Option<PointView> {
    (seconds > 0).then(|| PointView {
        start: format_event_time(p.start),
        seconds,
        requests: p.requests,
        errors: p.errors,
        request_rate: p.requests as f64 / seconds as f64,
        error_ratio: (p.requests > 0).then(|| p.errors as f64 / p.requests as f64),
        latency_p50_ms: p.latency_p50_ms,
        latency_p99_ms: p.latency_p99_ms,
    })
}

fn band(feature: Feature, b: &Baseline) -> Option<BandView> {
    let (lo, hi) = b.band()?;
    let finite = |x: f64| x.is_finite().then_some(x);
    Some(BandView {
        feature: feature.name(),
        mean: finite(b.ewma.mean)?,
        lo: finite(lo)?,
        hi: finite(hi)?,
        samples: b.ewma.samples,
        slot: b
            .slot_quantiles()
            .map(|[q05, q50, q95, q99]| SlotQuantiles { q05, q50, q95, q99 }),
    })
}

fn share(n: u64, total: u64) -> f64 {
    if total == 0 { 0.0 } else { n as f64 / total as f64 }
}

/// Both versions' operations, the busiest (over both) first.
fn operation_mix(
    canary: &std::collections::BTreeMap<String, u64>,
    stable: &std::collections::BTreeMap<String, u64>,
) -> Vec<OperationMix> {
    let canary_total: u64 = canary.values().sum();
    let stable_total: u64 = stable.values().sum();
    let mut names: Vec<&String> = canary.keys().chain(stable.keys()).collect();
    names.sort();
    names.dedup();
    let mut mix: Vec<OperationMix> = names
        .into_iter()
        .map(|op| {
            let c = canary.get(op).copied().unwrap_or(0);
            let s = stable.get(op).copied().unwrap_or(0);
            OperationMix {
                operation: op.clone(),
                canary_requests: c,
                stable_requests: s,
                canary_share: share(c, canary_total),
                stable_share: share(s, stable_total),
            }
        })
        .collect();
    mix.sort_by(|a, b| {
        (b.canary_share + b.stable_share)
            .total_cmp(&(a.canary_share + a.stable_share))
            .then_with(|| a.operation.cmp(&b.operation))
    });
    mix
}

/// Both versions' downstreams, each marked new, vanished or both; a rate of 0 counts as absent.
fn call_edges(
    canary: &std::collections::BTreeMap<String, f64>,
    stable: &std::collections::BTreeMap<String, f64>,
) -> Vec<CallEdge> {
    let present =
        |m: &std::collections::BTreeMap<String, f64>, d: &str| m.get(d).copied().filter(|r| *r > 0.0);
    let mut names: Vec<&String> = canary.keys().chain(stable.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|d| {
            let c = present(canary, d);
            let s = present(stable, d);
            CallEdge {
                downstream: d.clone(),
                canary_per_request: c,
                stable_per_request: s,
                status: match (c, s) {
                    (Some(_), None) => "new",
                    (None, Some(_)) => "vanished",
                    _ => "both",
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partly_covered_block_is_a_rate_over_what_it_covers() {
        let p = SeriesPoint {
            start: 1_767_571_200 * SECOND,
            requests: 40,
            errors: 4,
            latency_p50_ms: Some(20.0),
            latency_p99_ms: None,
        };
        let view = point(&p, 4).expect("covered");
        assert_eq!(view.request_rate, 10.0);
        assert_eq!(view.error_ratio, Some(0.1));
        assert_eq!(view.start, "2026-01-05T00:00:00.000000000Z");
        assert_eq!(point(&p, 0), None);
    }

    #[test]
    fn edges_only_one_version_calls_are_new_or_vanished() {
        let canary = [("db".to_owned(), 1.0), ("fraud".to_owned(), 0.5)].into();
        let stable = [
            ("db".to_owned(), 1.0),
            ("cache".to_owned(), 2.0),
            ("fraud".to_owned(), 0.0),
        ]
        .into();
        let edges = call_edges(&canary, &stable);
        let status: Vec<(&str, &str)> = edges.iter().map(|e| (e.downstream.as_str(), e.status)).collect();
        assert_eq!(status, [("cache", "vanished"), ("db", "both"), ("fraud", "new")]);
    }

    #[test]
    fn the_mix_is_shares_of_each_version_busiest_first() {
        let canary = [("GET /a".to_owned(), 30), ("GET /b".to_owned(), 10)].into();
        let stable = [("GET /a".to_owned(), 50), ("GET /b".to_owned(), 50)].into();
        let mix = operation_mix(&canary, &stable);
        assert_eq!(mix[0].operation, "GET /a");
        assert_eq!(mix[0].canary_share, 0.75);
        assert_eq!(mix[1].stable_share, 0.5);
        assert_eq!(operation_mix(&Default::default(), &Default::default()).len(), 0);
    }
}
