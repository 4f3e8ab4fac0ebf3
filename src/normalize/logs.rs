//! Log records to severity counts.
//!
//! The engine counts records by severity, ERROR and above apart. A record's event time is its
//! `time_unix_nano`, else its `observed_time_unix_nano`; a record with neither is rejected.
//! Severity comes from `severity_number`, else from `severity_text`. Records are read in place
//! from the request's protobuf (`wire`), as spans are.

use canaryd_engine::{LogObservation, ResourceObservations, Severity};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use prost::Message;

use super::common::{DecodeError, ItemReader, Nesting, read_request, within};
use super::wire::Fields;
use super::{NormalizeOptions, Normalized, beyond_horizon};

/// A logs export as one signal's nesting, for `read_request`.
const LOGS: Nesting = Nesting {
    request: "ExportLogsServiceRequest",
    resource: "ResourceLogs",
    scope: "ScopeLogs",
};

/// Normalizes a request already decoded (a prost message, as tests and tools hold one) by reading
/// its protobuf encoding.
pub fn logs(
    request: &ExportLogsServiceRequest,
    options: &NormalizeOptions,
) -> Result<Normalized, DecodeError> {
    logs_protobuf(&request.encode_to_vec(), options)
}

/// Normalizes an `ExportLogsServiceRequest` in its protobuf encoding, reading it in place.
pub fn logs_protobuf(buf: &[u8], options: &NormalizeOptions) -> Result<Normalized, DecodeError> {
    read_request(buf, &LOGS, options, &mut Records)
}

/// Log records, read one at a time: nothing of one is kept for the next.
struct Records;

impl<'a> ItemReader<'a> for Records {
    fn count(&mut self, _record: &'a [u8]) -> Result<u64, DecodeError> {
        Ok(1)
    }

    fn observe(
        &mut self,
        record: &'a [u8],
        _options: &NormalizeOptions,
        obs: &mut ResourceObservations,
        out: &mut Normalized,
    ) -> Result<u64, DecodeError> {
        let within = within("LogRecord");
        let (mut time, mut observed, mut number, mut text) = (0, 0, 0, "");
        for field in Fields::new(record) {
            let (n, value) = field.map_err(&within)?;
            match n {
                1 => time = value.fixed64(n).map_err(&within)?,
                // An enum is an int32: keep the low 32 bits of a sign-extended one.
                2 => number = value.varint(n).map_err(&within)? as i32,
                3 => text = value.str(n).map_err(&within)?,
                11 => observed = value.fixed64(n).map_err(&within)?,
                _ => {}
            }
        }
        Ok(observe_record(time, observed, number, text, obs, out))
    }
}

/// Observes one log record from the fields canaryd reads (the protobuf and JSON readers' own);
/// returns 1 when it was accepted, else 0 (rejected in `out`).
pub(super) fn observe_record(
    time: u64,
    observed: u64,
    number: i32,
    text: &str,
    obs: &mut ResourceObservations,
    out: &mut Normalized,
) -> u64 {
    let time = if time != 0 { time } else { observed };
    if time == 0 {
        out.reject("log records without time_unix_nano or observed_time_unix_nano", 1);
        return 0;
    }
    if beyond_horizon(time) {
        out.reject(
            "log records with a time after 2262-04-11 (beyond int64 nanoseconds)",
            1,
        );
        return 0;
    }
    let severity = match Severity::from_number(number) {
        Severity::Unspecified => severity_from_text(text),
        known => known,
    };
    obs.saw(time);
    obs.logs.push(LogObservation { time, severity });
    1
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
        let out = logs(&request, &NormalizeOptions::default()).expect("decodes");
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

    /// A logs export as an SDK sends it, mutated, is read as prost reads it.
    #[test]
    fn mutated_requests_are_read_as_prost_reads_them() {
        let mut request = crate::testdata::sdk_logs_request(6, 2, 1_000);
        let records = &mut request.resource_logs[0].scope_logs[0].log_records;
        records[1].severity_number = 0;
        records[2].time_unix_nano = 0;
        super::super::common::assert_mutations_read_as_prost_reads::<ExportLogsServiceRequest>(
            &request.encode_to_vec(),
            logs_protobuf,
        );
    }

    #[test]
    fn a_record_that_does_not_decode_fails_the_request_with_where_and_why() {
        let request = crate::testdata::sdk_logs_request(1, 2, 1_000);
        let record = request.resource_logs[0].scope_logs[0].log_records[0].encode_to_vec();
        let whole = super::super::common::request_with_item(&record);
        assert!(logs_protobuf(&whole, &NormalizeOptions::default()).is_ok());
        assert!(logs_protobuf(&whole[..whole.len() - 1], &NormalizeOptions::default()).is_err());
        // The record's severity text (field 3) given again, not UTF-8.
        let mut bad = record;
        bad.extend([0x1a, 1, 0xff]);
        let buf = super::super::common::request_with_item(&bad);
        let error = logs_protobuf(&buf, &NormalizeOptions::default()).expect_err("invalid UTF-8");
        assert_eq!(error.to_string(), "in LogRecord: field 3 is not valid UTF-8");
    }
}
