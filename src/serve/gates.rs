//! Rollout-controller gates: Flagger's webhooks answered from the canary analysis.
//!
//! Its one job is to turn an app's analysis into the status codes Flagger acts on:
//! - `POST /api/v1/gates/flagger` (Flagger's `pre-rollout`, `rollout` and `confirm-promotion`
//!   hooks): 200 while the canary may proceed, 412 with `{proceed: false, reasons: [...]}` when it
//!   must not (Flagger counts any status over 202 as a failed check of a rollout hook, and holds
//!   the promotion while a confirm-promotion hook refuses). Before promotion, a healthy canary
//!   that the promotion chain blocks (`blocked_by`) is refused too.
//! - `POST /api/v1/gates/flagger/rollback` (Flagger's `rollback` hook, inverted sense): 200 when
//!   the canary is `failing` or `rolled_back` ("roll back now"), 409 otherwise.
//!
//! Flagger's `name` is the app and its `namespace` the env, unless `metadata.app` /
//! `metadata.env` say otherwise. Flagger sends the phase `Progressing` to both its `pre-rollout`
//! and `rollout` hooks, so a hook that runs before the canary gets traffic says so with
//! `metadata.hook: pre-rollout`; the phases `Initializing`, `Initialized` and `Waiting` count as
//! before traffic too. These routes sit behind the API's bearer-token check like every POST. The
//! JSON shapes of these answers are defined here (the rest of the API's are in `api`).
//!
//! A gate call answers for one canary version only, never for whichever canary canaryd sees now:
//! `metadata.version` names it outright; otherwise the first call of a Flagger revision (its
//! `checksum`) made while an analysis is under way pins that checksum to the analysis's canary
//! version (`GatePins`), and later calls with it are answered for that version. When the app's
//! analysis is of another version (the pinned one was rolled back and a new canary has started),
//! the gate holds (412) and the rollback hook says so (409), naming both versions.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use canaryd_engine::judge::{AnalysisView, GateOutcome, Outcome, State as CanaryState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Access, Granted, unauthorized};
use super::{ApiState, CanaryStateSchema, ErrorBody, error};

/// At most this many reasons go into an answer (Flagger copies the body into its events).
const MAX_REASONS: usize = 10;

/// Flagger revisions remembered by `GatePins`; past it the oldest pin is forgotten (counted).
const MAX_PINS: usize = 4096;

/// The canary version each Flagger revision (env, app, checksum) was first judged as. Bounded:
/// the oldest pins go first, counted in `canaryd_gate_pins_forgotten_total`. Kept in memory: after
/// a restart a revision is pinned again at its next call (analyses themselves survive restarts).
/// (env, app, checksum): one Flagger revision of one app.
type Revision = (String, String, String);

#[derive(Default)]
pub struct GatePins {
    /// The pins, and their revisions oldest first.
    pins: Mutex<(HashMap<Revision, String>, VecDeque<Revision>)>,
}

impl GatePins {
    /// The version `checksum` is pinned to, pinning it to `current` if it is not pinned yet and
    /// `current` is given. Returns the pin and whether an old one was forgotten for room.
    fn pin(&self, env: &str, app: &str, checksum: &str, current: Option<&str>) -> (Option<String>, bool) {
        let Ok(mut guard) = self.pins.lock() else {
            return (current.map(str::to_owned), false);
        };
        let (map, order) = &mut *guard;
        let key = (env.to_owned(), app.to_owned(), checksum.to_owned());
        if let Some(version) = map.get(&key) {
            return (Some(version.clone()), false);
        }
        let Some(current) = current else {
            return (None, false);
        };
        let mut forgot = false;
        if map.len() >= MAX_PINS
            && let Some(oldest) = order.pop_front()
        {
            map.remove(&oldest);
            forgot = true;
        }
        map.insert(key.clone(), current.to_owned());
        order.push_back(key);
        (Some(current.to_owned()), forgot)
    }
}

/// Phases of a Flagger canary that come before the canary gets any traffic.
const PRE_TRAFFIC_PHASES: [&str; 3] = ["Initializing", "Initialized", "Waiting"];

/// The gate routes, to be merged into the API router (inside its bearer-token check).
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(flagger_gate))
        .routes(routes!(flagger_rollback))
}

/// What Flagger POSTs to a webhook. Fields Flagger may add later are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({
    "name": "checkout",
    "namespace": "prod",
    "phase": "Progressing",
    "checksum": "6b8d5c7f9",
    "metadata": {"hook": "rollout"}
}))]
pub(super) struct FlaggerPayload {
    /// The Canary's name: the app, unless `metadata.app` says otherwise.
    name: String,
    /// The Canary's namespace: the env, unless `metadata.env` says otherwise.
    namespace: String,
    /// Flagger's phase; `Initializing`, `Initialized` and `Waiting` count as before traffic.
    #[serde(default)]
    phase: String,
    /// The canary's revision as Flagger knows it; echoed back, so that Flagger's events tell which
    /// revision was judged.
    #[serde(default)]
    checksum: Option<String>,
    /// The webhook's `metadata` from the Canary resource: `app`, `env`, `version` (the canary
    /// version this rollout deploys, to be judged and no other), `token`, and `hook`
    /// (`pre-rollout`, `rollout` or `confirm-promotion`) are read.
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// Where a hook stands in Flagger's rollout, from `metadata.hook`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    PreRollout,
    Rollout,
    /// Flagger's `confirm-promotion`: asked before it promotes, and repeated while refused (the
    /// canary keeps its traffic and its checks meanwhile).
    ConfirmPromotion,
}

/// A payload, checked: which analysis it asks about and whether traffic has started.
#[derive(Debug)]
pub(super) struct GateRequest {
    pub(super) env: String,
    pub(super) app: String,
    phase: String,
    checksum: Option<String>,
    pre_traffic: bool,
    /// Flagger's `confirm-promotion` hook: a version the promotion chain holds is not promoted.
    before_promotion: bool,
    /// `metadata.version`: the one canary version this call may be answered for.
    version: Option<String>,
    /// `metadata.token`: Flagger cannot set headers, so the gate's token can come here.
    token: Option<String>,
}

impl GateRequest {
    /// The request, or a 400 naming the field at fault.
    fn of(payload: FlaggerPayload) -> Result<GateRequest, Box<Response>> {
        let bad = |message: String| Box::new(error(StatusCode::BAD_REQUEST, &message));
        let metadata = payload.metadata.unwrap_or_default();
        let pick = |key: &str, field: &str, default: String| -> Result<String, Box<Response>> {
            match metadata.get(key) {
                Some(value) if value.is_empty() => Err(bad(format!("metadata.{key} must not be empty"))),
                Some(value) => Ok(value.clone()),
                None if default.is_empty() => Err(bad(format!("{field} must not be empty"))),
                None => Ok(default),
            }
        };
        let app = pick("app", "name", payload.name)?;
        let env = pick("env", "namespace", payload.namespace)?;
        let hook = match metadata.get("hook").map(String::as_str) {
            None => None,
            Some("pre-rollout") => Some(Hook::PreRollout),
            Some("rollout") => Some(Hook::Rollout),
            Some("confirm-promotion") => Some(Hook::ConfirmPromotion),
            Some(other) => {
                return Err(bad(format!(
                    "metadata.hook must be \"pre-rollout\", \"rollout\" or \"confirm-promotion\", not {other:?}"
                )));
            }
        };
        let pre_traffic = hook == Some(Hook::PreRollout)
            || hook.is_none()
                && PRE_TRAFFIC_PHASES
                    .iter()
                    .any(|p| p.eq_ignore_ascii_case(&payload.phase));
        let version = match metadata.get("version") {
            Some(v) if v.is_empty() => return Err(bad("metadata.version must not be empty".to_owned())),
            other => other.cloned(),
        };
        Ok(GateRequest {
            env,
            app,
            phase: payload.phase,
            checksum: payload.checksum.filter(|c| !c.is_empty()),
            pre_traffic,
            before_promotion: hook == Some(Hook::ConfirmPromotion),
            version,
            token: metadata.get("token").cloned(),
        })
    }
}

/// The answer of `POST /api/v1/gates/flagger`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "env": "prod",
    "app": "checkout",
    "phase": "Progressing",
    "checksum": "6b8d5c7f9",
    "proceed": false,
    "state": "failing",
    "canary_version": "1.5.0",
    "score": 12.5,
    "reasons": ["error ratio 30.00% against 0.10% (300 of 1000 requests)"]
}))]
pub(super) struct GateAnswer {
    env: String,
    app: String,
    phase: String,
    checksum: Option<String>,
    /// Whether the canary may proceed (200) or not (412).
    proceed: bool,
    /// The analysis's state, when there is one.
    #[schema(value_type = Option<CanaryStateSchema>)]
    state: Option<&'static str>,
    canary_version: Option<String>,
    score: Option<f64>,
    reasons: Vec<String>,
}

/// The answer of `POST /api/v1/gates/flagger/rollback`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "env": "prod",
    "app": "checkout",
    "phase": "Progressing",
    "checksum": "6b8d5c7f9",
    "rollback": false,
    "state": "healthy",
    "canary_version": "1.5.0",
    "reasons": ["canary 1.5.0 is healthy: no reason to roll back"]
}))]
pub(super) struct RollbackAnswer {
    env: String,
    app: String,
    phase: String,
    checksum: Option<String>,
    /// Whether Flagger should roll back now (200) or not (409).
    rollback: bool,
    /// The analysis's state, when there is one.
    #[schema(value_type = Option<CanaryStateSchema>)]
    state: Option<&'static str>,
    canary_version: Option<String>,
    reasons: Vec<String>,
}

/// The parsed payload, or the 400 that names what is wrong with it.
pub(super) fn parse(body: Result<Json<FlaggerPayload>, JsonRejection>) -> Result<GateRequest, Box<Response>> {
    match body {
        Ok(Json(payload)) => GateRequest::of(payload),
        Err(e) => Err(Box::new(error(StatusCode::BAD_REQUEST, &e.body_text()))),
    }
}

/// The analysis the request asks about, and why there is none when there is none.
pub(super) async fn lookup(state: &ApiState, request: &GateRequest) -> Result<AnalysisView, String> {
    let (env, app) = (request.env.clone(), request.app.clone());
    let found = state
        .engine
        .read_analyses(move |engine| {
            if engine.catalog().app(&env, &app).is_none() {
                return Err(format!(
                    "no app {app:?} in env {env:?}: canaryd has seen no telemetry for it"
                ));
            }
            engine.analysis(&env, &app).ok_or_else(|| {
                format!(
                    "app {app:?} in env {env:?} has no canary analysis: no canary version has sent telemetry and no rollout is declared"
                )
            })
        })
        .await;
    let view = found.unwrap_or_else(|e| Err(format!("{e}: canaryd is shutting down")))?;
    // The version this call is about: named outright, or pinned to the revision's checksum.
    let pinned = match (&request.version, &request.checksum) {
        (Some(version), _) => Some(version.clone()),
        (None, Some(checksum)) => {
            let under_way = (!matches!(view.state, CanaryState::Promoted | CanaryState::RolledBack))
                .then_some(view.canary_version.as_str());
            let (pin, forgot) = state
                .gate_pins
                .pin(&request.env, &request.app, checksum, under_way);
            if forgot {
                state.stats.gate_pin_forgotten();
            }
            pin
        }
        (None, None) => None,
    };
    match pinned {
        Some(version) if version != view.canary_version => Err(format!(
            "this rollout's canary is {version}, but the analysis of app {:?} in env {:?} is of {} ({}): no verdict on {version} stands now",
            request.app,
            request.env,
            view.canary_version,
            view.state.name()
        )),
        _ => Ok(view),
    }
}

/// The request, when it carries the read (or admin) token, as a bearer token or as
/// `metadata.token`.
fn authorized(state: &ApiState, granted: Access, request: GateRequest) -> Result<GateRequest, Box<Response>> {
    let sent = request.token.as_deref().unwrap_or("");
    if !state.tokens.enforced() || granted >= Access::Read || state.tokens.grants(sent) >= Access::Read {
        Ok(request)
    } else {
        Err(Box::new(unauthorized(Access::Read)))
    }
}

/// The messages of the failing checks and gates, then of the marginal ones, capped.
fn reasons(view: &AnalysisView, with_marginal: bool) -> Vec<String> {
    let mut checks: Vec<_> = view
        .checks
        .iter()
        .filter(|c| c.outcome == Outcome::Fail || with_marginal && c.outcome == Outcome::Marginal)
        .collect();
    checks.sort_by_key(|c| std::cmp::Reverse(c.outcome));
    let mut out: Vec<String> = view
        .gates
        .iter()
        .filter(|g| g.outcome == GateOutcome::Fail || with_marginal && g.outcome == GateOutcome::Shared)
        .map(|g| g.message.clone())
        .chain(checks.iter().map(|c| match &c.operation {
            Some(operation) => format!("{operation}: {}", c.message),
            None => c.message.clone(),
        }))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|r| seen.insert(r.clone()));
    if out.len() > MAX_REASONS {
        let more = out.len() - (MAX_REASONS - 1);
        out.truncate(MAX_REASONS - 1);
        out.push(format!("... and {more} more (GET /api/v1/apps/{{app}}/canary)"));
    }
    out
}

/// Whether the canary may proceed, and why (not).
fn verdict(request: &GateRequest, view: &AnalysisView) -> (bool, Vec<String>) {
    let score = view
        .score
        .map_or_else(|| "no score".to_owned(), |s| format!("score {s:.1}"));
    let version = &view.canary_version;
    match view.state {
        // The promotion chain holds a version not yet promoted in the environment before this
        // one: Flagger may keep it at its weight, but not promote it.
        CanaryState::Healthy if request.before_promotion && view.blocked_by.is_some() => (
            false,
            vec![format!(
                "canary {version} is healthy, but not yet promoted in {}, before {} in the promotion chain: promotion waits for it",
                view.blocked_by.as_deref().unwrap_or_default(),
                request.env
            )],
        ),
        CanaryState::Healthy | CanaryState::Promoted => (true, Vec::new()),
        // An earlier rollout's final verdict says nothing about one that has no traffic yet.
        CanaryState::RolledBack if request.pre_traffic => (
            true,
            vec![format!(
                "the last analysis ({version}) ended rolled_back; nothing to judge before traffic"
            )],
        ),
        CanaryState::Failing | CanaryState::RolledBack => {
            let mut reasons = reasons(view, false);
            if reasons.is_empty() {
                reasons.push(format!("canary {version} is {} ({score})", view.state.name()));
            }
            (false, reasons)
        }
        CanaryState::Marginal => {
            let mut reasons = reasons(view, true);
            reasons.insert(
                0,
                format!("canary {version} is marginal ({score}): holding until the doubt clears"),
            );
            reasons.truncate(MAX_REASONS);
            (false, reasons)
        }
        CanaryState::InsufficientData if request.pre_traffic => {
            (true, vec!["before traffic: nothing to judge yet".to_owned()])
        }
        CanaryState::InsufficientData => (
            false,
            vec![
                "not enough evidence yet".to_owned(),
                format!(
                    "canary {version} has {} requests and the stable {} since the analysis started",
                    view.canary_requests, view.stable_requests
                ),
            ],
        ),
    }
}

/// `POST /api/v1/gates/flagger`: 200 while the canary may proceed, 412 with the reasons when not.
#[utoipa::path(
    post,
    path = "/api/v1/gates/flagger",
    tag = "gates",
    request_body = FlaggerPayload,
    responses(
        (status = 200, description = "The canary may proceed", body = GateAnswer),
        (status = 400, description = "A bad payload, naming the field", body = ErrorBody),
        (status = 412, description = "The canary must not proceed (failing, rolled back, marginal, or no evidence once traffic has started; before promotion, also held by the promotion chain); Flagger counts it as a failed check of a rollout hook and holds the promotion on a confirm-promotion hook", body = GateAnswer)
    )
)]
pub(super) async fn flagger_gate(
    State(state): State<ApiState>,
    Extension(Granted(granted)): Extension<Granted>,
    body: Result<Json<FlaggerPayload>, JsonRejection>,
) -> Response {
    let request = match parse(body).and_then(|r| authorized(&state, granted, r)) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let answer = match lookup(&state, &request).await {
        Ok(view) => {
            let (proceed, reasons) = verdict(&request, &view);
            GateAnswer {
                proceed,
                state: Some(view.state.name()),
                canary_version: Some(view.canary_version),
                score: view.score.map(|s| (s * 10.0).round() / 10.0),
                reasons,
                env: request.env,
                app: request.app,
                phase: request.phase,
                checksum: request.checksum,
            }
        }
        Err(why) => GateAnswer {
            proceed: request.pre_traffic,
            state: None,
            canary_version: None,
            score: None,
            reasons: vec![if request.pre_traffic {
                format!("before traffic: nothing to judge yet ({why})")
            } else {
                why
            }],
            env: request.env,
            app: request.app,
            phase: request.phase,
            checksum: request.checksum,
        },
    };
    let status = if answer.proceed {
        StatusCode::OK
    } else {
        StatusCode::PRECONDITION_FAILED
    };
    tracing::debug!(env = %answer.env, app = %answer.app, phase = %answer.phase, proceed = answer.proceed, "flagger gate");
    (status, Json(answer)).into_response()
}

/// `POST /api/v1/gates/flagger/rollback`: 200 ("roll back now") when the canary is failing or
/// rolled back, 409 otherwise.
#[utoipa::path(
    post,
    path = "/api/v1/gates/flagger/rollback",
    tag = "gates",
    request_body = FlaggerPayload,
    responses(
        (status = 200, description = "Roll back now: the canary is failing or rolled back", body = RollbackAnswer),
        (status = 400, description = "A bad payload, naming the field", body = ErrorBody),
        (status = 409, description = "No reason to roll back", body = RollbackAnswer)
    )
)]
pub(super) async fn flagger_rollback(
    State(state): State<ApiState>,
    Extension(Granted(granted)): Extension<Granted>,
    body: Result<Json<FlaggerPayload>, JsonRejection>,
) -> Response {
    let request = match parse(body).and_then(|r| authorized(&state, granted, r)) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let answer = match lookup(&state, &request).await {
        Ok(view) => {
            let rollback = matches!(view.state, CanaryState::Failing | CanaryState::RolledBack);
            let reasons = if rollback {
                let mut reasons = reasons(&view, false);
                if reasons.is_empty() {
                    reasons.push(format!("canary {} is {}", view.canary_version, view.state.name()));
                }
                reasons
            } else {
                vec![format!(
                    "canary {} is {}: no reason to roll back",
                    view.canary_version,
                    view.state.name()
                )]
            };
            RollbackAnswer {
                rollback,
                state: Some(view.state.name()),
                canary_version: Some(view.canary_version),
                reasons,
                env: request.env,
                app: request.app,
                phase: request.phase,
                checksum: request.checksum,
            }
        }
        Err(why) => RollbackAnswer {
            rollback: false,
            state: None,
            canary_version: None,
            reasons: vec![why],
            env: request.env,
            app: request.app,
            phase: request.phase,
            checksum: request.checksum,
        },
    };
    let status = if answer.rollback {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    (status, Json(answer)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(json: serde_json::Value) -> Result<GateRequest, Box<Response>> {
        let payload: FlaggerPayload = serde_json::from_value(json).expect("payload shape");
        GateRequest::of(payload)
    }

    #[test]
    fn name_and_namespace_map_to_app_and_env_unless_metadata_says_otherwise() {
        let r = payload(serde_json::json!({"name": "podinfo", "namespace": "test", "phase": "Progressing"}))
            .expect("valid");
        assert_eq!(
            (r.app.as_str(), r.env.as_str(), r.pre_traffic),
            ("podinfo", "test", false)
        );
        let r = payload(serde_json::json!({
            "name": "podinfo", "namespace": "test", "phase": "Progressing", "checksum": "abc",
            "metadata": {"app": "shop", "env": "prod", "hook": "pre-rollout"}
        }))
        .expect("valid");
        assert_eq!(
            (r.app.as_str(), r.env.as_str(), r.pre_traffic),
            ("shop", "prod", true)
        );
    }

    #[test]
    fn phases_before_traffic_are_recognised() {
        for (phase, pre) in [
            ("Initializing", true),
            ("Initialized", true),
            ("Waiting", true),
            ("Progressing", false),
            ("Promoting", false),
            ("", false),
        ] {
            let r =
                payload(serde_json::json!({"name": "a", "namespace": "b", "phase": phase})).expect("valid");
            assert_eq!(r.pre_traffic, pre, "{phase}");
        }
        // An explicit rollout hook is after traffic whatever the phase.
        let r = payload(serde_json::json!({
            "name": "a", "namespace": "b", "phase": "Waiting", "metadata": {"hook": "rollout"}
        }))
        .expect("valid");
        assert!(!r.pre_traffic);
    }

    #[test]
    fn bad_fields_are_refused() {
        for json in [
            serde_json::json!({"name": "", "namespace": "b"}),
            serde_json::json!({"name": "a", "namespace": ""}),
            serde_json::json!({"name": "a", "namespace": "b", "metadata": {"app": ""}}),
            serde_json::json!({"name": "a", "namespace": "b", "metadata": {"hook": "post-rollout"}}),
        ] {
            let response = payload(json.clone()).expect_err("refused");
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{json}");
        }
    }
}
