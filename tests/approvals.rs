//! Manual approval and the environment chain (issue 18, items 3 and 4), on a real daemon fed the
//! project's generated traffic in event time: a stage that asks for approval waits, its event
//! carries signed links that work without a token, once, until they expire, and not when changed;
//! a version that failed in beta fails on sight in prod, naming that verdict's event, and one not
//! yet promoted in beta is not promoted in prod until it is.

mod support;

use std::path::Path;

use canaryd::testdata::kv;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use serde_json::{Value, json};
use support::{TestDaemon, eventually, shop_spans};

const TOKEN: &str = "approvals-test-token";

/// Two one-minute stages on errors and latency; the second waits for a person's approval.
const APPROVE: &str = r#"
description = "Two stages, the second approved by a person."
[checks.error_ratio]
[checks.latency]
[[stages]]
name = "10%"
weight = 10.0
observe_s = 60
[[stages]]
name = "50%"
weight = 50.0
observe_s = 60
approval = true
"#;

/// Promoted through beta, then prod; one one-minute stage.
const CHAIN: &str = r#"
description = "beta, then prod."
promotion = ["beta", "prod"]
[checks.error_ratio]
[checks.latency]
[[stages]]
name = "all"
weight = 100.0
observe_s = 60
"#;

async fn daemon(ttl_secs: u64) -> (TestDaemon, tempfile::TempDir) {
    let models = tempfile::tempdir().expect("models dir");
    std::fs::write(models.path().join("approve.toml"), APPROVE).expect("write");
    std::fs::write(models.path().join("chain.toml"), CHAIN).expect("write");
    let dir: &Path = models.path();
    let dir = dir.to_owned();
    let daemon = TestDaemon::start_with(move |raw| {
        raw.models_dir = Some(dir);
        raw.api_token = Some(TOKEN.into());
        raw.approval_link_ttl_secs = Some(ttl_secs);
    })
    .await;
    (daemon, models)
}

/// The stable 1.0.0 (0.1% errors) and `canary` (one error every `error_every`) of shop in `env`,
/// 50 requests a second each, `seconds` of event time from `start_s`, in 10 s exports.
async fn send(daemon: &TestDaemon, env: &str, canary: &str, start_s: u64, seconds: u64, error_every: u64) {
    let mut client = TraceServiceClient::connect(daemon.grpc_endpoint())
        .await
        .expect("connect");
    for at in (start_s..start_s + seconds).step_by(10) {
        let mut request = ExportTraceServiceRequest {
            resource_spans: vec![
                shop_spans("1.0.0", at, 10, 50, 1000),
                shop_spans(canary, at, 10, 50, error_every),
            ],
        };
        for spans in &mut request.resource_spans {
            for attribute in spans.resource.iter_mut().flat_map(|r| r.attributes.iter_mut()) {
                if attribute.key == "deployment.environment.name" {
                    *attribute = kv("deployment.environment.name", env);
                }
            }
        }
        client.export(request).await.expect("export");
    }
}

/// The stable alone, then the rollout of `canary` declared with `model`.
async fn declare(daemon: &TestDaemon, env: &str, canary: &str, model: &str, replace: bool) -> Value {
    let path = format!("/api/v1/apps/shop/rollout?env={env}");
    let body =
        json!({"stable_version": "1.0.0", "canary_version": canary, "model": model, "replace": replace});
    eventually("the rollout is declared", || async {
        let response = daemon
            .http
            .put(daemon.api(&path))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let json: Value = response.json().await.map_err(|e| e.to_string())?;
        if status == 200 {
            Ok(json)
        } else {
            Err(format!("{status}: {json}"))
        }
    })
    .await
}

/// The events of `event_type` in `env`, as a reader with the admin token sees them (approval
/// links included); `anonymous_events` as one without.
async fn events(daemon: &TestDaemon, env: &str, event_type: &str) -> Vec<Value> {
    events_as(daemon, env, event_type, Some(TOKEN)).await
}

async fn anonymous_events(daemon: &TestDaemon, env: &str, event_type: &str) -> Vec<Value> {
    events_as(daemon, env, event_type, None).await
}

async fn events_as(daemon: &TestDaemon, env: &str, event_type: &str, token: Option<&str>) -> Vec<Value> {
    let mut request = daemon
        .http
        .get(daemon.api(&format!("/api/v1/events?env={env}&app=shop&type={event_type}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("API answers");
    assert!(response.status().is_success(), "{}", response.status());
    let page: Value = response.json().await.expect("API answers JSON");
    page["events"].as_array().cloned().unwrap_or_default()
}

async fn one_event(daemon: &TestDaemon, env: &str, event_type: &str) -> Value {
    eventually(event_type, || async {
        events(daemon, env, event_type)
            .await
            .pop()
            .ok_or_else(|| "none yet".to_owned())
    })
    .await
}

async fn analysis(daemon: &TestDaemon, env: &str) -> Value {
    daemon
        .get_json(&format!("/api/v1/apps/shop/canary?env={env}"))
        .await
}

/// 2.0.0 of shop fails in beta (one error in five requests), under the chain model; the id of
/// its `canary.failed` event.
async fn fail_in_beta(daemon: &TestDaemon) -> String {
    send(daemon, "beta", "2.0.0", 0, 10, 1000).await;
    declare(daemon, "beta", "2.0.0", "chain", false).await;
    send(daemon, "beta", "2.0.0", 10, 60, 5).await;
    let failed = one_event(daemon, "beta", "canaryd.canary.failed").await;
    failed["id"].as_str().expect("an id").to_owned()
}

/// A models folder holding one model file.
fn models_with(file: &str, text: &str) -> tempfile::TempDir {
    let models = tempfile::tempdir().expect("models dir");
    std::fs::write(models.path().join(file), text).expect("write");
    models
}

/// A POST to a link, without any token: (status, body).
async fn open_link(daemon: &TestDaemon, url: &str, post: bool) -> (u16, String) {
    let request = if post {
        daemon.http.post(url)
    } else {
        daemon.http.get(url)
    };
    let response = request.send().await.expect("the link answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// The canary's first stage passes with A/A traffic, and the next one waits for approval.
/// Flagger's gate for prod's shop, as the `hook` webhook asks it: the status and the answer.
async fn flagger_gate(daemon: &TestDaemon, hook: &str) -> (u16, Value) {
    let response = daemon
        .http
        .post(daemon.api("/api/v1/gates/flagger"))
        .bearer_auth(TOKEN)
        .json(
            &json!({"name": "shop", "namespace": "prod", "phase": "Progressing", "metadata": {"hook": hook}}),
        )
        .send()
        .await
        .expect("the gate answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

/// The approval link `which` (`approve_url`, `abort_url`) an awaiting-approval event carries.
fn link(event: &Value, which: &str) -> String {
    event["data"]["approval"][which]
        .as_str()
        .expect("link")
        .to_owned()
}

async fn awaiting(daemon: &TestDaemon) -> Value {
    send(daemon, "prod", "2.0.0", 0, 10, 1000).await;
    declare(daemon, "prod", "2.0.0", "approve", false).await;
    send(daemon, "prod", "2.0.0", 10, 100, 1000).await;
    one_event(daemon, "prod", "canaryd.canary.awaiting_approval").await
}

#[tokio::test]
async fn a_stage_waits_for_approval_and_its_links_work_once_without_a_token() {
    let (daemon, _models) = daemon(86_400).await;
    let event = awaiting(&daemon).await;
    let approval = &event["data"]["approval"];
    assert_eq!(approval["stage"]["name"], "50%", "{event}");
    assert_eq!(event["data"]["stage"]["name"], "10%");
    assert!(
        event["data"]["action"].is_null(),
        "waiting moves no traffic: {event}"
    );
    let approve = approval["approve_url"]
        .as_str()
        .expect("an approve link")
        .to_owned();
    let abort = approval["abort_url"].as_str().expect("an abort link").to_owned();
    assert!(
        approve.starts_with(&daemon.api("/api/v1/approvals/")),
        "{approve}"
    );
    let view = analysis(&daemon, "prod").await;
    assert!(view["awaiting_approval"].is_string(), "{view}");
    assert_eq!(view["stage"]["index"], 0);
    // The links are credentials: a reader without a token sees the wait, not the links.
    let seen = anonymous_events(&daemon, "prod", "canaryd.canary.awaiting_approval").await;
    let withheld = &seen[0]["data"]["approval"];
    assert!(
        withheld["approve_url"].is_null() && withheld["abort_url"].is_null(),
        "{withheld}"
    );
    assert_eq!(withheld["stage"]["name"], "50%");

    // More healthy traffic: it still waits.
    send(&daemon, "prod", "2.0.0", 110, 90, 1000).await;
    let view = analysis(&daemon, "prod").await;
    assert_eq!(view["stage"]["index"], 0, "{view}");
    assert!(
        events(&daemon, "prod", "canaryd.canary.stage_passed")
            .await
            .is_empty()
    );

    // A changed link: 403, nothing changes.
    let (token, tag) = approve.rsplit_once('.').expect("token.tag");
    let flipped = if tag.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{token}.{flipped}{}", &tag[1..]);
    let (status, body) = open_link(&daemon, &tampered, true).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not one canaryd made"), "{body}");
    assert_eq!(open_link(&daemon, &tampered, false).await.0, 403);

    // Opening it shows a page with one button and changes nothing (chat apps preview links).
    let (status, page) = open_link(&daemon, &approve, false).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<form method=\"post\">") && page.contains(">Approve</button>"),
        "{page}"
    );
    assert_eq!(analysis(&daemon, "prod").await["stage"]["index"], 0);

    // Pressing it (no API token): the canary enters the 50% stage.
    let (status, body) = open_link(&daemon, &approve, true).await;
    assert_eq!(status, 200, "{body}");
    let done: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(done["action"], "approve");
    assert_eq!(done["stage"]["name"], "50%");
    let passed = one_event(&daemon, "prod", "canaryd.canary.stage_passed").await;
    assert_eq!(passed["data"]["action"]["weight"], 50, "{passed}");
    assert_eq!(passed["data"]["reasons"][0]["test"], "approval");

    // Used: neither link of the pair works again, nor offers its button, and nothing changes.
    for link in [&approve, &abort] {
        let (status, body) = open_link(&daemon, link, true).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("used already"), "{body}");
        let (status, page) = open_link(&daemon, link, false).await;
        assert_eq!(status, 403, "{page}");
        assert!(!page.contains("<form"), "{page}");
    }
    let view = analysis(&daemon, "prod").await;
    assert_eq!(view["stage"]["index"], 1, "{view}");
    assert!(view["awaiting_approval"].is_null());
    assert_ne!(view["state"], "failing");
}

/// Settings for a daemon whose models and data live in the given folders, so that a second
/// daemon started with them resumes where the first stopped.
fn kept_in(models: &Path, data: &Path) -> impl FnOnce(&mut canaryd::config::RawConfig) + use<> {
    support::models_and_data(models, Some(data), TOKEN)
}

/// The wait, and its links, outlive a restart: the analysis's record keeps the wait, the key
/// signing the links is kept in the data dir.
#[tokio::test]
async fn a_wait_and_its_links_survive_a_restart() {
    let models = models_with("approve.toml", APPROVE);
    let data = tempfile::tempdir().expect("data dir");
    let daemon = TestDaemon::start_with(kept_in(models.path(), data.path())).await;
    let event = awaiting(&daemon).await;
    let approve = link(&event, "approve_url");
    let addrs = daemon.addrs;
    daemon.stop().await.expect("stops cleanly");
    let again = kept_in(models.path(), data.path());
    let daemon = TestDaemon::start_with(move |raw| {
        again(raw);
        raw.http_addr = Some(addrs.http);
        raw.otlp_grpc_addr = Some(addrs.otlp_grpc);
        raw.otlp_http_addr = Some(addrs.otlp_http);
    })
    .await;
    let view = analysis(&daemon, "prod").await;
    assert!(view["awaiting_approval"].is_string(), "{view}");
    let (status, body) = open_link(&daemon, &approve, true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(analysis(&daemon, "prod").await["stage"]["index"], 1);
}

#[tokio::test]
async fn the_abort_link_fails_the_canary() {
    let (daemon, _models) = daemon(86_400).await;
    let event = awaiting(&daemon).await;
    let abort = link(&event, "abort_url");
    let (status, body) = open_link(&daemon, &abort, true).await;
    assert_eq!(status, 200, "{body}");
    let failed = one_event(&daemon, "prod", "canaryd.canary.failed").await;
    assert_eq!(failed["data"]["action"]["weight"], 0, "{failed}");
    assert_eq!(analysis(&daemon, "prod").await["state"], "failing");
}

/// A canary that fails on its own while it waits waits no more: its links are refused, and the
/// view no longer says it awaits approval.
#[tokio::test]
async fn a_canary_that_fails_while_waiting_voids_its_links() {
    let (daemon, _models) = daemon(86_400).await;
    let event = awaiting(&daemon).await;
    let approve = link(&event, "approve_url");
    send(&daemon, "prod", "2.0.0", 110, 60, 5).await;
    one_event(&daemon, "prod", "canaryd.canary.failed").await;
    let view = analysis(&daemon, "prod").await;
    assert_eq!(view["state"], "failing", "{view}");
    assert!(view["awaiting_approval"].is_null(), "{view}");
    let (status, body) = open_link(&daemon, &approve, true).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(open_link(&daemon, &approve, false).await.0, 403);
    assert!(
        events(&daemon, "prod", "canaryd.canary.stage_passed")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn an_expired_link_is_refused_and_changes_nothing() {
    let (daemon, _models) = daemon(1).await;
    let event = awaiting(&daemon).await;
    let approval = &event["data"]["approval"];
    let approve = approval["approve_url"].as_str().expect("link").to_owned();
    let expires =
        humantime::parse_rfc3339(approval["expires_at"].as_str().expect("expiry")).expect("RFC 3339");
    // Wait for the wall-clock instant the link expires at (links expire by the wall clock).
    support::poll_until("the link's expiry", || {
        (std::time::SystemTime::now() > expires).then_some(())
    });
    let (status, body) = open_link(&daemon, &approve, true).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("expired"), "{body}");
    let view = analysis(&daemon, "prod").await;
    assert!(view["awaiting_approval"].is_string(), "still waiting: {view}");
    assert_eq!(view["stage"]["index"], 0);
    // The operator's command still approves (with the API token).
    let response = daemon
        .http
        .post(daemon.api("/api/v1/apps/shop/canary/approve?env=prod"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("approve");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(analysis(&daemon, "prod").await["stage"]["index"], 1);
}

#[tokio::test]
async fn the_chain_fails_in_prod_a_version_that_failed_in_beta_and_holds_one_not_yet_promoted_there() {
    let (daemon, _models) = daemon(86_400).await;
    // 2.0.0 fails in beta.
    let beta_id = fail_in_beta(&daemon).await;

    // In prod it fails on sight, naming beta's verdict.
    send(&daemon, "prod", "2.0.0", 0, 10, 1000).await;
    declare(&daemon, "prod", "2.0.0", "chain", false).await;
    let failed = one_event(&daemon, "prod", "canaryd.canary.failed").await;
    let reason = failed["data"]["reasons"][0]["message"].as_str().unwrap_or("");
    assert!(reason.contains(&beta_id) && reason.contains("beta"), "{failed}");
    assert_eq!(failed["data"]["action"]["weight"], 0);
    let view = analysis(&daemon, "prod").await;
    assert_eq!(view["state"], "failing");
    assert_eq!(view["failed_in"], json!({"env": "beta", "event_id": beta_id}));

    // 3.0.0, not yet judged in beta: healthy in prod, but held there (blocked by beta).
    declare(&daemon, "prod", "3.0.0", "chain", true).await;
    send(&daemon, "prod", "3.0.0", 10, 90, 1000).await;
    let view = analysis(&daemon, "prod").await;
    assert_eq!(view["blocked_by"], "beta", "{view}");
    assert_ne!(view["state"], "promoted", "{view}");
    // Flagger may keep the canary going, but not promote it.
    assert_eq!(flagger_gate(&daemon, "rollout").await.0, 200);
    let (status, answer) = flagger_gate(&daemon, "confirm-promotion").await;
    assert_eq!(status, 412, "{answer}");
    let reason = answer["reasons"][0].as_str().unwrap_or("");
    assert!(reason.contains("not yet promoted in beta"), "{answer}");
    assert!(
        events(&daemon, "prod", "canaryd.canary.promoted")
            .await
            .is_empty()
    );

    // Promoted in beta (its event names prod next), then promoted in prod at the next look.
    declare(&daemon, "beta", "3.0.0", "chain", true).await;
    send(&daemon, "beta", "3.0.0", 70, 90, 1000).await;
    let promoted_in_beta = one_event(&daemon, "beta", "canaryd.canary.promoted").await;
    assert_eq!(promoted_in_beta["data"]["next_env"], "prod", "{promoted_in_beta}");
    eventually("prod is no longer blocked", || async {
        let view = analysis(&daemon, "prod").await;
        if view["blocked_by"].is_null() {
            Ok(())
        } else {
            Err(view.to_string())
        }
    })
    .await;
    assert_eq!(flagger_gate(&daemon, "confirm-promotion").await.0, 200);
    send(&daemon, "prod", "3.0.0", 100, 20, 1000).await;
    let promoted = one_event(&daemon, "prod", "canaryd.canary.promoted").await;
    assert_eq!(promoted["data"]["version"], "3.0.0");
    assert!(promoted["data"]["next_env"].is_null(), "prod is the chain's end");
}

/// Verdicts outlive a restart: the daemon reads them back from its stored events, so the chain
/// still fails in prod a version that failed in beta before the restart.
#[tokio::test]
async fn the_chain_remembers_verdicts_across_a_restart() {
    let models = models_with("chain.toml", CHAIN);
    let data = tempfile::tempdir().expect("data dir");
    let daemon = TestDaemon::start_with(kept_in(models.path(), data.path())).await;
    let beta_id = fail_in_beta(&daemon).await;
    daemon.stop().await.expect("stops cleanly");
    let daemon = TestDaemon::start_with(kept_in(models.path(), data.path())).await;
    send(&daemon, "prod", "2.0.0", 0, 10, 1000).await;
    declare(&daemon, "prod", "2.0.0", "chain", false).await;
    let failed = one_event(&daemon, "prod", "canaryd.canary.failed").await;
    assert!(
        failed["data"]["reasons"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains(&beta_id),
        "{failed}"
    );
}

/// A restart rebuilds the chain from the latest verdict per environment: a version that failed
/// in beta, then passed there on a second run and went on to prod, is not failed in prod when
/// the daemon comes back (the old failure, read first, must not act before the promotion that
/// overtook it).
#[tokio::test]
async fn a_later_promotion_overtakes_an_earlier_failure_across_a_restart() {
    let models = models_with("chain.toml", CHAIN);
    let data = tempfile::tempdir().expect("data dir");
    let daemon = TestDaemon::start_with(kept_in(models.path(), data.path())).await;
    fail_in_beta(&daemon).await;
    // Ended, and run again in beta once the failure has left the comparison windows (its cause,
    // say, a dependency since fixed): promoted this time.
    let ended = daemon
        .http
        .delete(daemon.api("/api/v1/apps/shop/rollout?env=beta"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("the rollout ends");
    assert!(ended.status().is_success(), "{}", ended.status());
    send(&daemon, "beta", "2.0.0", 700, 10, 1000).await;
    declare(&daemon, "beta", "2.0.0", "chain", false).await;
    send(&daemon, "beta", "2.0.0", 710, 90, 1000).await;
    one_event(&daemon, "beta", "canaryd.canary.promoted").await;
    // So prod takes it: neither failed on sight nor blocked.
    send(&daemon, "prod", "2.0.0", 0, 10, 1000).await;
    declare(&daemon, "prod", "2.0.0", "chain", false).await;
    let view = analysis(&daemon, "prod").await;
    assert!(
        view["blocked_by"].is_null() && view["failed_in"].is_null(),
        "{view}"
    );
    daemon.stop().await.expect("stops cleanly");

    let daemon = TestDaemon::start_with(kept_in(models.path(), data.path())).await;
    let view = analysis(&daemon, "prod").await;
    assert_ne!(view["state"], "failing", "{view}");
    assert!(
        view["blocked_by"].is_null() && view["failed_in"].is_null(),
        "{view}"
    );
    assert!(events(&daemon, "prod", "canaryd.canary.failed").await.is_empty());
}
