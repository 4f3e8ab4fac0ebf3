//! The HTTP API: one file per resource, the router that puts them together behind the bearer
//! token, and the one error type every handler answers failures with.
//!
//! Its one job is to turn HTTP requests into engine inputs and reads (through the engine's
//! channel) and store reads (off the async workers), and their results into JSON. This folder
//! alone defines the API's JSON shapes; the engine's types are converted at this edge. Event times
//! are written as RFC 3339 in UTC with nanoseconds.
//!
//! - `health`: `/healthz`, `/readyz`; `metrics`: `/metrics`; `openapi`: `/openapi.json`.
//! - `apps`: apps and baselines; `canary`: analyses and rollouts; `models`: the loaded models.
//! - `events`: the event history; `subscriptions`: subscriptions and their deliveries.
//! - `gates`: Flagger's webhooks; `dashboard`: the page and its timeline.
//! - `approvals`: the signed links of a stage waiting for approval (no token: the link is one).
//! - `watch`: `canaryd.v1.EventService/Watch`, the event stream, served on the gRPC port.
//! - `peers`: replicas answering for each other (`cluster_peers`): reads about an app another
//!   replica judges are relayed to it, and the list of apps is every replica's.
//! - `error`: `ApiError`, the status and RFC 9457 problem body of every failure.

mod approvals;
mod apps;
mod auth;
mod canary;
mod dashboard;
mod error;
mod events;
mod gates;
pub use gates::GatePins;
mod health;
mod metrics;
mod models;
mod openapi;
pub mod peers;
mod subscriptions;
pub mod watch;

pub use auth::Tokens;
pub use error::{ApiError, ErrorBody, error, internal};
pub use openapi::openapi;

pub(crate) use crate::events::format_event_time;
pub(crate) use canary::StageJson;
pub(crate) use openapi::{CanaryStateSchema, GateMetricSchema, GateOutcomeSchema, ModeSchema, OutcomeSchema};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::extract::{FromRequestParts, Query};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::Response;
use canaryd_engine::Engine;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::{IntoParams, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::act::delivery::Dispatcher;
use crate::act::outbound::OutboundPolicy;
use crate::engine::{EngineGone, EngineHandle};
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
    /// The admin and read tokens (`auth`).
    pub tokens: Tokens,
    /// Which canary version each Flagger revision is judged as (`gates`).
    pub gate_pins: Arc<GatePins>,
    /// True once storage is open and every receiver is bound; false again while shutting down.
    pub ready: Arc<AtomicBool>,
    /// Checks approval links (`approvals`).
    pub approvals: crate::events::approval::Approvals,
    /// The other replicas, which answer reads about the apps routed to them (`peers`); `None`
    /// for a replica on its own.
    pub peers: Option<Arc<peers::Peers>>,
}

impl ApiState {
    /// Runs `read`, a read of one app's learned state, on the engine's thread, after that app's
    /// windows waiting are learned (the other apps' wait on); a stopped engine answers 503.
    pub async fn read_app(
        &self,
        env: String,
        app: String,
        read: impl FnOnce(&Engine) -> Response + Send + 'static,
    ) -> Response {
        self.engine
            .read_app(env, app, read)
            .await
            .unwrap_or_else(unavailable)
    }

    /// `read_app`, for a read of analyses, models or the catalog alone
    /// (`EngineHandle::read_analyses`).
    pub async fn read_analyses(&self, read: impl FnOnce(&Engine) -> Response + Send + 'static) -> Response {
        self.engine.read_analyses(read).await.unwrap_or_else(unavailable)
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
    let relaying = state.clone();
    let (routes, _) = routes().split_for_parts();
    routes
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        // Inside the token check: a peer is asked with the caller's own credentials.
        .layer(axum::middleware::from_fn_with_state(
            relaying,
            peers::answer_for_peers,
        ))
        .layer(axum::middleware::from_fn_with_state(guarded, auth::require_token))
        .with_state(state)
}

/// Every route of the HTTP API, each registered together with its OpenAPI description: `routes!`
/// takes a handler's method and path from its `#[utoipa::path]`, so what is served and what
/// `GET /openapi.json` describes cannot drift apart. (Only the dashboard's page and its files,
/// which are not JSON API, are plain routes.)
pub fn routes() -> OpenApiRouter<ApiState> {
    let api = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(apps::apps))
        .routes(routes!(apps::baseline))
        .routes(routes!(canary::canary))
        .routes(routes!(canary::declare_rollout, canary::end_rollout))
        .routes(routes!(canary::operate))
        .routes(routes!(approvals::approval_page, approvals::use_approval))
        .routes(routes!(models::models))
        .routes(routes!(events::events))
        .routes(routes!(
            subscriptions::list_subscriptions,
            subscriptions::create_subscription
        ))
        .routes(routes!(subscriptions::delete_subscription))
        .routes(routes!(subscriptions::deliveries))
        .routes(routes!(subscriptions::redrive))
        .routes(routes!(subscriptions::redrive_all))
        .merge(gates::routes());
    dashboard::add_routes(api)
}

/// A JSON request body of the API, by the route it is sent to: what `crate::fuzzing` reads
/// arbitrary bytes as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestBody {
    /// `POST /api/v1/subscriptions`.
    Subscription,
    /// `PUT /api/v1/apps/{app}/rollout`.
    Rollout,
    /// `POST /api/v1/gates/flagger` and `.../flagger/rollback`.
    FlaggerPayload,
}

impl RequestBody {
    pub(crate) const ALL: [RequestBody; 3] = [
        RequestBody::Subscription,
        RequestBody::Rollout,
        RequestBody::FlaggerPayload,
    ];

    /// Reads `bytes` as the handler reads this body once its content type is JSON (axum's
    /// `Json`, then the function the handler itself calls to check the fields), without acting on
    /// it: `Err` is the handler's answer to a bad body, a 400 naming the problem.
    pub(crate) fn check(self, bytes: &[u8], outbound: &OutboundPolicy) -> Result<(), Box<Response>> {
        use axum::Json;
        match self {
            RequestBody::Subscription => {
                subscriptions::subscription_of(Json::from_bytes(bytes), outbound)?;
            }
            RequestBody::Rollout => {
                canary::rollout_of(Json::from_bytes(bytes), "default".into(), "checkout".into())?;
            }
            RequestBody::FlaggerPayload => {
                gates::parse(Json::from_bytes(bytes))?;
            }
        }
        Ok(())
    }
}

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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EnvQuery {
    /// The environment (default `default`).
    env: Option<String>,
}

/// The environment a request asks for with `?env=` (`default` when it names none); an empty one,
/// or any other query parameter, is refused with a 400. (`EnvQuery` describes it in the OpenAPI
/// document.)
pub(crate) struct Env(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Env {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let ApiQuery(query) = ApiQuery::<EnvQuery>::from_request_parts(parts, state).await?;
        let env = query.env.unwrap_or_else(|| "default".into());
        if env.is_empty() {
            return Err(error(StatusCode::BAD_REQUEST, "env must not be empty"));
        }
        Ok(Env(env))
    }
}
