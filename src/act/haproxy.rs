//! The HAProxy action: a canary's traffic weight set through HAProxy's runtime API.
//!
//! An `haproxy` subscription's URL is the runtime API socket (`tcp://host:port` or
//! `unix:///path/to/admin.sock`, a `stats socket ... level admin`). For each event carrying a
//! `set_weight` action (canary failed: 0; stage passed: the next stage's weight; promoted: 100), the
//! `haproxy_servers` setting says which `backend/server` serves that (env, app, version), and
//! optionally which server carries the stable version, which then gets the rest (100 - weight).
//! Each command goes over its own connection (the runtime API's one-shot mode), then `get weight`
//! reads the weight back: the action counts as done only once HAProxy reports it.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::outbound::OutboundPolicy;
use crate::events::Event;

/// Where one app's canary is served: `env/app/version=backend/server[+stable_server]`, `*` for
/// any version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaproxyTarget {
    pub env: String,
    pub app: String,
    /// `None` matches any version.
    pub version: Option<String>,
    pub backend: String,
    pub server: String,
    /// The server of the stable version, set to `100 - weight` alongside.
    pub stable_server: Option<String>,
}

/// The `haproxy_servers` setting: targets separated by commas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HaproxyServers(pub Vec<HaproxyTarget>);

impl FromStr for HaproxyServers {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut targets = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (key, server) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?}: expected env/app/version=backend/server"))?;
            let parts: Vec<&str> = key.split('/').collect();
            let [env, app, version] = parts[..] else {
                return Err(format!(
                    "{entry:?}: the left side must be env/app/version (version may be *)"
                ));
            };
            let (backend, servers) = server
                .split_once('/')
                .ok_or_else(|| format!("{entry:?}: the right side must be backend/server"))?;
            let (server, stable_server) = match servers.split_once('+') {
                Some((canary, stable)) => (canary, Some(stable)),
                None => (servers, None),
            };
            let names = [env, app, version, backend, server];
            if names.iter().any(|n| n.is_empty()) || stable_server.is_some_and(str::is_empty) {
                return Err(format!("{entry:?}: every name must be non-empty"));
            }
            // The names go into runtime API commands: nothing that could end or extend one.
            let bad = |n: &str| n.chars().any(|c| c.is_whitespace() || c.is_control() || c == ';');
            if [backend, server].into_iter().chain(stable_server).any(bad) {
                return Err(format!(
                    "{entry:?}: backend and server names cannot hold spaces or ';'"
                ));
            }
            targets.push(HaproxyTarget {
                env: env.to_owned(),
                app: app.to_owned(),
                version: (version != "*").then(|| version.to_owned()),
                backend: backend.to_owned(),
                server: server.to_owned(),
                stable_server: stable_server.map(str::to_owned),
            });
        }
        Ok(HaproxyServers(targets))
    }
}

impl<'de> serde::Deserialize<'de> for HaproxyServers {
    /// A TOML string (`"a/b/*=be/canary, ..."`) or an array of such strings.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::comma_separated(d)
    }
}

impl HaproxyServers {
    /// The target of (env, app, version): an exact version first, else a `*` entry.
    pub fn find(&self, env: &str, app: &str, version: &str) -> Option<&HaproxyTarget> {
        let of_app = || self.0.iter().filter(|t| t.env == env && t.app == app);
        of_app()
            .find(|t| t.version.as_deref() == Some(version))
            .or_else(|| of_app().find(|t| t.version.is_none()))
    }
}

/// A runtime API socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        if let Some(addr) = url.strip_prefix("tcp://") {
            let addr = addr.trim_end_matches('/');
            if addr
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                return Err(format!("{url:?}: expected tcp://host:port"));
            }
            Ok(Endpoint::Tcp(addr.to_owned()))
        } else if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("{url:?}: expected unix:///absolute/path"));
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else {
            Err(format!(
                "{url:?}: an haproxy subscription's url is its runtime API socket, tcp://host:port or unix:///path"
            ))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    #[error("cannot reach the runtime API at {endpoint}: {source}")]
    Io {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("the runtime API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("HAProxy refused {command:?}: {answer}")]
    Refused { command: String, answer: String },
    #[error("HAProxy reports weight {got:?} for {server} after setting it to {wanted}")]
    NotApplied {
        server: String,
        wanted: u32,
        got: String,
    },
    #[error("the runtime API's answer ran past {0} bytes; a runtime API answers these commands in a line")]
    AnswerTooLong(u64),
    #[error("HAProxy's map {map} does not hold the route after applying it: {detail}")]
    MapNotApplied { map: String, detail: String },
    #[error("{0}")]
    Unroutable(String),
    #[error("no haproxy_servers or haproxy_maps entry for {env}/{app}/{version}")]
    Unmapped {
        env: String,
        app: String,
        version: String,
    },
}

/// The most of an answer read: the commands canaryd sends are answered in a line, so a peer that
/// sends more (or streams without closing) is not HAProxy, and is not buffered.
pub const MAX_ANSWER_BYTES: u64 = 16 * 1024;

/// Sends one command and reads the whole answer (HAProxy closes the connection after it), at most
/// `MAX_ANSWER_BYTES` of it.
pub async fn command(
    endpoint: &Endpoint,
    policy: &OutboundPolicy,
    line: &str,
    timeout: Duration,
) -> Result<String, HaproxyError> {
    command_capped(endpoint, policy, line, timeout, MAX_ANSWER_BYTES).await
}

/// `command`, reading at most `cap` bytes of the answer (a map's listing runs longer than a
/// line).
pub async fn command_capped(
    endpoint: &Endpoint,
    policy: &OutboundPolicy,
    line: &str,
    timeout: Duration,
    cap: u64,
) -> Result<String, HaproxyError> {
    let io = |source| HaproxyError::Io {
        endpoint: format!("{endpoint:?}"),
        source,
    };
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        line: &str,
        cap: u64,
    ) -> std::io::Result<Vec<u8>> {
        stream.write_all(format!("{line}\n").as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(cap + 1).read_to_end(&mut answer).await?;
        Ok(answer)
    }
    let exchange = async {
        let answer = match endpoint {
            Endpoint::Tcp(addr) => {
                // Only to addresses the policy allows, whatever the name resolves to.
                let (host, port) = addr
                    .rsplit_once(':')
                    .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
                    .ok_or_else(|| io(std::io::Error::other("expected host:port")))?;
                let addrs = policy.resolve(host, port).await.map_err(io)?;
                let stream = tokio::net::TcpStream::connect(&addrs[..]).await.map_err(io)?;
                exchange(stream, line, cap).await.map_err(io)?
            }
            Endpoint::Unix(path) => {
                policy
                    .check_socket(path)
                    .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e)))?;
                let stream = tokio::net::UnixStream::connect(path).await.map_err(io)?;
                exchange(stream, line, cap).await.map_err(io)?
            }
        };
        if answer.len() as u64 > cap {
            return Err(HaproxyError::AnswerTooLong(cap));
        }
        Ok(String::from_utf8_lossy(&answer).trim().to_owned())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HaproxyError::Timeout(timeout))?
}

/// `backend/server`'s current weight, as `get weight` reports it (`<current> (initial <n>)`).
pub async fn get_weight(
    endpoint: &Endpoint,
    policy: &OutboundPolicy,
    backend: &str,
    server: &str,
    timeout: Duration,
) -> Result<u32, HaproxyError> {
    let line = format!("get weight {backend}/{server}");
    let got = command(endpoint, policy, &line, timeout).await?;
    got.split_whitespace()
        .next()
        .and_then(|w| w.parse::<u32>().ok())
        .ok_or(HaproxyError::Refused {
            command: line,
            answer: got,
        })
}

/// Sets `backend/server`'s weight and reads it back.
pub async fn set_weight(
    endpoint: &Endpoint,
    policy: &OutboundPolicy,
    backend: &str,
    server: &str,
    weight: u32,
    timeout: Duration,
) -> Result<(), HaproxyError> {
    let set = format!("set server {backend}/{server} weight {weight}");
    let answer = command(endpoint, policy, &set, timeout).await?;
    if !answer.is_empty() {
        return Err(HaproxyError::Refused { command: set, answer });
    }
    // `get weight` answers "<current> (initial <initial>)".
    let got = command(
        endpoint,
        policy,
        &format!("get weight {backend}/{server}"),
        timeout,
    )
    .await?;
    let current = got.split_whitespace().next().and_then(|w| w.parse::<u32>().ok());
    if current != Some(weight) {
        return Err(HaproxyError::NotApplied {
            server: format!("{backend}/{server}"),
            wanted: weight,
            got,
        });
    }
    Ok(())
}

/// One weight to set: (backend, server, weight).
pub type WeightStep = (String, String, u32);

/// What acting on `event` means: `None` when it carries no traffic action (or is a dry run),
/// else the weights to set, the canary's first.
pub fn plan(event: &Event, servers: &HaproxyServers) -> Option<Result<Vec<WeightStep>, HaproxyError>> {
    let action = event.data.action.as_ref()?;
    if event.data.dry_run || action.kind != "set_weight" {
        return None;
    }
    let Some(target) = servers.find(&event.data.env, &action.app, &action.version) else {
        return Some(Err(HaproxyError::Unmapped {
            env: event.data.env.clone(),
            app: action.app.clone(),
            version: action.version.clone(),
        }));
    };
    let weight = action.weight.min(100);
    let mut steps = vec![(target.backend.clone(), target.server.clone(), weight)];
    if let Some(stable) = &target.stable_server {
        steps.push((target.backend.clone(), stable.clone(), 100 - weight));
    }
    Some(Ok(steps))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that is not HAProxy and streams without end is read no further than the cap: the
    /// command fails at once instead of buffering until the timeout (it once buffered gigabytes).
    #[tokio::test]
    async fn an_endless_answer_is_cut_off_at_the_cap() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let peer = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let chunk = vec![b'x'; 64 * 1024];
            // Until canaryd hangs up.
            while stream.write_all(&chunk).await.is_ok() {}
        });
        let answer = command(
            &Endpoint::Tcp(addr.to_string()),
            &OutboundPolicy::new(crate::act::outbound::OutboundAllow::loopback()),
            "get weight b/s",
            Duration::from_secs(30),
        )
        .await;
        assert!(
            matches!(answer, Err(HaproxyError::AnswerTooLong(MAX_ANSWER_BYTES))),
            "{answer:?}"
        );
        peer.await.expect("the peer sees the connection closed");
    }

    /// The runtime API is an outbound target like a webhook: a name that resolves to a restricted
    /// address, or a unix socket not named in `outbound_allow`, is never connected to.
    #[tokio::test]
    async fn a_restricted_runtime_api_is_never_connected_to() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let strict = OutboundPolicy::default();
        let by_name = command(
            &Endpoint::Tcp(format!("localhost:{port}")),
            &strict,
            "get weight b/s",
            Duration::from_secs(30),
        )
        .await;
        assert!(
            matches!(&by_name, Err(HaproxyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::PermissionDenied),
            "{by_name:?}"
        );
        // A connection made would be waiting in the backlog by now.
        assert!(
            tokio::time::timeout(Duration::ZERO, listener.accept())
                .await
                .is_err(),
            "connected to a restricted address"
        );
        let socket = command(
            &Endpoint::Unix("/var/run/docker.sock".into()),
            &strict,
            "get weight b/s",
            Duration::from_secs(30),
        )
        .await;
        assert!(
            matches!(&socket, Err(HaproxyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::PermissionDenied),
            "{socket:?}"
        );
    }

    #[test]
    fn targets_parse_and_match_exact_versions_first() {
        let servers: HaproxyServers = "prod/shop/*=shop/canary+stable, prod/shop/2.8.0=shop/c28"
            .parse()
            .expect("valid");
        assert_eq!(
            servers.find("prod", "shop", "2.8.0").expect("exact").server,
            "c28"
        );
        let any = servers.find("prod", "shop", "3.0.0").expect("wildcard");
        assert_eq!(any.server, "canary");
        assert_eq!(any.stable_server.as_deref(), Some("stable"));
        assert!(servers.find("dev", "shop", "2.8.0").is_none());
        for bad in [
            "prod/shop=shop/canary",
            "prod/shop/*=shop",
            "prod/shop/*=shop/can ary",
            "prod/shop/*=shop/canary;x",
            "prod//*=shop/canary",
        ] {
            assert!(bad.parse::<HaproxyServers>().is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_are_tcp_or_unix_sockets() {
        assert_eq!(
            "tcp://127.0.0.1:9999".parse::<Endpoint>(),
            Ok(Endpoint::Tcp("127.0.0.1:9999".into()))
        );
        assert_eq!(
            "unix:///run/haproxy/admin.sock".parse::<Endpoint>(),
            Ok(Endpoint::Unix("/run/haproxy/admin.sock".into()))
        );
        for bad in ["http://127.0.0.1:9999", "tcp://127.0.0.1", "unix://relative.sock"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
