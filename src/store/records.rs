//! What the store keeps of subscriptions and deliveries: the store's own records, which the
//! dispatcher (`act`) and the API work with. Defined here so that the store depends on no module
//! that uses it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::events::EventType;

/// How a subscription acts on its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A signed CloudEvents POST.
    Webhook,
    /// The event's `set_weight` action, applied through HAProxy's runtime API (the URL is its
    /// socket: `tcp://host:port` or `unix:///path`).
    Haproxy,
}

/// A stored subscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub url: String,
    pub events: Vec<EventType>,
    pub kind: Kind,
    pub secret: String,
    /// Wall-clock time of creation, RFC 3339.
    pub created_at: String,
    /// Set when the receiver answered 410 Gone: nothing more is sent.
    pub disabled: Option<String>,
}

impl Subscription {
    pub fn wants(&self, event_type: EventType) -> bool {
        self.disabled.is_none() && self.events.contains(&event_type)
    }
}

/// The state of one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Pending,
    Delivered,
    /// Retried for `max_age` without success, or its event was no longer stored.
    Expired,
    /// The receiver answered 410 Gone.
    Gone,
    /// Nothing to do: an `haproxy` subscription's event without a traffic action, or a dry run.
    Skipped,
}

/// One event's delivery to one subscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub event_id: String,
    pub event_type: EventType,
    pub state: DeliveryState,
    pub attempts: u32,
    /// Unix milliseconds.
    pub first_attempt_ms: Option<u64>,
    pub next_attempt_ms: u64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub delivered_ms: Option<u64>,
}

impl Delivery {
    pub fn new(event_id: String, event_type: EventType) -> Self {
        Delivery {
            event_id,
            event_type,
            state: DeliveryState::Pending,
            attempts: 0,
            first_attempt_ms: None,
            next_attempt_ms: 0,
            last_status: None,
            last_error: None,
            delivered_ms: None,
        }
    }
}
