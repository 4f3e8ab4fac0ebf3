//! Properties of the catalog that must hold for any input: the order in which batches arrive
//! changes nothing (event time, not arrival, places observations), and caps never lose a count.

use canaryd_engine::{
    Batch, Catalog, Identity, Limits, OVERFLOW, RequestObservation, ResourceObservations, SpanId, TraceId,
};
use proptest::prelude::*;

/// (app, version, operation, time, error) for one request.
type Req = (u8, u8, u8, u64, bool);

fn batch(requests: &[Req]) -> Batch {
    let resources = requests
        .iter()
        .map(|&(app, version, op, time, error)| {
            let mut r =
                ResourceObservations::new(Identity::new("prod", &format!("a{app}"), &format!("v{version}")));
            r.spans = 1;
            r.saw(time);
            r.requests.push(RequestObservation {
                operation: format!("op{op}").into(),
                time,
                duration_ns: 1,
                error,
                trace_id: TraceId::default(),
                span_id: SpanId::default(),
                cohort: None,
            });
            r
        })
        .collect();
    Batch {
        resources,
        received: 0,
    }
}

/// Everything the catalog says, in a comparable form.
fn summary(catalog: &Catalog) -> Vec<String> {
    let mut lines = Vec::new();
    for (env, app, entry) in catalog.apps() {
        for (version, s) in entry.versions() {
            lines.push(format!("{env}/{app}@{version} {s:?}"));
        }
        let mut ops: Vec<String> = entry
            .operations()
            .map(|(o, s)| format!("{app} {o} {s:?}"))
            .collect();
        ops.sort();
        lines.extend(ops);
    }
    lines
}

fn requests() -> impl Strategy<Value = Vec<Vec<Req>>> {
    let req = (0u8..3, 0u8..3, 0u8..6, 1u64..1_000_000, any::<bool>());
    prop::collection::vec(prop::collection::vec(req, 1..20), 1..8)
}

proptest! {
    #[test]
    fn batch_order_does_not_matter(batches in requests(), seed in any::<u64>()) {
        let mut forward = Catalog::new(Limits::default());
        for b in &batches {
            forward.ingest(&batch(b));
        }
        let mut shuffled: Vec<&Vec<Req>> = batches.iter().collect();
        // A deterministic shuffle from the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut reordered = Catalog::new(Limits::default());
        for b in shuffled {
            reordered.ingest(&batch(b));
        }
        prop_assert_eq!(summary(&forward), summary(&reordered));
    }

    #[test]
    fn caps_never_lose_a_request(batches in requests(), max_ops in 1usize..4, max_versions in 2usize..3) {
        let limits = Limits {
            max_operations_per_app: max_ops,
            max_versions_per_app: max_versions,
            ..Limits::default()
        };
        let mut catalog = Catalog::new(limits);
        let mut sent = std::collections::BTreeMap::<String, u64>::new();
        for b in &batches {
            catalog.ingest(&batch(b));
            for (app, ..) in b {
                *sent.entry(format!("a{app}")).or_default() += 1;
            }
        }
        for (_, app, entry) in catalog.apps() {
            let by_version: u64 = entry.versions().map(|(_, s)| s.requests).sum();
            let by_operation: u64 = entry.operations().map(|(_, s)| s.requests).sum();
            prop_assert_eq!(by_version, sent[app]);
            prop_assert_eq!(by_operation, sent[app]);
            let real_ops = entry.operations().filter(|(o, _)| *o != OVERFLOW).count();
            prop_assert!(real_ops <= max_ops);
        }
    }
}
