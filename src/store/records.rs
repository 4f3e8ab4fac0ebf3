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

/// The state of one delivery. (Stored by variant index: new states go at the end.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// In its subscription's queue, sent in event order.
    Pending,
    Delivered,
    /// Its event is no longer stored (or, before parking existed, it was retried for `max_age`
    /// without success).
    Expired,
    /// The receiver answered 410 Gone.
    Gone,
    /// Nothing to do: an `haproxy` subscription's event without a traffic action, or a dry run, or
    /// one whose traffic action a later delivered event for the same app overrode.
    Skipped,
    /// Failed at the head of its subscription's queue for `delivery_park_after_secs`, so taken off
    /// it for the events behind it to go on: still stored, retried on its own with backoff until
    /// `max_age` after its first attempt, and re-drivable through the API.
    Parked,
}

impl DeliveryState {
    /// The state's name, as the API writes it.
    pub fn name(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Expired => "expired",
            DeliveryState::Gone => "gone",
            DeliveryState::Skipped => "skipped",
            DeliveryState::Parked => "parked",
        }
    }
}

/// One event's delivery to one subscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub event_id: String,
    pub event_type: EventType,
    pub state: DeliveryState,
    pub attempts: u32,
    /// Unix milliseconds (of the dispatcher's clock) of the first attempt of its retry window:
    /// its first attempt ever, or the first since a re-drive.
    pub first_attempt_ms: Option<u64>,
    /// When it is next tried (`NO_RETRY`: not without a re-drive).
    pub next_attempt_ms: u64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub delivered_ms: Option<u64>,
}

impl Delivery {
    /// `next_attempt_ms` of a parked delivery that is no longer retried on its own: its `max_age`
    /// after its first attempt is over. It stays parked until re-driven.
    pub const NO_RETRY: u64 = u64::MAX;

    /// When it is next tried, unless nothing will try it again without a re-drive.
    pub fn next_retry_ms(&self) -> Option<u64> {
        match self.state {
            DeliveryState::Pending => Some(self.next_attempt_ms),
            DeliveryState::Parked if self.next_attempt_ms != Self::NO_RETRY => Some(self.next_attempt_ms),
            _ => None,
        }
    }

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
