//! The daemon's records as the store keeps them (format 2): events, subscriptions and deliveries,
//! in types of the store's own, so that the daemon's in-memory types can change without making
//! what is stored unreadable.
//!
//! postcard is positional, so these records are frozen once released, like the engine's; they are
//! kept loose where the daemon's types are expected to grow. An event keeps its CloudEvents
//! envelope field by field and its `data` as the JSON text of the event contract, which reads
//! back through serde with unknown fields ignored and missing optional ones absent: a field added
//! to the data, or one an older build never wrote, costs no stored event. Event types, delivery
//! states and subscription kinds are kept by the names the API shows (`canaryd.canary.failed`,
//! `parked`, `webhook`), never by an enum's variant index, so reordering or extending the daemon's
//! enums changes nothing here. A name this build does not know makes its record unreadable to it
//! (skipped and counted where it is read, never misread).
//!
//! The store's outbox rules (who wants an event, whether a delivery is pending or parked) are
//! written in these records' terms: the store does not depend on the daemon. Format 1's records
//! (`v1`) convert to these when a data dir is migrated (`migrate`).

use serde::{Deserialize, Serialize};

use crate::records::ConvertError;
use crate::v1;

/// The format byte of the daemon's records that this build writes, and the newest it reads.
/// Format 1 (`v1`) was postcard of the daemon's own types.
pub const FORMAT: u8 = 2;

/// The state of a delivery waiting in its subscription's outbox.
pub const PENDING: &str = "pending";
/// The state of a delivery taken off its subscription's outbox, still to be delivered.
pub const PARKED: &str = "parked";

/// A stored event: a CloudEvents 1.0 envelope and its data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Assigned by the daemon from the event's sequence number when it is stored.
    pub id: String,
    pub specversion: String,
    pub source: String,
    /// The CloudEvents `type`, by name (`canaryd.anomaly.detected`).
    pub event_type: String,
    /// When it was emitted (wall clock, RFC 3339).
    pub time: String,
    pub subject: String,
    pub datacontenttype: String,
    /// The `data` member as JSON text, in the event contract's form.
    pub data: String,
}

/// A stored subscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    pub id: String,
    pub url: String,
    /// The event types it wants, by name.
    pub events: Vec<String>,
    /// How it acts on events, by name (`webhook`, `haproxy`).
    pub kind: String,
    pub secret: String,
    /// Wall-clock time of creation, RFC 3339.
    pub created_at: String,
    /// When it was disabled (RFC 3339): nothing more is sent.
    pub disabled: Option<String>,
}

impl SubscriptionRecord {
    /// Whether an event is to be delivered to it: enabled, and wanting the event's type.
    pub fn wants(&self, event: &EventRecord) -> bool {
        self.disabled.is_none() && self.events.contains(&event.event_type)
    }
}

/// One event's delivery to one subscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub event_id: String,
    /// The event's type, by name.
    pub event_type: String,
    /// By name: `pending` (`PENDING`) and `parked` (`PARKED`) are the store's to know, the
    /// others the daemon's.
    pub state: String,
    pub attempts: u32,
    /// Unix milliseconds (of the dispatcher's clock).
    pub first_attempt_ms: Option<u64>,
    pub next_attempt_ms: u64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub delivered_ms: Option<u64>,
}

impl DeliveryRecord {
    /// A new, pending delivery of a stored event: nothing tried yet.
    pub fn pending(event: &EventRecord) -> Self {
        DeliveryRecord {
            event_id: event.id.clone(),
            event_type: event.event_type.clone(),
            state: PENDING.to_owned(),
            attempts: 0,
            first_attempt_ms: None,
            next_attempt_ms: 0,
            last_status: None,
            last_error: None,
            delivered_ms: None,
        }
    }

    pub fn is_pending(&self) -> bool {
        self.state == PENDING
    }

    pub fn is_parked(&self) -> bool {
        self.state == PARKED
    }
}

/// Format 1's event as format 2 keeps it: the data as the contract's JSON, the type by name.
impl TryFrom<&v1::EventRecord> for EventRecord {
    type Error = ConvertError;

    fn try_from(old: &v1::EventRecord) -> Result<Self, ConvertError> {
        let data = serde_json::to_string(&old.data).map_err(|e| ConvertError {
            what: "format-1 event data",
            reason: e.to_string(),
        })?;
        Ok(EventRecord {
            id: old.id.clone(),
            specversion: old.specversion.clone(),
            source: old.source.clone(),
            event_type: old.event_type.name().to_owned(),
            time: old.time.clone(),
            subject: old.subject.clone(),
            datacontenttype: old.datacontenttype.clone(),
            data,
        })
    }
}

impl From<&v1::SubscriptionRecord> for SubscriptionRecord {
    fn from(old: &v1::SubscriptionRecord) -> Self {
        SubscriptionRecord {
            id: old.id.clone(),
            url: old.url.clone(),
            events: old.events.iter().map(|t| t.name().to_owned()).collect(),
            kind: old.kind.name().to_owned(),
            secret: old.secret.clone(),
            created_at: old.created_at.clone(),
            disabled: old.disabled.clone(),
        }
    }
}

impl From<&v1::DeliveryRecord> for DeliveryRecord {
    fn from(old: &v1::DeliveryRecord) -> Self {
        DeliveryRecord {
            event_id: old.event_id.clone(),
            event_type: old.event_type.name().to_owned(),
            state: old.state.name().to_owned(),
            attempts: old.attempts,
            first_attempt_ms: old.first_attempt_ms,
            next_attempt_ms: old.next_attempt_ms,
            last_status: old.last_status,
            last_error: old.last_error.clone(),
            delivered_ms: old.delivered_ms,
        }
    }
}

/// Writes one record of the current format.
pub(crate) fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    let mut bytes = vec![FORMAT];
    // Serializing plain data into a Vec cannot fail.
    bytes.extend(postcard::to_stdvec(record).unwrap_or_default());
    bytes
}

/// What reading one daemon record found.
pub(crate) enum Decoded<T> {
    Record(T),
    /// Written by this newer format.
    Newer(u8),
    /// Corrupt, or a format-1 record its migration could not read.
    Corrupt,
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Decoded<T> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => match postcard::from_bytes(rest) {
            Ok(record) => Decoded::Record(record),
            Err(_) => Decoded::Corrupt,
        },
        Some((&format, _)) if format > FORMAT => Decoded::Newer(format),
        _ => Decoded::Corrupt,
    }
}
