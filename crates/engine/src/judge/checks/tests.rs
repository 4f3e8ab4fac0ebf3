//! The checks' tests: the decision rule on every signal family, the thresholds, the dispersion.

mod thresholds {
    use super::super::*;
    use crate::judge::model::Decision;

    fn check(group: Group, feature: Feature, operation: Option<&str>) -> Check {
        let id = CheckId {
            group,
            feature,
            test: Test::FisherExact,
            horizon_s: 10,
        };
        Check {
            group,
            feature: id.feature.to_string(),
            id,
            operation: operation.map(str::to_owned),
            test: Test::FisherExact,
            critical: true,
            weight: 10.0,
            outcome: Outcome::Pass,
            canary_value: None,
            baseline_value: None,
            canary_samples: 0,
            baseline_samples: 0,
            statistic: None,
            p_value: None,
            threshold: 0.0,
            effect: None,
            min_effect: 0.0,
            effect_kind: "ratio",
            window_s: 10,
            message: String::new(),
        }
    }

    #[test]
    fn thresholds_spend_exactly_the_budget_and_leave_no_check_out() {
        let decision = Decision::default();
        // One horizon's checks: app-wide and per-subject ones, and a mix check naming an operation.
        let checks = vec![
            check(Group::Errors, Feature::app("error_ratio"), None),
            check(
                Group::Errors,
                Feature::of("error_ratio", "GET /a"),
                Some("GET /a"),
            ),
            check(
                Group::Errors,
                Feature::of("error_ratio", "GET /b"),
                Some("GET /b"),
            ),
            check(
                Group::OperationMix,
                Feature::app("operation_share"),
                Some("GET /a"),
            ),
            check(Group::CallGraph, Feature::of("calls_per_request", "db"), None),
        ];
        let horizons = 1;
        let t = Thresholds::new(&decision, &checks, horizons);
        let looks: f64 = decision.horizons_s.iter().map(|h| 2.0 * 3600.0 / *h as f64).sum();
        let spent: f64 = checks.iter().map(|c| t.of(c)).sum();
        let budget = decision.false_alarm_rate / looks;
        assert!((spent - budget).abs() < budget * 1e-9, "{spent} of {budget}");
        for c in &checks {
            assert!(t.of(c) > 0.0, "{} has no budget", c.feature);
        }
        assert!(
            t.of(&checks[0]) > t.of(&checks[1]),
            "the app-wide check gets the larger share"
        );
    }
}

mod dispersion {
    use super::super::*;

    fn part(requests: u64, calls: u64) -> Aggregate {
        let mut a = Aggregate::default();
        for _ in 0..requests {
            a.all.add(1_000_000, false);
        }
        a.calls.insert("db".into(), (calls, 0));
        a
    }

    #[test]
    fn clustered_calls_are_overdispersed_and_steady_ones_are_not() {
        // Every request makes exactly one call: no more variation than Poisson (less, in fact).
        let steady: Vec<Aggregate> = (0..30).map(|_| part(100, 100)).collect();
        let parts: Vec<(u64, &Aggregate)> = steady.iter().map(|a| (0, a)).collect();
        assert_eq!(Dispersion::of(&parts).get("call:db"), 1.0);
        // Calls come ten at a time from a few requests: far more variation between parts.
        let clustered: Vec<Aggregate> = (0..30)
            .map(|i| part(100, if i % 2 == 0 { 0 } else { 40 }))
            .collect();
        let parts: Vec<(u64, &Aggregate)> = clustered.iter().map(|a| (0, a)).collect();
        assert!(Dispersion::of(&parts).get("call:db") > 10.0);
        assert_eq!(Dispersion::of(&parts).get("call:unknown"), 1.0);
    }
}
