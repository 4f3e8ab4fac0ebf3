//! Durable state: the `canaryd-store` crate (the only one that touches sled), bound to the
//! daemon's events, subscriptions and deliveries (`records`). The store keeps those as records of
//! its own, under a record format of their own, and the engine's state under a schema version
//! (see the crate's documentation); the daemon's types convert to and from them here, so they
//! can change without making what is stored unreadable.

use canaryd_store::{ConvertError, DaemonRecords, DeliveryRecord, EventRecord, SubscriptionRecord};

use crate::events::{Event, event_id};

pub mod records;
pub mod writer;

pub use records::{Delivery, DeliveryState, Kind, Subscription};

pub use canaryd_store::{SledSlots, StoreCounters, StoreError};

/// The store, holding the daemon's records.
pub type Store = canaryd_store::Store<Daemon>;

/// The sequence number of the kept event named `id`: looked up by its id, or, for an id of the
/// sequence form events were named with before their ids were derived from content, read from it.
pub fn event_seq_of(store: &Store, id: &str) -> Result<Option<u64>, StoreError> {
    match store.event_seq_of(id)? {
        Some(seq) => Ok(Some(seq)),
        None => Ok(crate::events::event_seq(id)),
    }
}

/// The daemon's record types, for the store.
pub struct Daemon;

impl DaemonRecords for Daemon {
    type Event = Event;
    type Subscription = Subscription;
    type Delivery = Delivery;

    fn stored(event: &mut Event, seq: u64) {
        event.seq = seq;
        if event.id.is_empty() {
            event.id = event_id(seq);
        }
    }

    fn event_record(event: &Event) -> Result<EventRecord, ConvertError> {
        records::event_record(event)
    }

    fn event(record: EventRecord) -> Result<Event, ConvertError> {
        records::event_of_record(record)
    }

    fn subscription_record(subscription: &Subscription) -> SubscriptionRecord {
        subscription.into()
    }

    fn subscription(record: SubscriptionRecord) -> Result<Subscription, ConvertError> {
        record.try_into()
    }

    fn delivery_record(delivery: &Delivery) -> DeliveryRecord {
        delivery.into()
    }

    fn delivery(record: DeliveryRecord) -> Result<Delivery, ConvertError> {
        record.try_into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Action, EventData, EventType, Reason, Stage};

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

    fn event(event_type: EventType) -> Event {
        let mut event = Event::new(
            event_type,
            EventData {
                env: "prod".into(),
                app: "shop".into(),
                stable_version: Some("1.0".into()),
                canary_version: Some("1.1".into()),
                version: Some("1.1".into()),
                stage: Some(Stage {
                    index: 1,
                    name: "25%".into(),
                    weight: 25,
                }),
                state: "failing".into(),
                score: Some(12.5),
                detected_at: "2026-01-05T00:00:00.000000000Z".into(),
                reasons: vec![Reason {
                    feature: "error_ratio".into(),
                    operation: Some("GET /a".into()),
                    test: "fisher_exact".into(),
                    canary_value: 0.3,
                    baseline_value: 0.001,
                    statistic: 14.2,
                    threshold: 4.9,
                    message: "errors".into(),
                }],
                action: Some(Action {
                    kind: "set_weight".into(),
                    app: "shop".into(),
                    version: "1.1".into(),
                    weight: 0,
                }),
                dry_run: true,
                approval: None,
                next_env: None,
                traffic: None,
                cause: None,
                levers: None,
            },
        );
        event.id = event_id(7);
        event.time = "2026-01-05T00:00:01.000000000Z".into();
        event
    }

    #[test]
    fn every_event_type_delivery_state_and_kind_round_trips_through_the_records() {
        for event_type in EventType::ALL {
            let event = event(event_type);
            let record = Daemon::event_record(&event).expect("to record");
            assert_eq!(record.event_type, event_type.as_str(), "kept by name");
            assert_eq!(Daemon::event(record).expect("from record"), event);
        }
        for state in DeliveryState::ALL {
            let mut delivery = Delivery::new(event_id(7), EventType::CanaryHeld);
            delivery.state = state;
            delivery.attempts = 3;
            delivery.first_attempt_ms = Some(1);
            delivery.next_attempt_ms = Delivery::NO_RETRY;
            delivery.last_status = Some(503);
            delivery.last_error = Some("unavailable".into());
            delivery.delivered_ms = Some(2);
            let record = Daemon::delivery_record(&delivery);
            assert_eq!(record.state, state.name(), "kept by name");
            assert_eq!(record.is_pending(), state == DeliveryState::Pending);
            assert_eq!(record.is_parked(), state == DeliveryState::Parked);
            assert_eq!(Daemon::delivery(record).expect("from record"), delivery);
        }
        for kind in Kind::ALL {
            let subscription = Subscription {
                id: "sub_1".into(),
                url: "http://127.0.0.1:9/hook".into(),
                events: EventType::ALL.to_vec(),
                kind,
                secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
                created_at: "2026-01-05T00:00:00Z".into(),
                disabled: Some("2026-01-06T00:00:00Z".into()),
            };
            let record = Daemon::subscription_record(&subscription);
            assert_eq!(record.kind, kind.name());
            assert_eq!(Daemon::subscription(record).expect("from record"), subscription);
        }
        // The store's own record of a new delivery is the daemon's new delivery.
        let record = Daemon::event_record(&event(EventType::CanaryFailed)).expect("to record");
        assert_eq!(
            Daemon::delivery(DeliveryRecord::pending(&record)).expect("from record"),
            Delivery::new(event_id(7), EventType::CanaryFailed)
        );
    }

    /// An event stored by a build whose data had a field more, and one less, reads as the
    /// contract's JSON does.
    #[test]
    fn an_event_record_reads_past_a_field_it_does_not_know_and_one_it_lacks() {
        let mut record = Daemon::event_record(&event(EventType::CanaryFailed)).expect("to record");
        let mut data: serde_json::Value = serde_json::from_str(&record.data).expect("json");
        let fields = data.as_object_mut().expect("an object");
        fields.insert("signed_off".into(), serde_json::json!({"by": "ops", "at": 3}));
        fields.remove("canary_version");
        fields.remove("action");
        record.data = data.to_string();
        let read = Daemon::event(record).expect("reads");
        let mut expected = event(EventType::CanaryFailed);
        expected.data.canary_version = None;
        expected.data.action = None;
        assert_eq!(read, expected);
    }

    /// serde_json writes a non-finite number as null; the stored event still reads.
    #[test]
    fn an_event_with_a_non_finite_number_reads_back() {
        let mut event = event(EventType::CanaryFailed);
        event.data.reasons[0].statistic = f64::INFINITY;
        let record = Daemon::event_record(&event).expect("to record");
        let read = Daemon::event(record).expect("reads");
        assert!(read.data.reasons[0].statistic.is_nan());
    }

    /// A name this build does not know is not misread: the record does not convert, and the store
    /// skips and counts it.
    #[test]
    fn a_record_naming_an_unknown_type_or_state_does_not_convert() {
        let mut record = Daemon::event_record(&event(EventType::CanaryFailed)).expect("to record");
        record.event_type = "canaryd.canary.approved".into();
        let error = Daemon::event(record).expect_err("unknown type");
        assert!(error.to_string().contains("canaryd.canary.approved"), "{error}");
        let mut record = Daemon::delivery_record(&Delivery::new(event_id(1), EventType::CanaryFailed));
        record.state = "escalated".into();
        assert!(Daemon::delivery(record).is_err());
        let mut record = Daemon::subscription_record(&Subscription {
            id: "s".into(),
            url: "http://127.0.0.1:9/hook".into(),
            events: vec![EventType::CanaryFailed],
            kind: Kind::Webhook,
            secret: String::new(),
            created_at: String::new(),
            disabled: None,
        });
        record.kind = "pagerduty".into();
        assert!(Daemon::subscription(record).is_err());
    }
}
