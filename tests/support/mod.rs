//! Test support: a whole daemon on port 0 with a temporary data dir, clients for its OTLP and HTTP
//! ends, and waiting on conditions with a deadline.

#![allow(dead_code)]

pub mod process;

use std::future::Future;
use std::time::Duration;

use canaryd::config::{Config, RawConfig};
use canaryd::daemon::{BoundAddrs, Daemon, RunError};
use canaryd::testdata::{self, EPOCH_NS, kv, kv_int};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a condition may take to become true before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

pub struct TestDaemon {
    pub addrs: BoundAddrs,
    pub data_dir: std::path::PathBuf,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), RunError>>>,
    _dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl TestDaemon {
    pub async fn start() -> TestDaemon {
        TestDaemon::start_with(|_| {}).await
    }

    /// Starts a daemon on port 0 after `adjust` has had its say on the settings.
    pub async fn start_with(adjust: impl FnOnce(&mut RawConfig)) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temporary data dir");
        let any_port = Some("127.0.0.1:0".parse().expect("address"));
        let mut raw = RawConfig {
            data_dir: Some(dir.path().join("data")),
            otlp_grpc_addr: any_port,
            otlp_http_addr: any_port,
            http_addr: any_port,
            ..RawConfig::default()
        };
        adjust(&mut raw);
        let config = Config::resolve(raw).expect("test config is valid");
        let data_dir = config.data_dir.clone();
        let daemon = Daemon::start(config).await.expect("daemon starts");
        let addrs = daemon.addrs();
        let shutdown = daemon.shutdown_token();
        let task = tokio::spawn(daemon.run_until_stopped());
        TestDaemon {
            addrs,
            data_dir,
            shutdown,
            task: Some(task),
            _dir: dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.addrs.http)
    }

    pub fn otlp_http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addrs.otlp_http)
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.addrs.otlp_grpc)
    }

    /// The HTTP status of `GET path` on the API.
    pub async fn status_of(&self, path: &str) -> u16 {
        let response = self.http.get(self.api(path)).send().await.expect("API answers");
        response.status().as_u16()
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.http.get(self.api(path)).send().await.expect("API answers");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.expect("API answers JSON")
    }

    /// `GET /api/v1/apps`.
    pub async fn apps(&self) -> serde_json::Value {
        self.get_json("/api/v1/apps").await
    }

    pub async fn metrics_text(&self) -> String {
        let response = self
            .http
            .get(self.api("/metrics"))
            .send()
            .await
            .expect("metrics answer");
        response.text().await.expect("metrics text")
    }

    /// The value of one sample on `/metrics`, by its exact name and labels as exposed.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        sample(&text, series).unwrap_or_else(|| panic!("{series} is not on /metrics:\n{text}"))
    }

    /// Stops the daemon in order and returns how the stop went.
    pub async fn stop(mut self) -> Result<(), RunError> {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("daemon stops within the deadline")
            .expect("daemon task does not panic")
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The value of `series` in a Prometheus text exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Polls `check` until it yields a value, failing the test after `DEADLINE` with `what` and the
/// last thing `describe` said.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// `eventually` for code that blocks (a child process, a file it writes): polls `check` until it
/// yields a value, failing the test with `what` after `DEADLINE`.
pub fn poll_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The entry for `app` in `/api/v1/apps`, if listed.
pub fn find_app<'a>(apps: &'a serde_json::Value, env: &str, app: &str) -> Option<&'a serde_json::Value> {
    apps["apps"]
        .as_array()?
        .iter()
        .find(|a| a["env"] == env && a["app"] == app)
}

/// One version's entry of an app.
pub fn find_version<'a>(app: &'a serde_json::Value, version: &str) -> Option<&'a serde_json::Value> {
    app["versions"]
        .as_array()?
        .iter()
        .find(|v| v["version"] == version)
}

/// Waits until `app`'s `version` shows `field` equal to `want`, and returns the app entry.
pub async fn wait_for_count(
    daemon: &TestDaemon,
    env: &str,
    app: &str,
    version: &str,
    field: &str,
    want: u64,
) -> serde_json::Value {
    eventually(&format!("{env}/{app}@{version} {field} = {want}"), || async {
        let apps = daemon.apps().await;
        let entry = find_app(&apps, env, app).ok_or_else(|| apps.to_string())?;
        let got = find_version(entry, version).and_then(|v| v[field].as_u64());
        if got == Some(want) {
            Ok(entry.clone())
        } else {
            Err(entry.to_string())
        }
    })
    .await
}

/// How a test webhook receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiverMode {
    Accept,
    /// Answers with this status.
    Fail(u16),
    /// Never answers (until the client gives up).
    Hang,
    /// Answers this status to every attempt at the first event it is sent (by `webhook-id`),
    /// and accepts every other event: one event it cannot take.
    FailFirstEvent(u16),
}

/// One request a receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub headers: axum::http::HeaderMap,
    pub body: axum::body::Bytes,
    pub accepted: bool,
}

/// A real HTTP webhook receiver on 127.0.0.1:0 that records every request.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    mode: std::sync::Arc<std::sync::Mutex<ReceiverMode>>,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    /// The event `FailFirstEvent` refuses, once it has seen one.
    refused: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Receiver {
    pub async fn start(mode: ReceiverMode) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        let receiver = Receiver {
            url,
            mode: std::sync::Arc::new(std::sync::Mutex::new(mode)),
            received: std::sync::Arc::default(),
            refused: std::sync::Arc::default(),
        };
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let mut mode = *state.mode.lock().expect("mode");
                    if let ReceiverMode::FailFirstEvent(status) = mode {
                        let id = headers
                            .get("webhook-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let mut refused = state.refused.lock().expect("refused");
                        let refused = refused.get_or_insert(id.clone());
                        mode = if *refused == id {
                            ReceiverMode::Fail(status)
                        } else {
                            ReceiverMode::Accept
                        };
                    }
                    let accepted = mode == ReceiverMode::Accept;
                    state.received.lock().expect("received").push(Received {
                        headers,
                        body,
                        accepted,
                    });
                    match mode {
                        ReceiverMode::Accept => axum::http::StatusCode::NO_CONTENT,
                        ReceiverMode::Fail(code) => axum::http::StatusCode::from_u16(code).expect("status"),
                        ReceiverMode::Hang => {
                            std::future::pending::<()>().await;
                            unreachable!()
                        }
                        ReceiverMode::FailFirstEvent(_) => unreachable!("resolved above"),
                    }
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        receiver
    }

    pub fn set_mode(&self, mode: ReceiverMode) {
        *self.mode.lock().expect("mode") = mode;
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("received").clone()
    }

    /// The ids (`webhook-id`) of the deliveries it accepted, in arrival order.
    pub fn accepted_ids(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter(|r| r.accepted)
            .filter_map(|r| r.headers.get("webhook-id")?.to_str().ok().map(str::to_owned))
            .collect()
    }
}

/// One second of event time, in nanoseconds.
const SECOND: u64 = 1_000_000_000;

/// `per_second` SERVER spans a second for each of `seconds` seconds from `start_s` (seconds after
/// `EPOCH_NS`) for one version of `shop` in `prod`, every `error_every`-th one failing with a 500.
pub fn shop_spans(
    version: &str,
    start_s: u64,
    seconds: u64,
    per_second: u64,
    error_every: u64,
) -> ResourceSpans {
    // Ids unique across versions: the version's bytes salt the trace id.
    let salt = version
        .bytes()
        .fold(0x5eed_u64, |h, b| h.rotate_left(8) ^ u64::from(b));
    let mut spans = Vec::new();
    for s in start_s..start_s + seconds {
        for i in 0..per_second {
            let n = s * per_second + i;
            let failed = n.is_multiple_of(error_every);
            let start = EPOCH_NS + s * SECOND + i * (SECOND / per_second);
            spans.push(Span {
                trace_id: [n.to_be_bytes(), salt.to_be_bytes()].concat(),
                span_id: (n + 1).rotate_left(17).wrapping_add(salt).to_be_bytes().to_vec(),
                name: "GET /orders".into(),
                kind: span::SpanKind::Server as i32,
                start_time_unix_nano: start,
                // 20 to 29 ms, the same for both versions.
                end_time_unix_nano: start + 20_000_000 + (n % 10) * 1_000_000,
                attributes: vec![
                    kv("http.request.method", "GET"),
                    kv("http.route", "/orders"),
                    kv_int("http.response.status_code", if failed { 500 } else { 200 }),
                ],
                status: failed.then(|| Status {
                    code: status::StatusCode::Error as i32,
                    message: "internal error".into(),
                }),
                ..Span::default()
            });
        }
    }
    ResourceSpans {
        resource: Some(testdata::resource("prod", "shop", version)),
        scope_spans: vec![ScopeSpans {
            spans,
            ..ScopeSpans::default()
        }],
        ..ResourceSpans::default()
    }
}

/// Both versions over the same seconds: the stable with 0.1% errors, the canary with one error
/// every `canary_error_every` requests.
pub fn canary_traffic(start_s: u64, seconds: u64, canary_error_every: u64) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![
            shop_spans("1.0.0", start_s, seconds, 50, 1000),
            shop_spans("2.0.0", start_s, seconds, 50, canary_error_every),
        ],
    }
}

/// Exports `request` through `traces` and waits until `daemon` lists the shop in prod: what a
/// scenario does before it declares a rollout of the shop.
pub async fn export_until_shop_catalogued(
    daemon: &TestDaemon,
    traces: &mut opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient<
        tonic::transport::Channel,
    >,
    request: ExportTraceServiceRequest,
) {
    traces.export(request).await.expect("export");
    eventually("shop is catalogued", || async {
        find_app(&daemon.apps().await, "prod", "shop")
            .map(|_| ())
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
}

/// A trace exporter to `daemon` after it has seen two seconds of both shop versions
/// (`canary_traffic`) and a rollout of 1.0.0 to 2.0.0 was declared, with `token` when given: the
/// start of every canary scenario, which sends its own traffic on through the exporter.
pub async fn shop_rollout_declared(
    daemon: &TestDaemon,
    token: Option<&str>,
) -> opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient<
    tonic::transport::Channel,
> {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    let mut traces = TraceServiceClient::connect(daemon.grpc_endpoint())
        .await
        .expect("connect");
    export_until_shop_catalogued(daemon, &mut traces, canary_traffic(0, 2, 1000)).await;
    let mut declare = daemon.http.put(daemon.api("/api/v1/apps/shop/rollout?env=prod"));
    if let Some(token) = token {
        declare = declare.bearer_auth(token);
    }
    let response = declare
        .json(&serde_json::json!({"stable_version": "1.0.0", "canary_version": "2.0.0"}))
        .send()
        .await
        .expect("PUT");
    assert_eq!(response.status().as_u16(), 200);
    traces
}

/// Settings for a daemon that reads its models from `models`, keeps its data in `data` when given
/// (so that a second daemon started with them resumes where the first stopped), and takes
/// `token` as its admin token.
pub fn models_and_data(
    models: &std::path::Path,
    data: Option<&std::path::Path>,
    token: &str,
) -> impl FnOnce(&mut RawConfig) + use<> {
    let (models, data, token) = (
        models.to_owned(),
        data.map(std::path::Path::to_owned),
        token.to_owned(),
    );
    move |raw| {
        raw.models_dir = Some(models);
        raw.api_token = Some(token);
        if let Some(data) = data {
            raw.data_dir = Some(data);
        }
    }
}
