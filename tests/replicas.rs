//! canaryd as several replicas (issue 17): apps routed across daemons by a hash of `service.name`,
//! as the OpenTelemetry Collector's `loadbalancing` exporter routes them, get the verdicts one
//! daemon gives them all; a replica killed with SIGKILL and restarted on its data dir loses none;
//! any replica answers for any app (`cluster_peers`), naming a peer that does not answer; and two
//! daemons fed the same stream emit the same events, byte for byte, under the same ids.
//!
//! The traffic is the project's scenario generator (`canaryd_engine::simulate::Traffic`): per
//! app a stable version and, after a warm-up, a canary with its own fault, sent as OTLP.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;

use canaryd::testdata::otlp_of_batch;
use canaryd_engine::simulate::{Chunk, Fault, Service, Traffic};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use support::process::Running;
use support::{Receiver, ReceiverMode, TestDaemon, eventually};

/// The app of scenario `i`, and its service: faults of three kinds (errors, latency, a new
/// downstream) and healthy canaries, over a 120 s warm-up and 180 s of canary.
fn scenario(i: usize) -> (String, Service) {
    let fault = match i % 5 {
        0 => Fault::ErrorRate(0.2),
        1 => Fault::LatencyFactor(3.0),
        2 => Fault::NewEdge,
        _ => Fault::None,
    };
    let service = Service {
        rps: 20.0,
        canary_share: 0.25,
        warmup_s: 120,
        duration_s: 180,
        fault_at_s: 30,
        batch_s: 10,
        ..Service::new(7_000 + i as u64, fault)
    };
    (format!("app-{i:02}"), service)
}

/// The OTLP of every scenario's next batch, by app, in app order; `None` once they are done.
struct Stream {
    traffic: Vec<(String, Traffic<'static>)>,
    ids: u64,
}

impl Stream {
    fn new(apps: usize) -> Stream {
        let traffic = (0..apps)
            .map(|i| {
                let (app, service) = scenario(i);
                // Leaked: a test's few services live as long as the process anyway.
                let service: &'static Service = Box::leak(Box::new(service));
                let traffic = Traffic::new(service, &app);
                (app, traffic)
            })
            .collect();
        Stream { traffic, ids: 0 }
    }

    #[allow(clippy::type_complexity)]
    fn next_round(
        &mut self,
    ) -> Option<
        Vec<(
            String,
            ExportTraceServiceRequest,
            Option<ExportMetricsServiceRequest>,
        )>,
    > {
        let mut round = Vec::new();
        for (app, traffic) in &mut self.traffic {
            let Chunk { batch, .. } = traffic.next()?;
            let (traces, metrics) = otlp_of_batch(&batch, &mut self.ids);
            round.push((app.clone(), traces, metrics));
        }
        Some(round)
    }
}

/// The replica a service's telemetry goes to, as a hash of its name picks it (FNV-1a here; the
/// collector's exporter hashes onto a ring, to the same effect: one app, one replica).
fn route(app: &str, replicas: usize) -> usize {
    let hash = app.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (hash % replicas as u64) as usize
}

/// A port free now, for a replica whose address its peers must know before it starts, and which
/// it binds again when it restarts.
///
/// Taken below the kernel's ephemeral range: a port the kernel handed out for a bind to port 0
/// could be handed out again, between its pick and its use or while its replica restarts, to
/// any daemon of a test running beside this one (they bind their other listeners to port 0).
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000, ephemeral_start.saturating_sub(10_000));
    if span < 1_000 {
        // No room below the range: the kernel's pick, as before.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
    }
    // Test binaries run at once start from different places.
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(low + start.wrapping_add(next) % span).expect("below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {ephemeral_start}");
}

/// `count` replicas under `dir`, each listing them all as `cluster_peers`, itself included, as a
/// headless Service's name would; with `extra` flags. Returns their API ports and them.
fn start_cluster(dir: &std::path::Path, count: usize, extra: &[&str]) -> (Vec<u16>, Vec<Replica>) {
    let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
    let peers = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let replicas = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let mut flags = vec![
                "--http-addr".to_owned(),
                format!("127.0.0.1:{port}"),
                "--cluster-peers".to_owned(),
                peers.clone(),
            ];
            flags.extend(extra.iter().map(|f| (*f).to_owned()));
            Replica::start(dir.join(format!("replica-{i}")), flags)
        })
        .collect();
    (ports, replicas)
}

/// A daemon process and what it was sent since it started.
struct Replica {
    daemon: Running,
    data: std::path::PathBuf,
    flags: Vec<String>,
    /// Export requests it accepted since it (re)started.
    sent: usize,
}

impl Replica {
    fn start(data: std::path::PathBuf, flags: Vec<String>) -> Replica {
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let daemon = Running::start_logging(&data, &args, "warn");
        Replica {
            daemon,
            data,
            flags,
            sent: 0,
        }
    }

    async fn send(
        &mut self,
        traces: &ExportTraceServiceRequest,
        metrics: &Option<ExportMetricsServiceRequest>,
    ) {
        self.daemon.post_traces(traces).await;
        self.sent += 1;
        if let Some(metrics) = metrics {
            let response = self
                .daemon
                .http
                .post(format!("http://{}/v1/metrics", self.daemon.addr("otlp_http")))
                .header("content-type", "application/x-protobuf")
                .body(prost::Message::encode_to_vec(metrics))
                .send()
                .await
                .expect("post metrics");
            assert_eq!(response.status(), 200);
            self.sent += 1;
        }
    }

    /// Kills the daemon with SIGKILL and starts it again on its data dir.
    fn restart_after_sigkill(&mut self) {
        self.daemon.signal("-KILL");
        let mut child = self.daemon.child.take().expect("running");
        let status = support::poll_until("the killed daemon to exit", || child.try_wait().expect("poll"));
        assert_eq!(status.code(), None, "killed by a signal");
        let args: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        self.daemon = Running::start_logging(&self.data, &args, "warn");
        self.sent = 0;
    }

    /// Waits until the engine has taken every request sent since it started.
    async fn ingested(&self) {
        eventually("the engine to take every request", || async {
            let text = self.daemon.get("/metrics").await;
            match support::sample(&text, "canaryd_engine_batches_total") {
                Some(n) if n >= self.sent as f64 => Ok(()),
                other => Err(format!("{other:?} of {}", self.sent)),
            }
        })
        .await;
    }

    async fn json(&self, path: &str) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
        let url = format!("http://{}{path}", self.daemon.addr("http"));
        let response = self.daemon.http.get(url).send().await.expect("get");
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        (status, response.json().await.unwrap_or_default(), headers)
    }

    /// Its canary events for `app`, as JSON, oldest first.
    async fn canary_events(&self, app: &str) -> Vec<serde_json::Value> {
        let (status, body, _) = self
            .json(&format!("/api/v1/events?app={app}&env=prod&limit=1000"))
            .await;
        assert_eq!(status, 200, "{body}");
        body["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| {
                e["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("canaryd.canary."))
            })
            .cloned()
            .collect()
    }
}

/// Each app's canary verdicts (the canary event types it got, in order), from its events.
fn verdicts(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["type"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_apps_across_three_replicas_get_one_daemons_verdicts_through_a_sigkill() {
    const APPS: usize = 30;
    const REPLICAS: usize = 3;
    const KILLED: usize = 1;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut reference = Replica::start(dir.path().join("one"), vec![]);
    let (ports, mut replicas) = start_cluster(dir.path(), REPLICAS, &["--flush-interval-secs", "1"]);
    let owner: BTreeMap<String, usize> = (0..APPS)
        .map(|i| {
            let app = scenario(i).0;
            let at = route(&app, REPLICAS);
            (app, at)
        })
        .collect();
    for r in 0..REPLICAS {
        assert!(
            owner.values().any(|&at| at == r),
            "each replica gets apps: {owner:?}"
        );
    }

    let mut stream = Stream::new(APPS);
    let mut round = 0;
    while let Some(batches) = stream.next_round() {
        for (app, traces, metrics) in &batches {
            reference.send(traces, metrics).await;
            replicas[owner[app]].send(traces, metrics).await;
        }
        round += 1;
        // Mid-run, the canaries live and some failing already: one replica is killed as the
        // kernel kills, with no warning, once what it was sent is taken and flushed (at most a
        // flush interval of learning is lost to a crash, and this test is about verdicts), and
        // comes back on its data dir.
        if round == 16 {
            let killed = &mut replicas[KILLED];
            killed.ingested().await;
            let flushes = killed_flushes(killed).await;
            eventually("a flush after the last batch", || async {
                let now = killed_flushes(killed).await;
                if now > flushes {
                    Ok(())
                } else {
                    Err(format!("{now}"))
                }
            })
            .await;
            let mine: Vec<&String> = owner
                .iter()
                .filter(|(_, at)| **at == KILLED)
                .map(|(a, _)| a)
                .collect();
            let before = learned(killed, &mine).await;
            killed.restart_after_sigkill();
            // Restarted on its volume, it resumes its apps where the last flush left them,
            // rather than learning them again from nothing.
            assert_eq!(learned(killed, &mine).await, before);
        }
    }
    reference.ingested().await;
    for replica in &replicas {
        replica.ingested().await;
    }

    let mut failed = 0;
    for (i, (app, &at)) in owner.iter().enumerate() {
        let one = reference.canary_events(app).await;
        let theirs = replicas[at].canary_events(app).await;
        assert!(!one.is_empty(), "{app}: the canary was judged");
        if at == KILLED {
            assert_eq!(
                verdicts(&theirs),
                verdicts(&one),
                "{app}, on the replica killed mid-run"
            );
        } else {
            // Fed the same stream, a replica names and words each decision as one daemon does.
            assert_eq!(theirs, one, "{app}");
        }
        let faulty = !matches!(scenario(i).1.fault, Fault::None);
        let failed_here = verdicts(&one).iter().any(|t| t == "canaryd.canary.failed");
        assert_eq!(failed_here, faulty, "{app}: {:?}", verdicts(&one));
        failed += usize::from(failed_here);
    }
    assert_eq!(failed, 18);

    // Any replica answers for any app: the list is everyone's, and a read about an app routed
    // elsewhere is answered by the replica that judges it.
    let asked = &replicas[0];
    let (status, apps, _) = asked.json("/api/v1/apps?env=prod").await;
    assert_eq!(status, 200, "{apps}");
    let names: BTreeSet<&str> = apps["apps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["app"].as_str())
        .collect();
    assert_eq!(names.len(), APPS, "{names:?}");
    assert_eq!(apps["unanswered_peers"], serde_json::json!([]));
    let elsewhere = owner
        .iter()
        .find(|(_, at)| **at == 2)
        .map(|(app, _)| app.clone())
        .expect("an app of replica 2");
    let path = format!("/api/v1/apps/{elsewhere}/canary?env=prod");
    let (status, canary, headers) = asked.json(&path).await;
    assert_eq!(status, 200, "{canary}");
    assert_eq!(canary["canary_version"], "1.1.0");
    let by = headers.get("canaryd-answered-by").and_then(|v| v.to_str().ok());
    assert_eq!(by, Some(format!("127.0.0.1:{}", ports[2]).as_str()));
    let (_, direct, _) = replicas[2].json(&path).await;
    assert_eq!(canary, direct);
    let (status, events, _) = asked
        .json(&format!("/api/v1/events?app={elsewhere}&env=prod"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        events["events"],
        serde_json::json!(replicas[2].canary_events(&elsewhere).await)
    );

    // Flagger's gate, asked of any replica, is answered by the one that judges the app.
    let gate = |replica: &Replica| {
        let url = format!("http://{}/api/v1/gates/flagger", replica.daemon.addr("http"));
        let request = replica.daemon.http.post(url).json(&serde_json::json!({
            "name": elsewhere, "namespace": "prod", "phase": "Progressing",
        }));
        async move {
            let response = request.send().await.expect("gate");
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.expect("JSON"))
        }
    };
    let relayed = gate(asked).await;
    assert_eq!(relayed, gate(&replicas[2]).await);
    assert_eq!(relayed.1["canary_version"], "1.1.0", "{relayed:?}");

    // An operator's action on that replica's healthy canary, sent to another, is taken there.
    let healthy = (0..APPS)
        .map(scenario)
        .find(|(app, service)| owner[app] == 2 && matches!(service.fault, Fault::None))
        .map(|(app, _)| app)
        .expect("a healthy app of replica 2");
    let url = format!(
        "http://{}/api/v1/apps/{healthy}/canary/pause?env=prod",
        asked.daemon.addr("http")
    );
    let response = asked.daemon.http.post(url).send().await.expect("pause");
    assert_eq!(response.status(), 200);
    let (_, paused, _) = replicas[2]
        .json(&format!("/api/v1/apps/{healthy}/canary?env=prod"))
        .await;
    assert_eq!(paused["paused"], true, "{paused}");

    // A replica down is named, never left out silently.
    let gone = replicas.pop().expect("replica 2");
    gone.daemon.signal("-KILL");
    let _ = gone.daemon.wait();
    let asked = &replicas[0];
    let (status, apps, _) = asked.json("/api/v1/apps?env=prod").await;
    assert_eq!(status, 200);
    let unanswered = apps["unanswered_peers"].as_array().cloned().unwrap_or_default();
    assert_eq!(unanswered.len(), 1, "{apps}");
    assert_eq!(unanswered[0]["peer"], format!("127.0.0.1:{}", ports[2]));
    let (status, problem, _) = asked.json(&path).await;
    assert_eq!(status, 502, "{problem}");
    assert_eq!(
        problem["unanswered_peers"][0]["peer"],
        format!("127.0.0.1:{}", ports[2])
    );
    let (status, _, _) = asked.json("/api/v1/apps/never-seen/canary?env=prod").await;
    assert_eq!(
        status, 502,
        "an app no answering replica knows may be the silent one's"
    );
}

/// How far `replica`'s baseline of each of `apps` has learned (windows, or `done`), and since
/// when, as its `/api/v1/apps` shows it.
async fn learned(replica: &Replica, apps: &[&String]) -> BTreeMap<String, String> {
    let (status, body, _) = replica.json("/api/v1/apps?env=prod").await;
    assert_eq!(status, 200, "{body}");
    let states: BTreeMap<String, String> = body["apps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let name = a["app"].as_str()?.to_owned();
            let learning = &a["learning"];
            let state = match learning.is_null() {
                true => "done".to_owned(),
                false => format!("{} windows since {}", learning["windows"], learning["since"]),
            };
            apps.contains(&&name).then_some((name, state))
        })
        .collect();
    assert_eq!(states.len(), apps.len(), "{body}");
    assert!(
        states.values().all(|state| !state.starts_with("0 windows")),
        "{states:?}"
    );
    states
}

async fn killed_flushes(replica: &Replica) -> f64 {
    let text = replica.daemon.get("/metrics").await;
    support::sample(&text, "canaryd_store_flushes_total").unwrap_or(0.0)
}

/// Lockstep pairs (issue 17): two daemons fed one stream emit byte-identical events under
/// identical ids, so a receiver subscribed to both takes each action once, de-duplicating by
/// `webhook-id` as it does a retry.
#[tokio::test]
async fn two_daemons_fed_one_stream_emit_identical_events_under_identical_ids() {
    const APPS: usize = 5;
    let receiver = Receiver::start(ReceiverMode::Accept).await;
    let pair = [TestDaemon::start().await, TestDaemon::start().await];
    for daemon in &pair {
        let response = daemon
            .http
            .post(daemon.api("/api/v1/subscriptions"))
            .json(&serde_json::json!({"url": receiver.url, "events": ["canaryd.canary.started", "canaryd.canary.failed"]}))
            .send()
            .await
            .expect("subscribe");
        assert_eq!(response.status(), 201);
    }
    let mut stream = Stream::new(APPS);
    let mut sent = 0;
    while let Some(batches) = stream.next_round() {
        for (_, traces, metrics) in &batches {
            for daemon in &pair {
                let post = |path: &str, body: Vec<u8>| {
                    daemon
                        .http
                        .post(daemon.otlp_http(path))
                        .header("content-type", "application/x-protobuf")
                        .body(body)
                        .send()
                };
                let response = post("/v1/traces", prost::Message::encode_to_vec(traces))
                    .await
                    .expect("post");
                assert_eq!(response.status(), 200);
                if let Some(metrics) = metrics {
                    let response = post("/v1/metrics", prost::Message::encode_to_vec(metrics))
                        .await
                        .expect("post");
                    assert_eq!(response.status(), 200);
                }
            }
            sent += 1 + usize::from(metrics.is_some());
        }
    }
    for daemon in &pair {
        eventually("the engine to take every request", || async {
            match daemon.metric("canaryd_engine_batches_total").await {
                n if n >= sent as f64 => Ok(()),
                n => Err(format!("{n} of {sent}")),
            }
        })
        .await;
    }
    let history = |daemon: &TestDaemon| {
        let url = daemon.api("/api/v1/events?limit=1000");
        let http = daemon.http.clone();
        async move {
            let body: serde_json::Value = http
                .get(url)
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("JSON");
            body["events"].as_array().cloned().unwrap_or_default()
        }
    };
    let (first, second) = (history(&pair[0]).await, history(&pair[1]).await);
    // Each daemon's own order of apps within a batch may differ; the events are the same.
    let by_id = |events: &[serde_json::Value]| -> BTreeMap<String, serde_json::Value> {
        events
            .iter()
            .map(|e| (e["id"].as_str().unwrap_or_default().to_owned(), e.clone()))
            .collect()
    };
    assert_eq!(by_id(&first), by_id(&second));
    let failed = first
        .iter()
        .filter(|e| e["type"] == "canaryd.canary.failed")
        .count();
    assert_eq!(failed, 3, "the three faulty canaries: {first:?}");
    assert_eq!(by_id(&first).len(), first.len(), "ids are unique");

    // The receiver gets each event from both, under one id, with one body.
    let wanted = first
        .iter()
        .filter(|e| {
            matches!(
                e["type"].as_str(),
                Some("canaryd.canary.started" | "canaryd.canary.failed")
            )
        })
        .count();
    let received = eventually("both daemons to deliver every event", || async {
        let received = receiver.received();
        if received.len() >= 2 * wanted {
            Ok(received)
        } else {
            Err(format!("{} of {}", received.len(), 2 * wanted))
        }
    })
    .await;
    let mut bodies: BTreeMap<String, Vec<axum::body::Bytes>> = BTreeMap::new();
    for r in &received {
        let id = r.headers["webhook-id"].to_str().expect("id").to_owned();
        bodies.entry(id).or_default().push(r.body.clone());
    }
    assert_eq!(bodies.len(), wanted, "one id per event");
    for (id, copies) in &bodies {
        assert_eq!(copies.len(), 2, "{id}");
        assert_eq!(copies[0], copies[1], "{id}: byte-identical");
        let event: serde_json::Value = serde_json::from_slice(&copies[0]).expect("JSON");
        assert_eq!(event, by_id(&first)[id]);
    }
}

/// Lockstep pairs (issue 17): either daemon of a pair can die without a missed or doubled action.
/// One is killed with SIGKILL before the canaries fail; the other alone sends the failures, and
/// the receiver, de-duplicating by `webhook-id`, acts on each decision exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_of_a_lockstep_pair_can_die_without_a_missed_or_doubled_action() {
    const APPS: usize = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(ReceiverMode::Accept).await;
    let mut pair: Vec<Replica> = (0..2)
        .map(|i| Replica::start(dir.path().join(format!("pair-{i}")), vec![]))
        .collect();
    for replica in &pair {
        let url = format!("http://{}/api/v1/subscriptions", replica.daemon.addr("http"));
        let response = replica
            .daemon
            .http
            .post(url)
            .json(&serde_json::json!({"url": receiver.url, "events": ["canaryd.canary.started", "canaryd.canary.failed"]}))
            .send()
            .await
            .expect("subscribe");
        assert_eq!(response.status(), 201);
    }
    let mut stream = Stream::new(APPS);
    let mut round = 0;
    while let Some(batches) = stream.next_round() {
        for (_, traces, metrics) in &batches {
            for replica in &mut pair {
                replica.send(traces, metrics).await;
            }
        }
        round += 1;
        // The canaries are live (from 120 s) and their faults begin at 150 s: one of the pair
        // dies, as the kernel kills, before any fails.
        if round == 15 {
            let dead = pair.pop().expect("the second");
            dead.ingested().await;
            dead.daemon.signal("-KILL");
            let _ = dead.daemon.wait();
        }
    }
    let survivor = &pair[0];
    survivor.ingested().await;
    let mut wanted = BTreeSet::new();
    for i in 0..APPS {
        for event in survivor.canary_events(&scenario(i).0).await {
            if matches!(
                event["type"].as_str(),
                Some("canaryd.canary.started" | "canaryd.canary.failed")
            ) {
                wanted.insert(event["id"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    assert_eq!(wanted.len(), APPS + 3, "five started, three failed: {wanted:?}");
    let received = eventually("every decision to reach the receiver", || async {
        let ids: BTreeSet<String> = receiver.accepted_ids().into_iter().collect();
        if ids == wanted {
            Ok(receiver.received())
        } else {
            Err(format!("{} of {}", ids.len(), wanted.len()))
        }
    })
    .await;
    // Each decision once per id, whoever sent it; the starts from both, byte-identical.
    let mut actions: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut bodies: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for r in &received {
        let event: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        let key = (
            event["subject"].as_str().unwrap_or_default().to_owned(),
            event["type"].as_str().unwrap_or_default().to_owned(),
        );
        actions.entry(key).or_default().insert(id.clone());
        bodies.entry(id).or_default().insert(r.body.to_vec());
    }
    assert!(actions.values().all(|ids| ids.len() == 1), "{actions:?}");
    assert!(bodies.values().all(|copies| copies.len() == 1), "one body per id");
    let failed = actions
        .keys()
        .filter(|(_, t)| t == "canaryd.canary.failed")
        .count();
    assert_eq!(failed, 3);
}

/// After the routing changed (replicas added or removed), two replicas know an app: the one that
/// judged it before and the one judging it now. A read relayed through a third is answered by
/// the one that saw the app last, and an action is taken by that one alone, never by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_routing_change_the_replica_that_saw_the_app_last_answers_and_acts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ports, mut replicas) = start_cluster(dir.path(), 3, &[]);
    // One healthy service: its first 150 s go to replica 1, the rest to replica 2.
    let mut stream = Stream::new(4);
    stream.traffic.drain(..3);
    let app = stream.traffic[0].0.clone();
    let mut round = 0;
    while let Some(batches) = stream.next_round() {
        let to = if round < 15 { 1 } else { 2 };
        for (_, traces, metrics) in &batches {
            replicas[to].send(traces, metrics).await;
        }
        round += 1;
    }
    for replica in &replicas {
        replica.ingested().await;
    }
    let canary = format!("/api/v1/apps/{app}/canary?env=prod");
    for at in [1, 2] {
        let (status, body, _) = replicas[at].json(&canary).await;
        assert_eq!(status, 200, "replica {at} judges it too: {body}");
    }
    let (status, _, headers) = replicas[0].json(&canary).await;
    assert_eq!(status, 200);
    let by = headers.get("canaryd-answered-by").and_then(|v| v.to_str().ok());
    assert_eq!(by, Some(format!("127.0.0.1:{}", ports[2]).as_str()));

    let url = format!(
        "http://{}/api/v1/apps/{app}/canary/pause?env=prod",
        replicas[0].daemon.addr("http")
    );
    let response = replicas[0].daemon.http.post(url).send().await.expect("pause");
    assert_eq!(response.status(), 200);
    assert_eq!(replicas[2].json(&canary).await.1["paused"], true);
    assert_eq!(
        replicas[1].json(&canary).await.1["paused"],
        false,
        "the older replica is left alone"
    );
}
