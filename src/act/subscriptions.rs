//! Subscriptions: who wants which events, where, and the secret their deliveries are signed with.
//!
//! A subscription is checked before it is stored: the URL must be http or https with a host, and
//! must not point at a link-local or cloud-metadata address (where a webhook could read cloud
//! credentials) unless the config allows it; the event types must be known; a given secret must be
//! a Standard Webhooks secret (`whsec_` + base64 of at least 16 bytes), and one is generated (32
//! random bytes) when none is given.

use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use utoipa::ToSchema;

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
    /// Where deliveries go: an http(s) URL, or for `kind: haproxy` the runtime API's socket
    /// (`tcp://host:port` or `unix:///path`).
    pub url: String,
    /// The event types wanted (`canaryd.canary.failed`, ...).
    #[schema(value_type = Vec<EventType>)]
    pub events: Vec<String>,
    /// A Standard Webhooks secret (`whsec_` + base64 of at least 16 bytes); one is generated when
    /// left out.
    pub secret: Option<String>,
    /// `webhook` (the default) or `haproxy`.
    pub kind: Option<Kind>,
}

/// Hosts that serve cloud instance metadata under a name rather than a link-local address.
const METADATA_HOSTS: [&str; 3] = ["metadata.google.internal", "metadata", "metadata.azure.internal"];

/// Whether `ip` is link-local or a known cloud-metadata address.
fn is_sensitive(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.octets() == [100, 100, 100, 200],
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            (first & 0xffc0) == 0xfe80 // fe80::/10, link-local
                || v6.segments() == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254] // AWS IMDS over IPv6
                || v6.to_ipv4_mapped().is_some_and(|v4| is_sensitive(IpAddr::V4(v4)))
        }
    }
}

/// Checks a subscription target. `allow_sensitive` lifts the link-local and metadata ban.
pub fn check_url(url: &str, allow_sensitive: bool) -> Result<reqwest::Url, SubscriptionError> {
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
    if !allow_sensitive {
        let refused = match host {
            url::Host::Ipv4(v4) => is_sensitive(IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => is_sensitive(IpAddr::V6(v6)),
            url::Host::Domain(name) => {
                METADATA_HOSTS.contains(&name.trim_end_matches('.').to_ascii_lowercase().as_str())
            }
        };
        if refused {
            return Err(SubscriptionError::Url(format!(
                "{host} is a link-local or cloud-metadata address; set allow_link_local_targets to allow it"
            )));
        }
    }
    Ok(parsed)
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

/// Checks a request and turns it into a subscription (without its id and time).
pub fn validate(
    new: NewSubscription,
    allow_sensitive: bool,
) -> Result<(String, Vec<EventType>, Kind, Option<String>), SubscriptionError> {
    let kind = new.kind.unwrap_or(Kind::Webhook);
    match kind {
        Kind::Webhook => {
            check_url(&new.url, allow_sensitive)?;
        }
        Kind::Haproxy => {
            new.url
                .parse::<super::haproxy::Endpoint>()
                .map_err(SubscriptionError::Url)?;
        }
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
    fn targets_must_be_http_and_not_metadata() {
        assert!(check_url("https://hooks.example.com/canary", false).is_ok());
        assert!(check_url("http://127.0.0.1:9000/x", false).is_ok());
        for bad in [
            "ftp://example.com/",
            "not a url",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fe80::1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://100.100.100.200/",
        ] {
            assert!(check_url(bad, false).is_err(), "{bad} should be refused");
        }
        assert!(
            check_url("http://169.254.169.254/", true).is_ok(),
            "allowed when configured"
        );
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
        assert!(validate(new(vec!["canaryd.anomaly.detected"]), false).is_ok());
        assert!(matches!(
            validate(new(vec![]), false),
            Err(SubscriptionError::Events(_))
        ));
        assert!(matches!(
            validate(new(vec!["canaryd.bogus"]), false),
            Err(SubscriptionError::Events(_))
        ));
    }
}
