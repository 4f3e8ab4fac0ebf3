//! canaryd's events: what it tells subscribers and keeps in its history, as CloudEvents 1.0, and
//! the feed that carries each to its followers once stored (`feed`).
//!
//! An event is built from an engine decision and named by what it is about (`Event::identify`): two
//! replicas fed the same stream name the same decision alike, so a receiver of both de-duplicates
//! by id, as it does a retry. The store gives it a sequence number, its place in the history, and
//! it is served as the same JSON everywhere: in `GET /api/v1/events` and in webhook bodies.

use std::time::SystemTime;

use canaryd_engine::anomaly::{AnomalyRules, Transition};
use canaryd_engine::judge::{
    AnalysisView, CanaryChange, ChangeKind, GateOutcome, HeaderMatch, Mode, Outcome, Sticky,
};
use canaryd_engine::{AnomalyChange, Engine, IngestReport, Scope};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub mod approval;
pub mod feed;

/// RFC 3339 in UTC with nanoseconds.
pub fn format_event_time(t: canaryd_engine::EventTime) -> String {
    humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(t)).to_string()
}

/// The CloudEvents `source` of every event.
pub const SOURCE: &str = "canaryd";

/// The event types of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    #[serde(rename = "canaryd.canary.started")]
    CanaryStarted,
    #[serde(rename = "canaryd.canary.stage_passed")]
    CanaryStagePassed,
    #[serde(rename = "canaryd.canary.failed")]
    CanaryFailed,
    #[serde(rename = "canaryd.canary.promoted")]
    CanaryPromoted,
    #[serde(rename = "canaryd.anomaly.detected")]
    AnomalyDetected,
    #[serde(rename = "canaryd.anomaly.resolved")]
    AnomalyResolved,
    /// A failed canary stopped getting traffic (taken out), in enforce mode.
    #[serde(rename = "canaryd.canary.rolled_back")]
    CanaryRolledBack,
    /// An analysis ended through the rollout API (`DELETE`), or replaced by a declaration of
    /// other versions: the reason's `test` says `ended` or `replaced`.
    #[serde(rename = "canaryd.canary.ended")]
    CanaryEnded,
    /// A gate broke for both versions alike (a shared fault): the rollout holds, the canary is
    /// not rolled back.
    #[serde(rename = "canaryd.canary.held")]
    CanaryHeld,
    /// An operator paused the analysis: it judges on, but passes no stage and fails nothing.
    #[serde(rename = "canaryd.canary.paused")]
    CanaryPaused,
    #[serde(rename = "canaryd.canary.resumed")]
    CanaryResumed,
    /// A stage passed and the next one asks for a person's approval: the analysis waits, and
    /// `data.approval` carries the signed links to approve or abort.
    #[serde(rename = "canaryd.canary.awaiting_approval")]
    CanaryAwaitingApproval,
    /// An event's traffic move was applied by some of its app's levers (weights, maps, routes)
    /// and not by others: traffic is split between what each lever holds, which is no one's
    /// plan. `data.cause` names the event, `data.levers` each lever's outcome; the failing ones
    /// are still retried.
    #[serde(rename = "canaryd.traffic.partial")]
    TrafficPartial,
}

impl EventType {
    pub const ALL: [EventType; 13] = [
        EventType::CanaryStarted,
        EventType::CanaryStagePassed,
        EventType::CanaryFailed,
        EventType::CanaryPromoted,
        EventType::AnomalyDetected,
        EventType::AnomalyResolved,
        EventType::CanaryRolledBack,
        EventType::CanaryEnded,
        EventType::CanaryHeld,
        EventType::CanaryPaused,
        EventType::CanaryResumed,
        EventType::CanaryAwaitingApproval,
        EventType::TrafficPartial,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CanaryStarted => "canaryd.canary.started",
            EventType::CanaryStagePassed => "canaryd.canary.stage_passed",
            EventType::CanaryFailed => "canaryd.canary.failed",
            EventType::CanaryPromoted => "canaryd.canary.promoted",
            EventType::AnomalyDetected => "canaryd.anomaly.detected",
            EventType::AnomalyResolved => "canaryd.anomaly.resolved",
            EventType::CanaryRolledBack => "canaryd.canary.rolled_back",
            EventType::CanaryEnded => "canaryd.canary.ended",
            EventType::CanaryHeld => "canaryd.canary.held",
            EventType::CanaryPaused => "canaryd.canary.paused",
            EventType::CanaryResumed => "canaryd.canary.resumed",
            EventType::CanaryAwaitingApproval => "canaryd.canary.awaiting_approval",
            EventType::TrafficPartial => "canaryd.traffic.partial",
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == text)
    }
}

/// One piece of evidence behind an event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Reason {
    pub feature: String,
    /// The operation (or downstream, exception type, metric series) the feature is about; null
    /// for the app as a whole.
    pub operation: Option<String>,
    pub test: String,
    #[serde(deserialize_with = "number_or_null")]
    pub canary_value: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub baseline_value: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub statistic: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub threshold: f64,
    pub message: String,
}

/// A number of the contract's JSON, which writes a non-finite one as null (serde_json's way): the
/// store keeps event data as that JSON, so null reads back as NaN instead of failing the event.
fn number_or_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// A rollout stage, for canary events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Stage {
    pub index: u32,
    pub name: String,
    pub weight: u32,
}

/// What a rollout controller should do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Action {
    pub kind: String,
    pub app: String,
    pub version: String,
    pub weight: u32,
}

/// The links of a stage waiting for approval: each opens a page with one button that approves
/// (the canary enters the stage) or aborts (it fails); each works once, until `expires_at`.
///
/// A link is a credential (whoever holds it may act, without a token), so the links go to
/// webhook subscribers and to readers holding a token; where canaryd has tokens set, the open
/// event reads (`GET /api/v1/events` without a token, the Watch stream) show them as null.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Approval {
    /// The stage waiting to be entered.
    pub stage: Stage,
    /// Null where the reader holds no token (see above).
    pub approve_url: Option<String>,
    /// Null where the reader holds no token (see above).
    pub abort_url: Option<String>,
    /// RFC 3339, wall clock.
    pub expires_at: String,
}

/// The `data` of an event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventData {
    pub env: String,
    pub app: String,
    pub stable_version: Option<String>,
    pub canary_version: Option<String>,
    /// The version the event is about.
    pub version: Option<String>,
    pub stage: Option<Stage>,
    pub state: String,
    pub score: Option<f64>,
    /// Event time of the evidence that decided it.
    pub detected_at: String,
    pub reasons: Vec<Reason>,
    pub action: Option<Action>,
    pub dry_run: bool,
    /// For `canary.awaiting_approval`: the links to approve or abort the next stage. (Left out
    /// of other events, so that they read as they always have.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// For `canary.promoted` under a model with a promotion chain: the environment the version
    /// goes to next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_env: Option<String>,
    /// For the canary events that move traffic (started, stage passed, failed, rolled back,
    /// promoted): the traffic the rollout should have from now on, whole, for the levers that
    /// route by more than a weight (HAProxy maps). Left out of other events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Route>,
    /// For `traffic.partial`: the id of the event whose traffic move only some levers applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// For `traffic.partial`: what each lever attached to the app did with that move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub levers: Option<Vec<LeverOutcome>>,
}

/// What one lever (a `haproxy` or `httproute` subscription) did with an event's traffic move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeverOutcome {
    pub subscription: String,
    /// `haproxy` or `httproute`.
    pub kind: String,
    /// `applied`; `failed` (tried, not applied, retried); `partial` (one of its own levers
    /// applied, another not: HAProxy's weights and maps); `pending` (not tried yet).
    pub outcome: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Why it failed, as its delivery records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The traffic a rollout should have: the canary's share of the users (or requests) the split
/// decides, and who reaches the canary whatever the split. A failed canary's route has no one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Route {
    /// The canary's share of the split, in percent.
    pub percent: f64,
    /// Where a request carries its user id (the split hashes it); null: each request is split
    /// on its own.
    #[schema(value_type = Option<Object>, example = json!({"header": "x-user-id"}))]
    pub sticky: Option<Sticky>,
    /// Requests with any of these headers reach the canary.
    #[schema(value_type = Vec<Object>, example = json!([{"name": "x-canary", "value": "always"}]))]
    pub headers: Vec<HeaderMatch>,
    /// Users (as the sticky key carries them) that reach the canary.
    pub users: Vec<String>,
}

/// The route a canary change asks for, when it moves traffic and the rollout says enough to
/// know it: a plan, or stages whose percentages it follows.
pub fn route(change: &CanaryChange) -> Option<Route> {
    let view = &change.view;
    let plan = &view.traffic.plan;
    let staged = !view.traffic.percentages.is_empty();
    let of = |percent: f64, everyone: bool| Route {
        percent,
        sticky: plan.sticky.clone(),
        headers: if everyone {
            plan.headers.clone()
        } else {
            Vec::new()
        },
        users: if everyone { plan.users.clone() } else { Vec::new() },
    };
    match change.kind {
        ChangeKind::Started if staged || !plan.is_empty() => {
            Some(of(view.traffic.percentages.first().copied().unwrap_or(0.0), true))
        }
        ChangeKind::StagePassed | ChangeKind::Approved => change.weight.map(|w| of(w, true)),
        ChangeKind::Failed | ChangeKind::OperatorAborted | ChangeKind::RolledBack => Some(of(0.0, false)),
        ChangeKind::Promoted | ChangeKind::OperatorPromoted => Some(of(100.0, true)),
        _ => None,
    }
}

/// A CloudEvents 1.0 event in structured JSON form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "specversion": "1.0",
    "id": "evt_3f5b0c8e1d2a4f6b9c7e8d1a2b3c4d5e",
    "source": "canaryd",
    "type": "canaryd.canary.failed",
    "time": "2026-01-05T10:02:13.120000000Z",
    "subject": "checkout",
    "datacontenttype": "application/json",
    "data": {
        "env": "prod",
        "app": "checkout",
        "stable_version": "1.4.2",
        "canary_version": "1.5.0",
        "version": "1.5.0",
        "stage": {"index": 0, "name": "10%", "weight": 10},
        "state": "failing",
        "score": 12.5,
        "detected_at": "2026-01-05T10:02:11.000000000Z",
        "reasons": [{
            "feature": "error_ratio",
            "operation": null,
            "test": "fisher_exact",
            "canary_value": 0.3,
            "baseline_value": 0.001,
            "statistic": 14.2,
            "threshold": 4.9,
            "message": "error ratio 30.00% against 0.10% (300 of 1000 requests)"
        }],
        "action": {"kind": "set_weight", "app": "checkout", "version": "1.5.0", "weight": 0},
        "dry_run": false
    }
}))]
pub struct Event {
    pub specversion: String,
    /// Derived from what the event is about (see `Event::identify`), so stable across retries
    /// and alike on replicas fed the same stream.
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When it happened: for a decision, the event time of the evidence that decided it (as
    /// `data.detected_at`); for an operator's action, when it was taken (wall clock).
    pub time: String,
    /// The app.
    pub subject: String,
    pub datacontenttype: String,
    pub data: EventData,
    /// Its place in this daemon's history, given when it is stored (0 before): not part of the
    /// event, which replicas name alike whatever their histories hold.
    #[serde(skip)]
    pub seq: u64,
    /// Served by `GET /api/v1/events` only, for an event that moves traffic: what each lever
    /// attached to its app (`haproxy`, `httproute` subscriptions) did with it, now: `applied`,
    /// `failed` (retried), `partial` or `pending`. Never stored or sent: the API adds it from
    /// the deliveries as it reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub levers: Option<Vec<LeverOutcome>>,
}

impl Event {
    /// An event not yet named (`identify`) nor stored, happening when its evidence says.
    pub fn new(event_type: EventType, data: EventData) -> Event {
        Event {
            specversion: "1.0".into(),
            id: String::new(),
            source: SOURCE.into(),
            event_type,
            time: data.detected_at.clone(),
            subject: data.app.clone(),
            datacontenttype: "application/json".into(),
            data,
            seq: 0,
            levers: None,
        }
    }

    /// Names the event by what it is about: its type, environment, app, versions, stage, the
    /// event time of the evidence that decided it and, for an anomaly, the feature and subject.
    /// A decision made from the same data is named alike by any replica, and no two decisions of
    /// one daemon share a name (a second one at the same instant would be of another type, stage
    /// or feature). The name (the first 32 hex digits of a SHA-256) never reads as an id of the
    /// old sequence form (`event_seq`).
    pub fn identify(&mut self) {
        self.id = self.identity(None);
    }

    /// Names an event an operator's action made, taken at `now` (wall clock): such an action
    /// reaches one replica, and can repeat at one event-time instant (pause, resume, pause), so
    /// the moment it was taken is part of its name and is its `time`.
    pub fn identify_operated(&mut self, now: SystemTime) {
        self.time = humantime::format_rfc3339_nanos(now).to_string();
        let nanos = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        self.id = self.identity(Some(nanos));
    }

    fn identity(&self, taken_at: Option<u64>) -> String {
        use sha2::{Digest, Sha256};
        let data = &self.data;
        let mut hash = Sha256::new();
        // Each part length-prefixed, so that no two lists of parts hash alike.
        let mut part = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        };
        let text = |value: Option<&str>| value.map_or(Vec::new(), |v| [b"=", v.as_bytes()].concat());
        part(b"canaryd.event.1");
        part(self.event_type.as_str().as_bytes());
        part(data.env.as_bytes());
        part(data.app.as_bytes());
        part(&text(data.stable_version.as_deref()));
        part(&text(data.canary_version.as_deref()));
        part(&text(data.version.as_deref()));
        part(
            &data
                .stage
                .as_ref()
                .map_or(u64::MAX, |s| u64::from(s.index))
                .to_be_bytes(),
        );
        part(data.detected_at.as_bytes());
        if matches!(
            self.event_type,
            EventType::AnomalyDetected | EventType::AnomalyResolved
        ) {
            let reason = data.reasons.first();
            part(reason.map_or("", |r| r.feature.as_str()).as_bytes());
            part(&text(reason.and_then(|r| r.operation.as_deref())));
        }
        if self.event_type == EventType::TrafficPartial {
            // One alert per move, however often its levers are looked at.
            part(&text(data.cause.as_deref()));
        }
        if let Some(nanos) = taken_at {
            part(&nanos.to_be_bytes());
        }
        let digest = hash.finalize();
        let mut id = String::with_capacity(4 + 32);
        id.push_str("evt_");
        for byte in &digest[..16] {
            id.push_str(&format!("{byte:02x}"));
        }
        id
    }
}

impl Event {
    /// The event for a reader who may not act on it: an approval's links left out (null).
    pub fn without_links(mut self) -> Event {
        if let Some(approval) = &mut self.data.approval {
            approval.approve_url = None;
            approval.abort_url = None;
        }
        self
    }
}

/// The id an event stored at sequence number `seq` was given before ids were derived from content
/// (and still is, where one is stored unnamed); such ids sort like their sequence numbers.
pub fn event_id(seq: u64) -> String {
    format!("evt_{seq:016x}")
}

/// The sequence number an id of that old form names, if it is one (a derived id never is: it
/// has 32 digits, not 16).
pub fn event_seq(id: &str) -> Option<u64> {
    let hex = id.strip_prefix("evt_")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// The event for an anomaly that a version's feature opened or closed.
pub fn anomaly_event(change: &AnomalyChange, stable_version: Option<&str>, rules: &AnomalyRules) -> Event {
    let version = match &change.id.scope {
        Scope::Version(v) => Some(v.clone()),
        Scope::App => None,
    };
    let (event_type, state, verb) = match change.transition {
        Transition::Detected => (EventType::AnomalyDetected, "anomalous", "left"),
        Transition::Resolved => (EventType::AnomalyResolved, "normal", "returned to"),
    };
    let feature = change.id.key.feature.name();
    let subject = (!change.id.key.subject.is_empty()).then(|| change.id.key.subject.clone());
    let band = change.band.map_or_else(String::new, |b| {
        format!(" ({} band {:.4}..{:.4})", b.kind.name(), b.lo, b.hi)
    });
    let message = format!(
        "{} {verb} its baseline: {:.4} against {:.4}{band}, {:.1} band half-widths outside, over {} events",
        change.id.key, change.value, change.expected, change.score, change.support
    );
    Event::new(
        event_type,
        EventData {
            env: change.id.env.clone(),
            app: change.id.app.clone(),
            stable_version: stable_version.map(str::to_owned),
            canary_version: None,
            version,
            stage: None,
            state: state.into(),
            score: Some(change.score),
            detected_at: format_event_time(change.time),
            reasons: vec![Reason {
                feature: feature.into(),
                operation: subject,
                test: "baseline_band".into(),
                canary_value: change.value,
                baseline_value: change.expected,
                statistic: change.score,
                threshold: match change.transition {
                    Transition::Detected => rules.detect_score,
                    Transition::Resolved => rules.resolve_score,
                },
                message,
            }],
            action: None,
            dry_run: false,
            approval: None,
            next_env: None,
            traffic: None,
            cause: None,
            levers: None,
        },
    )
}

/// The events a batch's decisions make, anomalies first, then canary decisions, each in event-time
/// order.
pub fn report_events(engine: &Engine, report: &IngestReport) -> Vec<Event> {
    let rules = &engine.config().anomaly;
    let mut events: Vec<Event> = report
        .anomalies
        .iter()
        .map(|change| {
            let stable = engine.baselines(&change.id.env, &change.id.app, None);
            anomaly_event(change, stable.and_then(|v| v.stable_version), rules)
        })
        .collect();
    events.extend(report.canary.iter().map(canary_event));
    events
}

/// The evidence of an analysis as event reasons: what failed (or was in doubt), else for a
/// passed stage its gates, else every check that could decide.
pub fn reasons(view: &AnalysisView, kind: ChangeKind) -> Vec<Reason> {
    let check_reason = |c: &canaryd_engine::judge::Check| Reason {
        feature: c.feature.clone(),
        operation: c.operation.clone(),
        test: c.test.name().into(),
        canary_value: c.canary_value.unwrap_or(0.0),
        baseline_value: c.baseline_value.unwrap_or(0.0),
        statistic: c.statistic.unwrap_or(0.0),
        threshold: c.threshold,
        message: match c.p_value {
            Some(p) => format!(
                "{} (over {} s: {} canary and {} stable samples, p = {p:.1e})",
                c.message, c.window_s, c.canary_samples, c.baseline_samples
            ),
            None => c.message.clone(),
        },
    };
    let gate_reason = |g: &canaryd_engine::judge::GateResult| Reason {
        feature: g.metric.name().into(),
        operation: None,
        test: "gate".into(),
        canary_value: g.value.unwrap_or(0.0),
        baseline_value: g.max.or(g.min).unwrap_or(0.0),
        statistic: g.value.unwrap_or(0.0),
        threshold: g.max.or(g.min).unwrap_or(0.0),
        message: g.message.clone(),
    };
    let mut out: Vec<Reason> = Vec::new();
    match kind {
        ChangeKind::Failed if view.failed_in.is_some() => {
            let (env, event_id) = view.failed_in.clone().unwrap_or_default();
            out.push(Reason {
                feature: "promotion".into(),
                operation: None,
                test: "promotion".into(),
                canary_value: 0.0,
                baseline_value: 0.0,
                statistic: 0.0,
                threshold: 0.0,
                message: format!(
                    "version {} failed in {env} ({event_id}), earlier in the promotion chain: failed on sight in {}",
                    view.canary_version, view.env
                ),
            });
        }
        ChangeKind::Failed => {
            out.extend(
                view.gates
                    .iter()
                    .filter(|g| g.outcome == GateOutcome::Fail)
                    .map(gate_reason),
            );
            let mut failing: Vec<_> = view
                .checks
                .iter()
                .filter(|c| c.outcome == Outcome::Fail)
                .collect();
            // The strongest evidence first.
            failing.sort_by(|a, b| b.statistic.unwrap_or(0.0).total_cmp(&a.statistic.unwrap_or(0.0)));
            out.extend(failing.into_iter().map(check_reason));
        }
        ChangeKind::StagePassed | ChangeKind::Promoted | ChangeKind::AwaitingApproval => {
            out.extend(view.gates.iter().map(gate_reason));
        }
        ChangeKind::Held => {
            out.extend(
                view.gates
                    .iter()
                    .filter(|g| g.outcome == GateOutcome::Shared)
                    .map(gate_reason),
            );
        }
        ChangeKind::Started
        | ChangeKind::RolledBack
        | ChangeKind::Ended
        | ChangeKind::Replaced
        | ChangeKind::OperatorPromoted
        | ChangeKind::OperatorAborted
        | ChangeKind::Paused
        | ChangeKind::Resumed
        | ChangeKind::Approved => {}
    }
    out
}

/// The event for a canary analysis decision.
pub fn canary_event(change: &CanaryChange) -> Event {
    let view = &change.view;
    let event_type = match change.kind {
        ChangeKind::Started => EventType::CanaryStarted,
        ChangeKind::StagePassed => EventType::CanaryStagePassed,
        ChangeKind::Failed | ChangeKind::OperatorAborted => EventType::CanaryFailed,
        ChangeKind::Promoted | ChangeKind::OperatorPromoted => EventType::CanaryPromoted,
        ChangeKind::RolledBack => EventType::CanaryRolledBack,
        ChangeKind::Ended | ChangeKind::Replaced => EventType::CanaryEnded,
        ChangeKind::Held => EventType::CanaryHeld,
        ChangeKind::Paused => EventType::CanaryPaused,
        ChangeKind::Resumed => EventType::CanaryResumed,
        ChangeKind::AwaitingApproval => EventType::CanaryAwaitingApproval,
        ChangeKind::Approved => EventType::CanaryStagePassed,
    };
    let action = change.weight.map(|weight| Action {
        kind: "set_weight".into(),
        app: view.app.clone(),
        version: view.canary_version.clone(),
        weight: weight.round().clamp(0.0, 100.0) as u32,
    });
    let mut reasons = reasons(view, change.kind);
    if reasons.is_empty() {
        let message = match change.kind {
            ChangeKind::Started => format!(
                "canary {} judged against stable {} with model {}",
                view.canary_version, view.stable_version, view.model
            ),
            ChangeKind::RolledBack => format!(
                "failed canary {} has had no traffic for the model's rolled_back_after_s: taken out",
                view.canary_version
            ),
            ChangeKind::Ended => format!(
                "analysis of canary {} ended through the rollout API while {}",
                view.canary_version,
                view.state.name()
            ),
            ChangeKind::Replaced => format!(
                "analysis of canary {} replaced by a declared rollout while {}",
                view.canary_version,
                view.state.name()
            ),
            ChangeKind::OperatorPromoted => format!("canary {} promoted by an operator", view.canary_version),
            ChangeKind::OperatorAborted => format!("canary {} aborted by an operator", view.canary_version),
            ChangeKind::Paused => format!(
                "analysis of canary {} paused by an operator: judged on, but no stage passes and nothing fails until it is resumed",
                view.canary_version
            ),
            ChangeKind::Resumed => format!(
                "analysis of canary {} resumed by an operator",
                view.canary_version
            ),
            ChangeKind::Approved => format!(
                "stage {} of canary {} approved by a person",
                view.stage.as_ref().map_or("?", |s| s.name.as_str()),
                view.canary_version
            ),
            ChangeKind::AwaitingApproval => format!(
                "stage {} of canary {} passed; the next stage waits for a person's approval",
                view.stage.as_ref().map_or("?", |s| s.name.as_str()),
                view.canary_version
            ),
            _ => format!("analysis is {}", view.state.name()),
        };
        let test = match change.kind {
            ChangeKind::Ended => "ended",
            ChangeKind::Replaced => "replaced",
            ChangeKind::OperatorPromoted
            | ChangeKind::OperatorAborted
            | ChangeKind::Paused
            | ChangeKind::Resumed => "operator",
            ChangeKind::Approved | ChangeKind::AwaitingApproval => "approval",
            _ => "state",
        };
        reasons.push(Reason {
            feature: "analysis".into(),
            operation: None,
            test: test.into(),
            canary_value: 0.0,
            baseline_value: 0.0,
            statistic: view.score.unwrap_or(0.0),
            threshold: 0.0,
            message,
        });
    }
    Event::new(
        event_type,
        EventData {
            env: view.env.clone(),
            app: view.app.clone(),
            stable_version: Some(view.stable_version.clone()),
            canary_version: Some(view.canary_version.clone()),
            version: Some(view.canary_version.clone()),
            stage: view.stage.as_ref().map(|s| Stage {
                index: s.index as u32,
                name: s.name.clone(),
                weight: s.weight.round() as u32,
            }),
            state: view.state.name().into(),
            score: view.score,
            detected_at: format_event_time(change.time),
            reasons,
            action,
            dry_run: view.mode == Mode::Shadow,
            approval: None,
            next_env: matches!(change.kind, ChangeKind::Promoted | ChangeKind::OperatorPromoted)
                .then(|| view.next_env.clone())
                .flatten(),
            traffic: route(change),
            cause: None,
            levers: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A declared rollout's route in each event that moves traffic: the stage's share and the
    /// plan's lists while the canary may have traffic, the full share once promoted, and no one
    /// once failed; events that move nothing carry none.
    #[test]
    fn routes_follow_the_plan_and_a_failed_canary_has_no_one() {
        use canaryd_engine::judge::{Operation, Stage as ModelStage, TrafficRequest};
        use canaryd_engine::simulate::{Chunk, Fault, Service, Traffic, long_stage, model};
        use canaryd_engine::{Declaration, Engine, EngineConfig};

        let stages = vec![
            long_stage().remove(0),
            ModelStage {
                name: "all".into(),
                weight: 100.0,
                ..long_stage().remove(0)
            },
        ];
        let plan = TrafficRequest {
            percentages: Some(vec![2.5, 100.0]),
            sticky: Some(Sticky::Header("X-User-Id".into())),
            headers: Some(vec![HeaderMatch {
                name: "x-canary".into(),
                value: "always".into(),
            }]),
            users: Some(vec!["alice".into()]),
        };
        let service = Service {
            declared: true,
            ..Service::new(7, Fault::None)
        };
        let routes_after = |operation: Operation| -> Vec<(EventType, Option<Route>)> {
            let config = EngineConfig {
                models: vec![model(stages.clone())],
                ..EngineConfig::default()
            };
            let mut engine = Engine::new(
                config,
                Box::new(canaryd_engine::baseline::MemorySlotStore::default()),
            );
            let mut events = Vec::new();
            for Chunk { declare, batch } in Traffic::new(&service, "shop") {
                if declare {
                    let declaration = Declaration {
                        stable: "1.0.0",
                        canary: "1.1.0",
                        model: None,
                        replace: false,
                        traffic: Some(&plan),
                    };
                    let started = engine
                        .declare_rollout("prod", "shop", declaration)
                        .expect("declared");
                    events.extend(started.iter().map(canary_event));
                    let done = engine.operate("prod", "shop", operation).expect("operated");
                    events.push(canary_event(&done));
                    break;
                }
                engine.ingest(&batch);
            }
            events
                .into_iter()
                .map(|e| (e.event_type, e.data.traffic))
                .collect()
        };
        let sticky = Some(Sticky::Header("x-user-id".into()));
        let everyone = |percent: f64| Route {
            percent,
            sticky: sticky.clone(),
            headers: vec![HeaderMatch {
                name: "x-canary".into(),
                value: "always".into(),
            }],
            users: vec!["alice".into()],
        };
        assert_eq!(
            routes_after(Operation::Abort),
            [
                (EventType::CanaryStarted, Some(everyone(2.5))),
                (
                    EventType::CanaryFailed,
                    Some(Route {
                        percent: 0.0,
                        sticky: sticky.clone(),
                        headers: vec![],
                        users: vec![],
                    })
                ),
            ]
        );
        assert_eq!(
            routes_after(Operation::Promote)[1],
            (EventType::CanaryPromoted, Some(everyone(100.0)))
        );
        assert_eq!(routes_after(Operation::Pause)[1], (EventType::CanaryPaused, None));
    }

    #[test]
    fn event_times_are_rfc3339_with_nanoseconds() {
        assert_eq!(
            format_event_time(1_767_571_200_000_000_001),
            "2026-01-05T00:00:00.000000001Z"
        );
    }

    #[test]
    fn ids_round_trip_and_sort_like_their_sequence() {
        assert_eq!(event_seq(&event_id(42)), Some(42));
        assert!(event_id(9) < event_id(10));
        assert_eq!(event_seq("evt_12"), None);
        assert_eq!(event_seq("nope"), None);
    }

    /// An event as a decision makes it, before it is named.
    fn decided(event_type: EventType, stage: Option<u32>, detected_at: &str, feature: &str) -> Event {
        let mut event = Event::new(
            event_type,
            EventData {
                env: "prod".into(),
                app: "shop".into(),
                stable_version: Some("1.0".into()),
                canary_version: Some("2.0".into()),
                version: Some("2.0".into()),
                stage: stage.map(|index| Stage {
                    index,
                    name: format!("s{index}"),
                    weight: 10,
                }),
                state: "failing".into(),
                score: Some(12.5),
                detected_at: detected_at.into(),
                reasons: vec![Reason {
                    feature: feature.into(),
                    operation: Some("GET /orders".into()),
                    test: "fisher_exact".into(),
                    canary_value: 0.3,
                    baseline_value: 0.001,
                    statistic: 14.2,
                    threshold: 4.9,
                    message: "error ratio 30.00% against 0.10%".into(),
                }],
                action: None,
                dry_run: false,
                approval: None,
                next_env: None,
                traffic: None,
                cause: None,
                levers: None,
            },
        );
        event.identify();
        event
    }

    /// Issue 17, lockstep pairs: a decision's id and time come from what it is about, so two
    /// replicas making it name it alike; any part of what it is about names another.
    #[test]
    fn a_decision_is_named_by_what_it_is_about() {
        let at = "2026-01-05T00:10:00.000000000Z";
        let event = decided(EventType::CanaryFailed, Some(0), at, "error_ratio");
        assert_eq!(
            event,
            decided(EventType::CanaryFailed, Some(0), at, "error_ratio")
        );
        assert_eq!(event.time, at, "it happened when its evidence says");
        assert!(
            event.id.starts_with("evt_") && event.id.len() == 36,
            "{}",
            event.id
        );
        assert_eq!(
            event_seq(&event.id),
            None,
            "never read as an id of the sequence form"
        );
        // The evidence's values and words are not what it is about: a replica that saw a little
        // less names the same decision alike.
        let mut other_numbers = event.clone();
        other_numbers.data.score = Some(11.0);
        other_numbers.data.reasons[0].message = "other words".into();
        other_numbers.identify();
        assert_eq!(other_numbers.id, event.id);
        let others = [
            decided(EventType::CanaryStagePassed, Some(0), at, "error_ratio"),
            decided(EventType::CanaryFailed, Some(1), at, "error_ratio"),
            decided(EventType::CanaryFailed, None, at, "error_ratio"),
            decided(
                EventType::CanaryFailed,
                Some(0),
                "2026-01-05T00:10:01.000000000Z",
                "error_ratio",
            ),
            decided(EventType::AnomalyDetected, Some(0), at, "error_ratio"),
        ];
        let mut ids: Vec<&str> = others.iter().map(|e| e.id.as_str()).collect();
        ids.push(&event.id);
        // An anomaly is about its feature too.
        let anomaly = decided(EventType::AnomalyDetected, Some(0), at, "latency_p95_ms");
        ids.push(&anomaly.id);
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "{ids:?}");
        let mut versions = event.clone();
        versions.data.stable_version = Some("1.1".into());
        versions.identify();
        assert_ne!(versions.id, event.id);
    }

    /// An operator's action reaches one replica and may repeat at one event-time instant: its
    /// moment is part of its name, and its time.
    #[test]
    fn an_operators_action_is_named_with_the_moment_it_was_taken() {
        let at = "2026-01-05T00:10:00.000000000Z";
        let mut first = decided(EventType::CanaryPaused, Some(0), at, "analysis");
        let mut second = first.clone();
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        first.identify_operated(now);
        second.identify_operated(now + std::time::Duration::from_nanos(1));
        assert_ne!(first.id, second.id);
        assert_eq!(first.time, "2027-01-15T08:00:00.000000000Z");
        assert_eq!(first.data.detected_at, at);
    }

    #[test]
    fn types_serialize_as_the_contract_names_them() {
        for t in EventType::ALL {
            assert_eq!(serde_json::to_value(t).expect("json"), t.as_str());
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
    }
}
