//! The canary API of the whole daemon: declaring a rollout, reading the analysis, its roles in
//! `/api/v1/apps`, its gauges on `/metrics`, its `started` event, the models, and ending it.

mod support;

use canaryd::testdata::{self, TraceShape};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use support::{TestDaemon, eventually, find_app, find_version};

#[tokio::test]
async fn a_declared_rollout_is_analysed_and_shown() {
    let daemon = TestDaemon::start().await;
    let put = |body: serde_json::Value| {
        let http = daemon.http.clone();
        let url = daemon.api("/api/v1/apps/app-0/rollout?env=prod");
        async move {
            let response = http.put(url).json(&body).send().await.expect("PUT");
            let status = response.status().as_u16();
            let json: serde_json::Value = response.json().await.unwrap_or_default();
            (status, json)
        }
    };
    let rollout = serde_json::json!({"stable_version": "1.0.0", "canary_version": "1.1.0"});
    let (status, body) = put(rollout.clone()).await;
    assert_eq!(status, 404, "an app never seen: {body}");

    // Traffic for two versions of app-0.
    let shape = TraceShape {
        apps: 1,
        versions_per_app: 2,
        spans: 200,
        ..TraceShape::default()
    };
    let mut traces = TraceServiceClient::connect(daemon.grpc_endpoint())
        .await
        .expect("connect");
    traces
        .export(testdata::trace_request(&shape, 7))
        .await
        .expect("export");
    eventually("app-0 is catalogued", || async {
        match find_app(&daemon.apps().await, "prod", "app-0") {
            Some(_) => Ok(()),
            None => Err("not yet".to_owned()),
        }
    })
    .await;

    let (status, body) = put(serde_json::json!({"stable_version": "1.0.0"})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap_or("").contains("canary_version"),
        "{body}"
    );
    let (status, body) = put(serde_json::json!({
        "stable_version": "1.0.0", "canary_version": "1.1.0", "model": "no-such-model"
    }))
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap_or("").contains("no-such-model"),
        "{body}"
    );
    let (status, body) = put(serde_json::json!({
        "stable_version": "1.0.0", "canary_version": "1.1.0", "model": "staged"
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["declared"], true);
    assert_eq!(body["model"], "staged");
    assert_eq!(body["stage"]["weight"], 5.0);
    // Another canary while this analysis is under way: refused unless the declaration says to
    // replace it, and the live analysis is untouched.
    let other = serde_json::json!({"stable_version": "1.0.0", "canary_version": "1.2.0"});
    let (status, body) = put(other.clone()).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap_or("").contains("replace"), "{body}");

    let canary = daemon.get_json("/api/v1/apps/app-0/canary?env=prod").await;
    assert_eq!(canary["stable_version"], "1.0.0");
    assert_eq!(canary["canary_version"], "1.1.0");
    assert_eq!(canary["state"], "insufficient_data");

    let apps = daemon.apps().await;
    let app = find_app(&apps, "prod", "app-0").expect("app");
    assert_eq!(find_version(app, "1.0.0").expect("stable")["role"], "stable");
    assert_eq!(find_version(app, "1.1.0").expect("canary")["role"], "canary");
    assert_eq!(app["canary"]["state"], "insufficient_data");

    let events = daemon
        .get_json("/api/v1/events?type=canaryd.canary.started")
        .await;
    let events = events["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["data"]["canary_version"], "1.1.0");
    assert_eq!(events[0]["data"]["stage"]["weight"], 5);

    let state = daemon
        .metric(r#"canaryd_canary_state{env="prod",app="app-0",canary_version="1.1.0",state="insufficient_data"}"#)
        .await;
    assert_eq!(state, 1.0);

    let models = daemon.get_json("/api/v1/models").await;
    let names: Vec<&str> = models["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, vec!["default", "error-or-p99", "shadow", "staged"]);

    let mut replacing = other;
    replacing["replace"] = serde_json::json!(true);
    let (status, body) = put(replacing).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["canary_version"], "1.2.0");

    let delete = |http: reqwest::Client, url: String| async move {
        http.delete(url).send().await.expect("DELETE").status().as_u16()
    };
    // The replaced analysis ended with an event, then the new one started.
    let kinds = |events: &serde_json::Value| -> Vec<(String, String, String)> {
        events["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_owned(),
                    e["data"]["canary_version"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    e["data"]["reasons"][0]["test"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    };
    let events = daemon.get_json("/api/v1/events?app=app-0").await;
    let pair = |t: &str, v: &str, r: &str| (format!("canaryd.canary.{t}"), v.to_owned(), r.to_owned());
    assert_eq!(
        kinds(&events),
        vec![
            pair("started", "1.1.0", "state"),
            pair("ended", "1.1.0", "replaced"),
            pair("started", "1.2.0", "state")
        ]
    );
    let url = daemon.api("/api/v1/apps/app-0/rollout?env=prod");
    assert_eq!(delete(daemon.http.clone(), url.clone()).await, 204);
    let events = daemon.get_json("/api/v1/events?app=app-0").await;
    assert_eq!(
        kinds(&events).last(),
        Some(&pair("ended", "1.2.0", "ended")),
        "{events}"
    );
    assert_eq!(daemon.status_of("/api/v1/apps/app-0/canary?env=prod").await, 404);
    assert_eq!(delete(daemon.http.clone(), url).await, 404);
    daemon.stop().await.expect("clean stop");
}

/// A failed canary that stops getting traffic is taken as rolled back, with an event saying so.
#[tokio::test]
async fn a_failed_canary_without_traffic_is_rolled_back_with_an_event() {
    let daemon = TestDaemon::start().await;
    let mut traces = support::shop_rollout_declared(&daemon, None).await;
    for chunk in 0..6 {
        traces
            .export(support::canary_traffic(2 + chunk * 10, 10, 2))
            .await
            .expect("export");
    }
    // Then only the stable, for longer than the model's rolled_back_after_s (60 s).
    for chunk in 0..12 {
        let request = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
            resource_spans: vec![support::shop_spans("1.0.0", 62 + chunk * 10, 10, 50, 1000)],
        };
        traces.export(request).await.expect("export");
    }
    let canary = eventually("the canary rolled back", || async {
        let canary = daemon.get_json("/api/v1/apps/shop/canary?env=prod").await;
        if canary["state"] == "rolled_back" {
            Ok(canary)
        } else {
            Err(canary["state"].to_string())
        }
    })
    .await;
    assert!(canary["failed_at"].is_string(), "{canary}");
    let events = daemon.get_json("/api/v1/events?app=shop").await;
    let types: Vec<&str> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        types,
        vec![
            "canaryd.canary.started",
            "canaryd.canary.failed",
            "canaryd.canary.rolled_back"
        ],
        "{events}"
    );
    daemon.stop().await.expect("clean stop");
}

/// Issue 20, item 5 (the API the dashboard's buttons call): an operator pauses, resumes, aborts
/// and promotes an analysis, each with the admin token and each an event. A paused analysis is
/// judged on (its state shows the failure) but fails nothing; abort fails the canary at once
/// (weight 0), promote overrides that (weight 100); what cannot be done now is 409.
#[tokio::test]
async fn an_operator_pauses_resumes_aborts_and_promotes_with_an_event_each() {
    let daemon = TestDaemon::start_with(|raw| raw.api_token = Some("admin-token".into())).await;
    let mut traces = support::shop_rollout_declared(&daemon, Some("admin-token")).await;
    let operate = |operation: &str, token: Option<&str>| {
        let mut request = daemon
            .http
            .post(daemon.api(&format!("/api/v1/apps/shop/canary/{operation}?env=prod")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.expect("POST");
            let status = response.status().as_u16();
            (
                status,
                response.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    assert_eq!(
        operate("pause", None).await.0,
        401,
        "an action needs the admin token"
    );
    let (status, paused) = operate("pause", Some("admin-token")).await;
    assert_eq!(
        (status, paused["paused"].as_bool()),
        (200, Some(true)),
        "{paused}"
    );
    assert_eq!(
        operate("pause", Some("admin-token")).await.0,
        409,
        "paused already"
    );
    let (status, body) = operate("bogus", Some("admin-token")).await;
    assert_eq!(status, 400, "{body}");

    // A failing canary, judged while paused: its state shows it, nothing is decided.
    for chunk in 0..6 {
        traces
            .export(support::canary_traffic(2 + chunk * 10, 10, 2))
            .await
            .expect("export");
    }
    eventually("the paused analysis judged failing", || async {
        let canary = daemon.get_json("/api/v1/apps/shop/canary?env=prod").await;
        if canary["state"] == "failing" {
            Ok(())
        } else {
            Err(canary["state"].to_string())
        }
    })
    .await;
    let types = |events: &serde_json::Value| -> Vec<String> {
        events["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter_map(|e| e["type"].as_str().map(str::to_owned))
            .collect()
    };
    let events = daemon.get_json("/api/v1/events?app=shop").await;
    assert_eq!(
        types(&events),
        ["canaryd.canary.started", "canaryd.canary.paused"],
        "no failure while paused: {events}"
    );

    assert_eq!(operate("resume", Some("admin-token")).await.0, 200);
    let (status, aborted) = operate("abort", Some("admin-token")).await;
    assert_eq!(
        (status, aborted["state"].as_str()),
        (200, Some("failing")),
        "{aborted}"
    );
    assert_eq!(
        operate("abort", Some("admin-token")).await.0,
        409,
        "failed already"
    );
    let (status, promoted) = operate("promote", Some("admin-token")).await;
    assert_eq!(
        (status, promoted["state"].as_str()),
        (200, Some("promoted")),
        "{promoted}"
    );
    assert_eq!(operate("pause", Some("admin-token")).await.0, 409, "over");

    let events = daemon.get_json("/api/v1/events?app=shop").await;
    assert_eq!(
        types(&events),
        [
            "canaryd.canary.started",
            "canaryd.canary.paused",
            "canaryd.canary.resumed",
            "canaryd.canary.failed",
            "canaryd.canary.promoted"
        ],
        "{events}"
    );
    let list = events["events"].as_array().expect("events");
    let failed = &list[3]["data"];
    assert_eq!(failed["action"]["weight"], 0, "{failed}");
    assert_eq!(failed["reasons"][0]["test"], "operator", "{failed}");
    assert_eq!(list[4]["data"]["action"]["weight"], 100);
    daemon.stop().await.expect("clean stop");
}

/// Issue 19, part 4: spans carrying `canary.cohort` are also judged per cohort, end to end. Every
/// tenth request of both versions is the `beta` cohort's; the canary fails half of its beta
/// requests and none of the rest: the analysis fails, its checks include the beta cohort's
/// (`operation` `cohort:beta`), failing, and the other cohort's do not fail.
#[tokio::test]
async fn a_canary_failing_one_cohort_is_judged_per_cohort_and_the_cohort_named() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    let daemon = TestDaemon::start().await;
    let mut traces = TraceServiceClient::connect(daemon.grpc_endpoint())
        .await
        .expect("connect");
    // Cohorts by request number: every tenth `beta`, every other one of the rest `gamma`;
    // the canary's beta requests fail one in two from `fail_from_s` on.
    let cohorted = |version: &str, start_s: u64, seconds: u64, fail_from_s: Option<u64>| {
        let mut resource = support::shop_spans(version, start_s, seconds, 50, 1000);
        for (n, span) in resource.scope_spans[0].spans.iter_mut().enumerate() {
            let second = start_s + n as u64 / 50;
            let cohort = match n % 10 {
                0 => "beta",
                k if k % 2 == 0 => "gamma",
                _ => continue,
            };
            span.attributes.push(testdata::kv("canary.cohort", cohort));
            if cohort == "beta" && fail_from_s.is_some_and(|from| second >= from) && n % 20 == 0 {
                span.attributes.retain(|a| a.key != "http.response.status_code");
                span.attributes
                    .push(testdata::kv_int("http.response.status_code", 500));
            }
        }
        resource
    };
    let export = |start_s: u64, seconds: u64, fail_from_s: Option<u64>| ExportTraceServiceRequest {
        resource_spans: vec![
            cohorted("1.0.0", start_s, seconds, None),
            cohorted("2.0.0", start_s, seconds, fail_from_s),
        ],
    };
    support::export_until_shop_catalogued(&daemon, &mut traces, export(0, 2, None)).await;
    let response = daemon
        .http
        .put(daemon.api("/api/v1/apps/shop/rollout?env=prod"))
        .json(&serde_json::json!({"stable_version": "1.0.0", "canary_version": "2.0.0"}))
        .send()
        .await
        .expect("PUT");
    assert_eq!(response.status().as_u16(), 200);
    for chunk in 0..12 {
        traces
            .export(export(2 + chunk * 10, 10, Some(2)))
            .await
            .expect("export");
    }
    let canary = eventually("the beta cohort's check fails", || async {
        let canary = daemon.get_json("/api/v1/apps/shop/canary?env=prod").await;
        let failing_beta = canary["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["operation"] == "cohort:beta" && c["outcome"] == "fail" && c["group"] == "errors");
        if failing_beta && canary["state"] == "failing" {
            Ok(canary)
        } else {
            Err(canary.to_string())
        }
    })
    .await;
    let checks = canary["checks"].as_array().expect("checks");
    assert!(
        checks.iter().any(|c| c["operation"] == "cohort:gamma"),
        "gamma is judged too"
    );
    assert!(
        !checks
            .iter()
            .any(|c| c["operation"] == "cohort:gamma" && c["outcome"] == "fail"),
        "the healthy cohort does not fail: {canary}"
    );
    daemon.stop().await.expect("clean stop");
}

/// Issue 19, part 4, beyond errors and latency: a cohort's call graph, from client spans that
/// carry no cohort of their own (only the request's server span does; the client span is its
/// child, in the same trace and batch). Every request of both versions calls `payments`, except
/// the canary's `beta` requests (a tenth of them): the app's calls per request drop by a tenth,
/// less than the model's smallest effect, and the beta cohort's drop to none, which fails it.
#[tokio::test]
async fn a_cohort_whose_calls_vanish_is_caught_from_client_spans_in_its_traces() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    let daemon = TestDaemon::start().await;
    let mut traces = TraceServiceClient::connect(daemon.grpc_endpoint())
        .await
        .expect("connect");
    let traffic = |version: &str, start_s: u64, seconds: u64, beta_calls: bool| {
        let mut resource = support::shop_spans(version, start_s, seconds, 50, 1000);
        let mut calls = Vec::new();
        for (n, span) in resource.scope_spans[0].spans.iter_mut().enumerate() {
            let beta = n % 10 == 0;
            if beta {
                span.attributes.push(testdata::kv("canary.cohort", "beta"));
            }
            if !beta || beta_calls {
                let mut call = span.clone();
                call.parent_span_id = span.span_id.clone();
                call.span_id[0] ^= 0xff;
                call.kind = SpanKind::Client as i32;
                call.name = "POST /charge".into();
                call.attributes = vec![testdata::kv("peer.service", "payments")];
                calls.push(call);
            }
        }
        resource.scope_spans[0].spans.extend(calls);
        resource
    };
    let export = |start_s: u64, seconds: u64| ExportTraceServiceRequest {
        resource_spans: vec![
            traffic("1.0.0", start_s, seconds, true),
            traffic("2.0.0", start_s, seconds, false),
        ],
    };
    support::export_until_shop_catalogued(&daemon, &mut traces, export(0, 2)).await;
    let response = daemon
        .http
        .put(daemon.api("/api/v1/apps/shop/rollout?env=prod"))
        .json(&serde_json::json!({"stable_version": "1.0.0", "canary_version": "2.0.0"}))
        .send()
        .await
        .expect("PUT");
    assert_eq!(response.status().as_u16(), 200);
    for chunk in 0..12 {
        traces.export(export(2 + chunk * 10, 10)).await.expect("export");
    }
    let canary = eventually("the beta cohort's call graph fails", || async {
        let canary = daemon.get_json("/api/v1/apps/shop/canary?env=prod").await;
        let failing = canary["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["feature"] == "calls_per_request[cohort:beta/payments]" && c["outcome"] == "fail");
        if failing && canary["state"] == "failing" {
            Ok(canary)
        } else {
            Err(canary.to_string())
        }
    })
    .await;
    let checks = canary["checks"].as_array().expect("checks");
    let failing_beta = checks
        .iter()
        .find(|c| c["feature"] == "calls_per_request[cohort:beta/payments]" && c["outcome"] == "fail")
        .expect("failing");
    assert_eq!(failing_beta["operation"], "cohort:beta", "{failing_beta}");
    assert!(
        !checks
            .iter()
            .any(|c| c["feature"] == "calls_per_request[payments]" && c["outcome"] == "fail"),
        "the app's calls moved by a tenth only: {canary}"
    );
    daemon.stop().await.expect("clean stop");
}

/// Receivers that sum each resource where they read it (while the engine's thread is busy, as on
/// many cores) leave the daemon judging and learning as the engine's adding of each observation
/// does: the same traffic into a daemon that always sums and one that does not gives the same
/// analysis, events and baselines.
#[tokio::test]
async fn summed_where_read_or_added_by_the_engine_a_canary_is_judged_alike() {
    let always = TestDaemon::start_with(|raw| raw.receivers_sum_from_engine_busy = Some(0.0)).await;
    // Sums only while its engine's thread is never idle; waiting for each export's answer leaves
    // it idle between them.
    let seldom = TestDaemon::start_with(|raw| raw.receivers_sum_from_engine_busy = Some(1.0)).await;
    let mut seen = Vec::new();
    for daemon in [&always, &seldom] {
        let mut traces = support::shop_rollout_declared(daemon, None).await;
        // Two minutes of both versions, the canary failing one request in 25.
        let chunks = 12;
        for chunk in 0..chunks {
            traces
                .export(support::canary_traffic(2 + chunk * 10, 10, 25))
                .await
                .expect("export");
        }
        let batches = (chunks + 1) as f64;
        eventually("every batch applied and every window learned", || async {
            let text = daemon.metrics_text().await;
            let applied = support::sample(&text, "canaryd_engine_batches_total");
            let unlearned = support::sample(&text, "canaryd_engine_unlearned_windows");
            match (applied, unlearned) {
                (Some(a), Some(u)) if a == batches && u == 0.0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        // The baseline first: reading it learns what the app's closed windows still wait to
        // teach, and any event that learning raises is then in the events read after it.
        let baseline = daemon
            .get_json("/api/v1/apps/shop/baseline?env=prod&version=1.0.0")
            .await;
        let canary = daemon.get_json("/api/v1/apps/shop/canary?env=prod").await;
        let events: Vec<serde_json::Value> = daemon.get_json("/api/v1/events?app=shop").await["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| serde_json::json!([e["type"], e["data"]]))
            .collect();
        seen.push((canary, events, baseline));
    }
    let summed = always.metric("canaryd_otlp_resources_summed_total").await;
    assert!(
        summed >= 24.0,
        "both versions' resources of each export: {summed}"
    );
    let (a, b) = (&seen[0], &seen[1]);
    assert_eq!(a.0["state"], "failing", "{}", a.0);
    assert_eq!(a.0, b.0, "the analysis");
    assert_eq!(a.1, b.1, "the events");
    assert_eq!(a.2, b.2, "the stable's baseline");
}
