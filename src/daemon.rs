//! Wires the daemon together: binds the listeners, starts each stage as a task, writes
//! `addrs.json` once everything is ready, and stops the stages in order.
//!
//! Start: create the data dir, open the store and restore the engine's state from it, bind all
//! three listeners (a bind failure names the setting), start the engine task, the receivers and the
//! API, then write `<data-dir>/addrs.json` and report ready.
//! Stop (on the token): report not ready; stop the receivers, letting requests in flight finish;
//! then close the engine's queue (whoever still holds a sender): the engine task drains it and
//! flushes state to disk; then the webhook delivery workers stop (they deliver until then);
//! the HTTP API stops last so that health and metrics stay visible until the end. Every step has
//! `shutdown_grace` to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use canaryd_engine::Engine;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::act::clock::Clock;
use crate::act::delivery::Dispatcher;
use crate::config::{Config, HttpTimeouts};
use crate::engine;
use crate::events::feed::EventFeed;
use crate::receive::{self, Intake, Summing};
use crate::serve::watch::Watch;
use crate::serve::{self, ApiState};
use crate::stats::Stats;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data_dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {field} {addr}: {source}")]
    Bind {
        field: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    AddrsFile { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the engine's thread: {0}")]
    EngineThread(std::io::Error),
    #[error("cannot start the store's writer thread: {0}")]
    WriterThread(std::io::Error),
    #[error(transparent)]
    WebhookClient(#[from] crate::act::delivery::ClientError),
    #[error(transparent)]
    ApprovalKey(#[from] crate::events::approval::KeyError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{stage} failed: {message}")]
    Stage { stage: &'static str, message: String },
    #[error("{stage} did not stop within {grace:?}")]
    Timeout { stage: &'static str, grace: Duration },
}

/// The addresses the daemon actually listens on (port 0 resolved), as `addrs.json` has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BoundAddrs {
    pub otlp_grpc: SocketAddr,
    pub otlp_http: SocketAddr,
    pub http: SocketAddr,
}

/// A started daemon.
pub struct Daemon {
    addrs: BoundAddrs,
    addrs_path: PathBuf,
    shutdown: CancellationToken,
    grace: Duration,
    ready: Arc<AtomicBool>,
    receivers: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
    /// Closes the engine's queue: the receivers are done (or out of time), whoever still holds a
    /// sender.
    engine_stop: CancellationToken,
    engine_task: JoinHandle<Result<(), String>>,
    /// Stops the delivery workers (and any started later), once the engine has drained.
    delivery_stop: CancellationToken,
    dispatcher: Arc<Dispatcher>,
    api_stop: CancellationToken,
    api_task: JoinHandle<Result<(), String>>,
}

async fn bind(field: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { field, addr, source })
}

fn local_addr(
    field: &'static str,
    addr: SocketAddr,
    listener: &TcpListener,
) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { field, addr, source })
}

/// Writes `addrs.json` whole or not at all (temporary file, then rename), so a reader never sees
/// half of it.
fn write_addrs(data_dir: &Path, addrs: &BoundAddrs) -> Result<(), StartError> {
    let path = data_dir.join("addrs.json");
    let tmp = data_dir.join("addrs.json.tmp");
    let text = serde_json::to_string_pretty(addrs).expect("addresses serialize");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| StartError::AddrsFile { path, source })
}

/// Serves an axum router until `stop` is cancelled, then lets requests in flight finish.
async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    timeouts: HttpTimeouts,
    stop: CancellationToken,
) -> Result<(), String> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let router = router.layer(axum::middleware::from_fn(
        move |request, next: axum::middleware::Next| request_deadline(timeouts.request, request, next),
    ));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted: the
                    // listener itself is fine, so wait a moment and go on.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small requests and answers: Nagle's algorithm would only delay them.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    // Stop accepting; connections finish the request they are in (the caller bounds the wait).
    graceful.shutdown().await;
    Ok(())
}

/// Answers 408 when a request (its body included) has not been served within `limit`.
async fn request_deadline(
    limit: Duration,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = (
                axum::http::StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request was not received and answered within {limit:?} (request_timeout_secs)\n"
                ),
            )
                .into_response();
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            response
        }
    }
}

/// Runs one stage as a task; a stage that fails, or panics, brings the daemon down in order, not
/// alone: a panicked stage must not leave the others serving (and /readyz saying ready) without it.
fn spawn_stage(
    stage: &'static str,
    shutdown: CancellationToken,
    run: impl Future<Output = Result<(), String>> + Send + 'static,
) -> JoinHandle<Result<(), String>> {
    let inner = tokio::spawn(run);
    tokio::spawn(async move {
        let result = match inner.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(format!("panicked: {}", panic_message(e.into_panic()))),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &result {
            tracing::error!(stage, error = %e, "stage failed; shutting down");
            shutdown.cancel();
        }
        result
    })
}

/// The text a panic carried, when it carried text.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => (*text).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    }
}

impl Daemon {
    /// Starts every stage. Returns once all listeners are bound and `addrs.json` is written.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        Daemon::start_with_clock(config, Clock::System).await
    }

    /// `start`, with delivery (backoff, parking, the retry window) on `clock`: the delivery
    /// benchmark runs a day of a receiver's outage on a manual clock.
    pub async fn start_with_clock(config: Config, clock: Clock) -> Result<Daemon, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        // A stale addrs.json from an earlier run must not be mistaken for this one's.
        let addrs_path = config.data_dir.join("addrs.json");
        if let Err(e) = std::fs::remove_file(&addrs_path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(StartError::AddrsFile {
                path: addrs_path,
                source: e,
            });
        }
        if !config.models_dir.is_dir() {
            tracing::warn!(
                models_dir = %config.models_dir.display(),
                "models_dir is not a folder: only the built-in default model is loaded"
            );
        }
        let names: Vec<&str> = config.engine.models.iter().map(|m| m.name.as_str()).collect();
        tracing::info!(models = %names.join(", "), "analysis models loaded");
        let stats = Arc::new(Stats::new());
        let store = Store::open(&config.data_dir, config.sled_cache_bytes, stats.store_counters())?;
        let (writer, writer_thread) =
            crate::store::writer::StoreWriter::start(store.clone()).map_err(StartError::WriterThread)?;
        let mut engine = Engine::new(
            config.engine.clone(),
            Box::new(writer.slot_store(store.slot_store(), config.slots_read_ahead_bytes)),
        );
        engine.set_archive(Box::new(store.archive()));
        let state = store.load()?;
        tracing::info!(
            apps = state.apps.len(),
            baselines = state.baselines.len(),
            "state restored"
        );
        engine.restore(state);
        for (env, app, was, back) in engine.repair_future_clocks(receive::wall_clock_ns()) {
            tracing::warn!(
                %env,
                %app,
                was = %crate::events::format_event_time(was),
                now = %crate::events::format_event_time(back),
                "repaired an event-time clock that a future-dated point had moved (written by an older canaryd)"
            );
        }

        let grpc_listener = bind("otlp_grpc_addr", config.otlp_grpc_addr).await?;
        let otlp_http_listener = bind("otlp_http_addr", config.otlp_http_addr).await?;
        let http_listener = bind("http_addr", config.http_addr).await?;
        let addrs = BoundAddrs {
            otlp_grpc: local_addr("otlp_grpc_addr", config.otlp_grpc_addr, &grpc_listener)?,
            otlp_http: local_addr("otlp_http_addr", config.otlp_http_addr, &otlp_http_listener)?,
            http: local_addr("http_addr", config.http_addr, &http_listener)?,
        };
        let shutdown = CancellationToken::new();
        // Not a child of `shutdown`: delivery goes on while the receivers and the engine drain.
        let delivery_stop = CancellationToken::new();
        let dispatcher = Dispatcher::with_clock(
            store.clone(),
            stats.clone(),
            config.delivery.clone(),
            clock,
            delivery_stop.clone(),
        )?;
        tracing::info!(allowed = %config.delivery.outbound_allow, "outbound targets: public addresses, and restricted ones named here");
        dispatcher.sync().await;
        let feed = EventFeed::new();
        let public_url = (config.public_url.clone()).unwrap_or_else(|| {
            if addrs.http.ip().is_unspecified() {
                tracing::warn!(addr = %addrs.http, "public_url is not set and the API listens on every address: approval links will name an address no one can open; set public_url");
            }
            format!("http://{}", addrs.http)
        });
        let approvals = crate::events::approval::Approvals::open(
            &config.data_dir,
            &public_url,
            config.approval_link_ttl_secs,
        )?;
        let emitter = engine::Emitter {
            store: store.clone(),
            writer,
            stats: stats.clone(),
            dispatcher: dispatcher.clone(),
            feed: feed.clone(),
            flush_interval: config.flush_interval,
            max_baseline_memory_bytes: config.max_baseline_memory_bytes,
            max_events: config.max_events,
            approvals: approvals.clone(),
        };
        // Promotion chains know each version's verdicts in the other environments from the stored
        // events (their ids are the reasons of failures on sight): all recalled first, oldest
        // first so that the latest per environment stands, then applied once; what they change
        // now is emitted before anything is received.
        for event in store.events(None, usize::MAX, |e| {
            matches!(
                e.event_type,
                crate::events::EventType::CanaryPromoted | crate::events::EventType::CanaryFailed
            )
        })? {
            engine::recall_verdict(&mut engine, &event);
        }
        let chained = engine.follow_chains();
        emitter.emit(
            &mut engine,
            chained.iter().map(crate::events::canary_event).collect(),
        );
        let engine_stop = CancellationToken::new();
        let (engine, engine_run) = engine::start(
            engine,
            emitter,
            writer_thread,
            config.pipeline_queue,
            config.ingest_wait,
            engine_stop.clone(),
        )
        .map_err(StartError::EngineThread)?;
        let engine_task = spawn_stage("engine", shutdown.clone(), engine_run);
        // Delivery's alerts (a traffic move some levers applied and others did not) are events
        // like any other: stored and sent by the engine's emitter.
        if let Some(mut alerts) = dispatcher.take_alerts() {
            let engine = engine.clone();
            tokio::spawn(async move {
                while let Some(alert) = alerts.recv().await {
                    if engine.alert(alert).await.is_err() {
                        break;
                    }
                }
            });
        }
        let intake = Arc::new(Intake::new(
            config.normalize.clone(),
            engine.clone(),
            (
                config.engine.windows.future_skew_ns,
                Summing {
                    bucket_ns: config.engine.windows.bucket_ns,
                    from_engine_busy: config.receivers_sum_from_engine_busy,
                },
            ),
            stats.clone(),
            config.max_message_bytes,
            (config.requests_in_flight, config.ingest_wait),
            config.threads,
        ));

        // The stream takes no token: where tokens are set, approval links (credentials) stay out of it.
        let tokens = serve::Tokens {
            admin: config.api_token.clone().map(Arc::from),
            read: config.api_read_token.clone().map(Arc::from),
        };
        let watch = Watch::new(store.clone(), feed.clone(), shutdown.clone(), !tokens.enforced());
        let grpc_serve = receive::grpc::serve(
            grpc_listener,
            intake.clone(),
            watch,
            config.http_timeouts.request,
            shutdown.clone(),
        );
        let grpc_task = spawn_stage("OTLP gRPC receiver", shutdown.clone(), async move {
            grpc_serve.await.map_err(|e| e.to_string())
        });
        let otlp_http_serve = serve_http(
            otlp_http_listener,
            receive::http::router(intake),
            config.http_timeouts,
            shutdown.clone(),
        );
        let otlp_http_task = spawn_stage("OTLP/HTTP receiver", shutdown.clone(), otlp_http_serve);
        let ready = Arc::new(AtomicBool::new(false));
        let api_stop = CancellationToken::new();
        let api_serve = serve_http(
            http_listener,
            serve::router(ApiState {
                engine,
                stats,
                store: store.clone(),
                dispatcher: dispatcher.clone(),
                tokens,
                gate_pins: Default::default(),
                ready: ready.clone(),
                approvals,
                peers: serve::peers::Peers::new(config.cluster_peers.clone()),
            }),
            config.http_timeouts,
            api_stop.clone(),
        );
        let api_task = spawn_stage("HTTP API", shutdown.clone(), api_serve);

        write_addrs(&config.data_dir, &addrs)?;
        ready.store(true, Ordering::Release);
        tracing::info!(
            otlp_grpc = %addrs.otlp_grpc,
            otlp_http = %addrs.otlp_http,
            http = %addrs.http,
            data_dir = %config.data_dir.display(),
            "canaryd ready"
        );
        Ok(Daemon {
            addrs,
            addrs_path: config.data_dir.join("addrs.json"),
            shutdown,
            grace: config.shutdown_grace,
            ready,
            receivers: vec![
                ("OTLP gRPC receiver", grpc_task),
                ("OTLP/HTTP receiver", otlp_http_task),
            ],
            engine_stop,
            engine_task,
            delivery_stop,
            dispatcher,
            api_stop,
            api_task,
        })
    }

    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// Cancelling this token starts the orderly stop that `run_until_stopped` completes.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits for the shutdown token (cancelled by a signal, or by a stage that failed), then stops
    /// every stage in order. Returns the first failure.
    pub async fn run_until_stopped(self) -> Result<(), RunError> {
        self.shutdown.cancelled().await;
        tracing::info!("shutting down");
        self.ready.store(false, Ordering::Release);
        // Whoever reads addrs.json from now on must not find this process's addresses.
        if let Err(e) = std::fs::remove_file(&self.addrs_path) {
            tracing::warn!(error = %e, path = %self.addrs_path.display(), "cannot remove addrs.json");
        }
        let mut first_failure = None;
        for (stage, task) in self.receivers {
            if let Err(e) = finish(stage, task, self.grace).await {
                first_failure.get_or_insert(e);
            }
        }
        // The receivers are done, or out of time: the engine's queue takes nothing more, even from a
        // sender that a stalled connection still holds; the engine drains what it has, flushes,
        // and ends.
        self.engine_stop.cancel();
        if let Err(e) = finish("engine", self.engine_task, self.grace).await {
            first_failure.get_or_insert(e);
        }
        // Only now: the engine's last events were stored with their deliveries. What is still in
        // the outbox is durable and goes out after the next start.
        self.delivery_stop.cancel();
        if tokio::time::timeout(self.grace, self.dispatcher.stop())
            .await
            .is_err()
        {
            first_failure.get_or_insert(RunError::Timeout {
                stage: "webhook delivery",
                grace: self.grace,
            });
        }
        self.api_stop.cancel();
        if let Err(e) = finish("HTTP API", self.api_task, self.grace).await {
            first_failure.get_or_insert(e);
        }
        tracing::info!("stopped");
        first_failure.map_or(Ok(()), Err)
    }
}

async fn finish(
    stage: &'static str,
    task: JoinHandle<Result<(), String>>,
    grace: Duration,
) -> Result<(), RunError> {
    match tokio::time::timeout(grace, task).await {
        Err(_) => Err(RunError::Timeout { stage, grace }),
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(message))) => Err(RunError::Stage { stage, message }),
        Ok(Err(e)) => Err(RunError::Stage {
            stage,
            message: e.to_string(),
        }),
    }
}

/// Starts the daemon and runs it until SIGTERM or Ctrl-C, then stops it in order.
pub async fn run_until_signal(config: Config) -> Result<(), DaemonError> {
    let daemon = Daemon::start(config).await?;
    let shutdown = daemon.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        shutdown.cancel();
    });
    daemon.run_until_stopped().await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Run(#[from] RunError),
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stage_that_panics_fails_and_stops_the_daemon() {
        let shutdown = CancellationToken::new();
        let task = spawn_stage("engine", shutdown.clone(), async {
            panic!("attempt to add with overflow");
        });
        tokio::time::timeout(Duration::from_secs(10), shutdown.cancelled())
            .await
            .expect("the panic cancels the shutdown token");
        let error = finish("engine", task, Duration::from_secs(10))
            .await
            .expect_err("a panic is a failure");
        let message = error.to_string();
        assert!(
            message.contains("engine failed") && message.contains("attempt to add with overflow"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_stage_that_ends_well_stops_nothing() {
        let shutdown = CancellationToken::new();
        let task = spawn_stage("engine", shutdown.clone(), async { Ok(()) });
        finish("engine", task, Duration::from_secs(10))
            .await
            .expect("clean end");
        assert!(!shutdown.is_cancelled());
    }
}
