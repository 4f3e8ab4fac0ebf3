//! The loaded analysis models: `GET /api/v1/models`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::ApiState;

/// `GET /api/v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ModelsView {
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
pub(super) async fn models(State(state): State<ApiState>) -> Response {
    state
        .read_analyses(|engine| {
            let models = engine.judge().models().cloned().collect();
            Json(ModelsView { models }).into_response()
        })
        .await
}
