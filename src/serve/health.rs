//! Liveness and readiness.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::ApiState;

/// `GET /healthz`: liveness.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The process is alive", content_type = "text/plain", body = String, example = "ok\n"))
)]
pub(super) async fn healthz() -> &'static str {
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
pub(super) async fn readyz(State(state): State<ApiState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}
