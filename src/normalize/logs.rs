//! Log records to severity counts.
//!
//! The engine counts records by severity, ERROR and above apart. A record's event time is its
//! `time_unix_nano`, else its `observed_time_unix_nano`; a record with neither is rejected.
//! Severity comes from `severity_number`, else from `severity_text`.

use canaryd_engine::{LogObservation, ResourceObservations, Severity};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;

use super::{
    IdentityReader, NO_SERVICE_NAME, NormalizeOptions, Normalized, beyond_horizon, resource_attributes,
};

pub fn logs(request: &ExportLogsServiceRequest, options: &NormalizeOptions) -> Normalized {
    let mut out = Normalized::default();
    let reader = IdentityReader { options };
    for resource_logs in &request.resource_logs {
        let records = resource_logs.scope_logs.iter().flat_map(|s| &s.log_records);
        let Some((identity, instance)) = reader.read(
            resource_attributes(resource_logs.resource.as_ref()),
            &mut out.truncated,
        ) else {
            out.reject(NO_SERVICE_NAME, records.count() as u64);
            continue;
        };
        let mut obs = ResourceObservations::new(identity);
        obs.instance = instance;
        for record in records {
            let time = if record.time_unix_nano != 0 {
                record.time_unix_nano
            } else {
                record.observed_time_unix_nano
            };
            if time == 0 {
                out.reject("log records without time_unix_nano or observed_time_unix_nano", 1);
                continue;
            }
            if beyond_horizon(time) {
                out.reject(
                    "log records with a time after 2262-04-11 (beyond int64 nanoseconds)",
                    1,
                );
                continue;
            }
            let severity = match Severity::from_number(record.severity_number) {
                Severity::Unspecified => severity_from_text(&record.severity_text),
                known => known,
            };
            obs.saw(time);
            obs.logs.push(LogObservation { time, severity });
        }
        if !obs.logs.is_empty() {
            out.accepted += obs.logs.len() as u64;
            out.batch.resources.push(obs);
        }
    }
    out
}

/// Reads the usual spellings of severity names (`ERROR`, `Warning`, `crit`...).
fn severity_from_text(text: &str) -> Severity {
    let word: String = text
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_lowercase();
    match word.as_str() {
        "trace" => Severity::Trace,
        "debug" => Severity::Debug,
        "info" | "information" | "notice" => Severity::Info,
        "warn" | "warning" => Severity::Warn,
        "error" | "err" => Severity::Error,
        "fatal" | "critical" | "crit" | "alert" | "emerg" | "emergency" | "panic" => Severity::Fatal,
        _ => Severity::Unspecified,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::resource;
    use super::*;
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};

    fn record(time: u64, observed: u64, number: i32, text: &str) -> LogRecord {
        LogRecord {
            time_unix_nano: time,
            observed_time_unix_nano: observed,
            severity_number: number,
            severity_text: text.into(),
            ..LogRecord::default()
        }
    }

    #[test]
    fn severities_and_times_are_read_with_fallbacks() {
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: resource(&[("service.name", "shop")]),
                scope_logs: vec![ScopeLogs {
                    log_records: vec![
                        record(10, 0, 9, ""),
                        record(0, 20, 17, ""),
                        record(30, 0, 0, "Warning"),
                        record(40, 0, 0, "CRITICAL"),
                        record(0, 0, 17, "ERROR"),
                        record(0, u64::MAX, 17, "ERROR"),
                    ],
                    ..ScopeLogs::default()
                }],
                ..ResourceLogs::default()
            }],
        };
        let out = logs(&request, &NormalizeOptions::default());
        assert_eq!((out.accepted, out.rejected), (4, 2));
        let message = out.error_message("log records").expect("a message");
        assert!(
            message.contains("1 log records with a time after 2262"),
            "{message}"
        );
        let got: Vec<(u64, Severity)> = out.batch.resources[0]
            .logs
            .iter()
            .map(|l| (l.time, l.severity))
            .collect();
        assert_eq!(
            got,
            vec![
                (10, Severity::Info),
                (20, Severity::Error),
                (30, Severity::Warn),
                (40, Severity::Fatal),
            ]
        );
    }
}
