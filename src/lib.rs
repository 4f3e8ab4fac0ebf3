//! canaryd: decides whether a new version of a service is safe, from its OpenTelemetry data.
//!
//! The data flows receive -> normalize -> engine -> serve:
//! - `receive`: OTLP over gRPC (`receive::grpc`) and HTTP (`receive::http`), into one `Intake`.
//! - `normalize`: OTLP requests to the engine's observations; the only protobuf-aware code.
//! - `pipeline`: the bounded queue into the engine and the task that owns it.
//! - `act`: subscriptions and the durable, signed delivery of events to them.
//! - `api`: health, readiness, `/metrics` and the JSON API over what the engine knows.
//! - `dashboard`: the page at `/` (embedded files) and the timeline its charts read.
//! - `events`: canaryd's events as CloudEvents, built from the engine's decisions.
//! - `gates`: Flagger's webhooks answered from the canary analysis.
//! - `stats`: the daemon's own counters.
//! - `store`: durable state: the `canaryd-store` crate (the only one that touches sled), with
//!   the daemon's records named for it.
//! - `config` and `cli`: settings from defaults, file, environment and flags, validated at once.
//! - `daemon`: wiring, start-up order, and the orderly stop.
//! - `watch`: `canaryd.v1.EventService/Watch`, the event stream for rollout controllers.
//! - `testdata`: seeded OTLP request generators for benchmarks and tests.
//!
//! The statistics live in the `canaryd_engine` crate, which does no IO.

pub mod act;
pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dashboard;
pub mod events;
pub mod gates;
pub mod models;
pub mod normalize;
pub mod pipeline;
pub mod receive;
pub mod stats;
pub mod store;
pub mod testdata;
pub mod watch;
