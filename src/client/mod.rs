//! The commands that talk to a running daemon (`canaryd gate`, `canaryd rollout ...`, `canaryd
//! events tail`): its HTTP API and its Watch stream, retried with backoff while the daemon cannot
//! be reached, with the token read from the environment or a file, never from a flag.
//!
//! Every command exits with the same codes (`Exit`): 0 passed (or done), 1 failed (or refused), 2
//! not decided by the deadline, 3 a usage error or a daemon that could not be reached.

pub mod gate;
pub mod operate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::serve::watch::proto::WatchRequest;
use crate::serve::watch::proto::event_service_client::EventServiceClient;

/// How a command ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Passed, promoted, or done as asked.
    Passed = 0,
    /// Failed, rolled back, or refused by the daemon.
    Failed = 1,
    /// Not decided by the deadline: timed out, or still without enough data.
    Undecided = 2,
    /// A usage error, or no daemon to be reached after retrying.
    Usage = 3,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach canaryd at {url} (retried for {retried:?}): {reason}")]
    Unreachable {
        url: String,
        retried: Duration,
        reason: String,
    },
    #[error("canaryd answered {status} to {method} {path}: {message}")]
    Refused {
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
    },
    #[error("canaryd's answer to {path} is not what this client reads: {reason}")]
    Unreadable { path: String, reason: String },
}

impl ClientError {
    /// The exit code this error ends a command with.
    pub fn exit(&self) -> Exit {
        match self {
            ClientError::Usage(_) | ClientError::Unreachable { .. } => Exit::Usage,
            ClientError::Refused { .. } | ClientError::Unreadable { .. } => Exit::Failed,
        }
    }

    /// Whether the daemon answered this with a 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

/// Where the daemon is and how to ask it.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    /// The daemon's HTTP API, e.g. http://canaryd:8080
    #[arg(long, env = "CANARYD_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The daemon's gRPC port (its Watch stream, on the OTLP gRPC listener); by default the
    /// server's host on port 4317
    #[arg(long, env = "CANARYD_GRPC")]
    pub grpc: Option<String>,
    /// A file holding the API token (else CANARYD_TOKEN is used; there is no flag for the token
    /// itself, since flags show in `ps`)
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// How long to keep retrying, with backoff, a daemon that cannot be reached before giving up
    /// (exit 3)
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub retry_for: Duration,
}

/// A daemon's API and Watch stream.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    server: url::Url,
    grpc: String,
    token: Option<String>,
    retry_for: Duration,
}

/// Reads the token: the file's first line when a file is named, else `CANARYD_TOKEN`.
pub fn token(file: Option<&Path>, env_token: Option<String>) -> Result<Option<String>, ClientError> {
    let token = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ClientError::Usage(format!("--token-file {}: cannot read it: {e}", path.display()))
            })?;
            Some(text.lines().next().unwrap_or_default().trim().to_owned())
        }
        None => env_token.map(|t| t.trim().to_owned()),
    };
    Ok(token.filter(|t| !t.is_empty()))
}

impl Client {
    pub fn new(args: &ServerArgs, token: Option<String>) -> Result<Client, ClientError> {
        let mut server = url::Url::parse(&args.server)
            .map_err(|e| ClientError::Usage(format!("--server {:?}: {e}", args.server)))?;
        if !matches!(server.scheme(), "http" | "https") || server.host_str().is_none() {
            return Err(ClientError::Usage(format!(
                "--server {:?}: an http:// or https:// URL with a host is needed",
                args.server
            )));
        }
        if !server.path().ends_with('/') {
            server.set_path(&format!("{}/", server.path()));
        }
        let grpc = match &args.grpc {
            Some(grpc) => {
                let parsed =
                    url::Url::parse(grpc).map_err(|e| ClientError::Usage(format!("--grpc {grpc:?}: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(ClientError::Usage(format!(
                        "--grpc {grpc:?}: an http:// or https:// URL is needed"
                    )));
                }
                grpc.clone()
            }
            None => format!(
                "{}://{}:4317",
                server.scheme(),
                server.host_str().unwrap_or("127.0.0.1")
            ),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot build an HTTP client: {e}")))?;
        Ok(Client {
            http,
            server,
            grpc,
            token,
            retry_for: args.retry_for,
        })
    }

    pub fn server(&self) -> &str {
        self.server.as_str()
    }

    /// `GET path` as JSON, retried while the daemon cannot be reached or is not ready.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// A request with an optional JSON body; the answer as JSON. A 4xx is final; an unreachable
    /// daemon or a 5xx is retried with backoff for `retry_for`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ClientError> {
        let url = self
            .server
            .join(path.trim_start_matches('/'))
            .map_err(|e| ClientError::Usage(format!("{path}: {e}")))?;
        let started = Instant::now();
        let mut backoff = Backoff::default();
        loop {
            let mut request = self.http.request(method.clone(), url.clone());
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let reason = match request.send().await {
                Ok(response) if response.status().is_server_error() => {
                    format!("{} {}", response.status(), message_of(response).await)
                }
                Ok(response) if !response.status().is_success() => {
                    let status = response.status();
                    return Err(ClientError::Refused {
                        method,
                        path: path.to_owned(),
                        status,
                        message: message_of(response).await,
                    });
                }
                Ok(response) => {
                    return response.json().await.map_err(|e| ClientError::Unreadable {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    });
                }
                Err(e) => crate::error_chain(&e),
            };
            if started.elapsed() >= self.retry_for {
                return Err(ClientError::Unreachable {
                    url: url.to_string(),
                    retried: self.retry_for,
                    reason,
                });
            }
            tracing::debug!(%url, %reason, "retrying");
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// The Watch stream of `env`/`app` from after `after_id` (empty: from now on), followed across
    /// reconnections.
    pub fn follow(&self, env: &str, app: &str, after_id: &str) -> Follower<'_> {
        Follower {
            client: self,
            env: env.to_owned(),
            app: app.to_owned(),
            last_id: after_id.to_owned(),
            stream: None,
            backoff: Backoff::default(),
            unreachable_since: None,
        }
    }
}

/// A Watch stream that outlives the daemon's restarts: when the stream ends or breaks it reconnects
/// with backoff and resumes after the last event it returned, so nothing is missed or repeated;
/// it gives up once the daemon has been unreachable for the client's `retry_for`.
pub struct Follower<'a> {
    client: &'a Client,
    env: String,
    app: String,
    last_id: String,
    stream: Option<tonic::Streaming<WatchedEvent>>,
    backoff: Backoff,
    unreachable_since: Option<Instant>,
}

pub use crate::serve::watch::proto::Event as WatchedEvent;

impl Follower<'_> {
    /// The next event. Cancel-safe: dropped mid-wait, it loses nothing.
    pub async fn next(&mut self) -> Result<WatchedEvent, ClientError> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                self.connect().await?;
                continue;
            };
            match stream.message().await {
                Ok(Some(event)) => {
                    self.last_id = event.id.clone();
                    return Ok(event);
                }
                // The daemon went away (a restart): reconnect after the last id seen.
                Ok(None) | Err(_) => self.stream = None,
            }
        }
    }

    async fn connect(&mut self) -> Result<(), ClientError> {
        let grpc = self.client.grpc.clone();
        let reason = match EventServiceClient::connect(grpc.clone()).await {
            Ok(mut client) => {
                let request = WatchRequest {
                    env: self.env.clone(),
                    app: self.app.clone(),
                    types: Vec::new(),
                    after_id: self.last_id.clone(),
                };
                match client.watch(request).await {
                    Ok(stream) => {
                        self.stream = Some(stream.into_inner());
                        self.unreachable_since = None;
                        self.backoff.reset();
                        return Ok(());
                    }
                    Err(status) => format!("{}: {}", status.code(), status.message()),
                }
            }
            Err(e) => crate::error_chain(&e),
        };
        let since = *self.unreachable_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.client.retry_for {
            return Err(ClientError::Unreachable {
                url: grpc,
                retried: self.client.retry_for,
                reason,
            });
        }
        tokio::time::sleep(self.backoff.next()).await;
        Ok(())
    }
}

/// Waits between retries: 250 ms, doubling to 5 s.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(250))
    }
}

impl Backoff {
    pub(crate) fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        wait
    }

    pub(crate) fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// What an error answer says: its problem `detail` or `error`, else its text.
async fn message_of(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("detail")
                .or_else(|| v.get("error"))
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or(text)
}

/// `app` as a path segment.
pub(crate) fn segment(app: &str) -> String {
    url::form_urlencoded::byte_serialize(app.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// `key=value&...` with the values encoded.
pub(crate) fn query(pairs: &[(&str, &str)]) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        out.append_pair(k, v);
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(server: &str) -> ServerArgs {
        ServerArgs {
            server: server.into(),
            grpc: None,
            token_file: None,
            retry_for: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_watch_is_on_the_servers_host_at_4317_unless_named() {
        let client = Client::new(&args("http://canaryd.prod:8080"), None).expect("valid");
        assert_eq!(client.grpc, "http://canaryd.prod:4317");
        assert_eq!(client.server(), "http://canaryd.prod:8080/");
        let bad = Client::new(&args("canaryd:8080"), None).expect_err("no scheme");
        assert_eq!(bad.exit(), Exit::Usage);
        assert!(bad.to_string().contains("--server"), "{bad}");
    }

    #[test]
    fn the_token_comes_from_the_file_first_then_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").expect("write");
        assert_eq!(
            token(Some(&file), Some("env".into())).expect("reads"),
            Some("s3cret".into())
        );
        assert_eq!(
            token(None, Some(" env ".into())).expect("reads"),
            Some("env".into())
        );
        assert_eq!(token(None, Some(String::new())).expect("reads"), None);
        let missing = token(Some(&dir.path().join("nope")), None).expect_err("no such file");
        assert!(missing.to_string().contains("--token-file"), "{missing}");
    }

    #[test]
    fn app_names_are_encoded_as_one_segment() {
        assert_eq!(segment("shop/api v2"), "shop%2Fapi%20v2");
        assert_eq!(query(&[("env", "prod & test")]), "env=prod+%26+test");
    }
}
