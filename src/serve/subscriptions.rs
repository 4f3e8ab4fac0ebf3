//! Webhook and haproxy subscriptions, and their deliveries.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiState, ErrorBody, blocking, error, internal};
use crate::act::delivery::DeliveryState;
use crate::act::subscriptions::{self, Kind, NewSubscription, Subscription};
use crate::events::EventType;

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SubscriptionView {
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
pub(super) struct SubscriptionsView {
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
pub(super) async fn create_subscription(
    State(state): State<ApiState>,
    body: Result<Json<NewSubscription>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(new) = match body {
        Ok(body) => body,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let (url, events, kind, secret) = match subscriptions::validate(new, state.dispatcher.outbound()) {
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
pub(super) async fn list_subscriptions(State(state): State<ApiState>) -> Response {
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
pub(super) async fn delete_subscription(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
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
pub(super) struct DeliveryView {
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
pub(super) struct DeliveriesView {
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
pub(super) async fn deliveries(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
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
