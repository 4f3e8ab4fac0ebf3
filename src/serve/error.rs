//! One error type for every API answer that is not a success: `ApiError`, its status and its
//! RFC 9457 problem body (`application/problem+json`).
//!
//! The body carries the standard members (`type`, `title`, `status`, `detail`) and, as an
//! extension member, `error` with the same text as `detail`, which clients of earlier versions
//! read. Every handler's failure goes through here, so every failure has the same shape.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::EngineGone;

/// The media type of a problem body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An answer that is not a success: its status and what was wrong, in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
        }
    }

    /// 400: a bad query, path or body; `detail` names the field first.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, detail)
    }

    /// 404: no such app, version, analysis or subscription.
    pub fn not_found(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, detail)
    }

    /// 500, logged once here with the cause; the client learns only `what` failed.
    pub fn internal(what: &str, cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "{what}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, what)
    }
}

impl From<EngineGone> for ApiError {
    fn from(e: EngineGone) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e}: canaryd is shutting down"),
        )
    }
}

/// An RFC 9457 problem body, as every failure of the API is answered.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "about:blank",
    "title": "Not Found",
    "status": 404,
    "detail": "no app \"checkout\" in env \"prod\"",
    "error": "no app \"checkout\" in env \"prod\""
}))]
pub struct ErrorBody {
    /// Always `about:blank`: the status says what kind of problem it is.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The status's reason phrase.
    pub title: &'static str,
    pub status: u16,
    /// What was wrong; for a bad field, its name first.
    pub detail: String,
    /// The same as `detail` (an extension member, for clients of earlier versions).
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            kind: "about:blank",
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            error: self.detail.clone(),
            detail: self.detail,
        };
        // Serializing a struct of strings and a number cannot fail.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status, json).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

/// A problem answer with `status` and `detail`.
pub fn error(status: StatusCode, detail: &str) -> Response {
    ApiError::new(status, detail).into_response()
}

/// A 500 answer for `what`, with the cause logged.
pub fn internal(what: &str, cause: impl std::fmt::Display) -> Response {
    ApiError::internal(what, cause).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_problem_has_the_rfc_9457_members_and_the_media_type() {
        let response = ApiError::not_found("no app \"x\" in env \"prod\"").into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({
                "type": "about:blank",
                "title": "Not Found",
                "status": 404,
                "detail": "no app \"x\" in env \"prod\"",
                "error": "no app \"x\" in env \"prod\"",
            })
        );
    }
}
