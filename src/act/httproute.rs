//! The `httproute` kind's lever: a rollout's route written into a Kubernetes Gateway API
//! `HTTPRoute` (`gateway.networking.k8s.io/v1`) by server-side apply.
//!
//! Each app named in `httproutes` has a route of its own in the cluster; its owner gives it
//! `parentRefs` and `hostnames`, canaryd owns its `spec.rules` (an atomic list, so one field
//! manager holds all of it): first the canary's rules (header rules and allow-listed users as
//! header matches, all to the canary), then one rule splitting the rest between the stable and
//! canary Services by backendRef weight (basis points). The Gateway API has no per-user hashing
//! in its standard channel, so the split there is per request, as the gateway weighs it.
//!
//! Applying reads the route first (a missing route is reported, never created by the apply),
//! sends nothing when it already holds the rules, and otherwise applies them as field manager
//! `canaryd` and checks the answer. A move that takes the canary out of traffic (share 0, no
//! one routed to it) is applied with `force`, so a breaker trips even when another manager holds
//! the rules; any other move is not, so a conflict with another manager is reported (and retried)
//! instead of taken over.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use canaryd_engine::judge::{HeaderMatch, Sticky};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::outbound::OutboundPolicy;
use crate::events::{Event, Route};

/// The field manager canaryd applies as.
pub const FIELD_MANAGER: &str = "canaryd";
/// A route's matches across all its rules: the Gateway API allows 128, and the split rule's
/// implicit match counts as one.
pub const MAX_MATCHES: usize = 127;
/// Matches in one rule.
pub const MAX_MATCHES_PER_RULE: usize = 64;
/// Rules in one route, the split rule included.
pub const MAX_RULES: usize = 16;
/// The weights are basis points of the split.
const WEIGHT_TOTAL: u32 = 10_000;

/// A Service port a route sends requests to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    pub port: u16,
}

/// Which HTTPRoute carries one app's route, and its stable and canary Services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTarget {
    pub env: String,
    pub app: String,
    pub namespace: String,
    pub name: String,
    pub stable: Backend,
    pub canary: Backend,
}

/// Why a route could not be applied; each says what to look at.
#[derive(Debug, thiserror::Error)]
pub enum HttpRouteError {
    #[error("{0}")]
    Unroutable(String),
    #[error("the API server URL {url:?} is not usable: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot reach the API server: {0}")]
    Outbound(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(String),
    #[error("HTTPRoute {namespace}/{name} does not exist; create it (with its parentRefs) first")]
    NotFound { namespace: String, name: String },
    #[error(
        "another field manager holds the rules of HTTPRoute {namespace}/{name} (409 Conflict): \
         {message}; canaryd forces only a move out of traffic"
    )]
    Conflict {
        namespace: String,
        name: String,
        message: String,
    },
    #[error(
        "the API server refused canaryd (403 Forbidden): {message}; grant get and patch on \
         httproutes.gateway.networking.k8s.io (deploy/kubernetes/components/httproute)"
    )]
    Forbidden { message: String },
    #[error("the API server answered {code}: {message}")]
    Api { code: u16, message: String },
    #[error("the API server did not answer as Kubernetes: {0}")]
    Transport(String),
    #[error("HTTPRoute {namespace}/{name} does not hold the route after applying it: {detail}")]
    NotApplied {
        namespace: String,
        name: String,
        detail: String,
    },
}

impl HttpRouteError {
    /// The HTTP status the API server answered, where it answered one.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpRouteError::NotFound { .. } => Some(404),
            HttpRouteError::Conflict { .. } => Some(409),
            HttpRouteError::Forbidden { .. } => Some(403),
            HttpRouteError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl RouteTarget {
    /// Whether an HTTPRoute can carry a plan with these header rules and users: the Gateway API
    /// allows 127 matches besides the split's, 64 to a rule and 16 rules.
    pub fn can_route(&self, headers: usize, users: usize) -> Result<(), String> {
        let matches = headers + users;
        if matches > MAX_MATCHES {
            return Err(format!(
                "HTTPRoute {}/{} can hold {MAX_MATCHES} header rules and allow-listed users \
                 together (the Gateway API's 128 matches, less the split's), and the plan has {} \
                 and {}; shorten the allow-list, or route users with HAProxy maps",
                self.namespace, self.name, headers, users
            ));
        }
        Ok(())
    }
}

/// The `httproutes` setting: `env/app=namespace/route@stable-service:port+canary-service:port`,
/// comma-separated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRoutes(pub Vec<RouteTarget>);

/// A DNS-1123 label (namespaces, Service names) or subdomain (route names), as Kubernetes checks
/// them.
fn dns_name(text: &str, subdomain: bool) -> bool {
    let max = if subdomain { 253 } else { 63 };
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (subdomain && c == '.');
    !text.is_empty()
        && text.len() <= max
        && text.chars().all(ok_char)
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn backend(entry: &str, text: &str) -> Result<Backend, String> {
    let (name, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{entry:?}: {text:?} needs a port (service:port)"))?;
    if !dns_name(name, false) {
        return Err(format!(
            "{entry:?}: {name:?} is not a Service name (a DNS-1123 label)"
        ));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{entry:?}: {port:?} is not a port (1-65535)"))?;
    Ok(Backend {
        name: name.to_owned(),
        port,
    })
}

impl FromStr for HttpRoutes {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut targets: Vec<RouteTarget> = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let usage = "expected env/app=namespace/route@stable-service:port+canary-service:port";
            let (key, rest) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?}: {usage}"))?;
            let Some((env, app)) = key
                .split_once('/')
                .filter(|(e, a)| !e.is_empty() && !a.is_empty())
            else {
                return Err(format!("{entry:?}: the left side must be env/app"));
            };
            let (route, backends) = rest
                .split_once('@')
                .ok_or_else(|| format!("{entry:?}: {usage}"))?;
            let (namespace, name) = route
                .split_once('/')
                .ok_or_else(|| format!("{entry:?}: the route is namespace/name"))?;
            if !dns_name(namespace, false) {
                return Err(format!("{entry:?}: {namespace:?} is not a namespace name"));
            }
            if !dns_name(name, true) {
                return Err(format!("{entry:?}: {name:?} is not an HTTPRoute name"));
            }
            let (stable, canary) = backends
                .split_once('+')
                .ok_or_else(|| format!("{entry:?}: {usage}"))?;
            let (stable, canary) = (backend(entry, stable)?, backend(entry, canary)?);
            if stable == canary {
                return Err(format!("{entry:?}: the stable and canary backends are the same"));
            }
            if targets.iter().any(|t| t.env == env && t.app == app) {
                return Err(format!("{entry:?}: {env}/{app} is named twice"));
            }
            targets.push(RouteTarget {
                env: env.to_owned(),
                app: app.to_owned(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                stable,
                canary,
            });
        }
        Ok(HttpRoutes(targets))
    }
}

impl<'de> serde::Deserialize<'de> for HttpRoutes {
    /// A TOML string or an array of such strings.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::comma_separated(d)
    }
}

impl HttpRoutes {
    pub fn find(&self, env: &str, app: &str) -> Option<&RouteTarget> {
        self.0.iter().find(|t| t.env == env && t.app == app)
    }
}

/// The route acting on `event` asks for: its `traffic`, or for an event with a `set_weight`
/// action and no route (a rollout without a plan or staged percentages), that weight alone.
pub fn route_of(event: &Event) -> Option<Route> {
    if event.data.dry_run {
        return None;
    }
    if let Some(route) = &event.data.traffic {
        return Some(route.clone());
    }
    let action = event.data.action.as_ref()?;
    (action.kind == "set_weight").then(|| Route {
        percent: f64::from(action.weight.min(100)),
        sticky: None,
        headers: Vec::new(),
        users: Vec::new(),
    })
}

/// What acting on `event` through an HTTPRoute means: `None` when it moves no traffic or its app
/// has no route; else the target and the route, or why an HTTPRoute cannot carry it.
pub fn plan<'a>(
    event: &Event,
    routes: &'a HttpRoutes,
) -> Option<Result<(&'a RouteTarget, Route), HttpRouteError>> {
    let target = routes.find(&event.data.env, &event.data.app)?;
    let route = route_of(event)?;
    Some(
        target
            .can_route(route.headers.len(), route.users.len())
            .map(|()| (target, route))
            .map_err(HttpRouteError::Unroutable),
    )
}

/// A regular expression matching `text` literally.
fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if !c.is_ascii_alphanumeric() && !"-_~!%&,/:=@ ".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The header match that picks out one allow-listed user: the sticky header's exact value, or
/// the sticky cookie in the `Cookie` header (a regular expression: its support is
/// implementation-specific in the Gateway API).
fn user_match(sticky: &Sticky, user: &str) -> Value {
    match sticky {
        Sticky::Header(name) => json!({"type": "Exact", "name": name, "value": user}),
        Sticky::Cookie(name) => json!({
            "type": "RegularExpression",
            "name": "cookie",
            "value": format!("(^|;\\s*){}={}(;|$)", literal(name), literal(user)),
        }),
    }
}

fn header_match(rule: &HeaderMatch) -> Value {
    json!({"type": "Exact", "name": rule.name, "value": rule.value})
}

fn backend_ref(backend: &Backend, weight: u32) -> Value {
    json!({"group": "", "kind": "Service", "name": backend.name, "port": backend.port, "weight": weight})
}

/// The rules carrying `route`: the canary's (at most 64 matches each), then the split.
pub fn rules(target: &RouteTarget, route: &Route) -> Result<Vec<Value>, HttpRouteError> {
    target
        .can_route(route.headers.len(), route.users.len())
        .map_err(HttpRouteError::Unroutable)?;
    let mut matches: Vec<Value> = route
        .headers
        .iter()
        .map(|h| json!({"path": {"type": "PathPrefix", "value": "/"}, "headers": [header_match(h)]}))
        .collect();
    if !route.users.is_empty() {
        let sticky = route.sticky.as_ref().ok_or_else(|| {
            HttpRouteError::Unroutable("an allow-list needs a sticky key to match users by".into())
        })?;
        matches.extend(route.users.iter().map(|user| {
            json!({"path": {"type": "PathPrefix", "value": "/"}, "headers": [user_match(sticky, user)]})
        }));
    }
    let mut rules: Vec<Value> = matches
        .chunks(MAX_MATCHES_PER_RULE)
        .map(|chunk| json!({"matches": chunk, "backendRefs": [backend_ref(&target.canary, 1)]}))
        .collect();
    let canary = (route.percent.clamp(0.0, 100.0) * 100.0).round() as u32;
    rules.push(json!({
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        "backendRefs": [
            backend_ref(&target.stable, WEIGHT_TOTAL - canary),
            backend_ref(&target.canary, canary),
        ],
    }));
    debug_assert!(rules.len() <= MAX_RULES);
    Ok(rules)
}

/// The apply configuration for `route`: the route's identity and the rules canaryd owns.
pub fn manifest(target: &RouteTarget, route: &Route) -> Result<Value, HttpRouteError> {
    Ok(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": target.name, "namespace": target.namespace},
        "spec": {"rules": rules(target, route)?},
    }))
}

/// Whether a move takes the canary out of traffic (then it is forced).
pub fn is_retreat(route: &Route) -> bool {
    route.percent <= 0.0 && route.headers.is_empty() && route.users.is_empty()
}

/// One rule as compared: per match its header matches (type, name, value), then its backends
/// (name, port, weight).
type RuleShape = (Vec<Vec<(String, String, String)>>, Vec<(String, u64, u64)>);

/// The shape of a rule list canaryd compares: per rule, its header matches and its backends
/// with weights, whatever defaults the API server filled in (a header match's `Exact` type, a
/// backend's weight of 1, its `group` and `kind`; header names compare without case).
fn shape(rules: &Value) -> Vec<RuleShape> {
    let empty = Vec::new();
    rules
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|rule| {
            let matches = rule["matches"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|m| {
                    m["headers"]
                        .as_array()
                        .unwrap_or(&empty)
                        .iter()
                        .map(|h| {
                            (
                                h["type"].as_str().unwrap_or("Exact").to_owned(),
                                h["name"].as_str().unwrap_or_default().to_ascii_lowercase(),
                                h["value"].as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect()
                })
                .collect();
            let backends = rule["backendRefs"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|b| {
                    (
                        b["name"].as_str().unwrap_or_default().to_owned(),
                        b["port"].as_u64().unwrap_or(0),
                        b["weight"].as_u64().unwrap_or(1),
                    )
                })
                .collect();
            (matches, backends)
        })
        .collect()
}

/// How canaryd reaches the API server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeAccess {
    /// A bearer token, re-read as it rotates (a service account's projected token).
    pub token_file: Option<PathBuf>,
    /// The CA bundle the API server's certificate chains to.
    pub ca_file: Option<PathBuf>,
}

impl KubeAccess {
    /// The in-cluster service account's token and CA, where canaryd runs in a pod that has them.
    pub fn in_cluster() -> KubeAccess {
        let dir = std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount");
        let present = |file: &str| Some(dir.join(file)).filter(|p| p.is_file());
        KubeAccess {
            token_file: present("token"),
            ca_file: present("ca.crt"),
        }
    }
}

/// A client for the API server at `url` (`https://kubernetes.default.svc`, or an http URL such
/// as `kubectl proxy`'s), once the outbound policy allows every address it resolves to.
pub async fn client(
    url: &str,
    access: &KubeAccess,
    policy: &OutboundPolicy,
    timeout: Duration,
) -> Result<kube::Client, HttpRouteError> {
    let bad = |reason: String| HttpRouteError::Url {
        url: url.to_owned(),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let host = parsed.host_str().ok_or_else(|| bad("no host".into()))?;
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| bad("no port".into()))?;
    // kube connects on its own; what it will reach is checked here, each time a client is built.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    policy
        .resolve(host, port)
        .await
        .map_err(|e| HttpRouteError::Outbound(e.to_string()))?;
    let uri = url.parse::<http::Uri>().map_err(|e| bad(e.to_string()))?;
    let mut config = kube::Config::new(uri);
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    config.reset_reader_on_write = true;
    // Retries are the outbox's, with its backoff and its record of each attempt.
    config.default_retry = false;
    config.root_cert_file = access.ca_file.clone();
    config.auth_info.token_file = access
        .token_file
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned());
    kube::Client::try_from(config).map_err(|e| HttpRouteError::Client(crate::error_chain(&e)))
}

fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    )
}

fn api_error(target: &RouteTarget, error: kube::Error) -> HttpRouteError {
    match error {
        kube::Error::Api(status) => {
            let message = if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            };
            match status.code {
                404 => HttpRouteError::NotFound {
                    namespace: target.namespace.clone(),
                    name: target.name.clone(),
                },
                409 => HttpRouteError::Conflict {
                    namespace: target.namespace.clone(),
                    name: target.name.clone(),
                    message,
                },
                403 => HttpRouteError::Forbidden { message },
                code => HttpRouteError::Api { code, message },
            }
        }
        other => HttpRouteError::Transport(crate::error_chain(&other)),
    }
}

/// What applying a route did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Whether an apply was sent: false when the route already held the rules.
    pub changed: bool,
}

/// Makes `target`'s HTTPRoute carry `route`, reading it first and checking the applied result.
pub async fn apply(
    client: &kube::Client,
    target: &RouteTarget,
    route: &Route,
) -> Result<Applied, HttpRouteError> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &target.namespace, &resource());
    let wanted = manifest(target, route)?;
    let held = api.get(&target.name).await.map_err(|e| api_error(target, e))?;
    if shape(&held.data["spec"]["rules"]) == shape(&wanted["spec"]["rules"]) {
        return Ok(Applied { changed: false });
    }
    let mut params = PatchParams::apply(FIELD_MANAGER);
    if is_retreat(route) {
        params = params.force();
    }
    let applied = api
        .patch(&target.name, &params, &Patch::Apply(&wanted))
        .await
        .map_err(|e| api_error(target, e))?;
    if shape(&applied.data["spec"]["rules"]) != shape(&wanted["spec"]["rules"]) {
        return Err(HttpRouteError::NotApplied {
            namespace: target.namespace.clone(),
            name: target.name.clone(),
            detail: format!(
                "the API server answered with rules {}",
                clipped(&applied.data["spec"]["rules"])
            ),
        });
    }
    Ok(Applied { changed: true })
}

fn clipped(value: &Value) -> String {
    let mut text = value.to_string();
    super::delivery::clip(&mut text, 512);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> RouteTarget {
        "prod/shop=shop/shop-route@shop-stable:8080+shop-canary:8080"
            .parse::<HttpRoutes>()
            .expect("a valid entry")
            .0
            .remove(0)
    }

    fn route(percent: f64, users: usize) -> Route {
        Route {
            percent,
            sticky: Some(Sticky::Header("x-user-id".into())),
            headers: vec![HeaderMatch {
                name: "x-canary".into(),
                value: "always".into(),
            }],
            users: (0..users).map(|i| format!("user-{i}")).collect(),
        }
    }

    #[test]
    fn the_setting_names_a_route_and_its_two_services() {
        let t = target();
        assert_eq!((t.env.as_str(), t.app.as_str()), ("prod", "shop"));
        assert_eq!((t.namespace.as_str(), t.name.as_str()), ("shop", "shop-route"));
        assert_eq!(
            t.stable,
            Backend {
                name: "shop-stable".into(),
                port: 8080
            }
        );
        assert_eq!(t.canary.name, "shop-canary");
        for bad in [
            "prod/shop",
            "prod=shop/r@a:1+b:1",
            "prod/shop=r@a:1+b:1",
            "prod/shop=shop/r@a:1",
            "prod/shop=shop/r@a+b:1",
            "prod/shop=shop/r@a:0+b:1",
            "prod/shop=shop/r@A:1+b:1",
            "prod/shop=Shop/r@a:1+b:1",
            "prod/shop=shop/r@a:1+a:1",
            "prod/shop=shop/r@a:1+b:1,prod/shop=shop/s@a:1+b:1",
        ] {
            assert!(bad.parse::<HttpRoutes>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn canary_rules_come_first_and_the_split_is_in_basis_points() {
        let rules = rules(&target(), &route(12.5, 2)).expect("routable");
        assert_eq!(rules.len(), 2);
        let canary = &rules[0];
        assert_eq!(canary["matches"].as_array().map(Vec::len), Some(3));
        assert_eq!(canary["matches"][0]["headers"][0]["name"], "x-canary");
        assert_eq!(canary["matches"][2]["headers"][0]["value"], "user-1");
        assert_eq!(canary["backendRefs"][0]["name"], "shop-canary");
        let split = &rules[1]["backendRefs"];
        assert_eq!(
            (split[0]["name"].as_str(), split[0]["weight"].as_u64()),
            (Some("shop-stable"), Some(8750))
        );
        assert_eq!(
            (split[1]["name"].as_str(), split[1]["weight"].as_u64()),
            (Some("shop-canary"), Some(1250))
        );
    }

    #[test]
    fn matches_past_one_rule_spill_into_more_and_past_the_route_are_refused() {
        let rules = rules(&target(), &route(5.0, 126)).expect("127 matches fit");
        let counts: Vec<usize> = rules
            .iter()
            .map(|r| r["matches"].as_array().map_or(0, Vec::len))
            .collect();
        assert_eq!(counts, vec![64, 63, 1]);
        assert!(matches!(
            super::rules(&target(), &route(5.0, 127)),
            Err(HttpRouteError::Unroutable(_))
        ));
    }

    #[test]
    fn a_cookie_user_is_matched_literally_in_the_cookie_header() {
        let m = user_match(&Sticky::Cookie("uid".into()), "a.b+c");
        assert_eq!(m["type"], "RegularExpression");
        assert_eq!(m["name"], "cookie");
        assert_eq!(m["value"], "(^|;\\s*)uid=a\\.b\\+c(;|$)");
    }

    #[test]
    fn only_a_move_out_of_traffic_is_forced() {
        let out = Route {
            percent: 0.0,
            sticky: None,
            headers: Vec::new(),
            users: Vec::new(),
        };
        assert!(is_retreat(&out));
        assert!(
            !is_retreat(&route(0.0, 0)),
            "header rules still send requests to the canary"
        );
        assert!(!is_retreat(&route(20.0, 0)));
    }

    #[test]
    fn defaults_the_server_fills_in_do_not_count_as_a_difference() {
        let wanted = json!([{"backendRefs": [{"name": "a", "port": 80, "weight": 1}]}]);
        let held = json!([{
            "matches": [],
            "backendRefs": [{"group": "", "kind": "Service", "name": "a", "port": 80}],
        }]);
        assert_eq!(shape(&wanted), shape(&held));
        let moved = json!([{"backendRefs": [{"name": "a", "port": 80, "weight": 0}]}]);
        assert_ne!(shape(&wanted), shape(&moved));
    }
}
