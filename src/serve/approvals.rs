//! `/api/v1/approvals/{token}`: the signed links of a stage waiting for approval, opened from a
//! chat message. A GET shows a page with one button and changes nothing (chat apps fetch links
//! to preview them); the button POSTs, which approves or aborts. No API token: the signed token
//! is the credential (`events::approval`). Tampered, expired and used links get 403.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, ApiState, ErrorBody, StageJson};
use crate::engine::LinkRefused;
use crate::events::approval::{Action, Claim, now_unix};

/// What a used link did.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ApprovalDone {
    /// `approve` or `abort`.
    action: &'static str,
    env: String,
    app: String,
    canary_version: String,
    /// The analysis's state after it.
    state: &'static str,
    /// The stage the canary is in now.
    stage: Option<StageJson>,
}

/// The link's claim, if this daemon made it and it has not expired.
fn verified(state: &ApiState, token: &str) -> Result<Claim, ApiError> {
    state
        .approvals
        .verify(token, now_unix())
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, e.to_string()))
}

/// Minimal HTML escaping for names shown on the page.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><meta name=\"robots\" content=\"noindex\"><title>{t}</title></head><body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\"><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    );
    let mut response = (status, Html(html)).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// `GET /api/v1/approvals/{token}`: the page of a link, with its one button.
#[utoipa::path(
    get,
    path = "/api/v1/approvals/{token}",
    tag = "canary",
    params(("token" = String, Path, description = "The signed token of an approval link (from a `canary.awaiting_approval` event)")),
    responses(
        (status = 200, description = "A page naming the analysis and the stage, with one button that approves (or aborts); nothing changes until it is pressed", content_type = "text/html"),
        (status = 403, description = "A tampered, expired or used link", content_type = "text/html")
    )
)]
pub(super) async fn approval_page(State(state): State<ApiState>, Path(token): Path<String>) -> Response {
    let claim = match verified(&state, &token) {
        Ok(claim) => claim,
        Err(e) => return link_refused(&e.detail),
    };
    // A used link, or one whose wait has ended, offers no button: it would only be refused.
    state
        .read_analyses(move |engine| {
            if crate::engine::waits_for(engine, &claim) {
                form(&claim)
            } else {
                link_refused(&crate::engine::LinkRefused::Stale.to_string())
            }
        })
        .await
}

fn link_refused(why: &str) -> Response {
    page(
        StatusCode::FORBIDDEN,
        "This link does not work",
        &format!("<p>{}</p>", escape(why)),
    )
}

/// The page of a link that works: what it does, and its one button.
fn form(claim: &Claim) -> Response {
    let verb = match claim.action {
        Action::Approve => "Approve",
        Action::Abort => "Abort",
    };
    let what = match claim.action {
        Action::Approve => format!(
            "Let canary <b>{}</b> of <b>{}</b> in <b>{}</b> enter stage {} of its rollout.",
            escape(&claim.canary),
            escape(&claim.app),
            escape(&claim.env),
            claim.stage + 1
        ),
        Action::Abort => format!(
            "Fail canary <b>{}</b> of <b>{}</b> in <b>{}</b> now: its traffic weight goes to 0.",
            escape(&claim.canary),
            escape(&claim.app),
            escape(&claim.env)
        ),
    };
    page(
        StatusCode::OK,
        &format!("{verb} the next stage?"),
        &format!(
            "<p>{what}</p><form method=\"post\"><button type=\"submit\">{verb}</button></form><p>The link works once.</p>"
        ),
    )
}

/// `POST /api/v1/approvals/{token}`: approves (or aborts) as the link says, once.
#[utoipa::path(
    post,
    path = "/api/v1/approvals/{token}",
    tag = "canary",
    params(("token" = String, Path, description = "The signed token of an approval link")),
    responses(
        (status = 200, description = "Done: the canary entered the stage (approve) or failed (abort); a page for a browser's form, JSON otherwise", body = ApprovalDone),
        (status = 403, description = "A tampered, expired or used link, or one whose analysis no longer waits for it: nothing changed", body = ErrorBody),
        (status = 409, description = "The analysis cannot take the action now (it failed already)", body = ErrorBody)
    )
)]
pub(super) async fn use_approval(
    State(state): State<ApiState>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let answer = match verified(&state, &token) {
        Ok(claim) => match state.engine.approval(claim.clone()).await {
            Ok(Ok(view)) => Ok(ApprovalDone {
                action: claim.action.name(),
                env: view.env,
                app: view.app,
                canary_version: view.canary_version,
                state: view.state.name(),
                stage: view.stage.as_ref().map(StageJson::of),
            }),
            Ok(Err(e @ LinkRefused::Stale)) => Err(ApiError::new(StatusCode::FORBIDDEN, e.to_string())),
            Ok(Err(LinkRefused::Judge(e))) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
            Err(gone) => Err(ApiError::from(gone)),
        },
        Err(e) => Err(e),
    };
    match (answer, form) {
        (Ok(done), false) => Json(done).into_response(),
        (Ok(done), true) => page(
            StatusCode::OK,
            match done.action {
                "approve" => "Approved",
                _ => "Aborted",
            },
            &format!(
                "<p>{} {} in {} is now {}.</p>",
                escape(&done.app),
                escape(&done.canary_version),
                escape(&done.env),
                done.state
            ),
        ),
        (Err(e), false) => e.into_response(),
        (Err(e), true) => page(
            e.status,
            "Nothing was changed",
            &format!("<p>{}</p>", escape(&e.detail)),
        ),
    }
}
