//! `GET /openapi.json` on a whole daemon: it is the router's own description (utoipa-axum registers
//! each route with its doc), every route of the API is in it with the methods the router serves,
//! every write carries the bearer token, every example validates against its schema, and the
//! answers of a real canary analysis validate against the schemas of their routes, with objects
//! closed (a field served but not described fails).

mod support;

use std::collections::BTreeSet;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use serde_json::{Value, json};
use support::{TestDaemon, canary_traffic as traffic, eventually};

/// The HTTP API's routes (README's "What it answers"), as (method, path).
const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/api/v1/apps"),
    ("get", "/api/v1/apps/{app}/baseline"),
    ("get", "/api/v1/apps/{app}/canary"),
    ("get", "/api/v1/apps/{app}/timeline"),
    ("put", "/api/v1/apps/{app}/rollout"),
    ("delete", "/api/v1/apps/{app}/rollout"),
    ("post", "/api/v1/apps/{app}/canary/{operation}"),
    ("get", "/api/v1/models"),
    ("get", "/api/v1/events"),
    ("get", "/api/v1/subscriptions"),
    ("post", "/api/v1/subscriptions"),
    ("delete", "/api/v1/subscriptions/{id}"),
    ("get", "/api/v1/subscriptions/{id}/deliveries"),
    ("post", "/api/v1/subscriptions/{id}/deliveries/{event_id}/redrive"),
    ("post", "/api/v1/subscriptions/{id}/deliveries/redrive"),
    ("post", "/api/v1/gates/flagger"),
    ("post", "/api/v1/gates/flagger/rollback"),
    ("get", "/api/v1/approvals/{token}"),
    ("post", "/api/v1/approvals/{token}"),
];

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];
const WRITES: [&str; 4] = ["post", "put", "delete", "patch"];

/// The document's operations as (method, path).
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(|m| ((*m).to_owned(), path.clone()))
        })
        .collect()
}

/// Adds `additionalProperties: false` to every object schema that lists its properties, so that a
/// value with a field the schema does not describe fails.
fn close_objects(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (key, v) in map.iter_mut() {
                if key != "example" && key != "examples" {
                    close_objects(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// Validates `instance` against `schema`, resolving `#/components/...` in `doc`, with objects
/// closed; the errors, if any.
fn violations(doc: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    let mut components = doc["components"].clone();
    close_objects(&mut components);
    let mut schema = schema.clone();
    close_objects(&mut schema);
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": components,
        "allOf": [schema],
    });
    let validator = jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("{schema} compiles: {e}"));
    validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// Every example in the document with the schema it illustrates and where it is.
fn examples(doc: &Value, at: &str, out: &mut Vec<(String, Value, Value)>) {
    match doc {
        Value::Object(map) => {
            // A media type or a parameter illustrates its `schema`; a schema illustrates itself.
            let schema = map.get("schema").cloned().unwrap_or_else(|| {
                let mut own = map.clone();
                own.remove("example");
                own.remove("examples");
                Value::Object(own)
            });
            let named_examples = map.contains_key("schema");
            if let Some(example) = map.get("example") {
                out.push((format!("{at}/example"), schema.clone(), example.clone()));
            }
            match map.get("examples") {
                Some(Value::Array(list)) => {
                    for (i, example) in list.iter().enumerate() {
                        out.push((format!("{at}/examples/{i}"), schema.clone(), example.clone()));
                    }
                }
                Some(Value::Object(named)) if named_examples => {
                    for (name, example) in named {
                        if let Some(value) = example.get("value") {
                            out.push((format!("{at}/examples/{name}"), schema.clone(), value.clone()));
                        }
                    }
                }
                _ => {}
            }
            for (key, v) in map {
                if key != "example" && key != "examples" {
                    examples(v, &format!("{at}/{key}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                examples(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// The schema of `method path`'s `status` answer in JSON.
fn response_schema(doc: &Value, method: &str, path: &str, status: u16) -> Value {
    let response = &doc["paths"][path][method]["responses"][status.to_string()];
    // Failures are RFC 9457 problems; everything else (a gate's 412 too) is plain JSON.
    let problem = &response["content"]["application/problem+json"]["schema"];
    let schema = if problem.is_object() {
        problem
    } else {
        &response["content"]["application/json"]["schema"]
    };
    assert!(
        schema.is_object(),
        "{method} {path} documents no JSON {status} answer: {response}"
    );
    schema.clone()
}

/// Checks a real answer against the document.
fn conforms(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let schema = response_schema(doc, method, path, status);
    let errors = violations(doc, &schema, body);
    assert!(
        errors.is_empty(),
        "{method} {path} {status} does not match its schema: {errors:?}\n{body:#}"
    );
}

/// Sends `method path` with an optional JSON body; the status and the answer (JSON, or null).
async fn send(daemon: &TestDaemon, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
    let mut request = daemon.http.request(method, daemon.api(path));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("API answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_document_describes_every_route_and_the_answers_match_it() {
    let daemon = TestDaemon::start().await;
    let response = daemon
        .http
        .get(daemon.api("/openapi.json"))
        .send()
        .await
        .expect("GET /openapi.json");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().ok(),
        Some("application/json")
    );
    let doc: Value = response.json().await.expect("JSON");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    // What is served is what the router was built with.
    let built = serde_json::to_value(canaryd::serve::openapi()).expect("document");
    assert_eq!(doc, built);

    // Every route, and nothing else, with the methods the router serves.
    let documented = operations(&doc);
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented, expected);
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in paths {
        let concrete = path
            .replace("{app}", "no-such-app")
            .replace("{id}", "sub_none")
            .replace("{operation}", "pause")
            .replace("{event_id}", "evt_0000000000000001")
            .replace("{token}", "not-a-link");
        for method in METHODS {
            let (status, body) = send(&daemon, method, &concrete, None).await;
            if documented.contains(&(method.to_owned(), path.clone())) {
                assert!(
                    status != 405 && body["error"] != "no such route",
                    "{method} {path} is documented but not served: {status} {body}"
                );
            } else {
                assert_eq!(status, 405, "{method} {path} is served but not documented");
            }
        }
    }

    // The bearer token on every write and on what reveals receivers, and only there.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearer"]["description"]})
    );
    for (method, path) in &documented {
        let operation = &doc["paths"][path][method];
        // An approval link is its own credential: no token.
        let link = path.starts_with("/api/v1/approvals/");
        if !link && (WRITES.contains(&method.as_str()) || path.starts_with("/api/v1/subscriptions")) {
            assert_eq!(operation["security"], json!([{"bearer": []}]), "{method} {path}");
            let schema = response_schema(&doc, method, path, 401);
            assert_eq!(
                schema["$ref"], "#/components/schemas/ErrorBody",
                "{method} {path}"
            );
        } else {
            assert!(operation.get("security").is_none(), "{method} {path}");
        }
    }

    // A few schemas clients rely on.
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["CanaryView"]["properties"]["state"]["$ref"],
        "#/components/schemas/CanaryState"
    );
    let states: BTreeSet<&str> = schemas["CanaryState"]["enum"]
        .as_array()
        .expect("state names")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        states,
        BTreeSet::from([
            "insufficient_data",
            "healthy",
            "marginal",
            "failing",
            "promoted",
            "rolled_back"
        ])
    );
    let check: BTreeSet<&str> = schemas["Check"]["properties"]
        .as_object()
        .expect("Check's properties")
        .keys()
        .map(String::as_str)
        .collect();
    for field in [
        "id",
        "group",
        "feature",
        "operation",
        "test",
        "critical",
        "weight",
        "outcome",
        "canary_value",
        "baseline_value",
        "canary_samples",
        "baseline_samples",
        "statistic",
        "p_value",
        "threshold",
        "effect",
        "min_effect",
        "effect_kind",
        "window_s",
        "message",
    ] {
        assert!(check.contains(field), "Check lacks {field}: {check:?}");
    }
    assert_eq!(
        schemas["ErrorBody"]["required"],
        json!(["type", "title", "status", "detail", "error"]),
        "{}",
        schemas["ErrorBody"]
    );

    // Every example validates against what it illustrates; the main types have one.
    let mut found = Vec::new();
    examples(&doc, "#", &mut found);
    for (at, schema, example) in &found {
        let errors = violations(&doc, schema, example);
        assert!(errors.is_empty(), "{at}: {errors:?}\n{example:#}");
    }
    for name in [
        "CanaryView",
        "RolloutRequest",
        "NewSubscription",
        "Event",
        "ErrorBody",
        "FlaggerPayload",
        "GateAnswer",
        "RollbackAnswer",
    ] {
        let at = format!("#/components/schemas/{name}/example");
        assert!(found.iter().any(|(a, _, _)| *a == at), "{name} has no example");
    }

    // Real answers, through a canary's life, match their routes' schemas.
    conforms(&doc, "get", "/api/v1/apps", 200, &daemon.apps().await);
    let (status, body) = send(&daemon, "get", "/api/v1/apps/shop/canary?env=prod", None).await;
    conforms(&doc, "get", "/api/v1/apps/{app}/canary", status, &body);
    assert_eq!(status, 404);
    let (status, body) = send(&daemon, "get", "/api/v1/events?limit=0", None).await;
    conforms(&doc, "get", "/api/v1/events", status, &body);
    assert_eq!(status, 400);
    let (status, body) = send(&daemon, "get", "/api/v1/models", None).await;
    conforms(&doc, "get", "/api/v1/models", status, &body);

    let (status, subscription) = send(
        &daemon,
        "post",
        "/api/v1/subscriptions",
        Some(json!({"url": "http://127.0.0.1:9/hook", "events": ["canaryd.canary.started"]})),
    )
    .await;
    assert_eq!(status, 201, "{subscription}");
    conforms(&doc, "post", "/api/v1/subscriptions", status, &subscription);
    let (status, body) = send(&daemon, "post", "/api/v1/subscriptions", Some(json!({"url": 1}))).await;
    conforms(&doc, "post", "/api/v1/subscriptions", status, &body);

    let mut traces = TraceServiceClient::connect(daemon.grpc_endpoint())
        .await
        .expect("connect");
    support::export_until_shop_catalogued(&daemon, &mut traces, traffic(0, 2, 1000)).await;
    let rollout = json!({"stable_version": "1.0.0", "canary_version": "2.0.0"});
    let (status, body) = send(
        &daemon,
        "put",
        "/api/v1/apps/shop/rollout?env=prod",
        Some(rollout),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    conforms(&doc, "put", "/api/v1/apps/{app}/rollout", status, &body);
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
    assert!(!canary["checks"].as_array().is_none_or(Vec::is_empty), "{canary}");
    conforms(&doc, "get", "/api/v1/apps/{app}/canary", 200, &canary);
    conforms(&doc, "get", "/api/v1/apps", 200, &daemon.apps().await);

    let id = subscription["id"].as_str().expect("id");
    for (method, path, route, body) in [
        (
            "get",
            "/api/v1/apps/shop/baseline?env=prod",
            "/api/v1/apps/{app}/baseline",
            None,
        ),
        (
            "get",
            "/api/v1/apps/shop/timeline?env=prod",
            "/api/v1/apps/{app}/timeline",
            None,
        ),
        ("get", "/api/v1/events", "/api/v1/events", None),
        ("get", "/api/v1/subscriptions", "/api/v1/subscriptions", None),
        (
            "get",
            &format!("/api/v1/subscriptions/{id}/deliveries"),
            "/api/v1/subscriptions/{id}/deliveries",
            None,
        ),
        (
            "get",
            &format!("/api/v1/subscriptions/{id}/deliveries?state=parked"),
            "/api/v1/subscriptions/{id}/deliveries",
            None,
        ),
        (
            "get",
            &format!("/api/v1/subscriptions/{id}/deliveries?state=lost"),
            "/api/v1/subscriptions/{id}/deliveries",
            None,
        ),
        (
            "post",
            &format!("/api/v1/subscriptions/{id}/deliveries/evt_00000000ffffffff/redrive"),
            "/api/v1/subscriptions/{id}/deliveries/{event_id}/redrive",
            None,
        ),
        (
            "post",
            &format!("/api/v1/subscriptions/{id}/deliveries/redrive"),
            "/api/v1/subscriptions/{id}/deliveries/redrive",
            None,
        ),
        (
            "post",
            "/api/v1/gates/flagger",
            "/api/v1/gates/flagger",
            Some(json!({"name": "shop", "namespace": "prod", "phase": "Progressing"})),
        ),
        (
            "post",
            "/api/v1/gates/flagger/rollback",
            "/api/v1/gates/flagger/rollback",
            Some(json!({"name": "shop", "namespace": "prod", "phase": "Progressing"})),
        ),
        (
            "post",
            "/api/v1/gates/flagger",
            "/api/v1/gates/flagger",
            Some(json!({"name": "", "namespace": "prod"})),
        ),
        (
            "delete",
            "/api/v1/subscriptions/sub_none",
            "/api/v1/subscriptions/{id}",
            None,
        ),
        (
            "delete",
            "/api/v1/apps/nothing/rollout",
            "/api/v1/apps/{app}/rollout",
            None,
        ),
    ] {
        let (status, answer) = send(&daemon, method, path, body).await;
        conforms(&doc, method, route, status, &answer);
    }
    let events = daemon.get_json("/api/v1/events").await;
    assert!(
        events["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["type"] == "canaryd.canary.failed")),
        "{events}"
    );
}

#[tokio::test]
async fn with_a_token_writes_answer_401_as_documented() {
    let daemon = TestDaemon::start_with(|raw| raw.api_token = Some("s3cret".into())).await;
    let doc = daemon.get_json("/openapi.json").await;
    let (status, body) = send(
        &daemon,
        "post",
        "/api/v1/subscriptions",
        Some(json!({"url": "http://127.0.0.1:9/hook", "events": ["canaryd.canary.started"]})),
    )
    .await;
    assert_eq!(status, 401);
    conforms(&doc, "post", "/api/v1/subscriptions", status, &body);
}
