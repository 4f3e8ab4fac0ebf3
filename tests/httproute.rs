//! Issue 19, part 3: the `httproute` lever, against a local HTTP server standing in for the
//! Kubernetes API server's HTTPRoute endpoint. It keeps one route, answers as the API server does
//! (a `Status` body for 403, 404 and 409; server-side apply's ownership of `spec.rules` by field
//! manager, with `force` taking it over), and records every request, whose apply bodies are
//! validated against the vendored Gateway API v1 HTTPRoute schema.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use canaryd::act::httproute::{self, HttpRouteError, HttpRoutes, KubeAccess, RouteTarget};
use canaryd::act::outbound::{OutboundAllow, OutboundPolicy};
use canaryd::events::Route;
use canaryd_engine::judge::{HeaderMatch, Sticky};
use serde_json::{Value, json};
use support::{TestDaemon, eventually};

const ROUTE_PATH: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/{namespace}/httproutes/{name}";
const TOKEN: &str = "token-of-the-canaryd-service-account";

/// One request as the API server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    query: HashMap<String, String>,
    content_type: Option<String>,
    authorization: Option<String>,
    body: Option<Value>,
}

#[derive(Default)]
struct Cluster {
    /// The HTTPRoutes, by (namespace, name).
    routes: HashMap<(String, String), Value>,
    /// The field manager holding each route's `spec.rules`.
    rules_manager: HashMap<(String, String), String>,
    /// Answer every request 403, as an API server does for an identity without RBAC.
    forbid: bool,
    seen: Vec<Seen>,
}

/// The stand-in API server.
struct ApiServer {
    addr: SocketAddr,
    cluster: Arc<Mutex<Cluster>>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

async fn route_endpoint(
    State(cluster): State<Arc<Mutex<Cluster>>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut cluster = cluster.lock().expect("cluster");
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    cluster.seen.push(Seen {
        method: method.clone(),
        path: format!("/apis/gateway.networking.k8s.io/v1/namespaces/{namespace}/httproutes/{name}"),
        query: query.clone(),
        content_type: header("content-type"),
        authorization: header("authorization"),
        body: serde_json::from_slice(&body).ok(),
    });
    if header("authorization").as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if cluster.forbid {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "httproutes.gateway.networking.k8s.io \"{name}\" is forbidden: User \
                 \"system:serviceaccount:canaryd:canaryd\" cannot {} resource \"httproutes\" in API \
                 group \"gateway.networking.k8s.io\" in the namespace \"{namespace}\"",
                if method == Method::GET { "get" } else { "patch" }
            ),
        );
    }
    let key = (namespace.clone(), name.clone());
    match method {
        Method::GET => match cluster.routes.get(&key) {
            Some(route) => axum::Json(route.clone()).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("httproutes.gateway.networking.k8s.io \"{name}\" not found"),
            ),
        },
        Method::PATCH => {
            if header("content-type").as_deref() != Some("application/apply-patch+yaml") {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "not an apply",
                );
            }
            let Some(manager) = query.get("fieldManager").cloned() else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "fieldManager is required for apply requests",
                );
            };
            let Ok(applied) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "the body is not JSON");
            };
            let forced = query.get("force").is_some_and(|f| f == "true");
            if let Some(holder) = cluster.rules_manager.get(&key)
                && *holder != manager
                && !forced
            {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!("Apply failed with 1 conflict: conflict with \"{holder}\": .spec.rules"),
                );
            }
            // An apply of a missing object creates it, as the API server does: canaryd must not
            // send one (it reads the route first).
            let route = cluster.routes.entry(key.clone()).or_insert_with(|| {
                json!({
                    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                    "metadata": {"name": name, "namespace": namespace}, "spec": {},
                })
            });
            route["spec"]["rules"] = applied["spec"]["rules"].clone();
            let answer = route.clone();
            cluster.rules_manager.insert(key, manager);
            axum::Json(answer).into_response()
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not here"),
    }
}

impl ApiServer {
    /// Serves `shop/shop`, whose rules `holder` manages (as a team's `kubectl apply` would).
    async fn start(holder: &str) -> ApiServer {
        let mut cluster = Cluster::default();
        let key = ("shop".to_owned(), "shop".to_owned());
        cluster.routes.insert(
            key.clone(),
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "shop", "namespace": "shop"},
                "spec": {
                    "parentRefs": [{"name": "public"}],
                    "rules": [{"backendRefs": [{"name": "shop-stable", "port": 8080}]}],
                },
            }),
        );
        cluster.rules_manager.insert(key, holder.to_owned());
        let cluster = Arc::new(Mutex::new(cluster));
        let app = axum::Router::new()
            .route(ROUTE_PATH, axum::routing::any(route_endpoint))
            .with_state(cluster.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        ApiServer { addr, cluster }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.cluster.lock().expect("cluster").seen.clone()
    }

    fn forbid(&self, forbid: bool) {
        self.cluster.lock().expect("cluster").forbid = forbid;
    }

    fn rules(&self) -> Value {
        let cluster = self.cluster.lock().expect("cluster");
        cluster.routes[&("shop".to_owned(), "shop".to_owned())]["spec"]["rules"].clone()
    }

    fn parent_refs(&self) -> Value {
        let cluster = self.cluster.lock().expect("cluster");
        cluster.routes[&("shop".to_owned(), "shop".to_owned())]["spec"]["parentRefs"].clone()
    }
}

/// Checks every apply body against the Gateway API's HTTPRoute v1 schema, and every request's
/// method, path, identity and (for applies) content type and field manager.
fn check_requests(seen: &[Seen]) {
    let validator = schema();
    for request in seen {
        assert!(
            request
                .path
                .starts_with("/apis/gateway.networking.k8s.io/v1/namespaces/"),
            "{request:?}"
        );
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{request:?}"
        );
        match request.method {
            Method::GET => assert!(request.body.is_none(), "{request:?}"),
            Method::PATCH => {
                assert_eq!(
                    request.content_type.as_deref(),
                    Some("application/apply-patch+yaml")
                );
                assert_eq!(
                    request.query.get("fieldManager").map(String::as_str),
                    Some("canaryd")
                );
                let body = request.body.as_ref().expect("an apply body");
                let errors: Vec<String> = validator
                    .iter_errors(body)
                    .map(|e| format!("{e} at {}", e.instance_path()))
                    .collect();
                assert!(
                    errors.is_empty(),
                    "the apply body breaks the HTTPRoute schema: {errors:?}\n{body:#}"
                );
                // The apply names only what canaryd owns: never the route's parents or hosts.
                let spec = body["spec"].as_object().expect("spec");
                assert_eq!(spec.keys().collect::<Vec<_>>(), vec!["rules"], "{body}");
            }
            ref other => panic!("canaryd sent {other} {}", request.path),
        }
    }
}

fn schema() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(include_str!("fixtures/gateway-api/httproute-v1.schema.json"))
        .expect("the vendored schema is JSON");
    jsonschema::draft4::new(&schema).expect("the schema compiles")
}

/// The schema check has teeth: bodies the API server would refuse fail it.
#[test]
fn the_vendored_schema_refuses_what_the_api_server_would() {
    let validator = schema();
    let body = |rules: Value| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "shop", "namespace": "shop"}, "spec": {"rules": rules}})
    };
    let good = httproute::manifest(&target(), &plan(20.0)).expect("a manifest");
    assert!(validator.is_valid(&good), "{good}");
    for bad in [
        json!([{"backendRefs": [{"name": "a", "port": 80, "weight": -1}]}]),
        json!([{"backendRefs": [{"name": "a", "port": 80, "weight": 1_000_001}]}]),
        json!([{"matches": [{"headers": [{"type": "Fuzzy", "name": "x", "value": "y"}]}]}]),
        json!([{"matches": [{"headers": [{"name": "bad name", "value": "y"}]}]}]),
        json!((0..17).map(|_| json!({})).collect::<Vec<_>>()),
    ] {
        assert!(
            !validator.is_valid(&body(bad.clone())),
            "{bad} should break the schema"
        );
    }
}

fn target() -> RouteTarget {
    "prod/shop=shop/shop@shop-stable:8080+shop-canary:8080"
        .parse::<HttpRoutes>()
        .expect("an entry")
        .0
        .remove(0)
}

fn token_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("token file");
    std::fs::write(file.path(), TOKEN).expect("write token");
    file
}

fn plan(percent: f64) -> Route {
    Route {
        percent,
        sticky: Some(Sticky::Header("x-user-id".into())),
        headers: vec![HeaderMatch {
            name: "x-canary".into(),
            value: "always".into(),
        }],
        users: vec!["alice".into(), "bob@example.com".into()],
    }
}

fn out_of_traffic() -> Route {
    Route {
        percent: 0.0,
        sticky: None,
        headers: Vec::new(),
        users: Vec::new(),
    }
}

/// (stable, canary) weights of the split rule (the last).
fn split(rules: &Value) -> (u64, u64) {
    let last = rules.as_array().and_then(|r| r.last()).expect("a rule");
    let weight = |i: usize| last["backendRefs"][i]["weight"].as_u64().expect("a weight");
    (weight(0), weight(1))
}

#[tokio::test]
async fn routes_are_applied_read_back_and_conflicts_and_refusals_reported() {
    let server = ApiServer::start("flagger").await;
    let token = token_file();
    let access = KubeAccess {
        token_file: Some(token.path().to_owned()),
        ca_file: None,
    };
    let policy = OutboundPolicy::new(OutboundAllow::loopback());
    let client = httproute::client(&server.url(), &access, &policy, Duration::from_secs(5))
        .await
        .expect("a client");
    let target = target();

    // Another manager holds the rules: a move into traffic is not forced, so it is a conflict,
    // reported with the API server's words.
    let conflict = httproute::apply(&client, &target, &plan(20.0)).await;
    match &conflict {
        Err(e @ HttpRouteError::Conflict { message, .. }) => {
            assert!(message.contains("flagger"), "{message}");
            assert_eq!(e.status(), Some(409));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A move out of traffic is forced: the breaker trips whoever held the rules.
    let out = httproute::apply(&client, &target, &out_of_traffic())
        .await
        .expect("forced");
    assert!(out.changed);
    assert_eq!(split(&server.rules()), (10_000, 0));
    assert_eq!(
        server.rules().as_array().map(Vec::len),
        Some(1),
        "no one routed to the canary"
    );
    // Now canaryd holds them: moves go through unforced, canary rules first.
    httproute::apply(&client, &target, &plan(20.0))
        .await
        .expect("applied");
    let rules = server.rules();
    assert_eq!(split(&rules), (8_000, 2_000));
    let canary_rule = &rules[0];
    let matched: Vec<(&str, &str)> = canary_rule["matches"]
        .as_array()
        .expect("matches")
        .iter()
        .map(|m| {
            (
                m["headers"][0]["name"].as_str().expect("name"),
                m["headers"][0]["value"].as_str().expect("value"),
            )
        })
        .collect();
    assert_eq!(
        matched,
        vec![
            ("x-canary", "always"),
            ("x-user-id", "alice"),
            ("x-user-id", "bob@example.com")
        ]
    );
    assert_eq!(canary_rule["backendRefs"][0]["name"], "shop-canary");
    assert_eq!(
        server.parent_refs(),
        json!([{"name": "public"}]),
        "the owner's fields are untouched"
    );

    // The same route again: read, found held, nothing applied.
    let before = server.seen().len();
    let again = httproute::apply(&client, &target, &plan(20.0))
        .await
        .expect("held");
    assert!(!again.changed);
    let after = server.seen();
    assert_eq!(after.len(), before + 1);
    assert_eq!(after[before].method, Method::GET);

    // Without RBAC: a 403, named as such with what to grant.
    server.forbid(true);
    let forbidden = httproute::apply(&client, &target, &plan(50.0)).await;
    match &forbidden {
        Err(e @ HttpRouteError::Forbidden { .. }) => {
            assert_eq!(e.status(), Some(403));
            let text = e.to_string();
            assert!(
                text.contains("cannot get resource") && text.contains("httproutes"),
                "{text}"
            );
        }
        other => panic!("expected 403, got {other:?}"),
    }
    server.forbid(false);

    // A route that does not exist is reported, not created by an apply.
    let mut missing = target.clone();
    missing.name = "nowhere".into();
    let absent = httproute::apply(&client, &missing, &plan(5.0)).await;
    assert!(
        matches!(absent, Err(HttpRouteError::NotFound { .. })),
        "{absent:?}"
    );
    let seen = server.seen();
    assert!(
        !seen
            .iter()
            .any(|r| r.method == Method::PATCH && r.path.ends_with("/nowhere")),
        "an apply to a missing route would create it"
    );

    // A forced apply carries force=true; no other does.
    let forced: Vec<bool> = seen
        .iter()
        .filter(|r| r.method == Method::PATCH)
        .map(|r| r.query.get("force").is_some_and(|f| f == "true"))
        .collect();
    assert_eq!(forced, vec![false, true, false]);
    check_requests(&seen);
}

/// A plan past what an HTTPRoute holds never reaches the API server.
#[tokio::test]
async fn a_plan_past_the_gateway_api_limits_is_refused_before_sending() {
    let server = ApiServer::start("canaryd").await;
    let token = token_file();
    let access = KubeAccess {
        token_file: Some(token.path().to_owned()),
        ca_file: None,
    };
    let policy = OutboundPolicy::new(OutboundAllow::loopback());
    let client = httproute::client(&server.url(), &access, &policy, Duration::from_secs(5))
        .await
        .expect("a client");
    let mut big = plan(10.0);
    big.users = (0..httproute::MAX_MATCHES).map(|i| format!("user-{i}")).collect();
    let refused = httproute::apply(&client, &target(), &big).await;
    assert!(
        matches!(refused, Err(HttpRouteError::Unroutable(_))),
        "{refused:?}"
    );
    assert!(server.seen().is_empty());
    // Just inside the limit, the rules spill over rules of 64 matches and pass the schema.
    big.users.pop();
    httproute::apply(&client, &target(), &big).await.expect("applied");
    let counts: Vec<usize> = server
        .rules()
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| r["matches"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(counts, vec![64, 63, 1]);
    check_requests(&server.seen());
}

/// The API server is an outbound target like any other: a restricted address is refused unless
/// `outbound_allow` names it.
#[tokio::test]
async fn the_api_server_address_is_checked_against_the_outbound_policy() {
    let strict = OutboundPolicy::new(OutboundAllow::default());
    let refused = httproute::client(
        "http://127.0.0.1:6443",
        &KubeAccess::default(),
        &strict,
        Duration::from_secs(1),
    )
    .await;
    assert!(
        matches!(refused, Err(HttpRouteError::Outbound(_))),
        "{:?}",
        refused.err()
    );
    let named = OutboundPolicy::new("10.96.0.1".parse().expect("an allow list"));
    assert!(
        httproute::client(
            "https://10.96.0.1",
            &KubeAccess::default(),
            &named,
            Duration::from_secs(1)
        )
        .await
        .is_ok()
    );
}

/// Through the daemon: an `httproute` subscription follows a rollout's route. An apply the API
/// server refuses (403) is kept on the delivery with its status and retried; once RBAC allows
/// it, the route is applied; a failed canary is taken out of the route (forced), and an
/// HTTPRoute changed by hand is put back.
#[tokio::test]
async fn a_rollout_drives_its_httproute_and_a_failed_canary_leaves_it() {
    let server = ApiServer::start("canaryd").await;
    server.forbid(true);
    let token = token_file();
    let token_path = token.path().to_owned();
    let daemon = TestDaemon::start_with(move |raw| {
        raw.httproutes = Some(
            "prod/shop=shop/shop@shop-stable:8080+shop-canary:8080"
                .parse()
                .expect("entry"),
        );
        raw.kubernetes_token_file = Some(token_path);
        raw.haproxy_reconcile_secs = Some(1);
    })
    .await;
    let response = daemon
        .http
        .post(daemon.api("/api/v1/subscriptions"))
        .json(&json!({
            "url": server.url(),
            "kind": "httproute",
            "events": ["canaryd.canary.started", "canaryd.canary.stage_passed",
                       "canaryd.canary.failed", "canaryd.canary.promoted"],
        }))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 201);
    let subscription: Value = response.json().await.expect("JSON");
    let id = subscription["id"].as_str().expect("id").to_owned();

    let mut traces =
        opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient::connect(
            daemon.grpc_endpoint(),
        )
        .await
        .expect("connect");
    support::export_until_shop_catalogued(&daemon, &mut traces, support::canary_traffic(0, 2, 1000)).await;
    let declared = daemon
        .http
        .put(daemon.api("/api/v1/apps/shop/rollout?env=prod"))
        .json(&json!({
            "stable_version": "1.0.0", "canary_version": "2.0.0",
            "traffic": {"sticky": {"header": "x-user-id"}, "headers": [{"name": "x-canary", "value": "always"}],
                        "users": ["alice"]},
        }))
        .send()
        .await
        .expect("PUT");
    assert_eq!(
        declared.status(),
        200,
        "{}",
        declared.text().await.unwrap_or_default()
    );

    // Refused: the delivery says so, status and all, and is retried.
    let deliveries = format!("/api/v1/subscriptions/{id}/deliveries");
    eventually("the 403 is on the delivery", || async {
        let seen = daemon.get_json(&deliveries).await;
        let first = &seen["deliveries"][0];
        let error = first["last_error"].as_str().unwrap_or_default();
        if first["last_status"] == 403 && error.contains("forbidden") && first["next_retry"].is_string() {
            Ok(())
        } else {
            Err(seen.to_string())
        }
    })
    .await;
    server.forbid(false);
    eventually("the started route is applied", || async {
        let rules = server.rules();
        match rules.as_array().map(Vec::len) {
            Some(2) if rules[0]["matches"].as_array().map(Vec::len) == Some(2) => Ok(()),
            _ => Err(rules.to_string()),
        }
    })
    .await;
    let (_, canary_share) = split(&server.rules());
    assert!(
        canary_share > 0,
        "the first stage sends the canary a share: {}",
        server.rules()
    );

    // A hand edit is put back.
    {
        let mut cluster = server.cluster.lock().expect("cluster");
        let route = cluster
            .routes
            .get_mut(&("shop".to_owned(), "shop".to_owned()))
            .expect("route");
        route["spec"]["rules"] =
            json!([{"backendRefs": [{"name": "shop-stable", "port": 8080, "weight": 1}]}]);
    }
    eventually("the drifted route is reconciled", || async {
        match server.rules().as_array().map(Vec::len) {
            Some(2) => Ok(()),
            _ => Err(server.rules().to_string()),
        }
    })
    .await;

    for chunk in 0..6 {
        traces
            .export(support::canary_traffic(2 + chunk * 10, 10, 2))
            .await
            .expect("export");
    }
    eventually("the failed canary is out of the route", || async {
        let rules = server.rules();
        if rules.as_array().map(Vec::len) == Some(1) && split(&rules) == (10_000, 0) {
            Ok(())
        } else {
            Err(rules.to_string())
        }
    })
    .await;
    let failed_apply = server
        .seen()
        .into_iter()
        .rfind(|r| r.method == Method::PATCH)
        .expect("an apply");
    assert_eq!(failed_apply.query.get("force").map(String::as_str), Some("true"));
    check_requests(&server.seen());
    daemon.stop().await.expect("clean stop");
}

/// Issue 19, part 5: one breaker, every lever. A failed canary is taken out of traffic by every
/// lever attached to its app from its one event; the event shows each lever's outcome, and a
/// move one lever applied and another did not (here HAProxy's runtime API is down) is a
/// `canaryd.traffic.partial` alert naming the lever that failed, not a success.
#[tokio::test]
async fn a_move_only_some_levers_applied_is_an_alert() {
    let server = ApiServer::start("canaryd").await;
    let token = token_file();
    let token_path = token.path().to_owned();
    // An HAProxy runtime API that is not there: connections are refused.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let daemon = TestDaemon::start_with(move |raw| {
        raw.httproutes = Some(
            "prod/shop=shop/shop@shop-stable:8080+shop-canary:8080"
                .parse()
                .expect("entry"),
        );
        raw.haproxy_servers = Some("prod/shop/*=shop/canary+stable".parse().expect("entry"));
        raw.kubernetes_token_file = Some(token_path);
    })
    .await;
    let moves = json!(["canaryd.canary.started", "canaryd.canary.failed"]);
    for (kind, url) in [
        ("httproute", server.url()),
        ("haproxy", format!("tcp://{closed}")),
    ] {
        let response = daemon
            .http
            .post(daemon.api("/api/v1/subscriptions"))
            .json(&json!({"url": url, "kind": kind, "events": moves}))
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 201, "{kind}");
    }
    let mut traces = support::shop_rollout_declared(&daemon, None).await;
    for chunk in 0..6 {
        traces
            .export(support::canary_traffic(2 + chunk * 10, 10, 2))
            .await
            .expect("export");
    }
    let (failed, alert) = eventually("the failed canary's partial move is alerted", || async {
        let events = daemon.get_json("/api/v1/events?app=shop").await;
        let all = events["events"].as_array().cloned().unwrap_or_default();
        let failed = all.iter().find(|e| e["type"] == "canaryd.canary.failed");
        let alert = failed.and_then(|f| {
            all.iter()
                .find(|e| e["type"] == "canaryd.traffic.partial" && e["data"]["cause"] == f["id"])
        });
        match (failed, alert) {
            (Some(failed), Some(alert)) => Ok((failed.clone(), alert.clone())),
            _ => Err(events.to_string()),
        }
    })
    .await;
    // The route is out of traffic all the same: the lever that works did its part.
    assert_eq!(split(&server.rules()), (10_000, 0));
    let outcome_of = |levers: &Value, kind: &str| -> Value {
        levers
            .as_array()
            .and_then(|l| l.iter().find(|o| o["kind"] == kind).cloned())
            .unwrap_or_else(|| panic!("no {kind} lever in {levers}"))
    };
    for levers in [&failed["levers"], &alert["data"]["levers"]] {
        assert_eq!(outcome_of(levers, "httproute")["outcome"], "applied", "{levers}");
        let haproxy = outcome_of(levers, "haproxy");
        assert_eq!(haproxy["outcome"], "failed", "{levers}");
        assert!(haproxy["attempts"].as_u64() >= Some(1), "{levers}");
        assert!(
            haproxy["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{levers}"
        );
    }
    assert_eq!(alert["data"]["state"], "partial");
    assert_eq!(alert["data"]["app"], "shop");
    let reasons = alert["data"]["reasons"].as_array().expect("reasons");
    assert_eq!(reasons.len(), 1, "the failing lever only: {reasons:?}");
    let message = reasons[0]["message"].as_str().expect("message");
    assert!(
        message.contains("haproxy") && message.contains("canaryd.canary.failed"),
        "{message}"
    );
    // One alert per move, however many attempts follow.
    let events = daemon
        .get_json("/api/v1/events?app=shop&type=canaryd.traffic.partial")
        .await;
    let causes: Vec<&Value> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| &e["data"]["cause"])
        .collect();
    let unique: std::collections::BTreeSet<String> = causes.iter().map(|c| c.to_string()).collect();
    assert_eq!(causes.len(), unique.len(), "{events}");
    daemon.stop().await.expect("clean stop");
}
