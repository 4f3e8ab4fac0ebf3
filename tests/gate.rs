//! `canaryd gate` and the operator commands, run as the built binary against a real daemon fed
//! the project's own generated traffic in event time (issue 18): exit 0 when an A/A canary is
//! promoted, 1 on an error jump, 2 for a canary starved of traffic, 3 when no daemon answers; a
//! daemon restart mid-analysis is followed to the final verdict; the rollout commands act through
//! the API with the token from CANARYD_TOKEN.

mod support;

use std::path::Path;
use std::process::Output;

use canaryd::config::RawConfig;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use support::{DEADLINE, TestDaemon, canary_traffic};
use tokio::process::Command;

const TOKEN: &str = "gate-test-token";

/// One short stage on errors and latency: an A/A canary is promoted after a minute of event time.
const QUICK: &str = r#"
description = "One one-minute stage on errors and latency, for the gate's tests."
[checks.error_ratio]
[checks.latency]
[[stages]]
name = "all"
weight = 100.0
observe_s = 60
"#;

fn settings(models: &Path, data: Option<&Path>) -> impl FnOnce(&mut RawConfig) + use<> {
    support::models_and_data(models, data, TOKEN)
}

fn models_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("models dir");
    std::fs::write(dir.path().join("quick.toml"), QUICK).expect("write the model");
    dir
}

/// The built binary with `args`, the daemon's addresses and the token in the environment.
fn canaryd(daemon: &TestDaemon, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_canaryd"));
    command
        .args(args)
        .args(["--server", &daemon.api(""), "--grpc", &daemon.grpc_endpoint()])
        .env("CANARYD_TOKEN", TOKEN)
        .env_remove("GITHUB_OUTPUT")
        .env_remove("GITHUB_STEP_SUMMARY")
        .kill_on_drop(true);
    command
}

fn gate_args<'a>(version: &'a str, timeout: &'a str) -> Vec<&'a str> {
    vec![
        "gate",
        "--env",
        "prod",
        "--app",
        "shop",
        "--version",
        version,
        "--wait",
        "--timeout",
        timeout,
        "--output",
        "json",
    ]
}

async fn declare(daemon: &TestDaemon) {
    let status = canaryd(
        daemon,
        &[
            "rollout", "start", "--env", "prod", "--app", "shop", "--stable", "1.0.0", "--canary", "2.0.0",
            "--model", "quick",
        ],
    )
    .output()
    .await
    .expect("rollout start runs");
    assert_eq!(status.status.code(), Some(0), "rollout start: {status:?}");
    let line = String::from_utf8_lossy(&status.stdout);
    assert!(
        line.starts_with("shop 2.0.0 in prod against 1.0.0: stage 1 of 1 (all, weight 100)"),
        "{line}"
    );
}

/// Both versions, `seconds` of event time from `start_s`, in 10 s exports.
async fn send(daemon: &TestDaemon, start_s: u64, seconds: u64, canary_error_every: u64) {
    let mut traces = TraceServiceClient::connect(daemon.grpc_endpoint())
        .await
        .expect("connect");
    for at in (start_s..start_s + seconds).step_by(10) {
        traces
            .export(canary_traffic(at, 10, canary_error_every))
            .await
            .expect("export");
    }
}

/// The stable alone first, so that the app and both versions are known before the rollout.
async fn warm_up(daemon: &TestDaemon) {
    send(daemon, 0, 10, 1000).await;
    support::eventually("shop is catalogued", || async {
        let status = daemon.status_of("/api/v1/apps/shop/baseline?env=prod").await;
        if status == 200 {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
}

async fn finished(child: tokio::process::Child) -> (Output, serde_json::Value) {
    let output = tokio::time::timeout(DEADLINE * 4, child.wait_with_output())
        .await
        .expect("the gate ends within the deadline")
        .expect("the gate runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout is one JSON verdict ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, json)
}

#[tokio::test]
async fn an_a_a_canary_is_promoted_and_the_gate_exits_0_with_its_evidence() {
    let models = models_dir();
    let daemon = TestDaemon::start_with(settings(models.path(), None)).await;
    warm_up(&daemon).await;
    declare(&daemon).await;
    let github = tempfile::tempdir().expect("github files");
    let (output_file, summary_file) = (github.path().join("output"), github.path().join("summary"));
    let gate = canaryd(&daemon, &gate_args("2.0.0", "2m"))
        .env("GITHUB_OUTPUT", &output_file)
        .env("GITHUB_STEP_SUMMARY", &summary_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("gate starts");
    send(&daemon, 10, 180, 1000).await;
    let (output, verdict) = finished(gate).await;
    assert_eq!(output.status.code(), Some(0), "{verdict}");
    assert_eq!(verdict["verdict"], "passed");
    assert_eq!(verdict["state"], "promoted");
    let checks = verdict["analysis"]["checks"].as_array().expect("checks");
    assert!(
        !checks.is_empty() && checks.iter().all(|c| c["message"].is_string()),
        "{verdict}"
    );
    assert_eq!(
        std::fs::read_to_string(&output_file).expect("GITHUB_OUTPUT written"),
        "verdict=passed\n"
    );
    let summary = std::fs::read_to_string(&summary_file).expect("GITHUB_STEP_SUMMARY written");
    assert!(
        summary.contains("**passed**") && summary.contains("| `errors:"),
        "{summary}"
    );
    // In a log (stderr is not a terminal), one line per change of the progress line, the last
    // one the state the verdict came from, however quickly the analysis ran.
    let log = String::from_utf8_lossy(&output.stderr);
    let last = log.lines().last().unwrap_or("");
    assert!(last.contains("· promoted ·") && last.contains("checks "), "{log}");
}

#[tokio::test]
async fn an_error_jump_fails_the_canary_and_the_gate_exits_1() {
    let models = models_dir();
    let daemon = TestDaemon::start_with(settings(models.path(), None)).await;
    warm_up(&daemon).await;
    declare(&daemon).await;
    let gate = canaryd(&daemon, &gate_args("2.0.0", "2m"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gate starts");
    send(&daemon, 10, 60, 5).await;
    let (output, verdict) = finished(gate).await;
    assert_eq!(output.status.code(), Some(1), "{verdict}");
    assert_eq!(verdict["verdict"], "failed");
    assert!(
        verdict["reason"].as_str().unwrap_or("").contains("error"),
        "names the failing check: {verdict}"
    );
    // A later gate on the same version knows, without waiting; so does `rollout status`.
    let again = canaryd(
        &daemon,
        &["gate", "--env", "prod", "--app", "shop", "--version", "2.0.0"],
    )
    .output()
    .await
    .expect("gate runs");
    assert_eq!(again.status.code(), Some(1));
    let status = canaryd(&daemon, &["rollout", "status", "--env", "prod", "--app", "shop"])
        .output()
        .await
        .expect("status runs");
    assert_eq!(status.status.code(), Some(1));
}

#[tokio::test]
async fn a_canary_starved_of_traffic_is_undecided_at_the_deadline_and_the_gate_exits_2() {
    let models = models_dir();
    let daemon = TestDaemon::start_with(settings(models.path(), None)).await;
    warm_up(&daemon).await;
    declare(&daemon).await;
    let gate = canaryd(&daemon, &gate_args("2.0.0", "3s"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gate starts");
    let (output, verdict) = finished(gate).await;
    assert_eq!(output.status.code(), Some(2), "{verdict}");
    assert_eq!(verdict["verdict"], "insufficient_data", "{verdict}");
}

#[tokio::test]
async fn no_daemon_to_reach_is_exit_3_after_retrying() {
    // A port nothing listens on: bound, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let server = format!("http://127.0.0.1:{port}");
    let output = Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args([
            "gate",
            "--server",
            &server,
            "--app",
            "shop",
            "--version",
            "2.0.0",
            "--wait",
        ])
        .args(["--retry-for", "1s"])
        .output()
        .await
        .expect("gate runs");
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach canaryd") && stderr.contains(&server),
        "{stderr}"
    );
    // A usage error is 3 too (clap's own would be 2).
    let output = Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(["gate", "--app", "shop"])
        .output()
        .await
        .expect("gate runs");
    assert_eq!(output.status.code(), Some(3));
}

#[tokio::test]
async fn the_gate_follows_the_analysis_across_a_daemon_restart() {
    let (models, data) = (models_dir(), tempfile::tempdir().expect("data dir"));
    let daemon = TestDaemon::start_with(settings(models.path(), Some(data.path()))).await;
    warm_up(&daemon).await;
    declare(&daemon).await;
    let gate = canaryd(&daemon, &gate_args("2.0.0", "2m"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gate starts");
    // Half a stage of healthy traffic, then the daemon stops and comes back on the same ports.
    send(&daemon, 10, 30, 1000).await;
    let addrs = daemon.addrs;
    daemon.stop().await.expect("stops cleanly");
    let again = settings(models.path(), Some(data.path()));
    let daemon = TestDaemon::start_with(move |raw| {
        again(raw);
        raw.http_addr = Some(addrs.http);
        raw.otlp_grpc_addr = Some(addrs.otlp_grpc);
        raw.otlp_http_addr = Some(addrs.otlp_http);
    })
    .await;
    send(&daemon, 40, 60, 5).await;
    let (output, verdict) = finished(gate).await;
    assert_eq!(output.status.code(), Some(1), "{verdict}");
    assert_eq!(verdict["verdict"], "failed");
}

#[tokio::test]
async fn operators_pause_resume_and_promote_with_the_token_from_the_environment() {
    let models = models_dir();
    let daemon = TestDaemon::start_with(settings(models.path(), None)).await;
    warm_up(&daemon).await;
    declare(&daemon).await;
    let run = |args: &'static [&'static str], token: bool| {
        let mut command = canaryd(&daemon, args);
        if !token {
            command.env_remove("CANARYD_TOKEN");
        }
        async move { command.output().await.expect("runs") }
    };
    const PAUSE: &[&str] = &[
        "rollout", "pause", "--env", "prod", "--app", "shop", "--output", "json",
    ];
    let refused = run(PAUSE, false).await;
    assert_eq!(refused.status.code(), Some(1), "no token: the daemon refuses");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    let paused = run(PAUSE, true).await;
    assert_eq!(paused.status.code(), Some(0));
    let view: serde_json::Value = serde_json::from_slice(&paused.stdout).expect("JSON");
    assert_eq!(view["paused"], true);
    let resumed = run(&["rollout", "resume", "--env", "prod", "--app", "shop"], true).await;
    assert_eq!(resumed.status.code(), Some(0));
    let promoted = run(&["rollout", "promote", "--env", "prod", "--app", "shop"], true).await;
    assert_eq!(promoted.status.code(), Some(0));
    let gate = run(
        &["gate", "--env", "prod", "--app", "shop", "--version", "2.0.0"],
        true,
    )
    .await;
    assert_eq!(
        gate.status.code(),
        Some(0),
        "a promoted version passes the gate at once"
    );
    let tail = run(
        &[
            "events", "tail", "--env", "prod", "--app", "shop", "--output", "json",
        ],
        true,
    )
    .await;
    assert_eq!(tail.status.code(), Some(0));
    let types: Vec<String> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("one event per line")["type"].to_string()
        })
        .collect();
    for expected in ["started", "paused", "resumed", "promoted"] {
        assert!(
            types.iter().any(|t| t.contains(&format!("canary.{expected}"))),
            "{expected} in {types:?}"
        );
    }
}

/// `rollout start` carries a traffic plan (percentages, sticky key, header rules, allow-list from
/// flags and a file) into the analysis, and a plan the daemon refuses is a failed command whose
/// message names the field.
#[tokio::test]
async fn rollout_start_carries_a_traffic_plan_and_a_bad_one_is_refused_by_field() {
    let models = models_dir();
    let daemon = TestDaemon::start_with(settings(models.path(), None)).await;
    warm_up(&daemon).await;
    let users = tempfile::NamedTempFile::new().expect("users file");
    std::fs::write(users.path(), "# beta testers\nbob@example.com\n\ncarol\n").expect("write users");
    let users_file = users.path().to_str().expect("utf-8 path");
    let start = |extra: &[&str]| {
        let mut args = vec![
            "rollout",
            "start",
            "--env",
            "prod",
            "--app",
            "shop",
            "--stable",
            "1.0.0",
            "--canary",
            "2.0.0",
            "--model",
            "quick",
            "--replace",
        ];
        args.extend_from_slice(extra);
        canaryd(&daemon, &args).output()
    };
    let planned = start(&[
        "--percentages",
        "25",
        "--sticky-header",
        "X-User-Id",
        "--header",
        "x-canary=always",
        "--user",
        "alice",
        "--users-file",
        users_file,
    ])
    .await
    .expect("rollout start runs");
    assert_eq!(planned.status.code(), Some(0), "{planned:?}");
    let view = daemon.get_json("/api/v1/apps/shop/canary?env=prod").await;
    assert_eq!(
        view["traffic"],
        serde_json::json!({
            "percentages": [25.0],
            "sticky": {"header": "x-user-id"},
            "headers": [{"name": "x-canary", "value": "always"}],
            "users": ["alice", "bob@example.com", "carol"],
        })
    );
    assert_eq!(
        view["stage"]["weight"], 25.0,
        "the stage runs at the plan's percentage"
    );

    let refused = start(&["--sticky-cookie", "uid", "--user", "alice", "--user", "bad user"])
        .await
        .expect("rollout start runs");
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("traffic.users[1]"), "{said}");
    let unread = start(&["--users-file", "/nonexistent/users"])
        .await
        .expect("runs");
    assert_eq!(
        unread.status.code(),
        Some(3),
        "an unreadable file is a usage error: {unread:?}"
    );
}
