//! The HTTP API: health, readiness, the daemon's own metrics, and what the engine has seen.
//!
//! This module alone defines the JSON shapes of the API; the engine's types are converted at this
//! edge. Event times are written as RFC 3339 in UTC with nanoseconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use canaryd_engine::EventTime;
use canaryd_engine::catalog::AppEntry;
use serde::{Deserialize, Serialize};

use crate::pipeline::SharedEngine;
use crate::stats::Stats;

/// What the API handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub engine: SharedEngine,
    pub stats: Arc<Stats>,
    /// True once storage is open and every receiver is bound; false again while shutting down.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/apps", get(apps))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

/// A JSON error body: `{"error": "..."}`.
pub fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the classic text format.
async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| String::from_utf8_lossy(v.as_bytes()).contains("application/openmetrics-text"));
    let (content_type, body) = if wants_openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.stats.render_openmetrics(),
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            state.stats.render_prometheus(),
        )
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// RFC 3339 in UTC with nanoseconds.
pub fn format_event_time(t: EventTime) -> String {
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(t)).to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppsQuery {
    env: Option<String>,
}

#[derive(Debug, Serialize)]
struct AppsView {
    apps: Vec<AppView>,
}

#[derive(Debug, Serialize)]
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
}

#[derive(Debug, Serialize)]
struct VersionView {
    version: String,
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

#[derive(Debug, Serialize)]
struct OperationView {
    operation: String,
    requests: u64,
    errors: u64,
}

#[derive(Debug, Serialize)]
struct DownstreamView {
    downstream: String,
    calls: u64,
}

#[derive(Debug, Serialize)]
struct ExceptionTypeView {
    exception_type: String,
    count: u64,
}

async fn apps(
    State(state): State<ApiState>,
    query: Result<Query<AppsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let engine = state.engine.lock();
    let apps = engine
        .catalog()
        .apps()
        .filter(|(env, _, _)| query.env.as_deref().is_none_or(|wanted| wanted == *env))
        .map(|(env, app, entry)| app_view(env, app, entry))
        .collect();
    drop(engine);
    Json(AppsView { apps }).into_response()
}

fn app_view(env: &str, app: &str, entry: &AppEntry) -> AppView {
    let total_requests: u64 = entry.versions().map(|(_, s)| s.requests).sum();
    let versions = entry
        .versions()
        .map(|(version, s)| VersionView {
            version: version.to_owned(),
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
