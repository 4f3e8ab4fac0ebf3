//! Configuration: defaults, a TOML file, `CANARYD_*` environment variables and flags, in rising
//! precedence, validated in one step before anything is bound or opened.
//!
//! Each setting is declared once, in `settings!`, which gives it a TOML key, an environment
//! variable (`CANARYD_` + the key in upper case) and a flag (`--` + the key with dashes). Every
//! source is read into the same `RawConfig` of optional values; the sources are laid over each
//! other; `Config::resolve` applies the defaults and checks every value, naming the field and the
//! value it refuses. The environment is passed in, never read here, so tests need not touch the
//! process environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use canaryd_engine::anomaly::AnomalyRules;
use canaryd_engine::baseline::{BaselineConfig, RangeConfig};
use canaryd_engine::window::WindowConfig;
use canaryd_engine::{EngineConfig, Limits};

use crate::act::delivery::DeliveryConfig;
use crate::act::outbound::OutboundAllow;
use crate::normalize::NormalizeOptions;

/// Why a configuration was refused. Every variant names the field and, where there is one, the
/// value and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error(transparent)]
    Models(#[from] crate::models::ModelsError),
    #[error("invalid value {value:?} for {field} (from {origin}): {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        origin: String,
        reason: String,
    },
}

/// Declares every setting once: its type and doc. Expands to `RawConfig`, whose fields are all
/// optional, with its TOML, environment and flag readers.
macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $(#[arg($($arg:tt)*)])* $name:ident : $ty:ty, )*) => {
        /// Settings as one source gave them; `None` where that source is silent.
        #[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct RawConfig {
            $(
                $(#[doc = $doc])*
                #[arg(long)]
                $(#[arg($($arg)*)])*
                pub $name: Option<$ty>,
            )*
        }

        impl RawConfig {
            /// The TOML keys, which are also the environment variables' and flags' stems.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($name)),*];

            /// Reads `CANARYD_<KEY>` variables from `env`.
            pub fn from_env(env: &BTreeMap<String, String>) -> Result<RawConfig, ConfigError> {
                let mut raw = RawConfig::default();
                $(
                    let var = env_var_name(stringify!($name));
                    if let Some(text) = env.get(&var) {
                        raw.$name = Some(text.parse::<$ty>().map_err(|e| ConfigError::Invalid {
                            field: stringify!($name),
                            value: text.clone(),
                            origin: format!("environment variable {var}"),
                            reason: e.to_string(),
                        })?);
                    }
                )*
                Ok(raw)
            }

            /// The built-in defaults: each setting's `[default: ...]`, written once in its doc
            /// (which is also its `--help` text), parsed as its environment variable would be;
            /// `none` leaves it unset.
            pub fn defaults() -> Result<RawConfig, ConfigError> {
                let mut raw = RawConfig::default();
                $(
                    let doc = concat!($($doc, " "),*);
                    match default_in(doc) {
                        Some("none") => {}
                        Some(text) => {
                            raw.$name = Some(text.parse::<$ty>().map_err(|e| ConfigError::Invalid {
                                field: stringify!($name),
                                value: text.to_owned(),
                                origin: "its built-in default".to_owned(),
                                reason: e.to_string(),
                            })?);
                        }
                        None => {
                            return Err(ConfigError::Invalid {
                                field: stringify!($name),
                                value: String::new(),
                                origin: "its built-in default".to_owned(),
                                reason: "its doc names no [default: ...]".to_owned(),
                            });
                        }
                    }
                )*
                Ok(raw)
            }

            /// `over`'s values where it has them, `self`'s elsewhere.
            pub fn overlaid_with(self, over: RawConfig) -> RawConfig {
                RawConfig { $($name: over.$name.or(self.$name),)* }
            }

            /// The settings this one gives a value.
            pub fn given(&self) -> Vec<&'static str> {
                let mut out = Vec::new();
                $(
                    if self.$name.is_some() {
                        out.push(stringify!($name));
                    }
                )*
                out
            }

            /// The settings `other` gives a value that differs from this one's.
            pub fn differing(&self, other: &RawConfig) -> Vec<&'static str> {
                let mut out = Vec::new();
                $(
                    if other.$name.is_some() && other.$name != self.$name {
                        out.push(stringify!($name));
                    }
                )*
                out
            }
        }
    };
}

/// The text of `[default: ...]` in a setting's doc.
fn default_in(doc: &str) -> Option<&str> {
    let start = doc.rfind("[default: ")? + "[default: ".len();
    let len = doc[start..].find(']')?;
    Some(doc[start..start + len].trim())
}

/// A setting's value once the defaults are laid under what was given.
fn set<T>(value: Option<T>, field: &'static str) -> Result<T, ConfigError> {
    value.ok_or_else(|| ConfigError::Invalid {
        field,
        value: String::new(),
        origin: "its built-in default".to_owned(),
        reason: "has no value".to_owned(),
    })
}

settings! {
    /// Where sled keeps its files, and where addrs.json is written [default: ./data]
    data_dir: PathBuf,
    /// OTLP gRPC listen address; port 0 picks a free port [default: 127.0.0.1:4317]
    otlp_grpc_addr: SocketAddr,
    /// OTLP/HTTP listen address [default: 127.0.0.1:4318]
    otlp_http_addr: SocketAddr,
    /// HTTP API, dashboard and /metrics listen address [default: 127.0.0.1:8080]
    http_addr: SocketAddr,
    /// Folder of analysis models (*.toml) [default: ./models]
    models_dir: PathBuf,
    /// Bearer token that POST, PUT and DELETE on the API must carry [default: none]
    api_token: String,
    /// Bearer token for reading subscriptions and deliveries and for Flagger's gates (api_token works too) [default: none]
    api_read_token: String,
    /// Serve the API on an address other than loopback without api_token [default: false]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    insecure_no_auth: bool,
    /// Resource attribute that names the version [default: service.version]
    version_attribute: String,
    /// Span attribute that names a request's cohort (beta users, a region, a client): a canary's span checks (errors, latency, operation mix, call graph, exceptions) are also run per cohort, so a version failing for one cohort only is caught and the cohort named; "" turns it off [default: canary.cohort]
    cohort_attribute: String,
    /// Largest OTLP request accepted, in bytes after decompression [default: 8388608]
    max_message_bytes: usize,
    /// Most spans, data points or log records in one OTLP request, counted before decoding [default: 100000]
    max_items_per_request: u64,
    /// Memory OTLP requests may take from arrival until the engine has ingested them; it bounds the requests in flight. The default keeps the whole daemon under 512 MiB under any input, with the sled cache and learned state beside it [default: 268435456]
    ingest_memory_bytes: u64,
    /// Most apps (env and service name pairs) held in memory; past it, the app idle longest gives up its place once idle for app_idle_secs, its state kept in the store, and new apps are dropped until one is [default: 1000]
    max_apps: usize,
    /// Most environments one service name may take of max_apps [default: 20]
    max_envs_per_app: usize,
    /// Most versions tracked per app [default: 20]
    max_versions_per_app: usize,
    /// Most operations tracked per app [default: 200]
    max_operations_per_app: usize,
    /// Most downstreams (call-graph edges) tracked per app [default: 200]
    max_downstreams_per_app: usize,
    /// Most metric streams (series per version and instance) tracked per app [default: 2000]
    max_metric_series_per_app: usize,
    /// Most exception types tracked per app [default: 200]
    max_exception_types_per_app: usize,
    /// Most cohorts (values of cohort_attribute) judged per app; requests of a cohort past it are judged with the app only, and counted as capped [default: 20]
    max_cohorts_per_app: usize,
    /// Longest attribute value kept; longer values are cut [default: 256]
    max_attribute_value_len: usize,
    /// Most point attributes that key a metric series [default: 8]
    max_series_attributes: usize,
    /// Seconds of event time after which an unseen version may give its place to a new one [default: 3600]
    version_idle_secs: u64,
    /// Seconds of event time after which an unseen app may be moved out of memory to make room for a new one; it comes back from the store when seen again [default: 3600]
    app_idle_secs: u64,
    /// Threads (0-1024) that receive and decode OTLP and serve the API: the async runtime's workers, and at most as many requests decoded at once; 0 is one per CPU this process may use (its affinity and cgroup quota). The engine and the store's writes have their own threads beside these [default: 0]
    threads: usize,
    /// Batches that may wait between the receivers and the engine [default: 256]
    pipeline_queue: usize,
    /// Milliseconds (0-60000) a receiver waits for room in that queue before answering "unavailable" [default: 5000]
    ingest_wait_ms: u64,
    /// Share (0-1) of its last second the engine's thread must have been busy for the receivers to sum each resource's observations per second where they read them, taking that work off it. Summing costs more CPU in all than the engine's adding, so it pays only where that one thread limits ingest; 0 sums always, 1 only while the thread is never idle. Past a half, a batch's wait for the engine grows fast with load [default: 0.5]
    receivers_sum_from_engine_busy: f64,
    /// Seconds (1-3600) each shutdown step may take [default: 10]
    shutdown_grace_secs: u64,
    /// Seconds (1-300) a connection may take to send a request's headers (HTTP listeners) [default: 10]
    header_read_timeout_secs: u64,
    /// Seconds (1-3600) a request may take from its headers to its answer, body included [default: 60]
    request_timeout_secs: u64,
    /// Seconds of event time data may arrive behind the latest seen for its app [default: 10]
    allowed_lateness_secs: u64,
    /// Seconds (1-3600) of event time a source (a version's exporter, per instance) may send nothing before the app's buckets stop waiting for it [default: 10]
    source_idle_secs: u64,
    /// Seconds (1-604800) data may be dated ahead of both its app's event time and canaryd's clock; later data is refused [default: 300]
    max_clock_skew_secs: u64,
    /// Length of the evaluation windows baselines learn from, in seconds [default: 60]
    window_secs: u64,
    /// Half-life of the baselines' EWMAs, in seconds of event time [default: 21600]
    baseline_half_life_secs: u64,
    /// Half-life of seasonal memory, in weeks [default: 2]
    seasonal_half_life_weeks: f64,
    /// Windows a baseline must learn before it scores [default: 10]
    baseline_min_samples: u64,
    /// Half-width (0-10) of a third band, the long-memory range of values a series has shown, as a share of the range's width; 0 leaves it out [default: 0.03]
    baseline_range_width: f64,
    /// Band half-widths (1-100) a window must lie outside its baseline to count towards an anomaly [default: 3]
    anomaly_detect_score: f64,
    /// Windows in a row (1-60) at anomaly_detect_score that open an anomaly [default: 2]
    anomaly_detect_windows: u32,
    /// Windows in a row (1-1000) back within one band half-width that close an anomaly [default: 8]
    anomaly_resolve_windows: u32,
    /// Seconds (0-2592000) of event time over which a series' largest recent deviation halves; while it is large, a smaller deviation opens no new anomaly; 0 turns this novelty gate off [default: 0]
    anomaly_novelty_half_life_secs: u64,
    /// Memory the learned baselines may take, in bytes; past it, at each flush, the apps seen least recently (not those whose canary is being judged) move to the store, to come back whole when seen again; 0 is no limit [default: 268435456]
    max_baseline_memory_bytes: u64,
    /// Seconds between flushes of state to disk; at most this much learning is lost to a crash [default: 10]
    flush_interval_secs: u64,
    /// sled's cache, in MiB: what the store keeps of its records in memory. It speeds the store's writer (which writes each flush off the engine's thread), not decisions [default: 16]
    sled_cache_mb: u64,
    /// Memory, in MiB, for the next hour's seasonal slots read ahead of an hour's turn (from 5 minutes before it to 5 after), so that the turn does not read them on the engine's thread; an hour's slots take about 420 bytes a series, and past this the rest are read at the turn, holding decisions meanwhile (about 10 µs a series); 0 reads none ahead [default: 48]
    slots_read_ahead_mb: u64,
    /// Events kept in the history; the oldest go first, but one still to be delivered (pending or parked) is kept for its delivery [default: 100000]
    max_events: usize,
    /// Outbound targets (webhooks, HAProxy sockets) allowed although loopback, private, link-local or cloud-metadata: networks, addresses, host names or unix:///paths, comma-separated; unset allows loopback while http_addr is a loopback address [default: none]
    outbound_allow: OutboundAllow,
    /// Seconds each webhook request may take [default: 10]
    delivery_timeout_secs: u64,
    /// Hours a delivery is retried after its first attempt (or a re-drive); then, parked, it waits for a re-drive [default: 24]
    delivery_max_age_hours: u64,
    /// Seconds (1-86400, at most delivery_max_age_hours) a delivery may keep failing at the head of its subscription's queue before it is parked and later events go on; parked ones are still retried [default: 180]
    delivery_park_after_secs: u64,
    /// HAProxy servers of each canary, for haproxy subscriptions: env/app/version=backend/server[+stable_server], comma-separated, version * for any [default: none]
    haproxy_servers: crate::act::haproxy::HaproxyServers,
    /// HAProxy maps of each app's route (split share, allow-listed users, header rules), for haproxy subscriptions: env/app=/map/prefix[@header:NAME|@cookie:NAME], comma-separated; the prefix as HAProxy loaded <prefix>.split.map, .users.map and .headers.map, after @ where HAProxy's config reads the user id (deploy/haproxy) [default: none]
    haproxy_maps: crate::act::haproxy_maps::HaproxyMaps,
    /// Gateway API HTTPRoute of each app's route, for httproute subscriptions: env/app=namespace/route@stable-service:port+canary-service:port, comma-separated; canaryd owns the route's spec.rules (deploy/kubernetes/components/httproute) [default: none]
    httproutes: crate::act::httproute::HttpRoutes,
    /// Bearer token file httproute subscriptions present to the Kubernetes API server, re-read as it rotates; unset, the pod's service account token when there is one [default: none]
    kubernetes_token_file: PathBuf,
    /// CA bundle (PEM) the Kubernetes API server's certificate must chain to; unset, the pod's service account CA when there is one, else the system's roots [default: none]
    kubernetes_ca_file: PathBuf,
    /// Seconds (1-3600) between comparisons of what the traffic levers hold (HAProxy's maps, HTTPRoutes) with each app's latest route, which put back what a reload or a hand edit changed [default: 10]
    haproxy_reconcile_secs: u64,
    /// The API's base URL as people reach it (https://canaryd.example.com), for the approval links events carry; unset, http:// and http_addr [default: none]
    public_url: String,
    /// Seconds (1-2592000) an approval link works after its event was emitted [default: 86400]
    approval_link_ttl_secs: u64,
    /// Log filter, in tracing's EnvFilter syntax [default: info]
    log: String,
    /// The other replicas' HTTP API addresses (host:port, comma-separated; a host name stands for every address it resolves to, so a headless Service's name lists them all): reads about an app this replica does not judge are answered by the one that does [default: none]
    cluster_peers: crate::serve::peers::PeerList,
}

/// `CANARYD_` + the key in upper case.
pub fn env_var_name(key: &str) -> String {
    format!("CANARYD_{}", key.to_ascii_uppercase())
}

impl RawConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        RawConfig::from_toml(&text, path)
    }

    /// Reads a config file's text; `path` names it in errors.
    pub(crate) fn from_toml(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::ParseFile {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Lays file, environment and flags over each other: flag > env > file.
    pub fn layered(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        flags: RawConfig,
    ) -> Result<RawConfig, ConfigError> {
        let from_file = match file {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        Ok(from_file
            .overlaid_with(RawConfig::from_env(env)?)
            .overlaid_with(flags))
    }

    /// `CANARYD_*` variables in `env` that name no setting: likely typos, worth a warning.
    pub fn unknown_env_vars(env: &BTreeMap<String, String>) -> Vec<String> {
        let known: Vec<String> = RawConfig::KEYS.iter().map(|k| env_var_name(k)).collect();
        env.keys()
            .filter(|k| k.starts_with("CANARYD_") && !known.contains(k))
            .cloned()
            .collect()
    }
}

/// A complete, checked configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub data_dir: PathBuf,
    pub otlp_grpc_addr: SocketAddr,
    pub otlp_http_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub models_dir: PathBuf,
    pub api_token: Option<String>,
    pub api_read_token: Option<String>,
    pub normalize: NormalizeOptions,
    pub engine: EngineConfig,
    pub flush_interval: Duration,
    /// The most the baselines may take in memory before apps are paged out (0: no limit).
    pub max_baseline_memory_bytes: usize,
    pub sled_cache_bytes: u64,
    pub slots_read_ahead_bytes: usize,
    pub max_events: usize,
    pub delivery: DeliveryConfig,
    pub max_message_bytes: usize,
    /// OTLP requests decoded or queued at once, from `ingest_memory_bytes`.
    pub requests_in_flight: usize,
    /// The runtime's worker threads, and the most requests decoded at once.
    pub threads: usize,
    pub pipeline_queue: usize,
    pub ingest_wait: Duration,
    /// The engine thread's busy share from which the receivers sum what they read.
    pub receivers_sum_from_engine_busy: f64,
    pub shutdown_grace: Duration,
    pub http_timeouts: HttpTimeouts,
    /// The base of approval links; unset, the daemon uses `http://` and the address it bound.
    pub public_url: Option<String>,
    pub approval_link_ttl_secs: u64,
    pub log: String,
    /// The other replicas (`serve::peers`); empty for one on its own.
    pub cluster_peers: crate::serve::peers::PeerList,
}

/// Time limits of the HTTP listeners, so that a slow or stalled client cannot hold a connection
/// (and its memory) forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// From a connection's first byte (or the previous request) to the end of a request's headers.
    pub header_read: Duration,
    /// From a request's headers to its answer: reading the body included.
    pub request: Duration,
}

/// What one OTLP request may hold in memory at worst, beside its items: the body as received and
/// inflated.
const REQUEST_BUFFERS: u64 = 2;

/// What a decoded item (a span, data point or log record with its attributes) takes at most, as
/// prost and the normalizer hold it; measured at 150-250 bytes for OTLP's usual shapes.
pub const DECODED_ITEM_BYTES: u64 = 256;

/// How many OTLP requests may be in flight (read, decoded, or queued for the engine) so that even
/// the largest allowed ones stay within `ingest_memory_bytes`.
fn requests_in_flight(budget: u64, max_message_bytes: usize, max_items: u64) -> Result<usize, String> {
    let worst = REQUEST_BUFFERS * max_message_bytes as u64 + max_items.saturating_mul(DECODED_ITEM_BYTES);
    match budget / worst.max(1) {
        0 => Err(format!(
            "cannot hold one request of max_message_bytes ({max_message_bytes}) and max_items_per_request \
             ({max_items}): that takes up to {worst} bytes"
        )),
        n => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
    }
}

/// The delivery settings: a delivery is parked no later than its retries end; outbound targets
/// allowed as `outbound_allow` says, or loopback while the API listens on loopback (`http_addr`).
fn delivery_config(raw: &RawConfig, http_addr: SocketAddr) -> Result<DeliveryConfig, ConfigError> {
    let max_age_hours = within(
        "delivery_max_age_hours",
        set(raw.delivery_max_age_hours, "delivery_max_age_hours")?,
        1..=24 * 30,
    )?;
    let park_after_secs = within(
        "delivery_park_after_secs",
        set(raw.delivery_park_after_secs, "delivery_park_after_secs")?,
        1..=86_400,
    )?;
    if park_after_secs > max_age_hours * 3_600 {
        return Err(invalid(
            "delivery_park_after_secs",
            park_after_secs,
            &format!("must be at most delivery_max_age_hours ({max_age_hours} h)"),
        ));
    }
    let reconcile_secs = within(
        "haproxy_reconcile_secs",
        set(raw.haproxy_reconcile_secs, "haproxy_reconcile_secs")?,
        1..=3_600,
    )?;
    Ok(DeliveryConfig {
        timeout: Duration::from_secs(within(
            "delivery_timeout_secs",
            set(raw.delivery_timeout_secs, "delivery_timeout_secs")?,
            1..=600,
        )?),
        max_age: Duration::from_secs(max_age_hours * 3_600),
        park_after: Duration::from_secs(park_after_secs),
        haproxy_servers: raw.haproxy_servers.clone().unwrap_or_default(),
        haproxy_maps: raw.haproxy_maps.clone().unwrap_or_default(),
        httproutes: raw.httproutes.clone().unwrap_or_default(),
        kube_access: crate::act::httproute::KubeAccess {
            token_file: raw.kubernetes_token_file.clone(),
            ca_file: raw.kubernetes_ca_file.clone(),
        },
        reconcile_every: Duration::from_secs(reconcile_secs),
        // Unset: loopback while the API itself is only reachable from this host.
        outbound_allow: raw.outbound_allow.clone().unwrap_or_else(|| {
            if http_addr.ip().is_loopback() {
                OutboundAllow::loopback()
            } else {
                OutboundAllow::default()
            }
        }),
        ..DeliveryConfig::default()
    })
}

/// Where a value found bad after layering came from, until `Config::load` names its source.
const MERGED: &str = "the merged configuration";

fn invalid(field: &'static str, value: impl ToString, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        origin: MERGED.into(),
        reason: reason.into(),
    }
}

/// `value` when it lies in `range`, else an error naming `field`.
fn within<T: PartialOrd + std::fmt::Display + Copy>(
    field: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        let reason = format!("must be between {} and {}", range.start(), range.end());
        Err(invalid(field, value, &reason))
    }
}

impl Config {
    /// Lays file, environment and flags over each other (flag > env > file > default) and checks
    /// every value; a bad one is named with where it came from (the flag, the variable, the file
    /// or the default).
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        flags: RawConfig,
    ) -> Result<Config, ConfigError> {
        let from_file = file
            .map(|path| RawConfig::from_file(path).map(|raw| (path, raw)))
            .transpose()?;
        Config::from_sources(from_file, env, flags)
    }

    /// `load`, with the config file already read: `file` is its path and what it said.
    pub(crate) fn from_sources(
        file: Option<(&Path, RawConfig)>,
        env: &BTreeMap<String, String>,
        flags: RawConfig,
    ) -> Result<Config, ConfigError> {
        let (file, from_file) = match file {
            Some((path, raw)) => (Some(path), raw),
            None => (None, RawConfig::default()),
        };
        let from_env = RawConfig::from_env(env)?;
        let (by_flag, by_env, by_file) = (flags.given(), from_env.given(), from_file.given());
        let origin = |field: &str| {
            if by_flag.contains(&field) {
                format!("flag --{}", field.replace('_', "-"))
            } else if by_env.contains(&field) {
                format!("environment variable {}", env_var_name(field))
            } else if let (true, Some(path)) = (by_file.contains(&field), file) {
                format!("config file {}", path.display())
            } else {
                "its default".to_owned()
            }
        };
        let raw = from_file.overlaid_with(from_env).overlaid_with(flags);
        Config::resolve(raw).map_err(|e| match e {
            ConfigError::Invalid {
                field,
                value,
                origin: merged,
                reason,
            } if merged == MERGED => ConfigError::Invalid {
                field,
                value,
                origin: origin(field),
                reason,
            },
            e => e,
        })
    }

    /// Applies the defaults to `raw` and checks every value.
    pub fn resolve(raw: RawConfig) -> Result<Config, ConfigError> {
        let raw = RawConfig::defaults()?.overlaid_with(raw);
        let raw_insecure_no_auth = set(raw.insecure_no_auth, "insecure_no_auth")?;
        let delivery = delivery_config(&raw, set(raw.http_addr, "http_addr")?)?;
        let limits = Limits {
            max_apps: within("max_apps", set(raw.max_apps, "max_apps")?, 1..=1_000_000)?,
            max_envs_per_app: within(
                "max_envs_per_app",
                set(raw.max_envs_per_app, "max_envs_per_app")?,
                1..=1_000_000,
            )?,
            max_versions_per_app: within(
                "max_versions_per_app",
                set(raw.max_versions_per_app, "max_versions_per_app")?,
                2..=10_000,
            )?,
            max_operations_per_app: within(
                "max_operations_per_app",
                set(raw.max_operations_per_app, "max_operations_per_app")?,
                1..=1_000_000,
            )?,
            max_downstreams_per_app: within(
                "max_downstreams_per_app",
                set(raw.max_downstreams_per_app, "max_downstreams_per_app")?,
                1..=1_000_000,
            )?,
            max_metric_series_per_app: within(
                "max_metric_series_per_app",
                set(raw.max_metric_series_per_app, "max_metric_series_per_app")?,
                1..=10_000_000,
            )?,
            max_exception_types_per_app: within(
                "max_exception_types_per_app",
                set(raw.max_exception_types_per_app, "max_exception_types_per_app")?,
                1..=1_000_000,
            )?,
            max_cohorts_per_app: within(
                "max_cohorts_per_app",
                set(raw.max_cohorts_per_app, "max_cohorts_per_app")?,
                1..=1_000,
            )?,
            version_idle_ns: set(raw.version_idle_secs, "version_idle_secs")?.saturating_mul(1_000_000_000),
            app_idle_ns: set(raw.app_idle_secs, "app_idle_secs")?.saturating_mul(1_000_000_000),
        };
        let version_attribute = set(raw.version_attribute, "version_attribute")?;
        if version_attribute.trim().is_empty() {
            return Err(invalid(
                "version_attribute",
                &version_attribute,
                "must not be empty",
            ));
        }
        let token = |field: &'static str, value: Option<String>| match value {
            Some(t) if t.trim().is_empty() => Err(invalid(field, "", "must not be empty when set")),
            t => Ok(t),
        };
        let api_token = token("api_token", raw.api_token)?;
        let api_read_token = token("api_read_token", raw.api_read_token)?;
        if api_token.is_some() && api_token == api_read_token {
            return Err(invalid(
                "api_read_token",
                "(the api_token)",
                "must differ from api_token, or it grants everything",
            ));
        }
        let public_url = match raw.public_url {
            Some(url) => {
                let parsed =
                    url::Url::parse(&url).map_err(|e| invalid("public_url", &url, &e.to_string()))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                    return Err(invalid(
                        "public_url",
                        &url,
                        "must be an http:// or https:// URL with a host",
                    ));
                }
                Some(url.trim_end_matches('/').to_owned())
            }
            None => None,
        };
        let data_dir = set(raw.data_dir, "data_dir")?;
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "", "must not be empty"));
        }
        let log = set(raw.log, "log")?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
            return Err(invalid("log", &log, &e.to_string()));
        }
        const NS: u64 = 1_000_000_000;
        let window_secs = within("window_secs", set(raw.window_secs, "window_secs")?, 1..=3_600)?;
        if 3_600 % window_secs != 0 {
            return Err(invalid(
                "window_secs",
                window_secs,
                "must divide an hour (1, 2, 5, 10, 30, 60, ...)",
            ));
        }
        let windows = WindowConfig {
            bucket_ns: NS,
            lateness_ns: within(
                "allowed_lateness_secs",
                set(raw.allowed_lateness_secs, "allowed_lateness_secs")?,
                0..=3_600,
            )? * NS,
            window_ns: window_secs * NS,
            source_idle_ns: within(
                "source_idle_secs",
                set(raw.source_idle_secs, "source_idle_secs")?,
                1..=3_600,
            )? * NS,
            future_skew_ns: within(
                "max_clock_skew_secs",
                set(raw.max_clock_skew_secs, "max_clock_skew_secs")?,
                1..=604_800,
            )? * NS,
        };
        // NaN lies in no range, so it is refused here too.
        let seasonal_half_life_weeks = within(
            "seasonal_half_life_weeks",
            set(raw.seasonal_half_life_weeks, "seasonal_half_life_weeks")?,
            0.1..=520.0,
        )?;
        let baseline = BaselineConfig {
            half_life_ns: within(
                "baseline_half_life_secs",
                set(raw.baseline_half_life_secs, "baseline_half_life_secs")?,
                1..=365 * 86_400,
            )? * NS,
            seasonal_half_life_weeks,
            min_samples: within(
                "baseline_min_samples",
                set(raw.baseline_min_samples, "baseline_min_samples")?,
                1..=1_000_000,
            )?,
            range: RangeConfig::of_width(within(
                "baseline_range_width",
                set(raw.baseline_range_width, "baseline_range_width")?,
                0.0..=10.0,
            )?),
        };
        let anomaly = AnomalyRules {
            detect_score: within(
                "anomaly_detect_score",
                set(raw.anomaly_detect_score, "anomaly_detect_score")?,
                1.0..=100.0,
            )?,
            detect_windows: within(
                "anomaly_detect_windows",
                set(raw.anomaly_detect_windows, "anomaly_detect_windows")?,
                1..=60,
            )?,
            resolve_windows: within(
                "anomaly_resolve_windows",
                set(raw.anomaly_resolve_windows, "anomaly_resolve_windows")?,
                1..=1_000,
            )?,
            novelty_half_life_ns: within(
                "anomaly_novelty_half_life_secs",
                set(
                    raw.anomaly_novelty_half_life_secs,
                    "anomaly_novelty_half_life_secs",
                )?,
                0..=30 * 86_400,
            )? * NS,
            ..AnomalyRules::default()
        };
        let models_dir = set(raw.models_dir, "models_dir")?;
        let models = crate::models::load(&models_dir)?;
        let max_message_bytes = within(
            "max_message_bytes",
            set(raw.max_message_bytes, "max_message_bytes")?,
            1024..=(1 << 30),
        )?;
        let max_items_per_request = within(
            "max_items_per_request",
            set(raw.max_items_per_request, "max_items_per_request")?,
            1..=100_000_000,
        )?;
        let ingest_memory_bytes = within(
            "ingest_memory_bytes",
            set(raw.ingest_memory_bytes, "ingest_memory_bytes")?,
            1 << 20..=1 << 40,
        )?;
        let requests_in_flight =
            requests_in_flight(ingest_memory_bytes, max_message_bytes, max_items_per_request)
                .map_err(|reason| invalid("ingest_memory_bytes", ingest_memory_bytes, &reason))?;
        let http_addr = set(raw.http_addr, "http_addr")?;
        let approval_link_ttl_secs = within(
            "approval_link_ttl_secs",
            set(raw.approval_link_ttl_secs, "approval_link_ttl_secs")?,
            1..=30 * 86_400,
        )?;
        let config = Config {
            data_dir,
            otlp_grpc_addr: set(raw.otlp_grpc_addr, "otlp_grpc_addr")?,
            otlp_http_addr: set(raw.otlp_http_addr, "otlp_http_addr")?,
            http_addr,
            models_dir,
            api_token,
            api_read_token,
            normalize: NormalizeOptions {
                max_items_per_request,
                version_attribute,
                cohort_attribute: Some(set(raw.cohort_attribute, "cohort_attribute")?)
                    .filter(|a| !a.trim().is_empty()),
                max_attribute_value_len: within(
                    "max_attribute_value_len",
                    set(raw.max_attribute_value_len, "max_attribute_value_len")?,
                    16..=65_536,
                )?,
                max_series_attributes: within(
                    "max_series_attributes",
                    set(raw.max_series_attributes, "max_series_attributes")?,
                    0..=64,
                )?,
            },
            engine: EngineConfig {
                limits,
                windows,
                baseline,
                anomaly,
                models,
            },
            flush_interval: Duration::from_secs(within(
                "flush_interval_secs",
                set(raw.flush_interval_secs, "flush_interval_secs")?,
                1..=86_400,
            )?),
            max_baseline_memory_bytes: usize::try_from(within(
                "max_baseline_memory_bytes",
                set(raw.max_baseline_memory_bytes, "max_baseline_memory_bytes")?,
                0..=1 << 44,
            )?)
            .unwrap_or(usize::MAX),
            sled_cache_bytes: within(
                "sled_cache_mb",
                set(raw.sled_cache_mb, "sled_cache_mb")?,
                1..=1 << 20,
            )? << 20,
            slots_read_ahead_bytes: usize::try_from(
                within(
                    "slots_read_ahead_mb",
                    set(raw.slots_read_ahead_mb, "slots_read_ahead_mb")?,
                    0..=1 << 20,
                )? << 20,
            )
            .unwrap_or(usize::MAX),
            max_events: within("max_events", set(raw.max_events, "max_events")?, 1..=100_000_000)?,
            delivery,
            max_message_bytes,
            requests_in_flight,
            threads: match within("threads", set(raw.threads, "threads")?, 0..=1024)? {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
            pipeline_queue: within(
                "pipeline_queue",
                set(raw.pipeline_queue, "pipeline_queue")?,
                1..=1_000_000,
            )?,
            // 0 is allowed: a full queue is then answered "unavailable" at once.
            ingest_wait: Duration::from_millis(within(
                "ingest_wait_ms",
                set(raw.ingest_wait_ms, "ingest_wait_ms")?,
                0..=60_000,
            )?),
            receivers_sum_from_engine_busy: within(
                "receivers_sum_from_engine_busy",
                set(
                    raw.receivers_sum_from_engine_busy,
                    "receivers_sum_from_engine_busy",
                )?,
                0.0..=1.0,
            )?,
            // At least a second: with none, every stop would time out each step, skipping the
            // engine's last flush.
            shutdown_grace: Duration::from_secs(within(
                "shutdown_grace_secs",
                set(raw.shutdown_grace_secs, "shutdown_grace_secs")?,
                1..=3_600,
            )?),
            http_timeouts: HttpTimeouts {
                header_read: Duration::from_secs(within(
                    "header_read_timeout_secs",
                    set(raw.header_read_timeout_secs, "header_read_timeout_secs")?,
                    1..=300,
                )?),
                request: Duration::from_secs(within(
                    "request_timeout_secs",
                    set(raw.request_timeout_secs, "request_timeout_secs")?,
                    1..=3_600,
                )?),
            },
            public_url,
            approval_link_ttl_secs,
            log,
            cluster_peers: raw.cluster_peers.clone().unwrap_or_default(),
        };
        config.check_addresses()?;
        config.check_open_api(raw_insecure_no_auth)?;
        Ok(config)
    }

    /// The API changes what canaryd does to traffic: served beyond this machine it needs a token,
    /// unless `insecure_no_auth` says that is meant.
    fn check_open_api(&self, insecure_no_auth: bool) -> Result<(), ConfigError> {
        if self.api_token.is_none() && !self.http_addr.ip().is_loopback() && !insecure_no_auth {
            return Err(invalid(
                "api_token",
                "(none)",
                &format!(
                    "must be set when http_addr ({}) is not a loopback address, or anyone who can \
                     reach it can change rollouts and subscriptions; set insecure_no_auth to serve it \
                     open anyway",
                    self.http_addr
                ),
            ));
        }
        Ok(())
    }

    /// Two listeners cannot share a fixed port on the same address.
    fn check_addresses(&self) -> Result<(), ConfigError> {
        let named = [
            ("otlp_grpc_addr", self.otlp_grpc_addr),
            ("otlp_http_addr", self.otlp_http_addr),
            ("http_addr", self.http_addr),
        ];
        for (i, (field, addr)) in named.iter().enumerate() {
            for (other, other_addr) in &named[..i] {
                if addr.port() != 0 && addr == other_addr {
                    return Err(invalid(field, addr, &format!("is also {other}")));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write_file(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("canaryd.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = Config::resolve(RawConfig::default()).expect("defaults are valid");
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.otlp_grpc_addr.to_string(), "127.0.0.1:4317");
        assert_eq!(config.otlp_http_addr.to_string(), "127.0.0.1:4318");
        assert_eq!(config.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.models_dir, PathBuf::from("./models"));
        assert_eq!(config.api_token, None);
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_file(
            &dir,
            "http_addr = \"127.0.0.1:1001\"\notlp_http_addr = \"127.0.0.1:1002\"\nmax_apps = 7\n",
        );
        let env = env(&[
            ("CANARYD_HTTP_ADDR", "127.0.0.1:2001"),
            ("CANARYD_OTLP_GRPC_ADDR", "127.0.0.1:2003"),
        ]);
        let flags = RawConfig {
            http_addr: Some("127.0.0.1:3001".parse().expect("addr")),
            ..RawConfig::default()
        };
        let raw = RawConfig::layered(Some(&file), &env, flags).expect("layers");
        let config = Config::resolve(raw).expect("valid");
        assert_eq!(config.http_addr.to_string(), "127.0.0.1:3001", "flag wins");
        assert_eq!(
            config.otlp_grpc_addr.to_string(),
            "127.0.0.1:2003",
            "env over default"
        );
        assert_eq!(
            config.otlp_http_addr.to_string(),
            "127.0.0.1:1002",
            "file over default"
        );
        assert_eq!(config.engine.limits.max_apps, 7);
    }

    #[test]
    fn a_bad_env_value_names_the_variable_and_the_value() {
        let err = RawConfig::from_env(&env(&[("CANARYD_HTTP_ADDR", "localhost:nope")]))
            .expect_err("not an address");
        let message = err.to_string();
        assert!(message.contains("http_addr"), "{message}");
        assert!(message.contains("localhost:nope"), "{message}");
        assert!(message.contains("CANARYD_HTTP_ADDR"), "{message}");
    }

    #[test]
    fn a_bad_file_value_names_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_file(&dir, "max_apps = \"many\"\n");
        let message = RawConfig::from_file(&file).expect_err("bad type").to_string();
        assert!(message.contains("max_apps"), "{message}");
        let file = write_file(&dir, "max_ops = 3\n");
        let message = RawConfig::from_file(&file).expect_err("unknown key").to_string();
        assert!(message.contains("max_ops"), "{message}");
    }

    #[test]
    fn out_of_range_values_are_refused_by_name() {
        let raw = RawConfig {
            max_operations_per_app: Some(0),
            ..RawConfig::default()
        };
        let message = Config::resolve(raw).expect_err("zero cap").to_string();
        assert!(message.contains("max_operations_per_app"), "{message}");
        let raw = RawConfig {
            api_token: Some(" ".into()),
            ..RawConfig::default()
        };
        assert!(
            Config::resolve(raw)
                .expect_err("blank token")
                .to_string()
                .contains("api_token")
        );
    }

    #[test]
    fn an_api_beyond_loopback_needs_a_token_unless_told_otherwise() {
        let open = |token: Option<&str>, insecure: Option<bool>| RawConfig {
            http_addr: Some("0.0.0.0:8080".parse().expect("address")),
            api_token: token.map(str::to_owned),
            insecure_no_auth: insecure,
            ..RawConfig::default()
        };
        let message = Config::resolve(open(None, None))
            .expect_err("open API")
            .to_string();
        assert!(
            message.contains("api_token") && message.contains("insecure_no_auth"),
            "{message}"
        );
        assert!(Config::resolve(open(Some("t"), None)).is_ok());
        assert!(Config::resolve(open(None, Some(true))).is_ok());
        // Loopback (the default) needs nothing.
        assert!(Config::resolve(RawConfig::default()).is_ok());
        // A read token equal to the admin one would grant everything.
        let same = RawConfig {
            api_token: Some("t".into()),
            api_read_token: Some("t".into()),
            ..RawConfig::default()
        };
        let message = Config::resolve(same).expect_err("same tokens").to_string();
        assert!(message.contains("api_read_token"), "{message}");
    }

    #[test]
    fn shutdown_grace_and_ingest_wait_are_bounded() {
        let refused = |raw: RawConfig| Config::resolve(raw).expect_err("out of range").to_string();
        let message = refused(RawConfig {
            shutdown_grace_secs: Some(0),
            ..RawConfig::default()
        });
        assert!(
            message.contains("shutdown_grace_secs") && message.contains("\"0\""),
            "{message}"
        );
        let message = refused(RawConfig {
            shutdown_grace_secs: Some(86_400),
            ..RawConfig::default()
        });
        assert!(message.contains("shutdown_grace_secs"), "{message}");
        let message = refused(RawConfig {
            ingest_wait_ms: Some(3_600_000),
            ..RawConfig::default()
        });
        assert!(
            message.contains("ingest_wait_ms") && message.contains("3600000"),
            "{message}"
        );
        for share in [-0.1, 1.5, f64::NAN] {
            let message = refused(RawConfig {
                receivers_sum_from_engine_busy: Some(share),
                ..RawConfig::default()
            });
            assert!(
                message.contains("receivers_sum_from_engine_busy") && message.contains("between 0 and 1"),
                "{message}"
            );
        }
        let config = Config::resolve(RawConfig {
            shutdown_grace_secs: Some(1),
            ingest_wait_ms: Some(0),
            receivers_sum_from_engine_busy: Some(0.0),
            ..RawConfig::default()
        })
        .expect("the edges are valid");
        assert_eq!(config.shutdown_grace, Duration::from_secs(1));
        assert_eq!(config.ingest_wait, Duration::ZERO);
        assert_eq!(config.receivers_sum_from_engine_busy, 0.0);
    }

    #[test]
    fn fixed_ports_may_not_collide_but_port_zero_may_repeat() {
        let same = Some("127.0.0.1:9000".parse().expect("addr"));
        let raw = RawConfig {
            otlp_http_addr: same,
            http_addr: same,
            ..RawConfig::default()
        };
        let message = Config::resolve(raw).expect_err("collision").to_string();
        assert!(message.contains("http_addr"), "{message}");
        let zero = Some("127.0.0.1:0".parse().expect("addr"));
        let raw = RawConfig {
            otlp_grpc_addr: zero,
            otlp_http_addr: zero,
            http_addr: zero,
            ..RawConfig::default()
        };
        Config::resolve(raw).expect("port 0 may repeat");
    }

    #[test]
    fn unknown_canaryd_variables_are_reported() {
        let env = env(&[("CANARYD_HTTP_ADR", "x"), ("CANARYD_LOG", "debug"), ("HOME", "/")]);
        assert_eq!(
            RawConfig::unknown_env_vars(&env),
            vec!["CANARYD_HTTP_ADR".to_string()]
        );
    }

    #[test]
    fn defaults_are_written_once_in_each_settings_doc() {
        let defaults = RawConfig::defaults().expect("every default parses as its setting");
        let unset: Vec<&str> = RawConfig::KEYS
            .iter()
            .copied()
            .filter(|key| RawConfig::default().differing(&defaults).iter().all(|k| k != key))
            .collect();
        // Only what is documented as `[default: none]` has no value.
        assert_eq!(
            unset,
            [
                "api_token",
                "api_read_token",
                "outbound_allow",
                "haproxy_servers",
                "haproxy_maps",
                "httproutes",
                "kubernetes_token_file",
                "kubernetes_ca_file",
                "public_url",
                "cluster_peers"
            ]
        );
        let config = Config::resolve(RawConfig::default()).expect("the defaults are valid");
        // The engine's own defaults (what tests and canaryd-lab run) are the daemon's.
        let engine = EngineConfig::default();
        assert_eq!(config.engine.limits, engine.limits);
        assert_eq!(config.engine.windows, engine.windows);
        assert_eq!(config.engine.baseline, engine.baseline);
        assert_eq!(config.engine.anomaly, engine.anomaly);
        assert_eq!(config.normalize, NormalizeOptions::default());
        assert_eq!(config.delivery, DeliveryConfig::default());
    }

    #[test]
    fn a_delivery_is_parked_no_later_than_its_retries_end() {
        let raw = RawConfig {
            delivery_max_age_hours: Some(1),
            delivery_park_after_secs: Some(3_601),
            ..RawConfig::default()
        };
        let message = Config::resolve(raw)
            .expect_err("parks after the window")
            .to_string();
        assert!(message.contains("delivery_park_after_secs"), "{message}");
        assert!(message.contains("3601"), "{message}");
        let raw = RawConfig {
            delivery_park_after_secs: Some(2),
            ..RawConfig::default()
        };
        let config = Config::resolve(raw).expect("valid");
        assert_eq!(config.delivery.park_after, Duration::from_secs(2));
    }

    #[test]
    fn a_bad_value_is_blamed_on_where_it_came_from() {
        let flags = RawConfig {
            window_secs: Some(0),
            ..RawConfig::default()
        };
        let message = Config::load(None, &BTreeMap::new(), flags)
            .expect_err("0 s")
            .to_string();
        assert!(message.contains("flag --window-secs"), "{message}");
        let vars = env(&[("CANARYD_MAX_EVENTS", "0")]);
        let message = Config::load(None, &vars, RawConfig::default())
            .expect_err("0")
            .to_string();
        assert!(
            message.contains("environment variable CANARYD_MAX_EVENTS"),
            "{message}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_file(&dir, "window_secs = 7\n");
        let message = Config::load(Some(&file), &BTreeMap::new(), RawConfig::default())
            .expect_err("7 does not divide an hour")
            .to_string();
        assert!(
            message.contains("config file") && message.contains("canaryd.toml"),
            "{message}"
        );
    }

    #[test]
    fn the_example_config_names_every_setting_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/canaryd.example.toml");
        let example = RawConfig::from_file(&path).expect("example parses");
        let defaults = RawConfig::defaults().expect("defaults");
        // A setting with no default may show an example value (its format).
        let differing: Vec<&str> = defaults
            .differing(&example)
            .into_iter()
            .filter(|key| !RawConfig::default().differing(&defaults).iter().all(|k| k != key))
            .collect();
        assert_eq!(
            differing,
            Vec::<&str>::new(),
            "the example gives these other values than their defaults"
        );
        let text = std::fs::read_to_string(&path).expect("read");
        for key in RawConfig::KEYS {
            let named = text
                .lines()
                .any(|l| l.trim_start_matches(['#', ' ']).starts_with(&format!("{key} =")));
            assert!(named, "the example does not name {key}");
        }
    }

    #[test]
    fn the_shipped_example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/canaryd.example.toml");
        let raw = RawConfig::from_file(&path).expect("example parses");
        Config::resolve(raw).expect("example is valid");
    }
}
