//! Webhook and haproxy subscriptions, their deliveries, and the re-drive of parked ones.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiQuery, ApiState, ErrorBody, blocking, error, internal};
use crate::act::delivery::{Delivery, DeliveryState};
use crate::act::outbound::OutboundPolicy;
use crate::act::subscriptions::{self, Kind, NewSubscription, Subscription};
use crate::events::EventType;
use crate::store::event_seq_of;

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
    let (url, events, kind, secret) = match subscription_of(body, state.dispatcher.outbound()) {
        Ok(checked) => checked,
        Err(response) => return *response,
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

/// The subscription a `POST /api/v1/subscriptions` body asks for, checked (url, events, kind,
/// secret), or the 400 naming what is wrong with it.
pub(super) fn subscription_of(
    body: Result<Json<NewSubscription>, axum::extract::rejection::JsonRejection>,
    policy: &OutboundPolicy,
) -> Result<subscriptions::Checked, Box<Response>> {
    let bad = |message: &str| Box::new(error(StatusCode::BAD_REQUEST, message));
    let Json(new) = body.map_err(|e| bad(&e.body_text()))?;
    subscriptions::validate(new, policy).map_err(|e| bad(&e.to_string()))
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
    /// `pending` (queued, sent in event order), `parked` (taken off the queue after failing at its
    /// head for `delivery_park_after_secs`: retried on its own until `next_retry` is null, and
    /// re-drivable), `delivered`, `skipped`, `gone`, or `expired` (its event is no longer stored).
    state: DeliveryState,
    attempts: u32,
    /// The receiver's last HTTP status.
    last_status: Option<u16>,
    last_error: Option<String>,
    /// The first attempt of its retry window: its first ever, or the first since a re-drive.
    first_attempt: Option<String>,
    /// When it is next tried; null when it is finished, or parked with its retry window over
    /// (it then waits for a re-drive).
    next_retry: Option<String>,
    delivered_at: Option<String>,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        DeliveryView {
            next_retry: d.next_retry_ms().map(wall_time),
            first_attempt: d.first_attempt_ms.map(wall_time),
            delivered_at: d.delivered_ms.map(wall_time),
            event_id: d.event_id,
            event_type: d.event_type,
            state: d.state,
            attempts: d.attempts,
            last_status: d.last_status,
            last_error: d.last_error,
        }
    }
}

/// `GET /api/v1/subscriptions/{id}/deliveries`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeliveriesView {
    deliveries: Vec<DeliveryView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct DeliveriesQuery {
    /// Only deliveries in this state. `parked` lists every parked one, however many newer
    /// deliveries there are; other states are picked from the newest deliveries listed.
    state: Option<DeliveryState>,
}

fn wall_time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The most deliveries one answer lists.
const MAX_DELIVERIES: usize = 1_000;

/// `GET /api/v1/subscriptions/{id}/deliveries`.
#[utoipa::path(
    get,
    path = "/api/v1/subscriptions/{id}/deliveries",
    tag = "events",
    params(("id" = String, Path, description = "The subscription's id (`sub_...`)"), DeliveriesQuery),
    responses(
        (status = 200, description = "Its deliveries, newest first (at most 1,000): event id and type, state, attempts, last status or error, next retry", body = DeliveriesView),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody)
    )
)]
pub(super) async fn deliveries(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<DeliveriesQuery>,
) -> Response {
    let store = state.store.clone();
    let read = {
        let id = id.clone();
        blocking(move || {
            if store.subscription(&id)?.is_none() {
                return Ok(None);
            }
            let all = match query.state {
                Some(DeliveryState::Parked) => {
                    let parked = store.parked(&id)?.into_iter().rev().take(MAX_DELIVERIES);
                    parked.map(|(_, d)| d).collect()
                }
                Some(wanted) => {
                    let mut all = store.deliveries(&id, MAX_DELIVERIES)?;
                    all.retain(|d| d.state == wanted);
                    all
                }
                None => store.deliveries(&id, MAX_DELIVERIES)?,
            };
            Ok::<_, crate::store::StoreError>(Some(all))
        })
        .await
    };
    let read = match read {
        Ok(read) => read,
        Err(response) => return response,
    };
    match read {
        Ok(Some(all)) => Json(DeliveriesView {
            deliveries: all.into_iter().map(DeliveryView::from).collect(),
        })
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, &format!("no subscription {id:?}")),
        Err(e) => internal("cannot read deliveries", e),
    }
}

/// `POST /api/v1/subscriptions/{id}/deliveries/{event_id}/redrive`.
#[utoipa::path(
    post,
    path = "/api/v1/subscriptions/{id}/deliveries/{event_id}/redrive",
    tag = "events",
    params(
        ("id" = String, Path, description = "The subscription's id (`sub_...`)"),
        ("event_id" = String, Path, description = "The parked delivery's event id (`evt_...`)")
    ),
    responses(
        (status = 202, description = "Re-driven: tried again at once (the same event id), then with backoff for a new retry window; still `parked` until delivered", body = DeliveryView),
        (status = 404, description = "No such subscription, or no delivery of that event to it", body = ErrorBody),
        (status = 409, description = "The delivery is not parked (pending, delivered, ...)", body = ErrorBody)
    )
)]
pub(super) async fn redrive(
    State(state): State<ApiState>,
    Path((id, event_id)): Path<(String, String)>,
) -> Response {
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            &format!("subscription {id:?} has no delivery of event {event_id:?}"),
        )
    };
    let seq = {
        let store = state.store.clone();
        let event_id = event_id.clone();
        blocking(move || event_seq_of(&store, &event_id)).await
    };
    let seq = match seq {
        Ok(Ok(Some(seq))) => seq,
        Ok(Ok(None)) => return not_found(),
        Ok(Err(e)) => return internal("cannot read the event history", e),
        Err(response) => return response,
    };
    match subscription_exists(&state, &id).await {
        Ok(true) => {}
        Ok(false) => return error(StatusCode::NOT_FOUND, &format!("no subscription {id:?}")),
        Err(response) => return response,
    }
    match state.dispatcher.redrive(&id, seq).await {
        Ok(Some(delivery)) => (StatusCode::ACCEPTED, Json(DeliveryView::from(delivery))).into_response(),
        Ok(None) => {
            let store = state.store.clone();
            let found = {
                let id = id.clone();
                blocking(move || store.find_delivery(&id, seq)).await
            };
            match found {
                Ok(Ok(Some(delivery))) => error(
                    StatusCode::CONFLICT,
                    &format!(
                        "the delivery of {event_id} is {}, not parked",
                        delivery.state.name()
                    ),
                ),
                Ok(Ok(None)) => not_found(),
                Ok(Err(e)) => internal("cannot read the delivery", e),
                Err(response) => response,
            }
        }
        Err(e) => internal("cannot re-drive the delivery", e),
    }
}

/// `POST /api/v1/subscriptions/{id}/deliveries/redrive`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RedrivenView {
    /// How many parked deliveries were re-driven.
    redriven: usize,
    /// Those deliveries, oldest event first.
    deliveries: Vec<DeliveryView>,
}

/// `POST /api/v1/subscriptions/{id}/deliveries/redrive`.
#[utoipa::path(
    post,
    path = "/api/v1/subscriptions/{id}/deliveries/redrive",
    tag = "events",
    params(("id" = String, Path, description = "The subscription's id (`sub_...`)")),
    responses(
        (status = 202, description = "Every parked delivery re-driven, as the single re-drive does one (none is not an error)", body = RedrivenView),
        (status = 404, description = "No such subscription", body = ErrorBody)
    )
)]
pub(super) async fn redrive_all(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    match subscription_exists(&state, &id).await {
        Ok(true) => {}
        Ok(false) => return error(StatusCode::NOT_FOUND, &format!("no subscription {id:?}")),
        Err(response) => return response,
    }
    match state.dispatcher.redrive_all(&id).await {
        Ok(redriven) => (
            StatusCode::ACCEPTED,
            Json(RedrivenView {
                redriven: redriven.len(),
                deliveries: redriven.into_iter().map(DeliveryView::from).collect(),
            }),
        )
            .into_response(),
        Err(e) => internal("cannot re-drive deliveries", e),
    }
}

/// Whether subscription `id` exists; an answer when the store could not say.
async fn subscription_exists(state: &ApiState, id: &str) -> Result<bool, Response> {
    let (store, id) = (state.store.clone(), id.to_owned());
    match blocking(move || store.subscription(&id)).await? {
        Ok(found) => Ok(found.is_some()),
        Err(e) => Err(internal("cannot read the subscription", e)),
    }
}
