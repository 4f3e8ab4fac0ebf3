//! canaryd: decides whether a new version of a service is safe, from its OpenTelemetry data.
//!
//! The data flows receive -> normalize -> engine -> events -> act, and serve answers over it:
//! - `receive`: OTLP over gRPC (`receive::grpc`) and HTTP (`receive::http`), into one `Intake`.
//! - `normalize`: OTLP requests to the engine's observations; the only protobuf-aware code.
//! - `engine`: the one writer: a thread that owns the engine, fed by one bounded channel of
//!   inputs, and the one emitter of its decisions.
//! - `events`: canaryd's events as CloudEvents, built from the engine's decisions; the feed and
//!   `canaryd.v1.EventService/Watch`, the event stream for rollout controllers.
//! - `act`: subscriptions and the durable, signed delivery of events to them (webhooks, HAProxy).
//! - `serve`: the HTTP API, one file per resource, the dashboard, Flagger's gates and `/metrics`.
//! - `store`: durable state: the `canaryd-store` crate (the only one that touches sled), with
//!   the daemon's records (`store::records`) named for it. `io`: store IO off the async workers.
//! - `stats`: the daemon's own counters.
//! - `config`, `models` and `cli`: settings from defaults, file, environment and flags, and the
//!   analysis models, validated at once.
//! - `daemon`: wiring, start-up order, and the orderly stop.
//! - `testdata`: seeded OTLP request generators for benchmarks and tests.
//! - `fuzzing`: the entry points of the fuzz targets in `fuzz/` and of their replay on stable.
//!
//! The statistics live in the `canaryd_engine` crate, which does no IO.

pub mod act;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod healthcheck;
pub mod io;
pub mod models;
pub mod normalize;
pub mod receive;
pub mod serve;
pub mod stats;
pub mod store;
pub mod testdata;

/// The system clock: nanoseconds since the Unix epoch (0 if the clock is before it). Batches are
/// stamped with it on arrival, and delivery times its first attempts against it.
pub fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// An error and its causes, in one line ("error sending request: connection refused"): where
/// reqwest says what actually went wrong, for the webhook deliveries' `last_error` and the
/// client commands' messages alike.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
