//! The HTTP API: health, readiness, the daemon's own metrics, and what the engine has seen.
//!
//! This module alone defines the JSON shapes of the API; the engine's types are converted at this
//! edge. Event times are written as RFC 3339 in UTC with nanoseconds.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::Method;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use canaryd_engine::baseline::Score;
use canaryd_engine::catalog::AppEntry;
use canaryd_engine::judge::{
    AnalysisView, Check, GateMetric, GateOutcome, GateResult, JudgeError, Mode, Outcome, StageView,
    State as CanaryState,
};
use canaryd_engine::{Engine, EventTime};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, OpenApi, PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::act::delivery::{DeliveryState, Dispatcher};
use crate::act::subscriptions::{self, Kind, NewSubscription, Subscription};
use crate::engine::{EngineGone, EngineHandle, Rollout};
use crate::events::{Event, EventType, event_seq};
use crate::stats::Stats;
use crate::store::Store;

/// What the API handlers read.
#[derive(Clone)]
pub struct ApiState {
    /// The engine's one writer: reads and rollout changes go through it.
    pub engine: EngineHandle,
    pub stats: Arc<Stats>,
    pub store: Store,
    pub dispatcher: Arc<Dispatcher>,
    /// When set, POST, PUT and DELETE need `Authorization: Bearer <token>`.
    pub api_token: Option<Arc<str>>,
    pub allow_link_local_targets: bool,
    /// True once storage is open and every receiver is bound; false again while shutting down.
    pub ready: Arc<AtomicBool>,
}

impl ApiState {
    /// Runs `read` on the engine's thread; a stopped engine answers 503.
    pub async fn read_engine(&self, read: impl FnOnce(&Engine) -> Response + Send + 'static) -> Response {
        self.engine.read(read).await.unwrap_or_else(unavailable)
    }
}

/// 503 for a request that needs the engine while it is stopping.
pub fn unavailable(e: EngineGone) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("{e}: canaryd is shutting down"),
    )
}

/// Runs store IO on a blocking thread: sled (and its fsyncs) never run on the async workers.
pub async fn blocking<R: Send + 'static>(io: impl FnOnce() -> R + Send + 'static) -> Result<R, Response> {
    crate::io::blocking(io)
        .await
        .map_err(|e| internal("a store operation failed", e))
}

pub fn router(state: ApiState) -> Router {
    let guarded = state.clone();
    let (routes, _) = routes().split_for_parts();
    routes
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(axum::middleware::from_fn_with_state(guarded, require_token))
        .with_state(state)
}

/// Every route of the HTTP API, each registered together with its OpenAPI description: `routes!`
/// takes a handler's method and path from its `#[utoipa::path]`, so what is served and what
/// `GET /openapi.json` describes cannot drift apart. (Only the dashboard's page and its files,
/// which are not JSON API, are plain routes.)
pub fn routes() -> OpenApiRouter<ApiState> {
    let api = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(apps))
        .routes(routes!(baseline))
        .routes(routes!(canary))
        .routes(routes!(declare_rollout, end_rollout))
        .routes(routes!(models))
        .routes(routes!(events))
        .routes(routes!(list_subscriptions, create_subscription))
        .routes(routes!(delete_subscription))
        .routes(routes!(deliveries))
        .merge(crate::gates::routes());
    crate::dashboard::add_routes(api)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "canaryd",
        description = "Judges canary versions from OpenTelemetry data. JSON under `/api/v1`; an \
            `env` query parameter selects the environment (default `default`). Event times are \
            RFC 3339 in UTC. Errors are `{\"error\": \"...\"}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "health", description = "Liveness, readiness, the daemon's own metrics"),
        (name = "apps", description = "What canaryd has seen and learned"),
        (name = "canary", description = "Canary analyses and declared rollouts"),
        (name = "events", description = "Events and webhook subscriptions"),
        (name = "gates", description = "Flagger's webhooks"),
        (name = "meta", description = "This description")
    )
)]
struct ApiDoc;

/// The OpenAPI 3.1 description of `routes`, with the bearer token on every write.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = routes().into_openapi();
    secure_writes(&mut doc);
    doc
}

/// The name of the bearer-token security scheme.
const BEARER: &str = "bearer";

/// Marks every POST, PUT, DELETE and PATCH as needing the bearer token, with its 401, as
/// `require_token` enforces on all of them alike.
fn secure_writes(doc: &mut utoipa::openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "The daemon's `api_token`. When it is set, every POST, PUT and DELETE needs \
                     `Authorization: Bearer <api_token>` (401 without); reads never do.",
                ))
                .build(),
        ),
    );
    for item in doc.paths.paths.values_mut() {
        for operation in [&mut item.post, &mut item.put, &mut item.delete, &mut item.patch]
            .into_iter()
            .flatten()
        {
            operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
            operation
                .responses
                .responses
                .entry("401".to_owned())
                .or_insert_with(|| {
                    ResponseBuilder::new()
                        .description("`api_token` is set and the request lacks its bearer token")
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                                .build(),
                        )
                        .into()
                });
        }
    }
}

/// `GET /openapi.json`: this API's OpenAPI document, built once.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object))
)]
async fn openapi_json() -> Response {
    static DOC: OnceLock<Result<String, String>> = OnceLock::new();
    match DOC.get_or_init(|| openapi().to_json().map_err(|e| e.to_string())) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json.as_str()).into_response(),
        Err(e) => internal("cannot write the OpenAPI document", e),
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "no app \"checkout\" in env \"prod\""}))]
pub struct ErrorBody {
    /// What was wrong; for a bad field, its name first.
    pub error: String,
}

/// A JSON error body: `{"error": "..."}`.
pub fn error(status: StatusCode, message: &str) -> Response {
    let body = ErrorBody {
        error: message.to_owned(),
    };
    (status, Json(body)).into_response()
}

/// A string schema with the given values, for names the engine defines.
fn names_schema<E: Into<serde_json::Value>>(
    description: &str,
    names: impl IntoIterator<Item = E>,
) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .enum_values(Some(names))
        .into()
}

/// How serde writes `value` (an enum's variant name).
fn serde_name(value: impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// A schema named `$name` for a set of names (`$names`, an expression yielding them), whose
/// values come from the engine's own types, so that they cannot drift from what is served.
macro_rules! names_type {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $description:literal, $names:expr) => {
        $(#[$doc])*
        pub(crate) struct $ty;

        impl PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                names_schema($description, $names)
            }
        }

        impl ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

names_type!(
    /// `judge::State`'s names.
    CanaryStateSchema,
    "CanaryState",
    "An analysis's state: `insufficient_data` (no verdict yet, not a failure), `healthy`, \
     `marginal` (failing at this look, not yet confirmed), `failing`, `promoted`, `rolled_back`",
    CanaryState::ALL.iter().map(|s| s.name())
);

names_type!(
    /// `judge::Outcome`'s names.
    OutcomeSchema,
    "CheckOutcome",
    "What a check concluded at the last look",
    {
        // Exhaustive, so that a new outcome does not compile until it is listed here.
        let _ = |o: Outcome| match o {
            Outcome::Pass | Outcome::InsufficientData | Outcome::Marginal | Outcome::Fail => (),
        };
        [Outcome::Pass, Outcome::InsufficientData, Outcome::Marginal, Outcome::Fail].map(Outcome::name)
    }
);

names_type!(
    /// `judge::GateOutcome`'s names.
    GateOutcomeSchema,
    "GateOutcome",
    "What a stage gate concluded",
    {
        let _ = |o: GateOutcome| match o {
            GateOutcome::Pass | GateOutcome::Pending | GateOutcome::Fail => (),
        };
        [GateOutcome::Pass, GateOutcome::Pending, GateOutcome::Fail].map(serde_name)
    }
);

names_type!(
    /// `judge::GateMetric`'s names.
    GateMetricSchema,
    "GateMetric",
    "What a stage gate measures",
    {
        let _ = |m: GateMetric| match m {
            GateMetric::ErrorRate
            | GateMetric::Availability
            | GateMetric::LatencyP50Ms
            | GateMetric::LatencyP95Ms
            | GateMetric::LatencyP99Ms => (),
        };
        [
            GateMetric::ErrorRate,
            GateMetric::Availability,
            GateMetric::LatencyP50Ms,
            GateMetric::LatencyP95Ms,
            GateMetric::LatencyP99Ms,
        ]
        .map(serde_name)
    }
);

names_type!(
    /// `judge::Mode`'s names.
    ModeSchema,
    "Mode",
    "How verdicts are acted on: `enforce`, or `shadow` (judged and sent as `dry_run`, no traffic moved)",
    {
        let _ = |m: Mode| match m {
            Mode::Enforce | Mode::Shadow => (),
        };
        [Mode::Enforce, Mode::Shadow].map(serde_name)
    }
);

/// A query string parsed into `T`; a bad one is refused with a JSON 400 naming the problem.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(query)) => Ok(ApiQuery(query)),
            Err(e) => Err(error(StatusCode::BAD_REQUEST, &e.body_text())),
        }
    }
}

/// With `api_token` set, every request that changes something must carry it as a bearer token.
/// The comparison takes the same time whatever the token sent, so it leaks nothing.
async fn require_token(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let changes = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::DELETE | Method::PATCH
    );
    if let (true, Some(token)) = (changes, &state.api_token) {
        let sent = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            // The scheme is case-insensitive (RFC 9110); the token is not.
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        let matches: bool = sent.as_bytes().ct_eq(token.as_bytes()).into();
        if !matches {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "this request needs Authorization: Bearer <api_token>",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
    }
    next.run(request).await
}

/// `GET /healthz`: liveness.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The process is alive", content_type = "text/plain", body = String, example = "ok\n"))
)]
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: readiness.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Storage is open and every receiver is bound", content_type = "text/plain", body = String, example = "ready\n"),
        (status = 503, description = "Starting or shutting down", content_type = "text/plain", body = String, example = "not ready\n")
    )
)]
async fn readyz(State(state): State<ApiState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

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
async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| String::from_utf8_lossy(v.as_bytes()).contains("application/openmetrics-text"));
    let views = match state
        .engine
        .read(|engine| engine.judge().analyses().map(|a| a.view()).collect::<Vec<_>>())
        .await
    {
        Ok(views) => views,
        Err(e) => return unavailable(e),
    };
    let (content_type, body) = if wants_openmetrics {
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", {
            let text = state.stats.render_openmetrics();
            let canary = canary_metrics(&views);
            match text.strip_suffix("# EOF\n") {
                Some(head) => format!("{head}{canary}# EOF\n"),
                None => text + &canary,
            }
        })
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            state.stats.render_prometheus() + &canary_metrics(&views),
        )
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

pub use crate::events::format_event_time;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AppsQuery {
    /// Only this environment's apps (all of them when left out).
    env: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
struct AppsView {
    apps: Vec<AppView>,
}

#[derive(Debug, Serialize, ToSchema)]
struct AppView {
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
}

#[derive(Debug, Serialize, ToSchema)]
struct CanarySummary {
    stable_version: String,
    canary_version: String,
    #[schema(value_type = CanaryStateSchema)]
    state: &'static str,
    score: Option<f64>,
    stage: Option<StageJson>,
}

#[derive(Debug, Serialize, ToSchema)]
struct VersionView {
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
struct OperationView {
    operation: String,
    requests: u64,
    errors: u64,
}

#[derive(Debug, Serialize, ToSchema)]
struct DownstreamView {
    downstream: String,
    calls: u64,
}

#[derive(Debug, Serialize, ToSchema)]
struct ExceptionTypeView {
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
async fn apps(State(state): State<ApiState>, ApiQuery(query): ApiQuery<AppsQuery>) -> Response {
    state.read_engine(move |engine| apps_of(engine, query)).await
}

fn apps_of(engine: &Engine, query: AppsQuery) -> Response {
    let apps = engine
        .catalog()
        .apps()
        .filter(|(env, _, _)| query.env.as_deref().is_none_or(|wanted| wanted == *env))
        .map(|(env, app, entry)| {
            let analysis = engine.analysis(env, app);
            let inferred = engine
                .baselines(env, app, None)
                .and_then(|b| b.stable_version.map(str::to_owned));
            app_view(env, app, entry, analysis.as_ref(), inferred)
        })
        .collect();
    Json(AppsView { apps }).into_response()
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
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct BaselineQuery {
    /// The environment (default `default`).
    env: Option<String>,
    /// A version's own baselines; left out, the app's (learned from its stable version).
    version: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
struct BaselineView {
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
struct FeatureView {
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
struct SlotView {
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
async fn baseline(
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
        .read_engine(move |engine| baseline_of(engine, env, app, query.version))
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Only this app's events.
    app: Option<String>,
    /// Only this environment's events.
    env: Option<String>,
    /// Only events of this type (`canaryd.canary.failed`, ...).
    #[serde(rename = "type")]
    #[param(value_type = Option<EventType>)]
    event_type: Option<String>,
    /// An event id (events after it), or an RFC 3339 time (events emitted at or after it).
    since: Option<String>,
    /// At most this many events, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
struct EventsView {
    events: Vec<Event>,
    /// The id to pass as `since` for the events after these; null when there were none.
    last_id: Option<String>,
}

const MAX_EVENTS_PER_PAGE: usize = 1_000;

/// `GET /api/v1/events`.
#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "The history of canary and anomaly events, oldest first", body = EventsView),
        (status = 400, description = "A bad query parameter (unknown type, bad `since` or `limit`)", body = ErrorBody)
    )
)]
async fn events(State(state): State<ApiState>, ApiQuery(query): ApiQuery<EventsQuery>) -> Response {
    let event_type = match query.event_type.as_deref().map(|t| (t, EventType::parse(t))) {
        None => None,
        Some((_, Some(t))) => Some(t),
        Some((t, None)) => {
            let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
            return error(
                StatusCode::BAD_REQUEST,
                &format!("type: unknown event type {t:?}; known: {}", known.join(", ")),
            );
        }
    };
    let (after, not_before) = match query.since.as_deref() {
        None => (None, None),
        Some(since) => match (event_seq(since), humantime::parse_rfc3339_weak(since)) {
            (Some(seq), _) => (Some(seq), None),
            (None, Ok(time)) => (None, Some(time)),
            (None, Err(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("since: {since:?} is neither an event id nor an RFC 3339 time"),
                );
            }
        },
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_EVENTS_PER_PAGE).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("limit: must be between 1 and {MAX_EVENTS_PER_PAGE}"),
        );
    }
    let keep = move |e: &Event| {
        query.app.as_deref().is_none_or(|a| a == e.data.app)
            && query.env.as_deref().is_none_or(|env| env == e.data.env)
            && event_type.is_none_or(|t| t == e.event_type)
            && not_before.is_none_or(|t| humantime::parse_rfc3339_weak(&e.time).is_ok_and(|at| at >= t))
    };
    let store = state.store.clone();
    let read = match blocking(move || store.events(after, limit, keep)).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    match read {
        Ok(events) => {
            let last_id = events.last().map(|e| e.id.clone());
            Json(EventsView { events, last_id }).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read events");
            error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the event history")
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct SubscriptionView {
    id: String,
    url: String,
    events: Vec<EventType>,
    kind: Kind,
    /// Wall-clock time of creation, RFC 3339.
    created_at: String,
    /// When the receiver answered 410 Gone and nothing more is sent.
    disabled: Option<String>,
    /// Only in the answer to the POST that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

/// `GET /api/v1/subscriptions`.
#[derive(Debug, Serialize, ToSchema)]
struct SubscriptionsView {
    /// Without their secrets.
    subscriptions: Vec<SubscriptionView>,
}

impl SubscriptionView {
    fn of(s: &Subscription, with_secret: bool) -> Self {
        SubscriptionView {
            id: s.id.clone(),
            url: s.url.clone(),
            events: s.events.clone(),
            kind: s.kind,
            created_at: s.created_at.clone(),
            disabled: s.disabled.clone(),
            secret: with_secret.then(|| s.secret.clone()),
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "{what}");
    error(StatusCode::INTERNAL_SERVER_ERROR, what)
}

/// `POST /api/v1/subscriptions`.
#[utoipa::path(
    post,
    path = "/api/v1/subscriptions",
    tag = "events",
    request_body = NewSubscription,
    responses(
        (status = 201, description = "Created; the secret is shown only here", body = SubscriptionView),
        (status = 400, description = "A bad body, naming the field", body = ErrorBody)
    )
)]
async fn create_subscription(
    State(state): State<ApiState>,
    body: Result<Json<NewSubscription>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(new) = match body {
        Ok(body) => body,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let (url, events, kind, secret) = match subscriptions::validate(new, state.allow_link_local_targets) {
        Ok(checked) => checked,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let (id, secret) = match (
        subscriptions::generate_id(),
        secret.map_or_else(subscriptions::generate_secret, Ok),
    ) {
        (Ok(id), Ok(secret)) => (id, secret),
        (Err(e), _) | (_, Err(e)) => return internal("cannot draw random bytes", e),
    };
    let subscription = Subscription {
        id,
        url,
        events,
        kind,
        secret,
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        disabled: None,
    };
    let store = state.store.clone();
    let stored = {
        let subscription = subscription.clone();
        blocking(move || store.put_subscription(&subscription)).await
    };
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return internal("cannot store the subscription", e),
        Err(response) => return response,
    }
    state.dispatcher.sync().await;
    tracing::info!(id = %subscription.id, url = %subscription.url, "subscription created");
    (
        StatusCode::CREATED,
        Json(SubscriptionView::of(&subscription, true)),
    )
        .into_response()
}

/// `GET /api/v1/subscriptions`.
#[utoipa::path(
    get,
    path = "/api/v1/subscriptions",
    tag = "events",
    responses((status = 200, description = "Every subscription, without secrets", body = SubscriptionsView))
)]
async fn list_subscriptions(State(state): State<ApiState>) -> Response {
    let store = state.store.clone();
    let read = match blocking(move || store.subscriptions()).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    match read {
        Ok(all) => {
            let subscriptions = all.iter().map(|s| SubscriptionView::of(s, false)).collect();
            Json(SubscriptionsView { subscriptions }).into_response()
        }
        Err(e) => internal("cannot read subscriptions", e),
    }
}

/// `DELETE /api/v1/subscriptions/{id}`.
#[utoipa::path(
    delete,
    path = "/api/v1/subscriptions/{id}",
    tag = "events",
    params(("id" = String, Path, description = "The subscription's id (`sub_...`)")),
    responses(
        (status = 204, description = "Deleted, with its pending deliveries"),
        (status = 404, description = "No such subscription", body = ErrorBody)
    )
)]
async fn delete_subscription(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let store = state.store.clone();
    let deleted = {
        let id = id.clone();
        match blocking(move || store.delete_subscription(&id)).await {
            Ok(deleted) => deleted,
            Err(response) => return response,
        }
    };
    match deleted {
        Ok(true) => {
            state.dispatcher.sync().await;
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, &format!("no subscription {id:?}")),
        Err(e) => internal("cannot delete the subscription", e),
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct DeliveryView {
    event_id: String,
    event_type: EventType,
    state: DeliveryState,
    attempts: u32,
    /// The receiver's last HTTP status.
    last_status: Option<u16>,
    last_error: Option<String>,
    first_attempt: Option<String>,
    next_retry: Option<String>,
    delivered_at: Option<String>,
}

/// `GET /api/v1/subscriptions/{id}/deliveries`.
#[derive(Debug, Serialize, ToSchema)]
struct DeliveriesView {
    deliveries: Vec<DeliveryView>,
}

fn wall_time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `GET /api/v1/subscriptions/{id}/deliveries`.
#[utoipa::path(
    get,
    path = "/api/v1/subscriptions/{id}/deliveries",
    tag = "events",
    params(("id" = String, Path, description = "The subscription's id (`sub_...`)")),
    responses(
        (status = 200, description = "Each delivery: event id and type, state, attempts, last status or error, next retry", body = DeliveriesView),
        (status = 404, description = "No such subscription", body = ErrorBody)
    )
)]
async fn deliveries(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let store = state.store.clone();
    let read = {
        let id = id.clone();
        blocking(move || {
            store
                .subscription(&id)
                .and_then(|found| found.map(|_| store.deliveries(&id, 1_000)).transpose())
        })
        .await
    };
    let read = match read {
        Ok(read) => read,
        Err(response) => return response,
    };
    let read = match read {
        Ok(Some(all)) => Ok(all),
        Ok(None) => return error(StatusCode::NOT_FOUND, &format!("no subscription {id:?}")),
        Err(e) => Err(e),
    };
    match read {
        Ok(all) => {
            let deliveries = all
                .into_iter()
                .map(|d| DeliveryView {
                    event_id: d.event_id,
                    event_type: d.event_type,
                    state: d.state,
                    attempts: d.attempts,
                    last_status: d.last_status,
                    last_error: d.last_error,
                    first_attempt: d.first_attempt_ms.map(wall_time),
                    next_retry: (d.state == DeliveryState::Pending).then(|| wall_time(d.next_attempt_ms)),
                    delivered_at: d.delivered_ms.map(wall_time),
                })
                .collect();
            Json(DeliveriesView { deliveries }).into_response()
        }
        Err(e) => internal("cannot read deliveries", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_are_rfc3339_with_nanoseconds() {
        assert_eq!(
            format_event_time(1_767_571_200_000_000_001),
            "2026-01-05T00:00:00.000000001Z"
        );
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EnvQuery {
    /// The environment (default `default`).
    env: Option<String>,
}

/// The environment asked for, or a 400 when it is empty.
pub(crate) fn env_of(query: EnvQuery) -> Result<String, Box<Response>> {
    let env = query.env.unwrap_or_else(|| "default".into());
    if env.is_empty() {
        return Err(Box::new(error(StatusCode::BAD_REQUEST, "env must not be empty")));
    }
    Ok(env)
}

#[derive(Debug, Serialize, ToSchema)]
struct StageJson {
    index: usize,
    name: String,
    weight: f64,
}

impl StageJson {
    fn of(s: &StageView) -> Self {
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
        "gates": [gate]
    })
}

/// `GET /api/v1/apps/{app}/canary`: the analysis with its evidence. Times are RFC 3339 event time.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = canary_example)]
struct CanaryView {
    env: String,
    app: String,
    stable_version: String,
    canary_version: String,
    model: String,
    #[schema(value_type = ModeSchema)]
    mode: Mode,
    /// Whether the roles were declared through the rollout API (else inferred from traffic).
    declared: bool,
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
}

/// One check's evidence: the engine's `judge::Check`, field for field.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Check)]
struct CheckJson {
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
    /// The stable's value in the reference window (or the learned baseline's, for baseline checks).
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
        }
    }
}

/// One stage gate's verdict: the engine's `judge::GateResult`, field for field.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Gate)]
struct GateJson {
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
async fn canary(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    ApiQuery(query): ApiQuery<EnvQuery>,
) -> Response {
    let env = match env_of(query) {
        Ok(env) => env,
        Err(response) => return *response,
    };
    state
        .read_engine(move |engine| {
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
struct RolloutRequest {
    stable_version: String,
    canary_version: String,
    /// A loaded model's name; the app's default model when left out.
    model: Option<String>,
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
        (status = 404, description = "Unknown app", body = ErrorBody)
    )
)]
async fn declare_rollout(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    ApiQuery(query): ApiQuery<EnvQuery>,
    body: Result<Json<RolloutRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let env = match env_of(query) {
        Ok(env) => env,
        Err(response) => return *response,
    };
    let Json(request) = match body {
        Ok(body) => body,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    for (field, value) in [
        ("stable_version", &request.stable_version),
        ("canary_version", &request.canary_version),
    ] {
        if value.is_empty() {
            return error(StatusCode::BAD_REQUEST, &format!("{field} must not be empty"));
        }
    }
    let rollout = Rollout {
        env,
        app,
        stable_version: request.stable_version,
        canary_version: request.canary_version,
        model: request.model,
    };
    // The engine emits the `started` event (stored with its deliveries) before it answers.
    match state.engine.declare_rollout(rollout).await {
        Ok(Ok(view)) => (StatusCode::OK, Json(CanaryView::of(view))).into_response(),
        Ok(Err(e @ JudgeError::UnknownApp { .. })) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Ok(Err(e @ JudgeError::UnknownModel(_))) => error(StatusCode::BAD_REQUEST, &format!("model: {e}")),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => unavailable(e),
    }
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
async fn end_rollout(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    ApiQuery(query): ApiQuery<EnvQuery>,
) -> Response {
    let env = match env_of(query) {
        Ok(env) => env,
        Err(response) => return *response,
    };
    match state.engine.end_rollout(env.clone(), app.clone()).await {
        Ok(Ok(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => error(StatusCode::NOT_FOUND, &format!("app {app:?} in env {env:?}: {e}")),
        Err(e) => unavailable(e),
    }
}

/// `GET /api/v1/models`.
#[derive(Debug, Serialize, ToSchema)]
struct ModelsView {
    /// Each as `models/*.toml` gives it, every default filled in (see `models/README.md`):
    /// `name`, `description`, `mode`, `decision`, `checks`, `stages`.
    #[schema(value_type = Vec<Object>)]
    models: Vec<canaryd_engine::judge::Model>,
}

/// `GET /api/v1/models`: the loaded models, as validated.
#[utoipa::path(
    get,
    path = "/api/v1/models",
    tag = "canary",
    responses((status = 200, description = "The loaded analysis models, as validated", body = ModelsView))
)]
async fn models(State(state): State<ApiState>) -> Response {
    state
        .read_engine(|engine| {
            let models = engine.judge().models().cloned().collect();
            Json(ModelsView { models }).into_response()
        })
        .await
}

/// Each app's canary analysis as gauges: state, score, stage weight, and every check's outcome
/// and statistic, so that alerts and dashboards can be built on them.
fn canary_metrics(views: &[AnalysisView]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let _ = writeln!(
        out,
        "# HELP canaryd_canary_state Each app's canary analysis: 1 for its current state, 0 for the others.\n# TYPE canaryd_canary_state gauge"
    );
    for v in views {
        for s in CanaryState::ALL {
            let _ = writeln!(
                out,
                "canaryd_canary_state{{env=\"{}\",app=\"{}\",canary_version=\"{}\",state=\"{}\"}} {}",
                esc(&v.env),
                esc(&v.app),
                esc(&v.canary_version),
                s.name(),
                u8::from(v.state == s)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP canaryd_canary_score Each app's canary score, 0 (failing everything) to 100.\n# TYPE canaryd_canary_score gauge"
    );
    for v in views {
        if let Some(score) = v.score {
            let _ = writeln!(
                out,
                "canaryd_canary_score{{env=\"{}\",app=\"{}\",canary_version=\"{}\"}} {score}",
                esc(&v.env),
                esc(&v.app),
                esc(&v.canary_version)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP canaryd_canary_stage_weight The traffic weight (percent) of each canary's current stage.\n# TYPE canaryd_canary_stage_weight gauge"
    );
    for v in views {
        if let Some(stage) = &v.stage {
            let _ = writeln!(
                out,
                "canaryd_canary_stage_weight{{env=\"{}\",app=\"{}\",canary_version=\"{}\",stage=\"{}\"}} {}",
                esc(&v.env),
                esc(&v.app),
                esc(&v.canary_version),
                esc(&stage.name),
                stage.weight
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP canaryd_canary_check_failing Each check of each canary: 1 when it fails, 0 otherwise.\n# TYPE canaryd_canary_check_failing gauge"
    );
    let mut statistics = String::new();
    for v in views {
        for c in &v.checks {
            let labels = format!(
                "env=\"{}\",app=\"{}\",canary_version=\"{}\",group=\"{}\",feature=\"{}\",test=\"{}\",outcome=\"{}\"",
                esc(&v.env),
                esc(&v.app),
                esc(&v.canary_version),
                c.group,
                esc(&c.feature),
                c.test,
                c.outcome.name()
            );
            let _ = writeln!(
                out,
                "canaryd_canary_check_failing{{{labels}}} {}",
                u8::from(c.outcome == canaryd_engine::judge::Outcome::Fail)
            );
            if let Some(stat) = c.statistic.filter(|s| s.is_finite()) {
                let _ = writeln!(statistics, "canaryd_canary_check_statistic{{{labels}}} {stat}");
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP canaryd_canary_check_statistic Each check's statistic (a normal deviate, or band half-widths for baseline checks).\n# TYPE canaryd_canary_check_statistic gauge"
    );
    out.push_str(&statistics);
    out
}
