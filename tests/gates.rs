//! Flagger's gates on a whole daemon: a declared rollout with no evidence yet, then a canary that
//! fails (half its requests error), as the gate and the rollback hook answer them; malformed
//! payloads, unknown apps, and the bearer token.

mod support;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use support::{TestDaemon, canary_traffic as traffic, eventually, shop_spans};

/// POSTs `body` to `path` and returns the status and the JSON answer.
async fn post(daemon: &TestDaemon, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = daemon
        .http
        .post(daemon.api(path))
        .json(&body)
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

fn flagger(phase: &str) -> serde_json::Value {
    serde_json::json!({
        "name": "shop", "namespace": "prod", "phase": phase, "checksum": "6d4b8f",
        "metadata": {"cmd": "anything else Flagger carries"}
    })
}

const GATE: &str = "/api/v1/gates/flagger";
const ROLLBACK: &str = "/api/v1/gates/flagger/rollback";

#[tokio::test]
async fn the_gates_follow_the_canary_from_no_evidence_to_failing() {
    let daemon = TestDaemon::start().await;
    let mut traces = TraceServiceClient::connect(daemon.grpc_endpoint())
        .await
        .expect("connect");

    // Nothing known about shop yet: before traffic there is nothing to judge, after it the gate
    // holds, and there is no reason to roll back.
    let (status, body) = post(&daemon, GATE, flagger("Initialized")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&daemon, GATE, flagger("Progressing")).await;
    assert_eq!(status, 412, "{body}");
    assert!(
        body["reasons"][0].as_str().unwrap_or("").contains("no app"),
        "{body}"
    );
    let (status, body) = post(&daemon, ROLLBACK, flagger("Progressing")).await;
    assert_eq!(status, 409, "{body}");

    // A little healthy traffic of both versions, then the rollout is declared: no evidence yet.
    support::export_until_shop_catalogued(&daemon, &mut traces, traffic(0, 2, 1000)).await;
    let response = daemon
        .http
        .put(daemon.api("/api/v1/apps/shop/rollout?env=prod"))
        .json(&serde_json::json!({"stable_version": "1.0.0", "canary_version": "2.0.0"}))
        .send()
        .await
        .expect("PUT");
    assert_eq!(response.status().as_u16(), 200);
    let canary = daemon.get_json("/api/v1/apps/shop/canary?env=prod").await;
    assert_eq!(canary["state"], "insufficient_data", "{canary}");

    let (status, body) = post(&daemon, GATE, flagger("Progressing")).await;
    assert_eq!(status, 412, "{body}");
    assert_eq!(body["proceed"], false);
    assert_eq!(body["state"], "insufficient_data");
    assert_eq!(body["reasons"][0], "not enough evidence yet", "{body}");
    assert_eq!(body["checksum"], "6d4b8f");
    for phase in ["Initializing", "Initialized", "Waiting"] {
        let (status, body) = post(&daemon, GATE, flagger(phase)).await;
        assert_eq!(status, 200, "{phase}: {body}");
        assert_eq!(body["proceed"], true);
    }
    // Flagger says "Progressing" to its pre-rollout hooks too: metadata.hook tells them apart.
    let mut pre_rollout = flagger("Progressing");
    pre_rollout["metadata"]["hook"] = "pre-rollout".into();
    let (status, body) = post(&daemon, GATE, pre_rollout).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&daemon, ROLLBACK, flagger("Progressing")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["rollback"], false);

    // metadata.app and metadata.env name the analysis when the Canary's name and namespace differ.
    let (status, body) = post(
        &daemon,
        GATE,
        serde_json::json!({
            "name": "shop-canary", "namespace": "shop-ns", "phase": "Progressing",
            "metadata": {"app": "shop", "env": "prod"}
        }),
    )
    .await;
    assert_eq!(status, 412, "{body}");
    assert_eq!(
        (body["app"].as_str(), body["env"].as_str()),
        (Some("shop"), Some("prod"))
    );
    assert_eq!(body["state"], "insufficient_data", "{body}");

    // Now the canary fails half its requests, over two minutes of event time.
    for chunk in 0..12 {
        traces
            .export(traffic(2 + chunk * 10, 10, 2))
            .await
            .expect("export");
    }
    let canary = eventually("the canary is failing", || async {
        let canary = daemon.get_json("/api/v1/apps/shop/canary?env=prod").await;
        if canary["state"] == "failing" {
            Ok(canary)
        } else {
            Err(canary.to_string())
        }
    })
    .await;
    assert!(canary["failed_at"].is_string(), "{canary}");

    let (status, body) = post(&daemon, GATE, flagger("Progressing")).await;
    assert_eq!(status, 412, "{body}");
    assert_eq!(body["state"], "failing");
    let reasons = body["reasons"].as_array().expect("reasons");
    assert!(!reasons.is_empty(), "{body}");
    assert!(
        reasons
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.contains("error"))),
        "the failing error-ratio check is named: {body}"
    );
    let (status, body) = post(&daemon, ROLLBACK, flagger("Progressing")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rollback"], true);
    assert!(!body["reasons"].as_array().expect("reasons").is_empty(), "{body}");
    daemon.stop().await.expect("clean stop");
}

/// Flagger's payload for one revision of the Canary (`checksum`), with extra `metadata`.
fn revision(phase: &str, checksum: &str, metadata: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "name": "shop", "namespace": "prod", "phase": phase, "checksum": checksum,
        "metadata": metadata
    })
}

/// A gate call answers for its own rollout's canary only: once 2.0.0 has failed and 3.0.0's
/// analysis has replaced it, Flagger's calls for 2.0.0's revision are not answered with 3.0.0's
/// verdict, and a call can name its version outright.
#[tokio::test]
async fn the_gate_answers_for_the_version_of_its_own_rollout() {
    let daemon = TestDaemon::start().await;
    let mut traces = TraceServiceClient::connect(daemon.grpc_endpoint())
        .await
        .expect("connect");
    // Revision rev-2 deploys 2.0.0, which fails half its requests.
    support::export_until_shop_catalogued(&daemon, &mut traces, traffic(0, 2, 1000)).await;
    let declare = |canary: &'static str| {
        let daemon = &daemon;
        async move {
            let response = daemon
                .http
                .put(daemon.api("/api/v1/apps/shop/rollout?env=prod"))
                .json(&serde_json::json!({"stable_version": "1.0.0", "canary_version": canary, "replace": true}))
                .send()
                .await
                .expect("PUT");
            assert_eq!(response.status().as_u16(), 200);
        }
    };
    declare("2.0.0").await;
    let (status, body) = post(
        &daemon,
        GATE,
        revision("Progressing", "rev-2", serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 412, "no evidence yet: {body}");
    assert_eq!(body["canary_version"], "2.0.0");
    for chunk in 0..12 {
        traces
            .export(traffic(2 + chunk * 10, 10, 2))
            .await
            .expect("export");
    }
    eventually("2.0.0 failing", || async {
        let canary = daemon.get_json("/api/v1/apps/shop/canary?env=prod").await;
        (canary["state"] == "failing")
            .then_some(())
            .ok_or_else(|| canary.to_string())
    })
    .await;
    let (status, body) = post(
        &daemon,
        ROLLBACK,
        revision("Progressing", "rev-2", serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Revision rev-3 deploys 3.0.0, declared in 2.0.0's place, healthy.
    declare("3.0.0").await;
    traces
        .export(ExportTraceServiceRequest {
            resource_spans: vec![
                shop_spans("1.0.0", 122, 30, 50, 1000),
                shop_spans("3.0.0", 122, 30, 50, 1000),
            ],
        })
        .await
        .expect("export");

    // Flagger still asking about rev-2 (its rollback, its last gate call) gets no verdict of 3.0.0.
    for path in [GATE, ROLLBACK] {
        let (status, body) = post(
            &daemon,
            path,
            revision("Progressing", "rev-2", serde_json::json!({})),
        )
        .await;
        let expected = if path == GATE { 412 } else { 409 };
        assert_eq!(status, expected, "{path}: {body}");
        let reason = body["reasons"][0].as_str().unwrap_or("");
        assert!(
            reason.contains("canary is 2.0.0") && reason.contains("is of 3.0.0"),
            "{path}: {body}"
        );
        assert_eq!(body["canary_version"], serde_json::Value::Null, "{path}: {body}");
    }
    // rev-3 is pinned to 3.0.0 at its first call; metadata.version names it outright.
    let (_, body) = post(
        &daemon,
        GATE,
        revision("Progressing", "rev-3", serde_json::json!({})),
    )
    .await;
    assert_eq!(body["canary_version"], "3.0.0", "{body}");
    let (_, body) = post(
        &daemon,
        GATE,
        revision("Progressing", "rev-x", serde_json::json!({"version": "3.0.0"})),
    )
    .await;
    assert_eq!(body["canary_version"], "3.0.0", "{body}");
    let (status, body) = post(
        &daemon,
        GATE,
        revision("Progressing", "rev-y", serde_json::json!({"version": "2.0.0"})),
    )
    .await;
    assert_eq!(status, 412, "{body}");
    let (status, body) = post(
        &daemon,
        GATE,
        revision("Progressing", "rev-y", serde_json::json!({"version": ""})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("metadata.version"),
        "{body}"
    );
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_malformed_payload_is_refused_naming_the_field() {
    let daemon = TestDaemon::start().await;
    for path in [GATE, ROLLBACK] {
        let (status, body) = post(&daemon, path, serde_json::json!({"namespace": "prod"})).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body["error"].as_str().unwrap_or("").contains("name"), "{body}");

        let (status, body) = post(&daemon, path, serde_json::json!({"name": "shop", "namespace": 7})).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap_or("").contains("namespace"),
            "{body}"
        );

        let (status, body) = post(
            &daemon,
            path,
            serde_json::json!({"name": "shop", "namespace": "prod", "metadata": {"hook": "later"}}),
        )
        .await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap_or("").contains("metadata.hook"),
            "{body}"
        );

        let response = daemon
            .http
            .post(daemon.api(path))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status().as_u16(), 400, "{path}");
    }
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn with_an_api_token_the_gates_need_it() {
    let daemon = TestDaemon::start_with(|raw| {
        raw.api_token = Some("gate-token".into());
        raw.api_read_token = Some("gate-reader".into());
    })
    .await;
    for path in [GATE, ROLLBACK] {
        let (status, body) = post(&daemon, path, flagger("Progressing")).await;
        assert_eq!(status, 401, "{path}: {body}");
        let response = daemon
            .http
            .post(daemon.api(path))
            .bearer_auth("gate-token")
            .json(&flagger("Initialized"))
            .send()
            .await
            .expect("POST");
        let want = if path == GATE { 200 } else { 409 };
        assert_eq!(response.status().as_u16(), want, "{path}");
        // Flagger cannot set headers: the webhook's metadata.token is accepted instead, the read
        // token as well as the admin one, and a wrong one is refused.
        for (token, status) in [("gate-token", want), ("gate-reader", want), ("nope", 401)] {
            let mut payload = flagger("Initialized");
            payload["metadata"]["token"] = serde_json::json!(token);
            let (got, body) = post(&daemon, path, payload).await;
            assert_eq!(got, status, "{path} with metadata.token {token}: {body}");
        }
    }
    daemon.stop().await.expect("clean stop");
}
