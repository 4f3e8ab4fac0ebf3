//! Workers without HTTP (issue 14, item 6): a queue consumer's CONSUMER spans, named by their
//! `messaging.destination.name`, are judged like a request handler's SERVER spans. A worker
//! replayed in event time through the same normalizer and engine the daemon runs, under the
//! built-in default model: a version that fails one message in ten is failed, an identical one
//! is promoted through every stage.

use canaryd::normalize::{self, NormalizeOptions};
use canaryd::testdata::{self, EPOCH_NS};
use canaryd_engine::baseline::MemorySlotStore;
use canaryd_engine::judge::{ChangeKind, GateOutcome, State};
use canaryd_engine::{Engine, EngineConfig};

const SECOND: u64 = 1_000_000_000;
const EXPORT_S: u64 = 5;
/// The stable alone, then both versions, long enough for the default model's three stages.
const STABLE_ALONE_S: u64 = 300;
const TOGETHER_S: u64 = 1_800;

struct Outcome {
    changes: Vec<ChangeKind>,
    state: Option<State>,
    failed_on: Vec<String>,
    operations: Vec<String>,
}

fn replay(canary_fail_every: u64) -> Outcome {
    // The daemon's built-in default model, as `serve` loads it with no models_dir.
    let default = canaryd::models::parse(
        "default",
        std::path::Path::new("models/default.toml"),
        canaryd::models::EMBEDDED_DEFAULT,
    )
    .expect("the embedded default model");
    let config = EngineConfig {
        models: vec![default],
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(config, Box::new(MemorySlotStore::default()));
    let options = NormalizeOptions::default();
    let mut changes = Vec::new();
    let mut failed_on = Vec::new();
    for export in 0..(STABLE_ALONE_S + TOGETHER_S) / EXPORT_S {
        let at_s = export * EXPORT_S;
        let start = EPOCH_NS + at_s * SECOND;
        let mut requests = vec![testdata::worker_traffic(
            ("prod", "billing-worker", "1.0.0"),
            start,
            EXPORT_S,
            20,
            0,
            export,
        )];
        if at_s >= STABLE_ALONE_S {
            requests.push(testdata::worker_traffic(
                ("prod", "billing-worker", "1.1.0"),
                start,
                EXPORT_S,
                5,
                canary_fail_every,
                1_000_000 + export,
            ));
        }
        for request in &requests {
            let normalized = normalize::traces(request, &options).expect("the worker's spans decode");
            assert_eq!(normalized.rejected, 0);
            let report = engine.ingest(&normalized.batch);
            for change in &report.canary {
                if change.kind == ChangeKind::Failed {
                    failed_on.extend(
                        change
                            .view
                            .checks
                            .iter()
                            .filter(|c| c.outcome == canaryd_engine::judge::Outcome::Fail)
                            .map(|c| format!("{}: {}", c.id, c.message))
                            .chain(
                                change
                                    .view
                                    .gates
                                    .iter()
                                    .filter(|g| g.outcome == GateOutcome::Fail)
                                    .map(|g| g.message.clone()),
                            ),
                    );
                }
                changes.push(change.kind);
            }
        }
    }
    let operations = engine
        .catalog()
        .app("prod", "billing-worker")
        .map(|entry| {
            let mut operations: Vec<String> = entry.operations().map(|(op, _)| op.to_owned()).collect();
            operations.sort();
            operations
        })
        .unwrap_or_default();
    Outcome {
        changes,
        state: engine.analysis("prod", "billing-worker").map(|a| a.state),
        failed_on,
        operations,
    }
}

#[test]
fn a_worker_that_fails_messages_is_failed_and_an_identical_one_promoted() {
    let bad = replay(10);
    assert_eq!(bad.operations, ["orders", "refunds"], "operations are the queues");
    assert!(bad.changes.contains(&ChangeKind::Failed), "{:?}", bad.changes);
    assert!(!bad.changes.contains(&ChangeKind::Promoted), "{:?}", bad.changes);
    assert!(
        bad.failed_on
            .iter()
            .any(|c| c.contains("error") || c.contains("availability")),
        "failed on its errors: {:?}",
        bad.failed_on
    );

    let good = replay(0);
    assert!(
        !good.changes.contains(&ChangeKind::Failed),
        "{:?}",
        good.failed_on
    );
    assert_eq!(
        good.changes,
        [
            ChangeKind::Started,
            ChangeKind::StagePassed,
            ChangeKind::StagePassed,
            ChangeKind::Promoted
        ]
    );
    assert_eq!(good.state, Some(State::Promoted));
}
