//! Subscriptions: who wants which events, where, and the secret their deliveries are signed with.
//!
//! A subscription is checked before it is stored: the URL must be http or https with a host (an
//! `haproxy` one, a tcp or unix socket), and must not be a literal address or socket the outbound
//! policy refuses (`outbound`; resolved names are checked again at connect time); the event types
//! must be known; a given secret must be
//! a Standard Webhooks secret (`whsec_` + base64 of at least 16 bytes), and one is generated (32
//! random bytes) when none is given.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use utoipa::ToSchema;

use super::haproxy::Endpoint;
use super::outbound::OutboundPolicy;
use crate::events::EventType;

pub use crate::store::records::{Kind, Subscription};

/// Why a subscription was refused; each names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscriptionError {
    #[error("url: {0}")]
    Url(String),
    #[error("events: {0}")]
    Events(String),
    #[error("secret: {0}")]
    Secret(String),
}

/// A new subscription, as asked for.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "url": "https://hooks.example.com/canaryd",
    "events": ["canaryd.canary.failed", "canaryd.canary.promoted"],
    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
}))]
pub struct NewSubscription {
    /// Where deliveries go: an http(s) URL, for `kind: haproxy` the runtime API's socket
    /// (`tcp://host:port` or `unix:///path`), for `kind: httproute` the Kubernetes API server.
    pub url: String,
    /// The event types wanted (`canaryd.canary.failed`, ...).
    #[schema(value_type = Vec<EventType>)]
    pub events: Vec<String>,
    /// A Standard Webhooks secret (`whsec_` + base64 of at least 16 bytes); one is generated when
    /// left out.
    pub secret: Option<String>,
    /// `webhook` (the default), `haproxy` or `httproute` (the URL is the Kubernetes API
    /// server's: `https://kubernetes.default.svc`, or `kubectl proxy`'s http one).
    pub kind: Option<Kind>,
}

/// Checks a webhook target before it is stored: http or https with a host, and not a literal
/// restricted address or metadata name the policy refuses (names are checked again on every
/// address they resolve to, at connect time).
pub fn check_url(url: &str, policy: &OutboundPolicy) -> Result<reqwest::Url, SubscriptionError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| SubscriptionError::Url(format!("{url:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(SubscriptionError::Url(format!(
            "scheme {:?} is not allowed: use http or https",
            parsed.scheme()
        )));
    }
    let host = parsed
        .host()
        .ok_or_else(|| SubscriptionError::Url(format!("{url:?} has no host")))?;
    policy
        .check_host(&host)
        .map_err(|e| SubscriptionError::Url(e.to_string()))?;
    Ok(parsed)
}

/// Checks an `haproxy` subscription's runtime API socket the same way.
fn check_endpoint(url: &str, policy: &OutboundPolicy) -> Result<(), SubscriptionError> {
    let endpoint = url.parse::<Endpoint>().map_err(SubscriptionError::Url)?;
    let checked = match &endpoint {
        Endpoint::Tcp(addr) => {
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(host, _)| host);
            policy.check_host_text(host).map(|_| ())
        }
        Endpoint::Unix(path) => policy.check_socket(path),
    };
    checked.map_err(|e| SubscriptionError::Url(e.to_string()))
}

/// The key bytes of a `whsec_` secret.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, SubscriptionError> {
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or_else(|| SubscriptionError::Secret("must start with \"whsec_\"".into()))?;
    let key = STANDARD
        .decode(encoded)
        .map_err(|e| SubscriptionError::Secret(format!("the part after \"whsec_\" is not base64: {e}")))?;
    if key.len() < 16 {
        return Err(SubscriptionError::Secret(format!(
            "the key has {} bytes; use at least 16",
            key.len()
        )));
    }
    Ok(key)
}

/// A fresh secret: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)?;
    Ok(format!("whsec_{}", STANDARD.encode(key)))
}

/// A fresh subscription id.
pub fn generate_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes)?;
    Ok(format!("sub_{}", u64::from_be_bytes(bytes) >> 1))
}

/// A checked request: its url, event types (each once), kind and secret (when it gave one).
pub type Checked = (String, Vec<EventType>, Kind, Option<String>);

/// Checks a request and turns it into a subscription (without its id and time).
pub fn validate(new: NewSubscription, policy: &OutboundPolicy) -> Result<Checked, SubscriptionError> {
    let kind = new.kind.unwrap_or(Kind::Webhook);
    match kind {
        Kind::Webhook | Kind::Httproute => {
            check_url(&new.url, policy)?;
        }
        Kind::Haproxy => check_endpoint(&new.url, policy)?,
    }
    if new.events.is_empty() {
        return Err(SubscriptionError::Events("name at least one event type".into()));
    }
    let mut events = Vec::new();
    for name in &new.events {
        let t = EventType::parse(name).ok_or_else(|| {
            let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
            SubscriptionError::Events(format!(
                "unknown event type {name:?}; known: {}",
                known.join(", ")
            ))
        })?;
        if !events.contains(&t) {
            events.push(t);
        }
    }
    if let Some(secret) = &new.secret {
        secret_key(secret)?;
    }
    Ok((new.url, events, kind, new.secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_must_be_http_and_not_restricted() {
        use crate::act::outbound::OutboundAllow;
        let strict = OutboundPolicy::default();
        assert!(check_url("https://hooks.example.com/canary", &strict).is_ok());
        assert!(check_url("http://93.184.216.34:9000/x", &strict).is_ok());
        for bad in [
            "ftp://example.com/",
            "not a url",
            "http://127.0.0.1:9000/x",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fe80::1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://100.100.100.200/",
        ] {
            assert!(check_url(bad, &strict).is_err(), "{bad} should be refused");
        }
        let loopback = OutboundPolicy::new(OutboundAllow::loopback());
        assert!(check_url("http://127.0.0.1:9000/x", &loopback).is_ok());
        assert!(check_url("http://169.254.169.254/", &loopback).is_err());
        let named = OutboundPolicy::new("169.254.169.254".parse().expect("an allow list"));
        assert!(
            check_url("http://169.254.169.254/", &named).is_ok(),
            "allowed when named"
        );
    }

    #[test]
    fn haproxy_sockets_are_checked_too() {
        let policy = OutboundPolicy::new(
            "127.0.0.0/8, unix:///run/haproxy/admin.sock"
                .parse()
                .expect("an allow list"),
        );
        assert!(check_endpoint("tcp://127.0.0.1:9999", &policy).is_ok());
        assert!(check_endpoint("unix:///run/haproxy/admin.sock", &policy).is_ok());
        for bad in [
            "tcp://169.254.169.254:80",
            "tcp://[::ffff:a9fe:a9fe]:80",
            "tcp://10.0.0.1:9999",
            "unix:///var/run/docker.sock",
            "http://127.0.0.1:9999",
        ] {
            assert!(check_endpoint(bad, &policy).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn secrets_are_standard_webhooks_secrets() {
        let secret = generate_secret().expect("random");
        assert_eq!(secret_key(&secret).expect("valid").len(), 32);
        assert!(secret_key("hunter2").is_err());
        assert!(secret_key("whsec_!!!").is_err());
        assert!(secret_key("whsec_c2hvcnQ=").is_err(), "too short");
    }

    #[test]
    fn event_types_are_checked() {
        let new = |events: Vec<&str>| NewSubscription {
            url: "http://127.0.0.1/".into(),
            events: events.into_iter().map(String::from).collect(),
            secret: None,
            kind: None,
        };
        let policy = OutboundPolicy::new(crate::act::outbound::OutboundAllow::loopback());
        assert!(validate(new(vec!["canaryd.anomaly.detected"]), &policy).is_ok());
        assert!(matches!(
            validate(new(vec![]), &policy),
            Err(SubscriptionError::Events(_))
        ));
        assert!(matches!(
            validate(new(vec!["canaryd.bogus"]), &policy),
            Err(SubscriptionError::Events(_))
        ));
    }
}
