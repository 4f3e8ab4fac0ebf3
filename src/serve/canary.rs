//! Canary analyses and declared rollouts: `GET .../canary`, `PUT` and `DELETE .../rollout`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use canaryd_engine::judge::{
    AnalysisView, Check, GateMetric, GateOutcome, GateResult, HeaderMatch, JudgeError, Mode, Operation,
    Outcome, StageView, Sticky, TrafficRequest, TrafficView,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    ApiState, CanaryStateSchema, Env, EnvQuery, ErrorBody, GateMetricSchema, GateOutcomeSchema, ModeSchema,
    OutcomeSchema, error, format_event_time, unavailable,
};
use crate::engine::Rollout;

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StageJson {
    index: usize,
    name: String,
    weight: f64,
}

impl StageJson {
    pub(crate) fn of(s: &StageView) -> Self {
        StageJson {
            index: s.index,
            name: s.name.clone(),
            weight: s.weight,
        }
    }
}

/// An example analysis for the OpenAPI document (built in parts: one `json!` of it all would
/// exceed the macro recursion limit).
fn canary_example() -> serde_json::Value {
    let check = serde_json::json!({
        "id": "errors:error_ratio:fisher_exact",
        "group": "errors",
        "feature": "error_ratio",
        "operation": null,
        "test": "fisher_exact",
        "critical": true,
        "weight": 40.0,
        "outcome": "fail",
        "canary_value": 0.3,
        "baseline_value": 0.001,
        "canary_samples": 1000,
        "baseline_samples": 15000,
        "statistic": 14.2,
        "p_value": 1.0e-45,
        "threshold": 4.9,
        "effect": 300.0,
        "min_effect": 2.0,
        "effect_kind": "ratio",
        "window_s": 120,
        "message": "error ratio 30.00% against 0.10% (300 of 1000 requests)"
    });
    let gate = serde_json::json!({
        "metric": "error_rate",
        "max": 0.01,
        "min": null,
        "value": 0.3,
        "lower": 0.27,
        "upper": 0.33,
        "samples": 1000,
        "window_s": 0,
        "outcome": "fail",
        "message": "error_rate 0.3000 over the stage (1000 requests): above max 0.01"
    });
    serde_json::json!({
        "env": "prod",
        "app": "checkout",
        "stable_version": "1.4.2",
        "canary_version": "1.5.0",
        "model": "default",
        "mode": "enforce",
        "declared": false,
        "paused": false,
        "state": "failing",
        "score": 12.5,
        "stage": {"index": 0, "name": "10%", "weight": 10.0},
        "stages": 4,
        "since": "2026-01-05T10:00:00.000000000Z",
        "started_at": "2026-01-05T10:00:00.000000000Z",
        "stage_started_at": "2026-01-05T10:00:00.000000000Z",
        "evaluated_at": "2026-01-05T10:02:13.000000000Z",
        "failed_at": "2026-01-05T10:02:11.000000000Z",
        "canary_requests": 1330,
        "stable_requests": 11970,
        "checks": [check],
        "gates": [gate],
        "traffic": {
            "percentages": [10.0, 50.0, 100.0],
            "sticky": {"header": "x-user-id"},
            "headers": [{"name": "x-canary", "value": "always"}],
            "users": ["alice@example.com"]
        }
    })
}

/// The earlier environment of a promotion chain a version failed in.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct FailedIn {
    env: String,
    /// The id of the event of that failure.
    event_id: String,
}

/// `GET /api/v1/apps/{app}/canary`: the analysis with its evidence. Times are RFC 3339 event time.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = canary_example)]
pub(super) struct CanaryView {
    env: String,
    app: String,
    stable_version: String,
    canary_version: String,
    model: String,
    #[schema(value_type = ModeSchema)]
    mode: Mode,
    /// Whether the roles were declared through the rollout API (else inferred from traffic).
    declared: bool,
    /// Paused by an operator: judged on, but passing no stage and failing nothing until resumed.
    paused: bool,
    /// Since when (event time) the next stage has waited for a person's approval; null when it
    /// does not wait. The event `canary.awaiting_approval` carries the links.
    awaiting_approval: Option<String>,
    /// The environment before this one in the model's promotion chain, while the version has
    /// not been promoted there: until it is, it is not promoted here.
    blocked_by: Option<String>,
    /// When the version was failed on sight for failing earlier in the promotion chain: that
    /// environment and the id of the event that said so.
    failed_in: Option<FailedIn>,
    /// The promotion chain's environment after this one.
    next_env: Option<String>,
    #[schema(value_type = CanaryStateSchema)]
    state: &'static str,
    /// 0 (failing everything) to 100; null before any check could decide.
    score: Option<f64>,
    /// The current rollout stage, when the model has stages.
    stage: Option<StageJson>,
    stages: usize,
    since: String,
    started_at: String,
    stage_started_at: String,
    evaluated_at: String,
    failed_at: Option<String>,
    canary_requests: u64,
    stable_requests: u64,
    /// Every check, the failing and most significant first.
    checks: Vec<CheckJson>,
    /// The current stage's gates.
    gates: Vec<GateJson>,
    /// The rollout's traffic plan.
    traffic: TrafficJson,
}

/// One check's evidence: the engine's `judge::Check`, field for field.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Check)]
pub(super) struct CheckJson {
    /// Unique within an analysis: `group:feature[subject]:test`.
    id: String,
    /// `errors`, `latency`, `operation_mix`, `call_graph`, `exceptions`, `error_logs`, `metrics`
    /// or `baseline`.
    group: &'static str,
    feature: String,
    /// The operation (or downstream, exception type, metric series) checked; null for the app.
    operation: Option<String>,
    /// `fisher_exact`, `exceedance`, `chi_square`, `poisson_rate`, `t`, `baseline_band`, ...
    test: &'static str,
    /// Whether failing it fails the canary.
    critical: bool,
    weight: f64,
    #[schema(value_type = OutcomeSchema)]
    outcome: Outcome,
    canary_value: Option<f64>,
    /// The stable's value in the same window (or the learned baseline's, for baseline checks).
    baseline_value: Option<f64>,
    canary_samples: u64,
    baseline_samples: u64,
    /// The test statistic as a normal deviate (or band half-widths for baseline checks).
    statistic: Option<f64>,
    p_value: Option<f64>,
    /// What the statistic had to reach.
    threshold: f64,
    /// The practical effect (ratio, difference or distance, per `effect_kind`) and its minimum.
    effect: Option<f64>,
    min_effect: f64,
    effect_kind: &'static str,
    /// The trailing window looked at.
    window_s: u64,
    /// Why it passed or failed, in words.
    message: String,
}

impl CheckJson {
    fn of(check: Check) -> Self {
        // No `..`: a field the engine adds does not compile until it is served and described.
        let Check {
            id,
            group,
            feature,
            operation,
            test,
            critical,
            weight,
            outcome,
            canary_value,
            baseline_value,
            canary_samples,
            baseline_samples,
            statistic,
            p_value,
            threshold,
            effect,
            min_effect,
            effect_kind,
            window_s,
            message,
        } = check;
        CheckJson {
            id: id.to_string(),
            group: group.name(),
            feature,
            operation,
            test: test.name(),
            critical,
            weight,
            outcome,
            canary_value,
            baseline_value,
            canary_samples,
            baseline_samples,
            statistic,
            p_value,
            threshold,
            effect,
            min_effect,
            effect_kind,
            window_s,
            message,
        }
    }
}

/// One stage gate's verdict: the engine's `judge::GateResult`, field for field.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Gate)]
pub(super) struct GateJson {
    #[schema(value_type = GateMetricSchema)]
    metric: GateMetric,
    max: Option<f64>,
    min: Option<f64>,
    value: Option<f64>,
    /// Confidence bounds on the measured value.
    lower: Option<f64>,
    upper: Option<f64>,
    samples: u64,
    /// The trailing window looked at; 0 is the whole stage so far.
    window_s: u64,
    #[schema(value_type = GateOutcomeSchema)]
    outcome: GateOutcome,
    message: String,
}

impl GateJson {
    fn of(gate: GateResult) -> Self {
        let GateResult {
            metric,
            max,
            min,
            value,
            lower,
            upper,
            samples,
            window_s,
            outcome,
            message,
        } = gate;
        GateJson {
            metric,
            max,
            min,
            value,
            lower,
            upper,
            samples,
            window_s,
            outcome,
            message,
        }
    }
}

impl CanaryView {
    fn of(a: AnalysisView) -> Self {
        let mut checks = a.checks;
        // The failing and most significant first: what a reader wants to see.
        checks.sort_by(|x, y| {
            y.outcome
                .cmp(&x.outcome)
                .then(y.statistic.unwrap_or(0.0).total_cmp(&x.statistic.unwrap_or(0.0)))
        });
        CanaryView {
            env: a.env,
            app: a.app,
            stable_version: a.stable_version,
            canary_version: a.canary_version,
            model: a.model,
            mode: a.mode,
            declared: a.declared,
            paused: a.paused,
            awaiting_approval: a.awaiting_approval.map(format_event_time),
            blocked_by: a.blocked_by,
            failed_in: a.failed_in.map(|(env, event_id)| FailedIn { env, event_id }),
            next_env: a.next_env,
            state: a.state.name(),
            score: a.score.map(|s| (s * 10.0).round() / 10.0),
            stage: a.stage.as_ref().map(StageJson::of),
            stages: a.stages,
            since: format_event_time(a.since),
            started_at: format_event_time(a.started_at),
            stage_started_at: format_event_time(a.stage_started_at),
            evaluated_at: format_event_time(a.evaluated_at),
            failed_at: a.failed_at.map(format_event_time),
            canary_requests: a.canary_requests,
            stable_requests: a.stable_requests,
            checks: checks.into_iter().map(CheckJson::of).collect(),
            gates: a.gates.into_iter().map(GateJson::of).collect(),
            traffic: TrafficJson::of(a.traffic),
        }
    }
}

/// `GET /api/v1/apps/{app}/canary`.
#[utoipa::path(
    get,
    path = "/api/v1/apps/{app}/canary",
    tag = "canary",
    params(("app" = String, Path, description = "The app (`service.name`, `namespace/` first when set)"), EnvQuery),
    responses(
        (status = 200, description = "The current (or last) analysis with its evidence; also what an Argo Rollouts `web` metric reads", body = CanaryView),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 404, description = "Unknown app, or no analysis (no canary has had traffic, no rollout is declared)", body = ErrorBody)
    )
)]
pub(super) async fn canary(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    Env(env): Env,
) -> Response {
    state
        .read_analyses(move |engine| {
            if engine.catalog().app(&env, &app).is_none() {
                return error(StatusCode::NOT_FOUND, &format!("no app {app:?} in env {env:?}"));
            }
            let Some(view) = engine.analysis(&env, &app) else {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "app {app:?} in env {env:?} has no canary analysis: no version besides the stable one has had traffic, and no rollout is declared"
                    ),
                );
            };
            Json(CanaryView::of(view)).into_response()
        })
        .await
}

/// `PUT /api/v1/apps/{app}/rollout`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"stable_version": "1.4.2", "canary_version": "1.5.0", "model": "staged"}))]
pub(super) struct RolloutRequest {
    stable_version: String,
    canary_version: String,
    /// A loaded model's name; the app's default model when left out.
    model: Option<String>,
    /// Replace an analysis of other versions that is still under way (409 without it).
    #[serde(default)]
    replace: bool,
    /// The rollout's own traffic plan: each part given replaces the model's.
    #[schema(value_type = Option<TrafficRequestSchema>)]
    traffic: Option<TrafficRequest>,
}

/// A declared rollout's traffic plan (`canaryd_engine::judge::TrafficRequest`).
#[derive(ToSchema)]
#[schema(as = TrafficRequest, example = json!({
    "percentages": [1, 10, 50, 100],
    "sticky": {"header": "x-user-id"},
    "headers": [{"name": "x-canary", "value": "always"}],
    "users": ["alice@example.com", "u-1042"]
}))]
#[allow(dead_code)] // describes the engine's type in the OpenAPI document
pub(super) struct TrafficRequestSchema {
    /// The canary's percentage in each of the model's stages, one per stage, non-decreasing,
    /// each in (0, 100]; replaces the stages' weights.
    percentages: Option<Vec<f64>>,
    sticky: Option<StickySchema>,
    /// Requests carrying any of these headers (exact value; the name in any case) always reach
    /// the canary while it is not failed. At most 16.
    headers: Option<Vec<HeaderMatchSchema>>,
    /// User ids (as the sticky key carries them) that always reach the canary while it is not
    /// failed. At most 1,000; needs `sticky`.
    users: Option<Vec<String>>,
}

/// Where a request carries its user's id: exactly one of `header` and `cookie`. The percentage
/// split then hashes users, so one user stays on one version.
#[derive(ToSchema)]
#[schema(as = Sticky)]
#[allow(dead_code)] // describes the engine's type in the OpenAPI document
pub(super) struct StickySchema {
    header: Option<String>,
    cookie: Option<String>,
}

/// A header rule. Names: letters, digits, `-`, `_`, `.`; values: letters, digits and
/// `-._~+/=:@!$%&*,()` (every traffic lever carries these verbatim), 1 to 128 characters.
#[derive(ToSchema)]
#[schema(as = HeaderMatch)]
#[allow(dead_code)] // describes the engine's type in the OpenAPI document
pub(super) struct HeaderMatchSchema {
    name: String,
    value: String,
}

/// A rollout's traffic plan as it is applied: the stages' percentages and the sticky key,
/// header rules and allow-list (each left out when not set).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = TrafficPlan)]
pub(crate) struct TrafficJson {
    percentages: Vec<f64>,
    #[schema(value_type = Option<StickySchema>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    sticky: Option<Sticky>,
    #[schema(value_type = Vec<HeaderMatchSchema>)]
    headers: Vec<HeaderMatch>,
    users: Vec<String>,
}

impl TrafficJson {
    pub(crate) fn of(view: TrafficView) -> Self {
        let TrafficView { percentages, plan } = view;
        TrafficJson {
            percentages,
            sticky: plan.sticky,
            headers: plan.headers,
            users: plan.users,
        }
    }
}

/// `PUT /api/v1/apps/{app}/rollout`: declares the roles (and the model) and starts the analysis.
#[utoipa::path(
    put,
    path = "/api/v1/apps/{app}/rollout",
    tag = "canary",
    params(("app" = String, Path, description = "The app (`service.name`, `namespace/` first when set)"), EnvQuery),
    request_body = RolloutRequest,
    responses(
        (status = 200, description = "Declared; the analysis it started", body = CanaryView),
        (status = 400, description = "A bad body or model, naming the field", body = ErrorBody),
        (status = 404, description = "Unknown app", body = ErrorBody),
        (status = 409, description = "An analysis of other versions is under way and `replace` is not set", body = ErrorBody)
    )
)]
pub(super) async fn declare_rollout(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    Env(env): Env,
    body: Result<Json<RolloutRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let rollout = match rollout_of(body, env, app) {
        Ok(rollout) => rollout,
        Err(response) => return *response,
    };
    if let Err(response) = routable(&state, &rollout).await {
        return response;
    }
    // The engine emits the `started` event (stored with its deliveries) before it answers.
    match state.engine.declare_rollout(rollout).await {
        Ok(Ok(view)) => (StatusCode::OK, Json(CanaryView::of(view))).into_response(),
        Ok(Err(e @ JudgeError::UnknownApp { .. })) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Ok(Err(e @ JudgeError::LiveAnalysis { .. })) => error(StatusCode::CONFLICT, &e.to_string()),
        Ok(Err(e @ JudgeError::UnknownModel(_))) => error(StatusCode::BAD_REQUEST, &format!("model: {e}")),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => unavailable(e),
    }
}

/// Whether the levers the app has can carry the rollout's traffic plan: HAProxy's maps read the
/// user id from one header or cookie, fixed in its config, so a plan naming another sticky key
/// (or an allow-list with none) is refused here, by field, before anything starts; an HTTPRoute
/// holds at most 127 header rules and users together.
async fn routable(state: &ApiState, rollout: &Rollout) -> Result<(), Response> {
    let maps = state
        .dispatcher
        .haproxy_maps()
        .find(&rollout.env, &rollout.app)
        .cloned();
    let route = state
        .dispatcher
        .httproutes()
        .find(&rollout.env, &rollout.app)
        .cloned();
    if maps.is_none() && route.is_none() {
        return Ok(());
    }
    let model = rollout
        .model
        .clone()
        .unwrap_or_else(|| canaryd_engine::judge::DEFAULT_MODEL.to_owned());
    let request = rollout.traffic.clone().unwrap_or_default();
    let plan = state
        .engine
        .read_analyses(move |engine| {
            let model = engine.judge().models().find(|m| m.name == model)?;
            Some(model.with_traffic(&request).map(|m| m.traffic))
        })
        .await
        .map_err(unavailable)?;
    // An unknown model or a bad plan: the declaration itself says so, by field.
    let Some(Ok(plan)) = plan else {
        return Ok(());
    };
    if let Some(target) = maps {
        target
            .can_route(plan.sticky.as_ref(), !plan.users.is_empty())
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("traffic.sticky: {e}")))?;
    }
    if let Some(target) = route {
        target
            .can_route(plan.headers.len(), plan.users.len())
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("traffic.users: {e}")))?;
    }
    Ok(())
}

/// The rollout a `PUT .../rollout` body declares, or the 400 naming what is wrong with it.
pub(super) fn rollout_of(
    body: Result<Json<RolloutRequest>, axum::extract::rejection::JsonRejection>,
    env: String,
    app: String,
) -> Result<Rollout, Box<Response>> {
    let bad = |message: &str| Box::new(error(StatusCode::BAD_REQUEST, message));
    let Json(request) = body.map_err(|e| bad(&e.body_text()))?;
    for (field, value) in [
        ("stable_version", &request.stable_version),
        ("canary_version", &request.canary_version),
    ] {
        if value.is_empty() {
            return Err(bad(&format!("{field} must not be empty")));
        }
    }
    Ok(Rollout {
        env,
        app,
        stable_version: request.stable_version,
        canary_version: request.canary_version,
        model: request.model,
        replace: request.replace,
        traffic: request.traffic,
    })
}

/// `DELETE /api/v1/apps/{app}/rollout`: ends the analysis (declared or inferred).
#[utoipa::path(
    delete,
    path = "/api/v1/apps/{app}/rollout",
    tag = "canary",
    params(("app" = String, Path, description = "The app (`service.name`, `namespace/` first when set)"), EnvQuery),
    responses(
        (status = 204, description = "Ended"),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 404, description = "Unknown app, or no analysis to end", body = ErrorBody)
    )
)]
pub(super) async fn end_rollout(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    Env(env): Env,
) -> Response {
    match state.engine.end_rollout(env.clone(), app.clone()).await {
        Ok(Ok(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => error(StatusCode::NOT_FOUND, &format!("app {app:?} in env {env:?}: {e}")),
        Err(e) => unavailable(e),
    }
}

/// `POST /api/v1/apps/{app}/canary/{operation}`: an operator's promote, pause, resume, abort or
/// approve.
#[utoipa::path(
    post,
    path = "/api/v1/apps/{app}/canary/{operation}",
    tag = "canary",
    params(
        ("app" = String, Path, description = "The app (`service.name`, `namespace/` first when set)"),
        ("operation" = String, Path, description = "`promote` (now, `canary.promoted` with weight 100), `pause` (judged on, but no stage passes and nothing fails), `resume`, `abort` (now, `canary.failed` with weight 0), or `approve` (an analysis waiting for approval enters its next stage: `canary.stage_passed`)"),
        EnvQuery
    ),
    responses(
        (status = 200, description = "Done, its event emitted; the analysis", body = CanaryView),
        (status = 400, description = "An unknown operation or a bad query parameter", body = ErrorBody),
        (status = 404, description = "Unknown app, or no analysis", body = ErrorBody),
        (status = 409, description = "Not now: the analysis is over, paused already, not paused, failed already, or not awaiting approval", body = ErrorBody)
    )
)]
pub(super) async fn operate(
    State(state): State<ApiState>,
    Path((app, operation)): Path<(String, String)>,
    Env(env): Env,
) -> Response {
    let Some(operation) = Operation::named(&operation) else {
        let known: Vec<&str> = Operation::ALL.iter().map(|o| o.name()).collect();
        return error(
            StatusCode::BAD_REQUEST,
            &format!("operation {operation:?} is not one of {}", known.join(", ")),
        );
    };
    match state.engine.operate(env.clone(), app.clone(), operation).await {
        Ok(Ok(view)) => (StatusCode::OK, Json(CanaryView::of(view))).into_response(),
        Ok(Err(e @ JudgeError::NotNow { .. })) => error(StatusCode::CONFLICT, &e.to_string()),
        Ok(Err(e)) => error(StatusCode::NOT_FOUND, &format!("app {app:?} in env {env:?}: {e}")),
        Err(e) => unavailable(e),
    }
}
