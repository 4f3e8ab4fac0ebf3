//! Replicas answering for each other (`cluster_peers`): each replica judges the apps routed to it,
//! and any of them answers the API about any app. A read about an app this replica has never
//! seen, or an action on its analysis (a rollout declared or ended, an operator's action), is
//! asked of every peer, and the answer of the one that knows the app is relayed; the list of apps
//! is every replica's, merged. A peer that does not answer is named in the
//! response (`unanswered_peers`), never silently left out.
//!
//! A request asked on behalf of another replica carries `canaryd-forwarded` and is answered from
//! this replica alone (so that asking never goes round in circles), with `canaryd-app-here`
//! saying whether the app is known here. Every relayed answer says which replica gave it
//! (`canaryd-replica`, a random name each process picks at start): the asker drops its own, since
//! a peer list read from a headless Service's DNS name includes the asker itself.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::ApiState;
use super::error::{ApiError, PROBLEM_JSON};

/// On a request: asked on behalf of another replica (its name), to be answered from here alone.
pub const FORWARDED: HeaderName = HeaderName::from_static("canaryd-forwarded");
/// On an answer to a forwarded request: `1` when the app asked about is known here, else `0`.
pub const APP_HERE: HeaderName = HeaderName::from_static("canaryd-app-here");
/// On every answer: the name of the replica that gave it.
pub const REPLICA: HeaderName = HeaderName::from_static("canaryd-replica");
/// On an answer relayed from a peer: that peer's address.
pub const ANSWERED_BY: HeaderName = HeaderName::from_static("canaryd-answered-by");

/// How long a peer may take to answer before it is named as not answering.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest request body relayed (a Flagger gate payload is well under it).
const MAX_RELAYED_BODY: usize = 1 << 20;

/// The `cluster_peers` setting: the peers' HTTP API addresses, `host:port`, comma-separated. A
/// host name stands for every address it resolves to, looked up anew at each read, so one entry
/// can be a Kubernetes headless Service's name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerList(Vec<String>);

impl PeerList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::str::FromStr for PeerList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut peers = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let address = entry
                .strip_prefix("http://")
                .unwrap_or(entry)
                .trim_end_matches('/');
            let port = address
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            match port {
                Some((host, Ok(port))) if !host.is_empty() && port > 0 && !host.contains('/') => {
                    peers.push(address.to_owned());
                }
                _ => {
                    return Err(format!(
                        "{entry:?}: a peer is host:port (its HTTP API), e.g. canaryd-1.canaryd:8080 or a headless Service's name"
                    ));
                }
            }
        }
        Ok(PeerList(peers))
    }
}

impl<'de> serde::Deserialize<'de> for PeerList {
    /// A TOML string (`"a:8080, b:8080"`) or an array of such strings.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::act::comma_separated(d)
    }
}

impl std::fmt::Display for PeerList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

/// A peer that gave no usable answer, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct UnansweredPeer {
    /// The peer's address (or the list entry that did not resolve).
    pub peer: String,
    pub error: String,
}

/// What a peer answered.
pub struct PeerAnswer {
    pub peer: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl PeerAnswer {
    fn app_here(&self) -> bool {
        self.headers.get(APP_HERE).is_some_and(|v| v == "1")
    }

    /// The apps of an answer to `GET /api/v1/apps`, as JSON; a peer that answered something
    /// else did not answer.
    pub fn apps(self) -> Result<Vec<serde_json::Value>, UnansweredPeer> {
        let apps = (self.status == StatusCode::OK)
            .then(|| serde_json::from_slice::<serde_json::Value>(&self.body).ok())
            .flatten()
            .and_then(
                |mut list| match list.get_mut("apps").map(serde_json::Value::take) {
                    Some(serde_json::Value::Array(apps)) => Some(apps),
                    _ => None,
                },
            );
        match apps {
            Some(apps) => Ok(apps),
            _ => Err(UnansweredPeer {
                error: format!("answered {} without a list of apps", self.status),
                peer: self.peer,
            }),
        }
    }
}

/// This replica's peers, and its own name among them.
pub struct Peers {
    list: PeerList,
    replica: HeaderValue,
    http: reqwest::Client,
}

impl Peers {
    /// `None` for an empty list: a replica on its own.
    pub fn new(list: PeerList) -> Option<Arc<Peers>> {
        if list.is_empty() {
            return None;
        }
        let mut name = [0u8; 8];
        // A clash of two random 64-bit names only makes a replica skip a peer's answer once.
        let _ = getrandom::fill(&mut name);
        let replica = name.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let http = reqwest::Client::builder()
            .timeout(PEER_TIMEOUT)
            .connect_timeout(PEER_TIMEOUT)
            .build()
            .unwrap_or_default();
        Some(Arc::new(Peers {
            list,
            replica: HeaderValue::from_str(&replica).unwrap_or(HeaderValue::from_static("replica")),
            http,
        }))
    }

    /// Every address the list stands for now, and the entries that did not resolve.
    async fn addresses(&self) -> (Vec<String>, Vec<UnansweredPeer>) {
        let mut addresses = Vec::new();
        let mut unresolved = Vec::new();
        for entry in &self.list.0 {
            match tokio::net::lookup_host(entry.as_str()).await {
                Ok(found) => {
                    for address in found {
                        let address = address.to_string();
                        if !addresses.contains(&address) {
                            addresses.push(address);
                        }
                    }
                }
                Err(e) => unresolved.push(UnansweredPeer {
                    peer: entry.clone(),
                    error: format!("cannot resolve: {e}"),
                }),
            }
        }
        (addresses, unresolved)
    }

    /// Asks every peer the same request (on this replica's behalf); returns the answers of the
    /// others (this replica's own, reached through a shared name, left out) and who did not
    /// answer. A peer's 5xx is no answer: it could not say whether it knows the app.
    pub async fn ask(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> (Vec<PeerAnswer>, Vec<UnansweredPeer>) {
        let (addresses, unanswered) = self.addresses().await;
        self.ask_at(addresses, unanswered, method, path_and_query, headers, body)
            .await
    }

    /// `ask`, of the peers at `addresses` only; `unanswered` holds who could not be asked.
    async fn ask_at(
        &self,
        addresses: Vec<String>,
        mut unanswered: Vec<UnansweredPeer>,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> (Vec<PeerAnswer>, Vec<UnansweredPeer>) {
        let asks = addresses.into_iter().map(|peer| {
            let mut request = self
                .http
                .request(method.clone(), format!("http://{peer}{path_and_query}"))
                .header(FORWARDED, self.replica.clone())
                .body(body.clone());
            for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
                if let Some(value) = headers.get(&name) {
                    request = request.header(name, value.clone());
                }
            }
            async move {
                let answer = async {
                    let response = request.send().await?;
                    let (status, headers) = (response.status(), response.headers().clone());
                    let body = response.bytes().await?;
                    Ok::<_, reqwest::Error>(PeerAnswer {
                        peer: peer.clone(),
                        status,
                        headers,
                        body,
                    })
                }
                .await;
                answer.map_err(|e| UnansweredPeer {
                    peer,
                    error: crate::error_chain(&e),
                })
            }
        });
        let mut pending = tokio::task::JoinSet::new();
        for ask in asks {
            pending.spawn(ask);
        }
        let mut answers = Vec::new();
        while let Some(answer) = pending.join_next().await {
            let answer = answer.unwrap_or_else(|e| {
                Err(UnansweredPeer {
                    peer: "(a peer)".into(),
                    error: format!("asking it failed: {e}"),
                })
            });
            match answer {
                Ok(answer) if answer.headers.get(REPLICA) == Some(&self.replica) => {}
                Ok(answer) if answer.status.is_server_error() => unanswered.push(UnansweredPeer {
                    error: format!("answered {}", answer.status),
                    peer: answer.peer,
                }),
                Ok(answer) => answers.push(answer),
                Err(unanswered_peer) => unanswered.push(unanswered_peer),
            }
        }
        (answers, unanswered)
    }
}

impl Peers {
    /// The peer that judges `app` now, found through every peer's list of apps: of those that
    /// know it, the one that saw it last (after the routing changed, a replica that judged it
    /// before still knows it). `Ok(None)` when no peer knows it; `Err` with the peers that did
    /// not answer when none that answered does.
    async fn owner_of(
        &self,
        (env, app): &AppScope,
        headers: &HeaderMap,
    ) -> Result<Option<String>, Vec<UnansweredPeer>> {
        let path = match env {
            Some(env) => format!(
                "/api/v1/apps?env={}",
                url::form_urlencoded::byte_serialize(env.as_bytes()).collect::<String>()
            ),
            None => "/api/v1/apps".to_owned(),
        };
        let (answers, mut unanswered) = self.ask(&Method::GET, &path, headers, Bytes::new()).await;
        let mut owner: Option<(String, String)> = None;
        for answer in answers {
            let peer = answer.peer.clone();
            let apps = match answer.apps() {
                Ok(apps) => apps,
                Err(silent) => {
                    unanswered.push(silent);
                    continue;
                }
            };
            for entry in apps.iter().filter(|a| a["app"].as_str() == Some(app)) {
                let seen = entry["last_seen"].as_str().unwrap_or_default().to_owned();
                if owner.as_ref().is_none_or(|(_, best)| seen > *best) {
                    owner = Some((peer.clone(), seen));
                }
            }
        }
        match owner {
            Some((peer, _)) => Ok(Some(peer)),
            None if unanswered.is_empty() => Ok(None),
            None => Err(unanswered),
        }
    }
}

/// Whether a request was asked on another replica's behalf.
pub fn is_forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED)
}

/// The app a read is about: `(env, app)`, `env` `None` for any environment.
type AppScope = (Option<String>, String);

/// The app a request is about, where it is one this layer relays: `GET` of
/// `/api/v1/apps/{app}/...`, `GET /api/v1/events?app=`, Flagger's gate and rollback hooks (the
/// app named in their payload), and the writes that act on one app's analysis (a rollout
/// declared or ended, an operator's action), which the replica judging the app must take.
fn app_scope(method: &Method, path: &str, query: Option<&str>, body: &[u8]) -> Option<AppScope> {
    let param = |name: &str| {
        query.and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        })
    };
    if let Some(rest) = path.strip_prefix("/api/v1/apps/") {
        let (app, tail) = rest.split_once('/')?;
        let relayed = match (method, tail) {
            (&Method::GET, "canary" | "baseline" | "timeline") => true,
            (&Method::PUT | &Method::DELETE, "rollout") => true,
            (&Method::POST, operation) => operation.starts_with("canary/"),
            _ => false,
        };
        if !relayed {
            return None;
        }
        let app = percent_encoding::percent_decode_str(app).decode_utf8().ok()?;
        let env = param("env").unwrap_or_else(|| "default".into());
        return Some((Some(env), app.into_owned()));
    }
    if *method == Method::GET {
        if path == "/api/v1/events" {
            return Some((param("env"), param("app")?));
        }
        return None;
    }
    if *method == Method::POST && matches!(path, "/api/v1/gates/flagger" | "/api/v1/gates/flagger/rollback") {
        let request = super::gates::parse(axum::Json::from_bytes(body)).ok()?;
        return Some((Some(request.env), request.app));
    }
    None
}

/// Whether this replica knows the app: has seen it, learned it from an imported history, or
/// judges a canary of it.
async fn is_known_here(state: &ApiState, (env, app): AppScope) -> bool {
    let known = state
        .engine
        .read_analyses(move |engine| match &env {
            Some(env) => {
                engine.catalog().app(env, &app).is_some()
                    || engine.analysis(env, &app).is_some()
                    || engine.learned_only_apps().contains(&(env.as_str(), app.as_str()))
            }
            None => {
                engine.catalog().apps().any(|(_, a, _)| a == app)
                    || engine.learned_only_apps().iter().any(|(_, a)| *a == app)
            }
        })
        .await;
    // A stopping engine: answered here (503) rather than relayed.
    known.unwrap_or(true)
}

/// The layer: a read about an app this replica does not know is relayed to the peer that knows
/// it, an action on its analysis to the peer judging it; a forwarded request is answered from
/// here, saying whether the app is known here.
pub async fn answer_for_peers(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(peers) = state.peers.clone() else {
        return next.run(request).await;
    };
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_RELAYED_BODY).await {
        Ok(body) => body,
        Err(e) => {
            return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}"))
                .into_response();
        }
    };
    let scope = app_scope(&parts.method, parts.uri.path(), parts.uri.query(), &body);
    let forwarded = is_forwarded(&parts.headers);
    let here = match &scope {
        Some(scope) => is_known_here(&state, scope.clone()).await,
        None => true,
    };
    if forwarded || here {
        let mut response = next.run(Request::from_parts(parts, Body::from(body))).await;
        if forwarded {
            let flag = HeaderValue::from_static(if here { "1" } else { "0" });
            response.headers_mut().insert(APP_HERE, flag);
        }
        response.headers_mut().insert(REPLICA, peers.replica.clone());
        return response;
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    // An action is taken by one replica, the one judging the app: never by every peer that
    // happens to know it.
    let acts = !(parts.method == Method::GET || parts.uri.path().starts_with("/api/v1/gates/"));
    let (answers, unanswered) = match (acts, &scope) {
        (true, Some(scope)) => match peers.owner_of(scope, &parts.headers).await {
            Ok(Some(owner)) => {
                peers
                    .ask_at(
                        vec![owner],
                        Vec::new(),
                        &parts.method,
                        &path_and_query,
                        &parts.headers,
                        body.clone(),
                    )
                    .await
            }
            Ok(None) => (Vec::new(), Vec::new()),
            Err(unanswered) => (Vec::new(), unanswered),
        },
        _ => {
            peers
                .ask(&parts.method, &path_and_query, &parts.headers, body.clone())
                .await
        }
    };
    let mut knowing: Vec<PeerAnswer> = answers.into_iter().filter(PeerAnswer::app_here).collect();
    if knowing.len() > 1
        && let Some(scope) = &scope
        && let Ok(Some(owner)) = peers.owner_of(scope, &parts.headers).await
    {
        // More than one replica knows the app (its routing changed): the one judging it now.
        knowing.sort_by_key(|answer| answer.peer != owner);
    }
    if let Some(answer) = knowing.into_iter().next() {
        return relay(answer);
    }
    if !unanswered.is_empty() {
        let (_, app) = scope.unwrap_or_default();
        return unanswered_response(&app, &unanswered);
    }
    // No replica knows it: this one's own answer (a 404 naming the app, an empty history...).
    let mut response = next.run(Request::from_parts(parts, Body::from(body))).await;
    response.headers_mut().insert(REPLICA, peers.replica.clone());
    response
}

/// A peer's answer, passed on as it came, saying who gave it.
fn relay(answer: PeerAnswer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = answer.status;
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL, REPLICA] {
        if let Some(value) = answer.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    if let Ok(peer) = HeaderValue::from_str(&answer.peer) {
        response.headers_mut().insert(ANSWERED_BY, peer);
    }
    response
}

/// 502 for a read about an app no answering replica knows while some did not answer: the app may
/// be theirs.
fn unanswered_response(app: &str, unanswered: &[UnansweredPeer]) -> Response {
    let names: Vec<&str> = unanswered.iter().map(|u| u.peer.as_str()).collect();
    let detail = format!(
        "app {app:?} is not known to this replica nor to any peer that answered; {} did not answer: {}",
        if names.len() == 1 {
            "this peer"
        } else {
            "these peers"
        },
        names.join(", ")
    );
    let body = serde_json::json!({
        "type": "about:blank",
        "title": "Bad Gateway",
        "status": 502,
        "detail": detail,
        "error": detail,
        "unanswered_peers": unanswered,
    });
    let mut response = (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_list_is_host_port_entries_and_a_bad_one_is_named() {
        let list: PeerList = "canaryd-0.canaryd:8080, http://10.0.0.2:8080/,[::1]:9000"
            .parse()
            .expect("parses");
        assert_eq!(list.0, ["canaryd-0.canaryd:8080", "10.0.0.2:8080", "[::1]:9000"]);
        for bad in ["canaryd", "a:0", ":8080", "a:http", "https://a/b:80"] {
            let error = bad.parse::<PeerList>().expect_err(bad);
            assert!(error.contains(bad), "{error}");
        }
        assert!("".parse::<PeerList>().expect("empty").is_empty());
    }

    #[test]
    fn reads_about_one_app_are_relayed_and_others_are_not() {
        let get = Method::GET;
        assert_eq!(
            app_scope(&get, "/api/v1/apps/shop%2Fcart/canary", Some("env=prod"), b""),
            Some((Some("prod".into()), "shop/cart".into()))
        );
        assert_eq!(
            app_scope(&get, "/api/v1/apps/shop/baseline", None, b""),
            Some((Some("default".into()), "shop".into()))
        );
        assert_eq!(
            app_scope(&get, "/api/v1/events", Some("app=shop&limit=5"), b""),
            Some((None, "shop".into()))
        );
        assert_eq!(app_scope(&get, "/api/v1/events", Some("limit=5"), b""), None);
        assert_eq!(app_scope(&get, "/api/v1/apps", None, b""), None);
        assert_eq!(
            app_scope(&Method::PUT, "/api/v1/apps/shop/rollout", Some("env=prod"), b""),
            Some((Some("prod".into()), "shop".into()))
        );
        assert_eq!(
            app_scope(&Method::POST, "/api/v1/apps/shop/canary/pause", None, b""),
            Some((Some("default".into()), "shop".into()))
        );
        assert_eq!(
            app_scope(&Method::POST, "/api/v1/apps/shop/rollout", None, b""),
            None
        );
        assert_eq!(
            app_scope(&Method::GET, "/api/v1/apps/shop/versions", None, b""),
            None
        );
        let gate = br#"{"name": "shop", "namespace": "prod", "phase": "Progressing"}"#;
        let scope = app_scope(&Method::POST, "/api/v1/gates/flagger", None, gate);
        assert_eq!(scope.map(|(_, app)| app), Some("shop".into()));
    }
}
