//! The event history: `GET /api/v1/events`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Access, Granted};
use super::{ApiQuery, ApiState, ErrorBody, blocking, error};
use crate::act::delivery::lever_outcomes_among;
use crate::events::{Event, EventType};
use crate::store::event_seq_of;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsQuery {
    /// Only this app's events.
    app: Option<String>,
    /// Only this environment's events.
    env: Option<String>,
    /// Only events of this type (`canaryd.canary.failed`, ...).
    #[serde(rename = "type")]
    #[param(value_type = Option<EventType>)]
    event_type: Option<String>,
    /// An event id (the events stored after it), or an RFC 3339 time (events whose `time` is at
    /// or after it: for decisions, the event time of their evidence).
    since: Option<String>,
    /// At most this many events, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct EventsView {
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
pub(super) async fn events(
    State(state): State<ApiState>,
    Extension(Granted(granted)): Extension<Granted>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Response {
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
    let (after, not_before) = match query.since.clone() {
        None => (None, None),
        Some(since) => match humantime::parse_rfc3339_weak(&since) {
            Ok(time) => (None, Some(time)),
            Err(_) => {
                let store = state.store.clone();
                let id = since.clone();
                match blocking(move || event_seq_of(&store, &id)).await {
                    Ok(Ok(Some(seq))) => (Some(seq), None),
                    Ok(Ok(None)) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!(
                                "since: {since:?} is neither the id of an event in the history nor an RFC 3339 time"
                            ),
                        );
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot read event ids");
                        return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the event history");
                    }
                    Err(response) => return response,
                }
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
    let read = match blocking(move || {
        let events = store.events(after, limit, keep)?;
        let subscriptions = store.subscriptions()?;
        events
            .into_iter()
            .map(|mut event| {
                let moves = event.event_type != EventType::TrafficPartial
                    && (event.data.traffic.is_some() || event.data.action.is_some());
                if moves {
                    event.levers = Some(lever_outcomes_among(&store, &subscriptions, event.seq)?)
                        .filter(|l| !l.is_empty());
                }
                Ok(event)
            })
            .collect::<Result<Vec<_>, crate::store::StoreError>>()
    })
    .await
    {
        Ok(read) => read,
        Err(response) => return response,
    };
    match read {
        Ok(mut events) => {
            let last_id = events.last().map(|e| e.id.clone());
            // Approval links are credentials: a reader without a token does not get them.
            if granted == Access::Open {
                events = events.into_iter().map(Event::without_links).collect();
            }
            Json(EventsView { events, last_id }).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read events");
            error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the event history")
        }
    }
}
