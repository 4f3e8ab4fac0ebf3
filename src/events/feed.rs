//! The feed: every event as it is stored, broadcast to whoever follows (the gRPC Watch streams).
//! A follower that falls behind is told so by the channel and goes back to the store.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::Event;

/// Events as they are stored, for the watches that follow them.
#[derive(Clone)]
pub struct EventFeed {
    tx: broadcast::Sender<Arc<Event>>,
}

impl EventFeed {
    pub fn new() -> Self {
        EventFeed {
            tx: broadcast::channel(1_024).0,
        }
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Publishes stored events (no watcher is fine).
    pub fn publish(&self, events: &[Event]) {
        for event in events {
            let _ = self.tx.send(Arc::new(event.clone()));
        }
    }
}

impl Default for EventFeed {
    fn default() -> Self {
        EventFeed::new()
    }
}
