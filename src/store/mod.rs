//! Durable state: the `canaryd-store` crate (the only one that touches sled), with the daemon's
//! own records, events, subscriptions and deliveries (`records`), named for it. The store keeps those as the
//! daemon's types behind a format byte; the engine's state it keeps in records of its own, under
//! a schema version (see the crate's documentation).

use canaryd_store::DaemonRecords;

use crate::events::{Event, event_id};

pub mod records;

pub use records::{Delivery, DeliveryState, Kind, Subscription};

pub use canaryd_store::{SledSlots, StoreCounters, StoreError};

/// The store, holding the daemon's records.
pub type Store = canaryd_store::Store<Daemon>;

/// The daemon's record types, for the store.
pub struct Daemon;

impl DaemonRecords for Daemon {
    type Event = Event;
    type Subscription = Subscription;
    type Delivery = Delivery;

    fn stored(event: &mut Event, seq: u64) {
        event.id = event_id(seq);
    }

    fn subscription_id(subscription: &Subscription) -> &str {
        &subscription.id
    }

    fn wants(subscription: &Subscription, event: &Event) -> bool {
        subscription.wants(event.event_type)
    }

    fn is_disabled(subscription: &Subscription) -> bool {
        subscription.disabled.is_some()
    }

    fn disable(subscription: &mut Subscription, now: &str) {
        subscription.disabled.get_or_insert_with(|| now.to_owned());
    }

    fn delivery(event: &Event) -> Delivery {
        Delivery::new(event.id.clone(), event.event_type)
    }

    fn is_pending(delivery: &Delivery) -> bool {
        delivery.state == DeliveryState::Pending
    }

    fn is_parked(delivery: &Delivery) -> bool {
        delivery.state == DeliveryState::Parked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon's records round-trip through the store (the store's own tests use stand-ins).
    #[test]
    fn events_subscriptions_and_deliveries_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let subscription = Subscription {
            id: "a".into(),
            url: "http://127.0.0.1:9/hook".into(),
            events: vec![crate::events::EventType::AnomalyDetected],
            kind: Kind::Webhook,
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            created_at: "2026-01-05T00:00:00Z".into(),
            disabled: None,
        };
        store.put_subscription(&subscription).expect("subscribe");
        let event: Event = serde_json::from_value(serde_json::json!({
            "specversion": "1.0",
            "id": "",
            "source": "canaryd",
            "type": "canaryd.anomaly.detected",
            "time": "2026-01-05T00:00:00Z",
            "subject": "shop",
            "datacontenttype": "application/json",
            "data": {
                "env": "prod",
                "app": "shop",
                "state": "anomalous",
                "detected_at": "2026-01-05T00:00:00Z",
                "reasons": [],
                "dry_run": false,
            },
        }))
        .expect("an event");
        let mut events = vec![event];
        store.append_events(&mut events, 10).expect("append");
        assert!(!events[0].id.is_empty(), "the store gave it an id");
        assert_eq!(store.events(None, 10, |_| true).expect("read"), events);
        let (seq, delivery) = store.next_delivery("a").expect("read").expect("pending");
        assert_eq!(delivery.event_id, events[0].id);
        assert_eq!(store.last_event_seq().expect("read"), Some(seq));
        store.disable_subscription("a").expect("disable");
        let disabled = store.subscription("a").expect("read").expect("listed");
        assert!(disabled.disabled.is_some());
        assert_eq!(store.outbox_depth(), 0);
    }
}
