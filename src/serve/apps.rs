//! What canaryd has seen and learned: `GET /api/v1/apps` and `GET /api/v1/apps/{app}/baseline`.

use axum::Json;
use axum::extract::OriginalUri;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use canaryd_engine::baseline::Score;
use canaryd_engine::catalog::AppEntry;
use canaryd_engine::features::{Feature, FeatureKey};
use canaryd_engine::judge::{AnalysisView, State as CanaryState};
use canaryd_engine::{Engine, EventTime};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiQuery, ApiState, CanaryStateSchema, ErrorBody, StageJson, error, format_event_time};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AppsQuery {
    /// Only this environment's apps (all of them when left out).
    env: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct AppsView {
    /// Every replica's apps where `cluster_peers` is set (an app two replicas know, after its
    /// routing changed, as the one that saw it last has it), by environment and name.
    apps: Vec<AppView>,
    /// Where `cluster_peers` is set: the peers that did not answer, whose apps are missing from
    /// `apps` (empty when every peer answered); absent on a replica on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    unanswered_peers: Option<Vec<super::peers::UnansweredPeer>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct AppView {
    env: String,
    app: String,
    first_seen: Option<String>,
    last_seen: Option<String>,
    versions: Vec<VersionView>,
    operations: Vec<OperationView>,
    downstreams: Vec<DownstreamView>,
    exception_types: Vec<ExceptionTypeView>,
    metric_series: usize,
    metric_streams: usize,
    metric_resets: u64,
    metric_stale_points: u64,
    /// The current (or last) canary analysis, in brief.
    canary: Option<CanarySummary>,
    /// True for an app known only from an imported history (`canaryd-lab import`): its
    /// baselines are learned (`GET .../baseline`), but no traffic has been seen yet.
    learned_only: bool,
    /// Null once this daemon's baseline of the app has learned enough to judge by; else it is
    /// still learning here (a new app, or one routed here from another replica: `canaryd-lab
    /// import` seeds it from history).
    learning: Option<LearningView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct LearningView {
    /// Since when: the first telemetry of the app this daemon saw (event time).
    since: Option<String>,
    /// Windows of the app's request rate learned so far.
    windows: u64,
    /// Windows needed to judge by (the baselines' `min_samples`).
    needs: u64,
}

/// Whether the app's baseline is still learning, by its request rate's windows.
fn learning(engine: &Engine, env: &str, app: &str, since: Option<EventTime>) -> Option<LearningView> {
    let needs = engine.config().baseline.min_samples;
    let windows = engine
        .baselines(env, app, None)
        .and_then(|b| {
            b.baselines
                .get(&FeatureKey::app(Feature::RequestRate))
                .map(|rate| rate.ewma.samples)
        })
        .unwrap_or(0);
    (windows < needs).then(|| LearningView {
        since: since.map(format_event_time),
        windows,
        needs,
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CanarySummary {
    stable_version: String,
    canary_version: String,
    #[schema(value_type = CanaryStateSchema)]
    state: &'static str,
    score: Option<f64>,
    stage: Option<StageJson>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct VersionView {
    version: String,
    /// `stable`, `canary`, or null for a version that is neither.
    role: Option<&'static str>,
    first_seen: String,
    last_seen: String,
    spans: u64,
    requests: u64,
    errors: u64,
    /// This version's share of the app's requests, 0..1.
    traffic_share: f64,
    calls: u64,
    exceptions: u64,
    metric_points: u64,
    log_records: u64,
    error_log_records: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct OperationView {
    operation: String,
    requests: u64,
    errors: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DownstreamView {
    downstream: String,
    calls: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ExceptionTypeView {
    exception_type: String,
    count: u64,
}

/// `GET /api/v1/apps`.
#[utoipa::path(
    get,
    path = "/api/v1/apps",
    tag = "apps",
    params(AppsQuery),
    responses(
        (status = 200, description = "Apps with their versions, roles, first/last seen and traffic", body = AppsView),
        (status = 400, description = "A bad query parameter", body = ErrorBody)
    )
)]
pub(super) async fn apps(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    ApiQuery(query): ApiQuery<AppsQuery>,
) -> Response {
    let local = match state.engine.read(move |engine| apps_of(engine, query)).await {
        Ok(view) => view,
        Err(gone) => return super::unavailable(gone),
    };
    let peers = match &state.peers {
        Some(peers) if !super::peers::is_forwarded(&headers) => peers.clone(),
        _ => return Json(local).into_response(),
    };
    let path = uri.path_and_query().map_or("/api/v1/apps", |p| p.as_str());
    let (answers, mut unanswered) = peers.ask(&Method::GET, path, &headers, Default::default()).await;
    let mut apps: Vec<serde_json::Value> = local
        .apps
        .iter()
        .filter_map(|app| serde_json::to_value(app).ok())
        .collect();
    for answer in answers {
        match answer.apps() {
            Ok(theirs) => apps.extend(theirs),
            Err(silent) => unanswered.push(silent),
        }
    }
    let key = |app: &serde_json::Value| {
        let text = |k: &str| app[k].as_str().unwrap_or_default().to_owned();
        (text("env"), text("app"))
    };
    // By app, the one seen last first; then one each.
    apps.sort_by(|a, b| {
        key(a)
            .cmp(&key(b))
            .then_with(|| b["last_seen"].as_str().cmp(&a["last_seen"].as_str()))
    });
    apps.dedup_by(|later, first| key(later) == key(first));
    Json(serde_json::json!({"apps": apps, "unanswered_peers": unanswered})).into_response()
}

fn apps_of(engine: &Engine, query: AppsQuery) -> AppsView {
    let apps = engine
        .catalog()
        .apps()
        .filter(|(env, _, _)| query.env.as_deref().is_none_or(|wanted| wanted == *env))
        .map(|(env, app, entry)| {
            let analysis = engine.analysis(env, app);
            let inferred = engine
                .baselines(env, app, None)
                .and_then(|b| b.stable_version.map(str::to_owned));
            let mut view = app_view(env, app, entry, analysis.as_ref(), inferred);
            view.learning = learning(engine, env, app, entry.first_seen());
            view
        })
        .chain(
            engine
                .learned_only_apps()
                .into_iter()
                .filter(|(env, _)| query.env.as_deref().is_none_or(|wanted| wanted == *env))
                .map(|(env, app)| {
                    let mut view = app_view(env, app, &AppEntry::default(), None, None);
                    view.learned_only = true;
                    view.learning = learning(engine, env, app, None);
                    view
                }),
        )
        .collect();
    AppsView {
        apps,
        unanswered_peers: None,
    }
}

fn app_view(
    env: &str,
    app: &str,
    entry: &AppEntry,
    analysis: Option<&AnalysisView>,
    inferred_stable: Option<String>,
) -> AppView {
    // An analysis under way fixes the roles; otherwise the stable version is the inferred one.
    let live = analysis.filter(|a| !matches!(a.state, CanaryState::Promoted | CanaryState::RolledBack));
    let stable = live.map_or(inferred_stable, |a| Some(a.stable_version.clone()));
    let canary = live.map(|a| a.canary_version.clone());
    let role = |v: &str| {
        if stable.as_deref() == Some(v) {
            Some("stable")
        } else if canary.as_deref() == Some(v) {
            Some("canary")
        } else {
            None
        }
    };
    let total_requests: u64 = entry.versions().map(|(_, s)| s.requests).sum();
    let versions = entry
        .versions()
        .map(|(version, s)| VersionView {
            version: version.to_owned(),
            role: role(version),
            first_seen: format_event_time(s.first_seen),
            last_seen: format_event_time(s.last_seen),
            spans: s.spans,
            requests: s.requests,
            errors: s.errors,
            traffic_share: if total_requests == 0 {
                0.0
            } else {
                s.requests as f64 / total_requests as f64
            },
            calls: s.calls,
            exceptions: s.exceptions,
            metric_points: s.metric_points,
            log_records: s.log_records,
            error_log_records: s.error_log_records,
        })
        .collect();
    let mut operations: Vec<OperationView> = entry
        .operations()
        .map(|(op, s)| OperationView {
            operation: op.to_owned(),
            requests: s.requests,
            errors: s.errors,
        })
        .collect();
    operations.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then_with(|| a.operation.cmp(&b.operation))
    });
    let mut downstreams: Vec<DownstreamView> = entry
        .downstreams()
        .map(|(d, calls)| DownstreamView {
            downstream: d.to_owned(),
            calls,
        })
        .collect();
    downstreams.sort_by(|a, b| {
        b.calls
            .cmp(&a.calls)
            .then_with(|| a.downstream.cmp(&b.downstream))
    });
    let mut exception_types: Vec<ExceptionTypeView> = entry
        .exception_types()
        .map(|(t, count)| ExceptionTypeView {
            exception_type: t.to_owned(),
            count,
        })
        .collect();
    exception_types.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.exception_type.cmp(&b.exception_type))
    });
    let (metric_resets, metric_stale_points) = entry.metric_resets_and_stale();
    AppView {
        env: env.to_owned(),
        app: app.to_owned(),
        first_seen: entry.first_seen().map(format_event_time),
        last_seen: entry.last_seen().map(format_event_time),
        versions,
        operations,
        downstreams,
        exception_types,
        metric_series: entry.metric_series(),
        metric_streams: entry.metric_streams(),
        metric_resets,
        metric_stale_points,
        canary: analysis.map(|a| CanarySummary {
            stable_version: a.stable_version.clone(),
            canary_version: a.canary_version.clone(),
            state: a.state.name(),
            score: a.score,
            stage: a.stage.as_ref().map(StageJson::of),
        }),
        learned_only: false,
        learning: None,
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct BaselineQuery {
    /// The environment (default `default`).
    env: Option<String>,
    /// A version's own baselines; left out, the app's (learned from its stable version).
    version: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BaselineView {
    env: String,
    app: String,
    /// The version whose baselines these are; null for the app's own (learned from its stable
    /// version).
    version: Option<String>,
    stable_version: Option<String>,
    /// Latest event time seen for the app.
    max_event_time: Option<String>,
    /// Event time before which the app's buckets are closed.
    watermark: Option<String>,
    late_observations: u64,
    features: Vec<FeatureView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct FeatureView {
    feature: &'static str,
    /// The operation, downstream, exception type or metric series; "" for the app as a whole.
    subject: String,
    ewma_mean: f64,
    ewma_std: f64,
    /// Windows learned.
    samples: u64,
    /// The current hour-of-week slot's quantiles of the feature's values.
    slot: Option<SlotView>,
    last_value: Option<f64>,
    last_window_end: Option<String>,
    /// `scored`, or `insufficient_data` while the baseline is too young.
    status: &'static str,
    /// Half-widths of the learned band that the last window's value lay outside it (0 inside).
    score: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SlotView {
    hour_of_week: u16,
    q05: f64,
    q50: f64,
    q95: f64,
    q99: f64,
    /// Earlier weeks the quantiles come from (0: this week so far).
    weeks: u32,
    weight: f64,
}

fn optional_time(t: EventTime) -> Option<String> {
    (t > 0).then(|| format_event_time(t))
}

/// `GET /api/v1/apps/{app}/baseline`.
#[utoipa::path(
    get,
    path = "/api/v1/apps/{app}/baseline",
    tag = "apps",
    params(("app" = String, Path, description = "The app (`service.name`, `namespace/` first when set)"), BaselineQuery),
    responses(
        (status = 200, description = "The learned features: EWMA mean and std, the current seasonal slot's quantiles, sample counts", body = BaselineView),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 404, description = "Unknown app or version, or no baselines yet", body = ErrorBody)
    )
)]
pub(super) async fn baseline(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    ApiQuery(query): ApiQuery<BaselineQuery>,
) -> Response {
    let env = query.env.unwrap_or_else(|| "default".into());
    if env.is_empty() {
        return error(StatusCode::BAD_REQUEST, "env must not be empty");
    }
    if query.version.as_deref() == Some("") {
        return error(
            StatusCode::BAD_REQUEST,
            "version must not be empty (leave it out for the app's baseline)",
        );
    }
    state
        .read_app(env.clone(), app.clone(), move |engine| {
            baseline_of(engine, env, app, query.version)
        })
        .await
}

fn baseline_of(engine: &Engine, env: String, app: String, version: Option<String>) -> Response {
    // An app is known from its traffic, or from history imported with canaryd-lab.
    if engine.catalog().app(&env, &app).is_none() && engine.baselines(&env, &app, None).is_none() {
        return error(StatusCode::NOT_FOUND, &format!("no app {app:?} in env {env:?}"));
    }
    let Some(view) = engine.baselines(&env, &app, version.as_deref()) else {
        let what = match &version {
            Some(v) => format!("no version {v:?} of app {app:?} in env {env:?}"),
            None => format!("app {app:?} in env {env:?} has no baselines yet"),
        };
        return error(StatusCode::NOT_FOUND, &what);
    };
    let features = view
        .baselines
        .iter()
        .map(|(key, b)| FeatureView {
            feature: key.feature.name(),
            subject: key.subject.clone(),
            ewma_mean: b.ewma.mean,
            ewma_std: b.ewma.std(),
            samples: b.ewma.samples,
            slot: b.slot.as_ref().and_then(|(slot, summary)| {
                let [q05, q50, q95, q99] = b.slot_quantiles()?;
                Some(SlotView {
                    hour_of_week: *slot,
                    q05,
                    q50,
                    q95,
                    q99,
                    weeks: summary.past_weeks,
                    weight: summary.past.count() + summary.current.count(),
                })
            }),
            last_value: b.last_value,
            last_window_end: optional_time(b.last_window_end),
            status: match b.last_score {
                Some(Score::Scored(_)) => "scored",
                _ => "insufficient_data",
            },
            score: b.last_score.and_then(Score::value),
        })
        .collect();
    let body = BaselineView {
        env,
        app,
        version,
        stable_version: view.stable_version.map(str::to_owned),
        max_event_time: optional_time(view.clock.latest()),
        watermark: optional_time(view.clock.closed_until),
        late_observations: view.late,
        features,
    };
    Json(body).into_response()
}
