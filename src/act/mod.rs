//! Acting on events: subscriptions, and the durable, signed delivery of events to them.
//!
//! - `subscriptions`: what a subscription is, and the checks it passes (URL safety, event types,
//!   secret).
//! - `signing`: Standard Webhooks HMAC-SHA256 signatures.
//! - `delivery`: the per-subscription workers that drain the outbox with retries, parking a
//!   delivery that blocks it.
//! - `clock`: the dispatcher's time, wall time or moved by hand (the delivery benchmark).
//! - `outbound`: which addresses canaryd's own connections may reach, checked at connect time.
//! - `haproxy`: the `haproxy` kind's action, canary weights set through HAProxy's runtime API.
//! - `haproxy_maps`: its second lever, a rollout's route (split share, allow-list, header rules)
//!   kept in HAProxy maps, read back and reconciled.
//! - `httproute`: the `httproute` kind's lever, a rollout's route written into a Gateway API
//!   HTTPRoute by server-side apply.

pub mod clock;
pub mod delivery;
pub mod haproxy;
pub mod haproxy_maps;
pub mod httproute;
pub mod outbound;
pub mod signing;
pub mod subscriptions;

/// A setting that is a comma-separated list, given in TOML as one string (`"a, b"`) or an array of
/// such strings, parsed as `T` parses the joined text.
pub(crate) fn comma_separated<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Form {
        One(String),
        Many(Vec<String>),
    }
    let text = match <Form as serde::Deserialize>::deserialize(d)? {
        Form::One(s) => s,
        Form::Many(v) => v.join(","),
    };
    text.parse().map_err(serde::de::Error::custom)
}
