//! `canaryd.v1.EventService/Watch`: the event stream for rollout controllers, on the gRPC port.
//!
//! A watch first replays the stored events after the client's `after_id`, then follows new ones
//! from the feed (a broadcast of each event as it is stored). It subscribes to the feed before it
//! replays and skips what it already sent, so nothing falls between the two (a watch without
//! `after_id` reads where the history ends before it subscribes, for the same reason); if it falls
//! behind the feed, it goes back to the store from the last event it sent. Either way a client
//! that resumes from the last id it saw gets every later event once.

use std::pin::Pin;

use tokio::sync::{broadcast, mpsc};

use crate::events::feed::EventFeed;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::events::{Event, EventType};
use crate::io::try_blocking;
use crate::store::{Store, event_seq_of};

/// The generated protobuf types and service of `proto/canaryd/v1/events.proto`.
pub mod proto {
    tonic::include_proto!("canaryd.v1");
}

use proto::event_service_server::EventService;

/// What a watch wants.
#[derive(Clone, Debug)]
struct Filter {
    env: String,
    app: String,
    types: Vec<EventType>,
    /// Whether approval links are sent (`Watch::links`).
    links: bool,
}

impl Filter {
    fn keeps(&self, event: &Event) -> bool {
        (self.env.is_empty() || self.env == event.data.env)
            && (self.app.is_empty() || self.app == event.data.app)
            && (self.types.is_empty() || self.types.contains(&event.event_type))
    }
}

/// `links`: whether the reader may see approval links (see `Approval`).
fn to_proto(event: &Event, links: bool) -> proto::Event {
    let withheld;
    let event = if links || event.data.approval.is_none() {
        event
    } else {
        withheld = event.clone().without_links();
        &withheld
    };
    proto::Event {
        id: event.id.clone(),
        r#type: event.event_type.as_str().into(),
        source: event.source.clone(),
        subject: event.subject.clone(),
        time: event.time.clone(),
        env: event.data.env.clone(),
        app: event.data.app.clone(),
        version: event.data.version.clone().unwrap_or_default(),
        state: event.data.state.clone(),
        cloudevent_json: serde_json::to_string(event).unwrap_or_default(),
    }
}

/// The EventService over the store and the feed.
#[derive(Clone)]
pub struct Watch {
    store: Store,
    feed: EventFeed,
    shutdown: CancellationToken,
    /// Whether watchers see approval links: only where canaryd has no token set (the stream
    /// takes none, and a link is a credential).
    links: bool,
}

impl Watch {
    pub fn new(store: Store, feed: EventFeed, shutdown: CancellationToken, links: bool) -> Self {
        Watch {
            store,
            feed,
            shutdown,
            links,
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

/// How far a watch has got: the sequence number of the last event it passed (sent or filtered
/// out), `None` before the first.
type Position = Option<u64>;

type Out = mpsc::Sender<Result<proto::Event, Status>>;

/// Sends one item to the client; false when the client has gone or shutdown began. A client that
/// does not read fills the channel: waiting on it must not hold up the stop (the gRPC server's
/// drain waits for this stream to end).
async fn send(out: &Out, item: Result<proto::Event, Status>, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        () = shutdown.cancelled() => false,
        sent = out.send(item) => sent.is_ok(),
    }
}

/// Events stored after `after` that `filter` keeps, sent in order. Returns the new position, or
/// `Err(None)` when the client has gone or shutdown began.
async fn replay(
    store: &Store,
    filter: &Filter,
    mut after: Position,
    out: &Out,
    shutdown: &CancellationToken,
) -> Result<Position, Option<Status>> {
    loop {
        // Read a page of everything (to advance past filtered-out events too), then filter.
        let reader = store.clone();
        let page = try_blocking(move || reader.events(after, 256, |_| true))
            .await
            .map_err(|e| Some(Status::internal(format!("cannot read events: {e}"))))?;
        let Some(last) = page.last() else { return Ok(after) };
        let last_seq = Some(last.seq);
        for event in page.iter().filter(|e| filter.keeps(e)) {
            if !send(out, Ok(to_proto(event, filter.links)), shutdown).await {
                return Err(None);
            }
        }
        after = last_seq;
    }
}

#[tonic::async_trait]
impl EventService for Watch {
    type WatchStream = EventStream;

    async fn watch(&self, request: Request<proto::WatchRequest>) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        let mut types = Vec::new();
        for name in &request.types {
            let t = EventType::parse(name)
                .ok_or_else(|| Status::invalid_argument(format!("types: unknown event type {name:?}")))?;
            types.push(t);
        }
        let filter = Filter {
            env: request.env,
            app: request.app,
            types,
            links: self.links,
        };
        let start = if request.after_id.is_empty() {
            // Only what is stored from now on: where the history ends now, read before subscribing,
            // so that an event stored in between is replayed from the store rather than taken
            // for one from before the watch (and skipped).
            let store = self.store.clone();
            try_blocking(move || store.last_event_seq())
                .await
                .map_err(|e| Status::internal(format!("cannot read events: {e}")))?
        } else {
            let store = self.store.clone();
            let id = request.after_id.clone();
            let seq = try_blocking(move || event_seq_of(&store, &id))
                .await
                .map_err(|e| Status::internal(format!("cannot read events: {e}")))?;
            let seq = seq.ok_or_else(|| {
                Status::invalid_argument(format!(
                    "after_id: {:?} is not the id of an event in the history",
                    request.after_id
                ))
            })?;
            Some(seq)
        };
        // Subscribe before replaying: whatever is stored from here on reaches this watch one way
        // or the other.
        let mut live = self.feed.subscribe();
        let (tx, rx) = mpsc::channel(64);
        let store = self.store.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut position = replay(&store, &filter, start, &tx, &shutdown).await;
            loop {
                let at = match position {
                    Ok(at) => at,
                    Err(status) => {
                        if let Some(status) = status {
                            send(&tx, Err(status), &shutdown).await;
                        }
                        return;
                    }
                };
                let received = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    received = live.recv() => received,
                };
                position = match received {
                    Ok(event) => {
                        let seq = event.seq;
                        // Already passed by the replay, or from before the watch began.
                        if at.is_some_and(|at| seq <= at) {
                            continue;
                        }
                        if filter.keeps(&event)
                            && !send(&tx, Ok(to_proto(&event, filter.links)), &shutdown).await
                        {
                            return;
                        }
                        Ok(Some(seq))
                    }
                    // Fell behind the feed: catch up from the store, then follow again.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        replay(&store, &filter, at, &tx, &shutdown).await
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::StoreCounters;
    use tokio_stream::StreamExt;

    /// An event as the store keeps it (built from JSON, so it does not depend on every field).
    fn event(app: &str) -> Event {
        serde_json::from_value(serde_json::json!({
            "specversion": "1.0",
            "id": "",
            "source": "canaryd",
            "type": "canaryd.anomaly.detected",
            "time": "2026-01-05T00:00:00Z",
            "subject": app,
            "datacontenttype": "application/json",
            "data": {
                "env": "prod",
                "app": app,
                "state": "anomalous",
                "detected_at": "2026-01-05T00:00:00Z",
                "reasons": [],
                "dry_run": false,
            },
        }))
        .expect("an event")
    }

    #[test]
    fn approval_links_reach_watchers_only_where_no_token_is_set() {
        let mut waiting = event("shop");
        waiting.data.approval = Some(crate::events::Approval {
            stage: crate::events::Stage {
                index: 1,
                name: "50%".into(),
                weight: 50,
            },
            approve_url: Some("http://canaryd/api/v1/approvals/a.b".into()),
            abort_url: Some("http://canaryd/api/v1/approvals/c.d".into()),
            expires_at: "2026-01-06T00:00:00Z".into(),
        });
        let sent = |links| -> serde_json::Value {
            serde_json::from_str(&to_proto(&waiting, links).cloudevent_json).expect("JSON")
        };
        assert_eq!(
            sent(true)["data"]["approval"]["approve_url"],
            "http://canaryd/api/v1/approvals/a.b"
        );
        let withheld = sent(false);
        assert!(
            withheld["data"]["approval"]["approve_url"].is_null(),
            "{withheld}"
        );
        assert!(withheld["data"]["approval"]["abort_url"].is_null(), "{withheld}");
        assert_eq!(withheld["data"]["approval"]["stage"]["name"], "50%");
    }

    #[tokio::test]
    async fn a_watch_from_now_gets_an_event_stored_right_after_it_began() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let mut old = vec![event("before")];
        store.append_events(&mut old, 1_000).expect("append");
        let feed = EventFeed::new();
        let watch = Watch::new(store.clone(), feed.clone(), CancellationToken::new(), true);
        let mut stream = watch
            .watch(Request::new(proto::WatchRequest::default()))
            .await
            .expect("watch")
            .into_inner();
        // Stored (and published) once the watch has been answered, before its task first runs.
        let mut new = vec![event("after")];
        store.append_events(&mut new, 1_000).expect("append");
        feed.publish(&new);
        let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("an event");
        assert_eq!(first.id, new[0].id);
        assert_eq!(first.app, "after");
    }

    #[tokio::test]
    async fn a_watcher_that_does_not_read_does_not_hold_up_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let mut events: Vec<Event> = (0..300).map(|_| event("shop")).collect();
        store.append_events(&mut events, 1_000).expect("append");
        let shutdown = CancellationToken::new();
        let watch = Watch::new(store, EventFeed::new(), shutdown.clone(), true);
        let request = proto::WatchRequest {
            after_id: events[0].id.clone(),
            ..proto::WatchRequest::default()
        };
        // The replay fills the stream's buffer and waits for the client, which reads nothing.
        let mut stream = watch
            .watch(Request::new(request))
            .await
            .expect("watch")
            .into_inner();
        shutdown.cancel();
        // The watch ends at shutdown rather than going on to send everything.
        let mut got = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(item) = stream.next().await {
                got.push(item.expect("an event").id);
            }
        })
        .await;
        assert!(ended.is_ok(), "the stream ends at shutdown");
        assert!(got.len() < 299, "stopped partway: {} events", got.len());
        assert!(got.iter().zip(&events[1..]).all(|(a, b)| *a == b.id), "in order");
    }
}
