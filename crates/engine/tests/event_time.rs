//! Event time stays honest: no single observation, whatever its date, can move an app's watermark,
//! observations dated beyond the allowed skew ahead of both the app's event time and the receive
//! clock are refused and counted, and a clock poisoned by an older build is repaired at start.
//! Replays of recorded data (no receive clock, all in the past) are untouched.

use canaryd_engine::baseline::MemorySlotStore;
use canaryd_engine::window::AppClock;
use canaryd_engine::{
    Batch, Engine, EngineConfig, EventTime, Identity, LogObservation, MetricPoint, PointValue,
    RequestObservation, ResourceObservations, SeriesKey, Severity, SpanId, TraceId,
};
use proptest::prelude::*;

const S: u64 = 1_000_000_000;
const START: u64 = 1_767_571_200 * S;
const DAY: u64 = 86_400 * S;

fn engine() -> Engine {
    Engine::new(EngineConfig::default(), Box::new(MemorySlotStore::default()))
}

fn resource(version: &str) -> ResourceObservations {
    ResourceObservations::new(Identity::new("prod", "shop", version))
}

fn request(r: &mut ResourceObservations, time: EventTime) {
    r.spans += 1;
    r.saw(time);
    r.requests.push(RequestObservation {
        operation: "GET /".into(),
        time,
        duration_ns: 5_000_000,
        error: false,
        trace_id: TraceId::default(),
        span_id: SpanId::default(),
        cohort: None,
    });
}

/// Honest traffic: 10 requests a second from `from` for `secs` seconds, one export a second,
/// each received when its last span ended (a live stream), or with no receive clock (a replay).
fn honest(from: EventTime, secs: u64, live: bool) -> Vec<Batch> {
    (0..secs)
        .map(|s| {
            let mut r = resource("1.0");
            for i in 0..10 {
                request(&mut r, from + s * S + i * S / 10);
            }
            Batch {
                resources: vec![r],
                received: if live { from + (s + 1) * S } else { 0 },
            }
        })
        .collect()
}

/// One observation of the given kind at `time`, alone in its export.
fn lone(kind: u8, time: EventTime, received: EventTime) -> Batch {
    let mut r = resource("1.0");
    match kind {
        0 => request(&mut r, time),
        1 => {
            r.saw(time);
            r.metric_points.push(MetricPoint {
                series: SeriesKey::new("queue.depth".into(), Vec::new()),
                start_time: 0,
                time,
                value: PointValue::Gauge(3.0),
            });
        }
        _ => {
            r.saw(time);
            r.logs.push(LogObservation {
                time,
                severity: Severity::Error,
            });
        }
    }
    Batch {
        resources: vec![r],
        received,
    }
}

/// Feeds batches; returns (late, refused as future-dated).
fn feed(engine: &mut Engine, batches: &[Batch]) -> (u64, u64) {
    batches.iter().fold((0, 0), |(late, future), b| {
        let report = engine.ingest(b);
        (late + report.late, future + report.future)
    })
}

fn clock(engine: &Engine) -> AppClock {
    engine.baselines("prod", "shop", None).expect("the app").clock
}

#[test]
fn a_point_a_day_ahead_of_the_receive_clock_is_refused_for_every_signal() {
    for kind in 0..3 {
        let mut engine = engine();
        feed(&mut engine, &honest(START, 60, true));
        let before = clock(&engine);
        let now = START + 60 * S;
        let poisoned = lone(kind, now + DAY, now);
        assert_eq!(engine.ingest(&poisoned).future, 1, "kind {kind}");
        assert_eq!(clock(&engine), before, "kind {kind}: the clock did not move");
        let (late, future) = feed(&mut engine, &honest(now, 60, true));
        assert_eq!(
            (late, future),
            (0, 0),
            "kind {kind}: later honest data is on time"
        );
    }
}

#[test]
fn the_year_2200_is_refused_for_a_brand_new_app_too() {
    let mut engine = engine();
    let year_2200 = 7_258_118_400 * S;
    assert_eq!(engine.ingest(&lone(0, year_2200, START)).future, 1);
    let (late, future) = feed(&mut engine, &honest(START, 30, true));
    assert_eq!((late, future), (0, 0));
}

#[test]
fn a_replay_of_recorded_data_is_unaffected_by_the_receive_clock() {
    // Recorded weeks ago and replayed now: the receive clock is far ahead of the data, and with
    // no receive clock at all (the lab's import) nothing limits the first app time either.
    for received in [0, START + 30 * DAY] {
        let mut engine = engine();
        let batches: Vec<Batch> = honest(START, 120, false)
            .into_iter()
            .map(|b| Batch { received, ..b })
            .collect();
        let (late, future) = feed(&mut engine, &batches);
        assert_eq!((late, future), (0, 0));
        assert!(clock(&engine).closed_until >= START + 100 * S);
    }
}

#[test]
fn data_ahead_of_the_receive_clock_but_not_of_the_app_is_kept() {
    // A daemon whose own clock is behind the senders': the app's event time is what counts.
    let mut engine = engine();
    let behind = START - DAY;
    let batches: Vec<Batch> = honest(START, 60, true)
        .into_iter()
        .map(|b| Batch {
            received: behind,
            ..b
        })
        .collect();
    // The first export is a day ahead of the receive clock with no app time yet: refused.
    let (_, future) = feed(&mut engine, &batches[..1]);
    assert_eq!(future, 10);
    let mut engine = self::engine();
    engine.ingest(&honest(START, 1, false)[0]);
    let (late, future) = feed(&mut engine, &batches[1..]);
    assert_eq!((late, future), (0, 0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// One observation of any kind, dated anywhere ahead (within the skew or far beyond it),
    /// injected anywhere in an honest live stream, costs the stream nothing: no honest
    /// observation is late, and the windows closed are those of the honest stream alone.
    #[test]
    fn no_single_point_moves_the_watermark(
        kind in 0u8..3,
        at in 1usize..119,
        ahead_s in prop_oneof![2u64..300, 300u64..(10 * 86_400)],
    ) {
        let stream = honest(START, 120, true);
        let mut clean = engine();
        let (clean_late, _) = feed(&mut clean, &stream);
        let mut poisoned = engine();
        feed(&mut poisoned, &stream[..at]);
        let now = stream[at - 1].received;
        poisoned.ingest(&lone(kind, now + ahead_s * S, now));
        let (late, _) = feed(&mut poisoned, &stream[at..]);
        prop_assert_eq!(late, clean_late);
        prop_assert_eq!(clock(&poisoned).closed_until, clock(&clean).closed_until);
    }
}

#[test]
fn a_poisoned_clock_from_an_older_build_is_repaired_at_start() {
    let mut engine = engine();
    feed(&mut engine, &honest(START, 180, false));
    let honest_clock = clock(&engine);
    let mut state = engine.take_changes();
    // What an older build persisted after one point dated in 2200.
    let year_2200 = 7_258_118_400 * S;
    for (_, _, c) in &mut state.clocks {
        *c = AppClock {
            max_time: year_2200,
            closed_until: year_2200 - 10 * S,
            lead: year_2200,
        };
    }
    let mut restarted = self::engine();
    restarted.restore(state);
    let repaired = restarted.repair_future_clocks(START + 200 * S);
    assert_eq!(repaired.len(), 1);
    let back = clock(&restarted);
    assert!(back.closed_until <= honest_clock.max_time, "{back:?}");
    assert!(
        back.closed_until >= START + 60 * S,
        "back to what was learned: {back:?}"
    );
    let app = restarted.catalog().app("prod", "shop").expect("the app");
    assert!(app.last_seen().expect("seen") <= back.max_time);
    // Honest data after the restart is on time again.
    let (late, future) = feed(&mut restarted, &honest(START + 200 * S, 90, true));
    assert_eq!((late, future), (0, 0));
    assert!(clock(&restarted).closed_until > START + 250 * S);
    // A clock that is not ahead is left alone.
    assert!(restarted.repair_future_clocks(START + 300 * S).is_empty());
}

/// Exports of one version: `per_second` requests a second from `from` for `secs` seconds, sent
/// every `every` (ns) as one batch holding what ended since the last, received when sent.
fn exporter(
    version: &str,
    from: EventTime,
    secs: u64,
    per_second: u64,
    every: u64,
) -> Vec<(EventTime, Batch)> {
    let gap = S / per_second;
    let times: Vec<EventTime> = (0..secs * per_second).map(|i| from + i * gap).collect();
    let mut out = Vec::new();
    let mut sent_until = from;
    let end = from + secs * S;
    while sent_until < end {
        let at = (sent_until + every).min(end);
        let mut r = resource(version);
        for t in times.iter().filter(|t| **t >= sent_until && **t < at) {
            request(&mut r, *t);
        }
        if r.seen.is_some() {
            out.push((
                at,
                Batch {
                    resources: vec![r],
                    received: at,
                },
            ));
        }
        sent_until = at;
    }
    out
}

/// Batches of several exporters in the order they are sent.
fn interleaved(exporters: Vec<Vec<(EventTime, Batch)>>) -> Vec<Batch> {
    let mut all: Vec<(EventTime, usize, Batch)> = exporters
        .into_iter()
        .enumerate()
        .flat_map(|(i, batches)| batches.into_iter().map(move |(at, b)| (at, i, b)))
        .collect();
    all.sort_by_key(|(at, i, _)| (*at, *i));
    all.into_iter().map(|(_, _, b)| b).collect()
}

fn short_lateness() -> Engine {
    let mut config = EngineConfig::default();
    config.windows.lateness_ns = 2 * S;
    Engine::new(config, Box::new(MemorySlotStore::default()))
}

#[test]
fn a_fast_exporter_does_not_make_a_slow_one_late() {
    // The stable batches every 5 s (the SDK's default), the canary every half second, with 2 s
    // of allowed lateness: buckets close once both have passed them, so nothing is late. (The
    // stable was sending before the canary came: a source not seen yet cannot be waited for.)
    let batches = interleaved(vec![
        exporter("1.0", START - 10 * S, 130, 20, 5 * S),
        exporter("2.0", START, 120, 4, S / 2),
    ]);
    let mut engine = short_lateness();
    let (late, future) = feed(&mut engine, &batches);
    assert_eq!((late, future), (0, 0));
    assert!(
        clock(&engine).closed_until >= START + 110 * S,
        "{:?}",
        clock(&engine)
    );

    // Instances of one version are sources of their own too.
    let mut engine = short_lateness();
    let per_instance = |instance: &str, every: u64| -> Vec<(EventTime, Batch)> {
        exporter("1.0", START, 60, 5, every)
            .into_iter()
            .map(|(at, mut b)| {
                b.resources[0].instance = Some(instance.into());
                (at, b)
            })
            .collect()
    };
    let mut pod_b = per_instance("pod-b", S / 2);
    pod_b.retain(|(at, _)| *at > START + 5 * S);
    let batches = interleaved(vec![per_instance("pod-a", 5 * S), pod_b]);
    assert_eq!(feed(&mut engine, &batches), (0, 0));
}

#[test]
fn a_source_that_goes_quiet_stops_holding_the_windows_back() {
    // The canary is rolled back after 30 s and sends nothing more: within the idle time, the
    // stable's buckets close again as its own data comes in.
    let batches = interleaved(vec![
        exporter("1.0", START, 120, 10, S),
        exporter("2.0", START, 30, 10, S),
    ]);
    let mut engine = short_lateness();
    let (late, _) = feed(&mut engine, &batches);
    assert_eq!(late, 0);
    let idle = EngineConfig::default().windows.source_idle_ns;
    let closed = clock(&engine).closed_until;
    assert!(closed >= START + 120 * S - 4 * S, "{closed} vs idle {idle}");
}
