//! Simulated services in event time: a stable and a canary version of one app (or a stable app
//! alone), with the load cycles, latency shapes, operation mixes and faults real services have,
//! fed batch by batch into an `Engine`. What the judge's scenario tests and the calibration
//! benchmark (`benches/calibration.rs`) drive the engine with; seeded, so every run repeats.

use crate::anomaly::Transition;
use crate::baseline::MemorySlotStore;
use crate::judge::model::{
    CallGraphCheck, Checks, Decision, ErrorRatioCheck, LatencyCheck, MetricsCheck, OperationMixCheck,
    RateCheck,
};
use crate::judge::{ChangeKind, GateOutcome, Mode, Model, Outcome, Stage, State};
use crate::rng::Rng;
use crate::{
    AnomalyChange, Batch, CallObservation, DownstreamSource, Engine, EngineConfig, ExceptionObservation,
    Identity, MetricPoint, PointValue, RequestObservation, ResourceObservations, SeriesKey, SpanId,
    Temporality, TraceId,
};

/// One second of event time, in nanoseconds.
pub const S: u64 = 1_000_000_000;
/// 2026-01-05T00:00:00Z, a Monday: where every simulated run's clock starts.
pub const START: u64 = 1_767_571_200 * S;

/// The model the scenarios judge with: every comparison of the default model, no baseline check,
/// and `stages`.
pub fn model(stages: Vec<Stage>) -> Model {
    Model {
        name: "default".into(),
        description: String::new(),
        mode: Mode::Enforce,
        decision: Decision::default(),
        checks: Checks {
            error_ratio: Some(ErrorRatioCheck::default()),
            latency: Some(LatencyCheck::default()),
            operation_mix: Some(OperationMixCheck::default()),
            call_graph: Some(CallGraphCheck::default()),
            exceptions: Some(RateCheck::default()),
            error_logs: Some(RateCheck::default()),
            metrics: Some(MetricsCheck::default()),
            baseline: None,
        },
        stages,
        promotion: vec![],
        traffic: Default::default(),
    }
}

/// One stage that lasts longer than any run: the canary is judged, never promoted.
pub fn long_stage() -> Vec<Stage> {
    vec![Stage {
        name: "observe".into(),
        weight: 10.0,
        observe_s: 100_000,
        approval: false,
        gates: vec![],
    }]
}

/// What is wrong with the canary from the fault's onset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Every canary request fails with this chance.
    ErrorRate(f64),
    /// Every canary request is this many times slower.
    LatencyFactor(f64),
    /// The slowest 2% of canary requests are this many times slower: the p99 moves by the
    /// factor, the median not at all.
    TailLatency(f64),
    /// Multiplies the weight of the first operation.
    OpMix(f64),
    /// Every request of the canary also calls a new downstream.
    NewEdge,
    /// The canary stops calling the first operation's downstream.
    VanishedEdge,
    /// A fraction of canary requests throws a new exception type.
    NewException(f64),
    /// Multiplies the canary's orders counter increments.
    Metric(f64),
    /// The fault, in the canary's requests of one cohort only (by its index in
    /// `Service::cohorts`); its other requests are healthy.
    InCohort(usize, &'static Fault),
}

/// How the app's load varies with event time: a multiplier of its mean request rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    Flat,
    /// `1 - amplitude * cos(2 pi t / period_s)`, `t` in seconds from `START`: lowest at the start
    /// of each period (midnight, for a daily one), highest half-way through it.
    Cycle {
        period_s: u64,
        amplitude: f64,
    },
}

impl Load {
    pub const HOURLY: u64 = 3_600;
    pub const DAILY: u64 = 86_400;

    /// The multiplier at `t` seconds from `START`.
    pub fn at(self, t: f64) -> f64 {
        match self {
            Load::Flat => 1.0,
            Load::Cycle { period_s, amplitude } => {
                1.0 - amplitude * (t / period_s as f64 * std::f64::consts::TAU).cos()
            }
        }
    }
}

/// The spread of one operation's latency around its median.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Latency {
    /// Log-normal, with this sigma.
    LogNormal(f64),
    /// Log-normal, and a share of requests (a slow path: a cache miss, a retry) drawn from a
    /// Pareto tail with this index above the log-normal's own 99th percentile.
    HeavyTail { sigma: f64, share: f64, index: f64 },
}

/// One operation of a simulated service.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    pub name: String,
    /// Relative share of the app's requests.
    pub weight: f64,
    pub median_ms: f64,
    pub downstream: String,
    /// Calls to its downstream per request (calls cluster by operation in real services, which
    /// the call-graph test must allow for).
    pub calls: u32,
}

/// The four operations of a small shop: a product page, a cart, orders and order lookups.
pub fn shop() -> Vec<Operation> {
    [
        ("GET /api/products", 50.0, 28.0, "catalog-db", 1),
        ("GET /api/cart", 25.0, 22.0, "redis", 1),
        ("POST /api/orders", 15.0, 140.0, "payments", 2),
        ("GET /api/orders/{id}", 10.0, 30.0, "orders-db", 1),
    ]
    .into_iter()
    .map(|(name, weight, median_ms, downstream, calls)| Operation {
        name: name.into(),
        weight,
        median_ms,
        downstream: downstream.into(),
        calls,
    })
    .collect()
}

/// `n` operations with Zipf-skewed shares (the first takes about a quarter of the requests at 40,
/// the last a few in ten thousand), medians from 5 ms to 400 ms and eight downstreams.
pub fn skewed(n: usize) -> Vec<Operation> {
    let mut rng = Rng::new(n as u64);
    (0..n)
        .map(|i| Operation {
            name: format!("GET /api/v1/resource{i}"),
            weight: 1.0 / ((i + 1) as f64).powf(1.2),
            median_ms: 5.0 * 80f64.powf(rng.unit()),
            downstream: format!("backend-{}", i % 8),
            calls: 1 + (i % 3) as u32,
        })
        .collect()
}

/// A service with a stable version `1.0.0` and, after `warmup_s`, a canary `1.1.0` taking
/// `canary_share` of its requests.
#[derive(Clone, Debug)]
pub struct Service {
    pub seed: u64,
    /// Mean requests per second over a load cycle.
    pub rps: f64,
    pub canary_share: f64,
    pub warmup_s: u64,
    /// How long the canary runs.
    pub duration_s: u64,
    /// Seconds into the canary's run when the fault starts.
    pub fault_at_s: u64,
    pub fault: Fault,
    pub base_error: f64,
    pub operations: Vec<Operation>,
    pub latency: Latency,
    pub load: Load,
    /// How closely latency follows load: every request's latency is multiplied by the load
    /// multiplier to this power (0: latency does not depend on load).
    pub latency_load: f64,
    /// Where the run starts, in seconds after `START`: the time of day, or the point in the cycle.
    pub offset_s: u64,
    /// Each version exports its cumulative orders counter every this many seconds...
    pub metric_every_s: u64,
    /// ...except that an export fails with this chance, and with it every export for up to this
    /// many seconds (an exporter that cannot reach the collector): the next point that gets
    /// through spans the gap, as cumulative points do.
    pub metric_outage: Option<(f64, u64)>,
    /// From the fault's onset, every request of both versions fails with this chance: a fault
    /// they share (a dependency's outage). The canary's own fault, if any, comes on top.
    pub shared_error: Option<f64>,
    /// Event time each batch covers, as an SDK's batch processor would send it.
    pub batch_s: u64,
    /// The rollout is declared (with the model, named `default`) when the warm-up ends, rather
    /// than inferred once the canary has traffic.
    pub declared: bool,
    /// Cohorts and the share of requests (of both versions) each carries; the rest carry none.
    pub cohorts: Vec<(String, f64)>,
    /// The cohort (by its index in `cohorts`) routed to the canary alone once it is live, as an
    /// allow-list of users is; before, its requests reach the stable like any others.
    pub canary_only_cohort: Option<usize>,
}

impl Service {
    /// 200 requests a second, a tenth to the canary, four operations, a flat load, 0.1% errors;
    /// a 240 s warm-up and 300 s of canary, the fault at 60 s.
    pub fn new(seed: u64, fault: Fault) -> Self {
        Service {
            seed,
            rps: 200.0,
            canary_share: 0.1,
            warmup_s: 240,
            duration_s: 300,
            fault_at_s: 60,
            fault,
            base_error: 0.001,
            operations: shop(),
            latency: Latency::LogNormal(0.4),
            load: Load::Flat,
            latency_load: 0.0,
            offset_s: 0,
            metric_every_s: 10,
            metric_outage: None,
            shared_error: None,
            batch_s: 5,
            declared: false,
            cohorts: Vec::new(),
            canary_only_cohort: None,
        }
    }

    /// Where the canary's run begins, in event time.
    pub fn canary_from(&self) -> u64 {
        START + (self.offset_s + self.warmup_s) * S
    }

    /// Where the fault begins, in event time.
    pub fn onset(&self) -> u64 {
        self.canary_from() + self.fault_at_s * S
    }
}

/// The outcome of one run: every canary change, and the analysis at the end.
#[derive(Clone, Debug)]
pub struct Run {
    pub changes: Vec<(ChangeKind, u64)>,
    pub state: State,
    /// The analysis's last score, and its gates' outcomes.
    pub score: Option<f64>,
    pub gates: Vec<GateOutcome>,
    pub fault_onset: u64,
    pub failing_checks: Vec<String>,
    pub passing_checks: Vec<String>,
    /// Every check's feature at the end, whatever its outcome.
    pub judged: Vec<String>,
    /// The failing checks, with their messages, of the look that failed the canary.
    pub failed_on: Vec<String>,
}

impl Run {
    pub fn failed_at(&self) -> Option<u64> {
        self.changes
            .iter()
            .find(|(k, _)| *k == ChangeKind::Failed)
            .map(|(_, t)| *t)
    }

    /// Event-time seconds from the fault's onset to the failure.
    pub fn delay_s(&self) -> Option<f64> {
        self.failed_at()
            .map(|t| (t as f64 - self.fault_onset as f64) / S as f64)
    }
}

fn poisson(rng: &mut Rng, mean: f64) -> u64 {
    // Knuth's method; split to keep exp() in range.
    let mut left = mean;
    let mut n = 0;
    while left > 0.0 {
        let step = left.min(30.0);
        left -= step;
        let limit = (-step).exp();
        let mut p = 1.0;
        loop {
            p *= rng.unit();
            if p <= limit {
                break;
            }
            n += 1;
        }
    }
    n
}

fn normal(rng: &mut Rng) -> f64 {
    let (u, v) = (rng.unit().max(1e-12), rng.unit());
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// The standard normal's 98th percentile: above it lie the slowest 2% of a log-normal's draws.
const Z98: f64 = 2.054;
/// The standard normal's 99th percentile.
const Z99: f64 = 2.326;

impl Latency {
    /// A latency multiplier of the median, and whether the request is among the slowest 2% of
    /// its log-normal part.
    fn draw(self, rng: &mut Rng) -> (f64, bool) {
        match self {
            Latency::LogNormal(sigma) => {
                let z = normal(rng);
                ((sigma * z).exp(), z > Z98)
            }
            Latency::HeavyTail { sigma, share, index } => {
                if rng.unit() < share {
                    let pareto = (1.0 - rng.unit()).max(1e-12).powf(-1.0 / index);
                    ((sigma * Z99).exp() * pareto, true)
                } else {
                    let z = normal(rng);
                    ((sigma * z).exp(), z > Z98)
                }
            }
        }
    }
}

/// One batch of a service's traffic, as an SDK's batch processor would send it.
pub struct Chunk {
    /// The rollout is to be declared before this batch (`Service::declared`: the warm-up ended).
    pub declare: bool,
    /// Both versions' observations of the batch's seconds (a version with none left out).
    pub batch: Batch,
}

/// A service's traffic, batch by batch in event time: what `run` feeds the engine, and what the
/// daemon's tests send it as OTLP. Seeded: the same service yields the same batches.
pub struct Traffic<'a> {
    service: &'a Service,
    app: String,
    rng: Rng,
    /// The next batch's first second.
    chunk: u64,
    orders: [f64; 2],
    /// Per version, until when its metric exports fail.
    outage_until: [u64; 2],
    declared: bool,
}

impl<'a> Traffic<'a> {
    /// `service` as app `app` of env `prod`.
    pub fn new(service: &'a Service, app: &str) -> Self {
        Traffic {
            service,
            app: app.to_owned(),
            rng: Rng::new(service.seed),
            chunk: 0,
            orders: [0.0; 2],
            outage_until: [0; 2],
            declared: false,
        }
    }
}

impl Iterator for Traffic<'_> {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        let service = self.service;
        let total_s = service.warmup_s + service.duration_s;
        let chunk = self.chunk;
        if chunk >= total_s {
            return None;
        }
        let batch_s = service.batch_s.max(1);
        self.chunk += batch_s;
        let begin = START + service.offset_s * S;
        let onset = service.onset();
        let ops = &service.operations;
        let rng = &mut self.rng;
        let declare = service.declared && !self.declared && chunk >= service.warmup_s;
        self.declared |= declare;
        let mut resources = [
            ResourceObservations::new(Identity::new("prod", &self.app, "1.0.0")),
            ResourceObservations::new(Identity::new("prod", &self.app, "1.1.0")),
        ];
        for second in chunk..(chunk + batch_s).min(total_s) {
            let t0 = begin + second * S;
            let canary_live = second >= service.warmup_s;
            let faulty = t0 >= onset;
            let load = service.load.at((service.offset_s + second) as f64 + 0.5);
            let slower = load.powf(service.latency_load);
            let n = poisson(rng, service.rps * load);
            for _ in 0..n {
                let time = t0 + rng.below(S);
                let is_canary = canary_live && rng.unit() < service.canary_share;
                // Drawn only where there are cohorts, so that runs without them draw as always.
                let cohort = if service.cohorts.is_empty() {
                    None
                } else {
                    let mut pick = rng.unit();
                    service.cohorts.iter().position(|(_, share)| {
                        pick -= share;
                        pick < 0.0
                    })
                };
                // An allow-listed cohort: all of it on the canary once it is live.
                let is_canary =
                    is_canary || (canary_live && cohort.is_some() && cohort == service.canary_only_cohort);
                let fault = match service.fault {
                    _ if !(is_canary && faulty) => Fault::None,
                    Fault::InCohort(i, fault) if cohort == Some(i) => *fault,
                    Fault::InCohort(..) => Fault::None,
                    fault => fault,
                };
                let weight = |i: usize| match fault {
                    Fault::OpMix(f) if i == 0 => ops[i].weight * f,
                    _ => ops[i].weight,
                };
                let mut pick = rng.unit() * (0..ops.len()).map(weight).sum::<f64>();
                let mut op = 0;
                while op + 1 < ops.len() && pick >= weight(op) {
                    pick -= weight(op);
                    op += 1;
                }
                let operation = &ops[op];
                let (spread, slowest) = service.latency.draw(rng);
                let mut latency = operation.median_ms * slower * spread;
                match fault {
                    Fault::LatencyFactor(f) => latency *= f,
                    Fault::TailLatency(f) if slowest => latency *= f,
                    _ => {}
                }
                let error_p = match (fault, service.shared_error) {
                    (Fault::ErrorRate(p), _) => p,
                    (_, Some(p)) if faulty => p,
                    _ => service.base_error,
                };
                let error = rng.unit() < error_p;
                let cohort_name: Option<std::sync::Arc<str>> =
                    cohort.map(|i| service.cohorts[i].0.as_str().into());
                let r = &mut resources[usize::from(is_canary)];
                r.spans += 1;
                r.saw(time);
                r.requests.push(RequestObservation {
                    operation: operation.name.as_str().into(),
                    time,
                    duration_ns: (latency * 1e6) as u64,
                    error,
                    trace_id: TraceId::default(),
                    span_id: SpanId::default(),
                    cohort: cohort_name.clone(),
                });
                let call = |downstream: &str| CallObservation {
                    downstream: downstream.into(),
                    source: DownstreamSource::PeerService,
                    time,
                    duration_ns: 1_000_000,
                    error: false,
                    trace_id: TraceId::default(),
                    cohort: cohort_name.clone(),
                };
                if !(fault == Fault::VanishedEdge && op == 0) {
                    for _ in 0..operation.calls {
                        r.calls.push(call(&operation.downstream));
                    }
                }
                if fault == Fault::NewEdge {
                    r.calls.push(call("fraud-check"));
                }
                if let Fault::NewException(p) = fault
                    && rng.unit() < p
                {
                    r.exceptions.push(ExceptionObservation {
                        exception_type: "java.lang.NullPointerException".into(),
                        operation: operation.name.as_str().into(),
                        time,
                        trace_id: TraceId::default(),
                        cohort: cohort_name.clone(),
                    });
                }
                // Orders: placed by the third operation (the shop's POST /api/orders).
                if op == 2 && !error {
                    let factor = match fault {
                        Fault::Metric(f) => f,
                        _ => 1.0,
                    };
                    self.orders[usize::from(is_canary)] += if rng.unit() < 0.98 * factor.min(1.0) {
                        factor.max(1.0).round()
                    } else {
                        0.0
                    };
                }
            }
            // A cumulative orders counter per version, every `metric_every_s`.
            if second % service.metric_every_s == service.metric_every_s - 1 {
                for (v, r) in resources.iter_mut().enumerate() {
                    if v == 1 && !canary_live {
                        continue;
                    }
                    if let Some((chance, longest_s)) = service.metric_outage {
                        if second < self.outage_until[v] {
                            continue;
                        }
                        if rng.unit() < chance {
                            self.outage_until[v] = second + 1 + rng.below(longest_s);
                            continue;
                        }
                    }
                    let time = t0 + S - 1;
                    r.saw(time);
                    r.metric_points.push(MetricPoint {
                        series: SeriesKey::new("orders.completed".into(), vec![]),
                        // As SDKs do: the series starts when its version does, and its first
                        // point carries no increment the engine can place.
                        start_time: if v == 1 {
                            begin + service.warmup_s * S
                        } else {
                            begin
                        },
                        time,
                        value: PointValue::Sum {
                            temporality: Temporality::Cumulative,
                            monotonic: true,
                            value: self.orders[v],
                        },
                    });
                }
            }
        }
        Some(Chunk {
            declare,
            batch: Batch {
                resources: resources.into_iter().filter(|r| r.seen.is_some()).collect(),
                received: 0,
            },
        })
    }
}

/// Feeds `service` into a fresh engine judging with `model`, and reports what the judge did.
pub fn run(service: &Service, model: Model) -> Run {
    let config = EngineConfig {
        models: vec![model],
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(config, Box::new(MemorySlotStore::default()));
    let onset = service.onset();
    let mut changes = Vec::new();
    let mut failed_on = Vec::new();
    for Chunk { declare, batch } in Traffic::new(service, "shop") {
        if declare {
            let started = engine
                .declare_rollout(
                    "prod",
                    "shop",
                    crate::Declaration {
                        stable: "1.0.0",
                        canary: "1.1.0",
                        model: Some("default"),
                        replace: false,
                        traffic: None,
                    },
                )
                .expect("the stable's warm-up made the app known");
            changes.extend(started.iter().map(|c| (c.kind, c.time)));
        }
        let report = engine.ingest(&batch);
        for c in &report.canary {
            if c.kind == ChangeKind::Failed && failed_on.is_empty() {
                failed_on = c
                    .view
                    .checks
                    .iter()
                    .filter(|c| c.outcome == Outcome::Fail)
                    .map(|c| format!("{}: {}", c.id, c.message))
                    .collect();
            }
        }
        changes.extend(report.canary.iter().map(|c| (c.kind, c.time)));
    }
    let view = engine.analysis("prod", "shop");
    let named = |outcome: Outcome, with_message: bool| -> Vec<String> {
        view.as_ref()
            .map(|v| {
                v.checks
                    .iter()
                    .filter(|c| c.outcome == outcome)
                    .map(|c| {
                        if with_message {
                            format!("{}: {}", c.id, c.message)
                        } else {
                            c.feature.clone()
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    Run {
        failing_checks: named(Outcome::Fail, false),
        judged: view
            .as_ref()
            .map(|v| v.checks.iter().map(|c| c.feature.clone()).collect())
            .unwrap_or_default(),
        passing_checks: named(Outcome::Pass, true),
        failed_on,
        changes,
        state: view.as_ref().map_or(State::InsufficientData, |v| v.state),
        score: view.as_ref().and_then(|v| v.score),
        gates: view
            .as_ref()
            .map(|v| v.gates.iter().map(|g| g.outcome).collect())
            .unwrap_or_default(),
        fault_onset: onset,
    }
}

/// (name, share of the app's requests, median latency ms) of the stable-only app: skewed, as
/// real services are.
const STABLE_OPS: [(&str, f64, f64); 5] = [
    ("GET /api/products", 0.55, 25.0),
    ("GET /api/cart", 0.25, 18.0),
    ("POST /api/orders", 0.1, 120.0),
    ("GET /api/orders/{id}", 0.06, 30.0),
    ("POST /api/login", 0.04, 60.0),
];

/// A stable app (one version) for `days` from Monday 00:00, under a daily cycle from a tenth of
/// its mean `rps` at midnight to nearly twice it at noon, each request failing with chance
/// `error` (`fault(second)` instead, where it says); batches of 10 s, into `engine`. Returns the
/// anomaly changes.
pub fn stable_app(
    engine: &mut Engine,
    seed: u64,
    days: u64,
    rps: f64,
    error: f64,
    fault: impl Fn(u64) -> Option<f64>,
) -> Vec<AnomalyChange> {
    let mut rng = Rng::new(seed);
    let mut changes = Vec::new();
    let seconds = days * 86_400;
    for chunk in (0..seconds).step_by(10) {
        let mut r = ResourceObservations::new(Identity::new("prod", "shop", "1.0.0"));
        for second in chunk..chunk + 10 {
            let day = (second % 86_400) as f64 / 86_400.0;
            let load = 1.0 - 0.9 * (day * std::f64::consts::TAU).cos();
            let p_error = fault(second).unwrap_or(error);
            for (name, share, median) in STABLE_OPS {
                // Poisson arrivals: exponential gaps within the second.
                let mut t = 0.0;
                loop {
                    t += -(1.0 - rng.unit()).ln() / (rps * share * load);
                    if t >= 1.0 {
                        break;
                    }
                    let time = START + second * S + (t * S as f64) as u64;
                    let latency_ms = median * (0.4 * (rng.unit() - 0.5) * 3.4).exp();
                    r.spans += 1;
                    r.saw(time);
                    r.requests.push(RequestObservation {
                        operation: name.into(),
                        time,
                        duration_ns: (latency_ms * 1e6) as u64,
                        error: rng.unit() < p_error,
                        trace_id: TraceId::default(),
                        span_id: SpanId::default(),
                        cohort: None,
                    });
                }
            }
        }
        r.requests.sort_by_key(|q| q.time);
        changes.extend(
            engine
                .ingest(&Batch {
                    resources: vec![r],
                    received: 0,
                })
                .anomalies,
        );
    }
    changes
}

/// The anomalies detected (not resolved) among `changes`, one line each.
pub fn detected(changes: &[AnomalyChange]) -> Vec<String> {
    changes
        .iter()
        .filter(|c| c.transition == Transition::Detected)
        .map(|c| {
            format!(
                "{} at {}h{:02}: {} against {:.5} (score {:.3e}, support {})",
                c.id.key,
                (c.time - START) / S / 3_600,
                (c.time - START) / S % 3_600 / 60,
                c.value,
                c.expected,
                c.score,
                c.support
            )
        })
        .collect()
}
