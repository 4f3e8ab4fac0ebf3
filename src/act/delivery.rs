//! Delivery: each subscription's outbox, sent in order by a task of its own.
//!
//! When an event is stored, an outbox entry is written for every subscription that wants it, in
//! the same flush, so a delivery exists as soon as the event does and survives restarts. Each
//! subscription has one worker task, so a slow or dead receiver only ever delays itself: the
//! worker sends the oldest pending entry; a 2xx marks it delivered; a 410 disables the
//! subscription (and drops its pending entries); anything else (another status, a timeout, a
//! refused connection) is retried after an exponential backoff with jitter, until 24 hours after
//! the first attempt. Entries go out one at a time, so a receiver sees a subscription's events in
//! order. The event id is the
//! `webhook-id`, the same on every attempt, so receivers can de-duplicate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::haproxy;
use super::outbound::{GuardedResolver, OutboundAllow, OutboundPolicy};
use super::signing::sign;
use super::subscriptions::{Kind, Subscription, secret_key};
use crate::io::try_blocking;
use crate::stats::Stats;
use crate::store::Store;

pub use crate::store::records::{Delivery, DeliveryState};

/// Delivery settings.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryConfig {
    /// Each request's deadline.
    pub timeout: Duration,
    /// How long after the first attempt a delivery is given up.
    pub max_age: Duration,
    /// Backoff before the first retry; it doubles per attempt up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Where each (env, app, version) is served, for `haproxy` subscriptions.
    pub haproxy_servers: super::haproxy::HaproxyServers,
    /// Restricted targets deliveries may reach all the same (`outbound`).
    pub outbound_allow: OutboundAllow,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(24 * 3_600),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(15 * 60),
            haproxy_servers: super::haproxy::HaproxyServers::default(),
            outbound_allow: OutboundAllow::loopback(),
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wait before retry number `attempts` (1 = the first retry): exponential, capped, with
/// "equal jitter" (half fixed, half random) so that receivers coming back are not hit in lockstep.
pub fn backoff(attempts: u32, config: &DeliveryConfig, unit_random: f64) -> Duration {
    let exp = config
        .first_backoff
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1).min(30)));
    let capped = exp.min(config.max_backoff);
    capped.mul_f64(0.5 + 0.5 * unit_random.clamp(0.0, 1.0))
}

/// The webhook client could not be built with the outbound policy.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the webhook client (no redirects, checked resolution): {0}")]
pub struct ClientError(reqwest::Error);

/// Runs the workers, one per active subscription.
pub struct Dispatcher {
    store: Store,
    stats: Arc<Stats>,
    client: reqwest::Client,
    /// What every delivery's connection is checked against, webhook and HAProxy alike.
    outbound: Arc<OutboundPolicy>,
    config: DeliveryConfig,
    /// Woken when events are appended or subscriptions change.
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    workers: Mutex<HashMap<String, (CancellationToken, JoinHandle<()>)>>,
}

impl Dispatcher {
    pub fn new(
        store: Store,
        stats: Arc<Stats>,
        config: DeliveryConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Dispatcher>, ClientError> {
        let outbound = Arc::new(OutboundPolicy::new(config.outbound_allow.clone()));
        // Redirects are not followed (a receiver could send a delivery anywhere), names resolve
        // only to addresses the policy allows, and no proxy stands between: a proxy would do
        // the resolving, out of the policy's sight. A client without that policy is no client:
        // start-up stops.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver(outbound.clone())))
            .no_proxy()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("canaryd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError)?;
        Ok(Arc::new(Dispatcher {
            store,
            stats,
            client,
            outbound,
            config,
            wake: Arc::new(Notify::new()),
            shutdown,
            workers: Mutex::new(HashMap::new()),
        }))
    }

    /// The outbound policy deliveries go through; subscriptions are checked against it too.
    pub fn outbound(&self) -> &OutboundPolicy {
        &self.outbound
    }

    /// Tells the workers there may be new work.
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Starts a worker for every active subscription that has none, and stops the workers of
    /// subscriptions that are gone or disabled.
    pub async fn sync(self: &Arc<Self>) {
        let store = self.store.clone();
        let subscriptions = match try_blocking(move || store.subscriptions()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read subscriptions");
                return;
            }
        };
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.retain(|id, (stop, task)| {
            let active = subscriptions.iter().any(|s| &s.id == id && s.disabled.is_none());
            if !active || task.is_finished() {
                stop.cancel();
            }
            active && !task.is_finished()
        });
        for subscription in subscriptions.into_iter().filter(|s| s.disabled.is_none()) {
            if workers.contains_key(&subscription.id) {
                continue;
            }
            let stop = self.shutdown.child_token();
            let id = subscription.id.clone();
            let task = tokio::spawn(self.clone().work(subscription, stop.clone()));
            workers.insert(id, (stop, task));
        }
        drop(workers);
        self.wake();
    }

    /// Stops every worker and waits for them (each finishes or abandons its request in flight).
    pub async fn stop(&self) {
        let workers: Vec<_> = {
            let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            workers.drain().map(|(_, w)| w).collect()
        };
        for (stop, task) in workers {
            stop.cancel();
            let _ = task.await;
        }
    }

    async fn work(self: Arc<Self>, subscription: Subscription, stop: CancellationToken) {
        let key = match secret_key(&subscription.secret) {
            Ok(key) => key,
            Err(e) => {
                tracing::error!(subscription = %subscription.id, error = %e, "unusable secret; not delivering");
                return;
            }
        };
        loop {
            // Register for a wake-up before looking, so that an append between the look and the
            // wait is not missed.
            let woken = self.wake.notified();
            let (store, id) = (self.store.clone(), subscription.id.clone());
            let next = match try_blocking(move || store.next_delivery(&id)).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(subscription = %subscription.id, error = %e, "cannot read the outbox");
                    None
                }
            };
            let Some((seq, delivery)) = next else {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = woken => continue,
                    // A safety net: look again now and then even without a wake-up.
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            };
            let wait = Duration::from_millis(delivery.next_attempt_ms.saturating_sub(now_ms()));
            if !wait.is_zero() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.attempt(&subscription, &key, seq, delivery) => outcome,
            };
            if outcome == DeliveryState::Gone {
                let (store, id) = (self.store.clone(), subscription.id.clone());
                if let Err(e) = try_blocking(move || store.disable_subscription(&id)).await {
                    tracing::error!(subscription = %subscription.id, error = %e, "cannot disable the subscription");
                }
                tracing::warn!(subscription = %subscription.id, url = %subscription.url, "receiver answered 410 Gone; subscription disabled");
                return;
            }
        }
    }

    /// One attempt at one delivery; records and returns its new state.
    async fn attempt(
        &self,
        subscription: &Subscription,
        key: &[u8],
        seq: u64,
        mut delivery: Delivery,
    ) -> DeliveryState {
        let now = now_ms();
        let first = *delivery.first_attempt_ms.get_or_insert(now);
        delivery.attempts += 1;
        let store = self.store.clone();
        let event = match try_blocking(move || store.event(seq)).await {
            Ok(Some(event)) => event,
            Ok(None) => {
                delivery.state = DeliveryState::Expired;
                delivery.last_error = Some("the event is no longer stored".into());
                return self.record(subscription, seq, delivery, "expired").await;
            }
            Err(e) => {
                delivery.last_error = Some(e.to_string());
                delivery.next_attempt_ms = now + 1_000;
                return self.record(subscription, seq, delivery, "retry").await;
            }
        };
        if subscription.kind == Kind::Haproxy {
            let label = self
                .act_on_haproxy(subscription, &event, &mut delivery, first)
                .await;
            return self.record(subscription, seq, delivery, label).await;
        }
        // A literal address is connected to without resolution, so it is checked here; names
        // are checked by the resolver on every address.
        let literal = reqwest::Url::parse(&subscription.url)
            .map_err(|e| e.to_string())
            .and_then(|url| match url.host() {
                Some(host) => self.outbound.check_host(&host).map_err(|e| e.to_string()),
                None => Err("the URL has no host".to_owned()),
            });
        if let Err(e) = literal {
            delivery.last_status = None;
            delivery.last_error = Some(e);
            let label = self.schedule_retry(&mut delivery, first);
            return self.record(subscription, seq, delivery, label).await;
        }
        let body = serde_json::to_vec(&event).unwrap_or_default();
        let timestamp = now / 1_000;
        let signature = sign(key, &event.id, timestamp, &body);
        let started = std::time::Instant::now();
        let result = self
            .client
            .post(&subscription.url)
            .header("content-type", "application/cloudevents+json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        self.stats.delivery_seconds(started.elapsed());
        let label = match result {
            Ok(response) if response.status().is_success() => {
                delivery.state = DeliveryState::Delivered;
                delivery.last_status = Some(response.status().as_u16());
                delivery.last_error = None;
                delivery.delivered_ms = Some(now_ms());
                "delivered"
            }
            Ok(response) if response.status() == reqwest::StatusCode::GONE => {
                delivery.state = DeliveryState::Gone;
                delivery.last_status = Some(410);
                "gone"
            }
            Ok(response) => {
                delivery.last_status = Some(response.status().as_u16());
                delivery.last_error = Some(format!("answered {}", response.status()));
                self.schedule_retry(&mut delivery, first)
            }
            Err(e) => {
                delivery.last_status = None;
                delivery.last_error = Some(error_chain(&e));
                self.schedule_retry(&mut delivery, first)
            }
        };
        self.record(subscription, seq, delivery, label).await
    }

    /// Applies the event's traffic action on HAProxy; a failure is retried like a webhook's.
    async fn act_on_haproxy(
        &self,
        subscription: &Subscription,
        event: &crate::events::Event,
        delivery: &mut Delivery,
        first: u64,
    ) -> &'static str {
        let steps = match haproxy::plan(event, &self.config.haproxy_servers) {
            None => {
                delivery.state = DeliveryState::Skipped;
                delivery.last_error = None;
                return "skipped";
            }
            Some(Err(e)) => {
                delivery.last_error = Some(e.to_string());
                return self.schedule_retry(delivery, first);
            }
            Some(Ok(steps)) => steps,
        };
        let endpoint = match subscription.url.parse::<haproxy::Endpoint>() {
            Ok(endpoint) => endpoint,
            Err(e) => {
                delivery.last_error = Some(e);
                return self.schedule_retry(delivery, first);
            }
        };
        let started = std::time::Instant::now();
        for (backend, server, weight) in &steps {
            let result = haproxy::set_weight(
                &endpoint,
                &self.outbound,
                backend,
                server,
                *weight,
                self.config.timeout,
            )
            .await;
            if let Err(e) = result {
                self.stats.delivery_seconds(started.elapsed());
                delivery.last_error = Some(e.to_string());
                return self.schedule_retry(delivery, first);
            }
            tracing::info!(subscription = %subscription.id, event = %event.id, %backend, %server, weight, "HAProxy weight set");
        }
        self.stats.delivery_seconds(started.elapsed());
        delivery.state = DeliveryState::Delivered;
        delivery.last_error = None;
        delivery.delivered_ms = Some(now_ms());
        "delivered"
    }

    fn schedule_retry(&self, delivery: &mut Delivery, first_ms: u64) -> &'static str {
        let mut random = [0u8; 8];
        let unit = match getrandom::fill(&mut random) {
            Ok(()) => (u64::from_be_bytes(random) >> 11) as f64 / (1u64 << 53) as f64,
            Err(_) => 0.5,
        };
        let wait = backoff(delivery.attempts, &self.config, unit);
        let next = now_ms() + wait.as_millis() as u64;
        if next.saturating_sub(first_ms) > self.config.max_age.as_millis() as u64 {
            delivery.state = DeliveryState::Expired;
            "expired"
        } else {
            delivery.next_attempt_ms = next;
            "retry"
        }
    }

    async fn record(
        &self,
        subscription: &Subscription,
        seq: u64,
        delivery: Delivery,
        label: &'static str,
    ) -> DeliveryState {
        self.stats.delivery(&subscription.id, label);
        match label {
            "delivered" | "skipped" => {
                tracing::debug!(subscription = %subscription.id, event = %delivery.event_id, "delivery {label}");
            }
            // A failed attempt is worth an operator's eye: the receiver is down or refusing.
            // Backoff spaces the attempts, so this stays a few lines per subscription.
            _ => tracing::warn!(
                subscription = %subscription.id,
                url = %subscription.url,
                event = %delivery.event_id,
                attempts = delivery.attempts,
                error = delivery.last_error.as_deref().unwrap_or(""),
                "delivery {label}"
            ),
        }
        let state = delivery.state;
        // A peer's answer can be anything, of any size: what is kept of it, and served by the
        // deliveries API, is its start.
        let mut delivery = delivery;
        if let Some(e) = &mut delivery.last_error {
            clip(e, MAX_ERROR_BYTES);
        }
        let (store, id) = (self.store.clone(), subscription.id.clone());
        if let Err(e) = try_blocking(move || store.put_delivery(&id, seq, &delivery)).await {
            tracing::error!(subscription = %subscription.id, error = %e, "cannot record a delivery");
        }
        state
    }
}

/// The most of a delivery's last error that is kept.
pub const MAX_ERROR_BYTES: usize = 2_048;

/// Cuts `text` to at most `max` bytes at a character boundary, saying that it was cut.
fn clip(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    const MORE: &str = " [...]";
    let mut end = max.saturating_sub(MORE.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MORE);
}

/// An error with its causes, which is where reqwest says what actually went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_error_is_kept_clipped_at_a_character_boundary() {
        let mut text = "é".repeat(10_000);
        clip(&mut text, MAX_ERROR_BYTES);
        assert!(text.len() <= MAX_ERROR_BYTES, "{}", text.len());
        assert!(text.ends_with(" [...]"));
        let mut short = "refused".to_owned();
        clip(&mut short, MAX_ERROR_BYTES);
        assert_eq!(short, "refused");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let config = DeliveryConfig::default();
        assert_eq!(backoff(1, &config, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, &config, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(4, &config, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(40, &config, 1.0), Duration::from_secs(15 * 60));
    }
}
