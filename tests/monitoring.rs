//! The monitoring components in `deploy/kubernetes/components` (the Grafana dashboard and the
//! PrometheusRule's alerts) query only metrics a real daemon exports: a daemon is driven until
//! every kind of family is out (ingest, a canary with its checks, webhook deliveries to a receiver
//! that is not there), and every `canaryd_*` name the components use must be a sample name of its
//! `/metrics`.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use canaryd::testdata::{self, EPOCH_NS};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use support::{TestDaemon, eventually};

const SECOND: u64 = 1_000_000_000;

/// Sample names of a Prometheus text exposition, from its `# TYPE` lines: a histogram's
/// `_bucket`, `_sum` and `_count` as well.
fn sample_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// Every `canaryd_*` name in the files under `dir`, with the files that use it.
fn names_used(dir: &Path, found: &mut BTreeSet<(String, String)>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            names_used(&path, found);
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("canaryd_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            found.insert((name, path.display().to_string()));
        }
    }
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_query_only_metrics_canaryd_exports() {
    let began = std::time::Instant::now();
    let daemon = TestDaemon::start().await;
    // A receiver that is not there: deliveries fail and are counted.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let response = daemon
        .http
        .post(daemon.api("/api/v1/subscriptions"))
        .json(&serde_json::json!({
            "url": format!("http://127.0.0.1:{port}/hook"),
            "events": ["canaryd.canary.started", "canaryd.canary.failed"],
        }))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(response.status(), 201);

    // A stable worker for five minutes, then a canary that fails every other message.
    let mut client = TraceServiceClient::connect(daemon.grpc_endpoint())
        .await
        .expect("connect");
    for export in 0..84u64 {
        let start = EPOCH_NS + export * 5 * SECOND;
        let stable = testdata::worker_traffic(("prod", "worker", "1.0.0"), start, 5, 20, 0, export);
        client.export(stable).await.expect("export");
        if export >= 60 {
            let canary =
                testdata::worker_traffic(("prod", "worker", "1.1.0"), start, 5, 10, 2, 1_000 + export);
            client.export(canary).await.expect("export");
        }
    }

    let wanted = [
        "canaryd_canary_check_statistic",
        "canaryd_canary_score",
        "canaryd_deliveries_total",
        "canaryd_otlp_requests_total",
    ];
    let exported = eventually("every kind of metric family", || async {
        let names = sample_names(&daemon.metrics_text().await);
        match wanted.iter().find(|name| !names.contains(**name)) {
            None => Ok(names),
            Some(missing) => Err(format!("{missing} not yet exported")),
        }
    })
    .await;

    // The start was decided by a batch: its first attempt was timed from that batch's arrival,
    // and no such time can be longer than this test has run. (The failure waits behind it, at
    // the head of the queue of a receiver that is down.)
    let timed = eventually("a decided event's first attempt timed", || async {
        match daemon.metric("canaryd_act_seconds_count").await {
            n if n >= 1.0 => Ok(n),
            n => Err(format!("{n} timed")),
        }
    })
    .await;
    let total = daemon.metric("canaryd_act_seconds_sum").await;
    assert!(
        total > 0.0 && total <= timed * began.elapsed().as_secs_f64(),
        "{total} s over {timed} attempts in {:?}",
        began.elapsed()
    );

    let components = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/components");
    let mut used = BTreeSet::new();
    names_used(&components, &mut used);
    let queried: BTreeSet<&str> = used.iter().map(|(name, _)| name.as_str()).collect();
    for name in [
        "canaryd_canary_state",
        "canaryd_outbox_depth",
        "canaryd_deliveries_total",
    ] {
        assert!(queried.contains(name), "the components watch {name}");
    }
    let unknown: Vec<&(String, String)> = used.iter().filter(|(name, _)| !exported.contains(name)).collect();
    assert!(
        unknown.is_empty(),
        "queried but not exported: {unknown:?}; exported: {exported:?}"
    );
}
