//! The daemon's subscriptions and deliveries, which the dispatcher (`act`) and the API work
//! with, and the conversions of these and of events to and from the store's records
//! (`canaryd_store::daemon`), where types, states and kinds are kept by name. Defined here so
//! that the store depends on no module that uses it.

use canaryd_store::{ConvertError, DeliveryRecord, EventRecord, SubscriptionRecord};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::events::{Event, EventData, EventType};

/// How a subscription acts on its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A signed CloudEvents POST.
    Webhook,
    /// The event's `set_weight` action, applied through HAProxy's runtime API (the URL is its
    /// socket: `tcp://host:port` or `unix:///path`).
    Haproxy,
    /// The event's route written into a Kubernetes Gateway API HTTPRoute by server-side apply
    /// (the URL is the API server's).
    Httproute,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Webhook, Kind::Haproxy, Kind::Httproute];

    /// The kind's name, as the API writes it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Webhook => "webhook",
            Kind::Haproxy => "haproxy",
            Kind::Httproute => "httproute",
        }
    }

    /// Whether the kind moves traffic itself (rather than telling a receiver).
    pub fn is_lever(self) -> bool {
        !matches!(self, Kind::Webhook)
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
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
    pub const ALL: [DeliveryState; 6] = [
        DeliveryState::Pending,
        DeliveryState::Delivered,
        DeliveryState::Expired,
        DeliveryState::Gone,
        DeliveryState::Skipped,
        DeliveryState::Parked,
    ];

    pub fn parse(name: &str) -> Option<DeliveryState> {
        DeliveryState::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The state's name, as the API writes it (and the store keeps it).
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

fn unknown(what: &'static str, name: &str) -> ConvertError {
    ConvertError {
        what,
        reason: format!("unknown name {name:?}"),
    }
}

fn event_type(name: &str) -> Result<EventType, ConvertError> {
    EventType::parse(name).ok_or_else(|| unknown("event type", name))
}

/// An event as the store keeps it: the envelope, and the data as the contract's JSON.
pub fn event_record(event: &Event) -> Result<EventRecord, ConvertError> {
    let data = serde_json::to_string(&event.data).map_err(|e| ConvertError {
        what: "event data",
        reason: e.to_string(),
    })?;
    Ok(EventRecord {
        id: event.id.clone(),
        specversion: event.specversion.clone(),
        source: event.source.clone(),
        event_type: event.event_type.as_str().to_owned(),
        time: event.time.clone(),
        subject: event.subject.clone(),
        datacontenttype: event.datacontenttype.clone(),
        data,
    })
}

/// A stored event read back. Its data reads as the contract's JSON does: fields this build does
/// not know are ignored, optional ones it lacks are absent.
pub fn event_of_record(record: EventRecord) -> Result<Event, ConvertError> {
    let data: EventData = serde_json::from_str(&record.data).map_err(|e| ConvertError {
        what: "event data",
        reason: e.to_string(),
    })?;
    Ok(Event {
        specversion: record.specversion,
        id: record.id,
        source: record.source,
        event_type: event_type(&record.event_type)?,
        time: record.time,
        subject: record.subject,
        datacontenttype: record.datacontenttype,
        data,
        // Given by the store, which knows where it keeps the record.
        seq: 0,
        levers: None,
    })
}

impl From<&Subscription> for SubscriptionRecord {
    fn from(s: &Subscription) -> Self {
        SubscriptionRecord {
            id: s.id.clone(),
            url: s.url.clone(),
            events: s.events.iter().map(|t| t.as_str().to_owned()).collect(),
            kind: s.kind.name().to_owned(),
            secret: s.secret.clone(),
            created_at: s.created_at.clone(),
            disabled: s.disabled.clone(),
        }
    }
}

impl TryFrom<SubscriptionRecord> for Subscription {
    type Error = ConvertError;

    fn try_from(record: SubscriptionRecord) -> Result<Self, ConvertError> {
        Ok(Subscription {
            events: record
                .events
                .iter()
                .map(|name| event_type(name))
                .collect::<Result<_, _>>()?,
            kind: Kind::parse(&record.kind).ok_or_else(|| unknown("subscription kind", &record.kind))?,
            id: record.id,
            url: record.url,
            secret: record.secret,
            created_at: record.created_at,
            disabled: record.disabled,
        })
    }
}

impl From<&Delivery> for DeliveryRecord {
    fn from(d: &Delivery) -> Self {
        DeliveryRecord {
            event_id: d.event_id.clone(),
            event_type: d.event_type.as_str().to_owned(),
            state: d.state.name().to_owned(),
            attempts: d.attempts,
            first_attempt_ms: d.first_attempt_ms,
            next_attempt_ms: d.next_attempt_ms,
            last_status: d.last_status,
            last_error: d.last_error.clone(),
            delivered_ms: d.delivered_ms,
        }
    }
}

impl TryFrom<DeliveryRecord> for Delivery {
    type Error = ConvertError;

    fn try_from(record: DeliveryRecord) -> Result<Self, ConvertError> {
        Ok(Delivery {
            event_type: event_type(&record.event_type)?,
            state: DeliveryState::parse(&record.state)
                .ok_or_else(|| unknown("delivery state", &record.state))?,
            event_id: record.event_id,
            attempts: record.attempts,
            first_attempt_ms: record.first_attempt_ms,
            next_attempt_ms: record.next_attempt_ms,
            last_status: record.last_status,
            last_error: record.last_error,
            delivered_ms: record.delivered_ms,
        })
    }
}
