//! The entry points of the fuzz targets (`fuzz/`, cargo-fuzz on nightly) and of the stable test
//! that replays their corpora and crash inputs (`tests/fuzz_corpus.rs`).
//!
//! Its one job: hand arbitrary bytes to each reader of untrusted input the way the daemon hands
//! them over, and check what must hold for any input. Each function panics only when that
//! contract is broken, which is what the fuzzer counts as a crash:
//! - no panic inside the reader;
//! - a refusal is the error a client or operator is meant to get: an OTLP request refused as a
//!   whole is a 400 (undecodable) or a 413 (too many items) with a message; an API body, the
//!   handler's 400; a config or model, an error naming the file;
//! - what is accepted keeps normalization's promises: every identity is non-empty and free of
//!   control characters, event times lie within `MAX_EVENT_TIME` and within the resource's `seen`
//!   range, and rejections add up to what `partial_success` reports;
//! - the in-place readers of traces, metrics and logs read what prost reads.
//!
//! The readers: the trace, metrics and logs requests in protobuf (`OtlpRequest::normalize_protobuf`,
//! what both the gRPC and the OTLP/HTTP receivers call on a body), in OTLP/JSON
//! (`receive::http::normalize_json`), a config file's TOML (`Config::from_sources`, the path
//! `--config` takes once the file is read), a model file (`models::parse`) and the API's JSON
//! bodies (`serve::RequestBody::check`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use axum::http::StatusCode;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use crate::act::outbound::OutboundPolicy;
use crate::config::{Config, ConfigError, RawConfig};
use crate::normalize::{DecodeError, MAX_EVENT_TIME, NormalizeOptions, Normalized};
use crate::receive::{ExportError, OtlpRequest};
use crate::serve::RequestBody;

/// A fuzz target's entry: it panics when the reader breaks its contract on `data`.
pub type Entry = fn(data: &[u8]);

/// Every fuzz target by its name in `fuzz/fuzz_targets/` (and so in `fuzz/corpus/`).
pub const TARGETS: [(&str, Entry); 7] = [
    ("traces_protobuf", traces_protobuf),
    ("metrics_protobuf", metrics_protobuf),
    ("logs_protobuf", logs_protobuf),
    ("otlp_json", otlp_json),
    ("config_toml", config_toml),
    ("model_toml", model_toml),
    ("api_bodies", api_bodies),
];

/// An `ExportTraceServiceRequest` in protobuf: the in-place span reader, with the item limit,
/// held to prost.
pub fn traces_protobuf(data: &[u8]) {
    protobuf::<ExportTraceServiceRequest>(data);
    read_as_prost_reads(data, crate::normalize::traces_protobuf, crate::normalize::traces);
}

/// An `ExportMetricsServiceRequest` in protobuf: the in-place point reader, with the item
/// limit, held to prost.
pub fn metrics_protobuf(data: &[u8]) {
    protobuf::<ExportMetricsServiceRequest>(data);
    read_as_prost_reads(
        data,
        crate::normalize::metrics_protobuf,
        crate::normalize::metrics,
    );
}

/// An `ExportLogsServiceRequest` in protobuf: the in-place record reader, with the item limit,
/// held to prost.
pub fn logs_protobuf(data: &[u8]) {
    protobuf::<ExportLogsServiceRequest>(data);
    read_as_prost_reads(data, crate::normalize::logs_protobuf, crate::normalize::logs);
}

/// Whenever prost decodes `data`, the in-place reader reads it too, and reads the same as from
/// prost's own re-encoding of what it decoded (canonical order, merged, unknown fields dropped);
/// unless it holds more items than `max_items_per_request`, which the reader refuses.
fn read_as_prost_reads<R: OtlpRequest>(
    data: &[u8],
    in_place: fn(&[u8], &NormalizeOptions) -> Result<Normalized, DecodeError>,
    decoded: fn(&R, &NormalizeOptions) -> Result<Normalized, DecodeError>,
) {
    let Ok(request) = R::decode(data) else {
        return;
    };
    let items = R::count_items(data).expect("what prost decodes is framed");
    for options in settings() {
        let over = items > options.max_items_per_request;
        match (in_place(data, &options), decoded(&request, &options)) {
            (Err(DecodeError::TooManyItems { .. }), _) if over => {}
            (Ok(in_place), Ok(via_prost)) if !over => {
                assert_eq!(in_place, via_prost, "the reader and prost read differently")
            }
            (in_place, via_prost) => panic!(
                "prost decodes it ({items} items, the limit {}); the reader says {in_place:?}, prost's encoding {via_prost:?}",
                options.max_items_per_request
            ),
        }
    }
}

/// An OTLP/JSON body, read as each of the three signals' requests (the same body may well be
/// sent to the wrong path, and one corpus of JSON serves all three). Each is read straight into
/// observations (`normalize::json`): whatever decoding the body whole with opentelemetry-proto's
/// serde accepts, that reader accepts and reads the same (metrics: see below).
pub fn otlp_json(data: &[u8]) {
    use crate::receive::http::normalize_json;
    for options in settings() {
        if let Ok(whole) = serde_json::from_slice::<ExportTraceServiceRequest>(data) {
            let direct = crate::normalize::traces_json(data, &options).expect("read as decoded whole");
            as_the_protobuf_path_reads(direct, crate::normalize::traces(&whole, &options), &options);
        }
        // A metric's data is a flattened oneof in opentelemetry-proto's serde, which drops a
        // metric whose data does not decode whole (an exemplar of the wrong shape, a key given
        // twice) without a word; canaryd's reader reads what it uses of it. So metrics are held
        // to the protobuf path on the request as serde understood it, written out again.
        if let Ok(whole) = serde_json::from_slice::<ExportMetricsServiceRequest>(data)
            && let Ok(canonical) = serde_json::to_vec(&whole)
        {
            let direct = crate::normalize::metrics_json(&canonical, &options).expect("read as decoded whole");
            as_the_protobuf_path_reads(direct, crate::normalize::metrics(&whole, &options), &options);
        }
        if let Ok(whole) = serde_json::from_slice::<ExportLogsServiceRequest>(data) {
            let direct = crate::normalize::logs_json(data, &options).expect("read as decoded whole");
            as_the_protobuf_path_reads(direct, crate::normalize::logs(&whole, &options), &options);
        }
        check_export(
            normalize_json::<ExportTraceServiceRequest>(data, &options),
            &options,
        );
        check_export(
            normalize_json::<ExportMetricsServiceRequest>(data, &options),
            &options,
        );
        check_export(
            normalize_json::<ExportLogsServiceRequest>(data, &options),
            &options,
        );
    }
}

/// What the OTLP/JSON reader read, held to what the protobuf path reads of the same request: the
/// same, unless the protobuf path refused it for its items (it stops reading past the limit),
/// which the JSON reader reads whole (the body's size bounds it) and `normalize_json` refuses.
fn as_the_protobuf_path_reads(
    direct: Normalized,
    via_protobuf: Result<Normalized, DecodeError>,
    options: &NormalizeOptions,
) {
    match via_protobuf {
        Err(DecodeError::TooManyItems { limit }) => {
            assert_eq!(limit, options.max_items_per_request);
            let items = direct.accepted + direct.rejected + direct.skipped;
            assert!(
                items > limit,
                "{items} items read from JSON, within the limit of {limit}"
            );
        }
        via_protobuf => assert_eq!(Ok(direct), via_protobuf),
    }
}

/// The normalization settings every OTLP input is read under: the defaults, and the tightest that
/// `Config::resolve` lets an operator set (values cut at 16 bytes, no series attributes, 16 items
/// a request), where the cuts and the item limit are met most often.
fn settings() -> [NormalizeOptions; 2] {
    let tight = NormalizeOptions {
        max_items_per_request: 16,
        max_attribute_value_len: 16,
        max_series_attributes: 0,
        ..NormalizeOptions::default()
    };
    [NormalizeOptions::default(), tight]
}

/// A config file's text, as `canaryd serve --config` reads it (no environment variables or other
/// flags). `--models-dir` names a folder that does not exist, so that whatever the file says,
/// only the embedded default model is read and no file is opened.
pub fn config_toml(data: &[u8]) {
    let path = Path::new("fuzz.toml");
    let Ok(text) = std::str::from_utf8(data) else {
        // `RawConfig::from_file` refuses it when reading the file.
        return;
    };
    let flags = RawConfig {
        models_dir: Some("/nonexistent/canaryd-fuzz-models".into()),
        ..RawConfig::default()
    };
    let result = RawConfig::from_toml(text, path)
        .and_then(|raw| Config::from_sources(Some((path, raw)), &BTreeMap::new(), flags));
    // A refusal names the file (a TOML error) or the field, its value and where it came from.
    match result {
        Ok(_) | Err(ConfigError::ParseFile { .. } | ConfigError::Invalid { .. }) => {}
        Err(e) => panic!("a config refused for another reason than its text: {e}"),
    }
}

/// A model file's text, as `models::load` reads each `*.toml` of the models folder.
pub fn model_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        // `models::load` refuses it when reading the file.
        return;
    };
    let path = Path::new("models/fuzz.toml");
    match crate::models::parse("fuzz", path, text) {
        Ok(model) => assert_eq!(model.name, "fuzz"),
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("models/fuzz.toml"), "{message}");
        }
    }
}

/// A JSON body, read as each of the API's request bodies: subscriptions, rollout declarations and
/// Flagger's gate payloads; subscriptions under an `outbound_allow` that allows nothing (the
/// default when the API listens beyond loopback) and under one that allows a network of each
/// restricted kind, a metadata host name and a unix socket.
pub fn api_bodies(data: &[u8]) {
    static ALLOWING: LazyLock<OutboundPolicy> = LazyLock::new(|| {
        let allow = "127.0.0.0/8, ::1/128, 10.0.0.0/8, 169.254.0.0/16, fe80::/10, 100.64.0.0/10, \
                     metadata.google.internal, unix:///run/haproxy/admin.sock";
        OutboundPolicy::new(allow.parse().expect("a constant outbound_allow"))
    });
    let nothing = OutboundPolicy::default();
    for body in RequestBody::ALL {
        for outbound in [&nothing, &*ALLOWING] {
            if let Err(response) = body.check(data, outbound) {
                assert_eq!(
                    response.status(),
                    StatusCode::BAD_REQUEST,
                    "{body:?} refused with another status"
                );
            }
        }
    }
}

fn protobuf<R: OtlpRequest>(data: &[u8]) {
    for options in settings() {
        check_export(
            R::normalize_protobuf(Bytes::copy_from_slice(data), &options),
            &options,
        );
    }
}

/// What a normalized request, or a refused one, must be.
fn check_export(result: Result<Normalized, ExportError>, options: &NormalizeOptions) {
    let normalized = match result {
        Ok(normalized) => normalized,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    ExportError::Undecodable { .. } | ExportError::TooManyItems { .. }
                ),
                "a request refused for another reason than its content: {e}"
            );
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let reasons: u64 = normalized.rejections.values().sum();
    assert_eq!(normalized.rejected, reasons, "rejections do not add up");
    assert_eq!(
        normalized.error_message("items").is_some(),
        normalized.rejected > 0
    );
    let max = options.max_attribute_value_len;
    for resource in &normalized.batch.resources {
        let id = &resource.identity;
        // The app is `namespace/name` when the namespace is set, each part cut to `max`.
        for (part, value, limit) in [
            ("env", &id.env, max),
            ("app", &id.app, 2 * max + 1),
            ("version", &id.version, max),
        ] {
            assert!(!value.is_empty(), "an empty {part}");
            assert!(value.len() <= limit, "{part} longer than {limit} bytes");
            assert!(!value.chars().any(char::is_control), "{part} {value:?}");
        }
        let times = resource
            .requests
            .iter()
            .map(|r| r.time)
            .chain(resource.calls.iter().map(|c| c.time))
            .chain(resource.exceptions.iter().map(|e| e.time))
            .chain(resource.metric_points.iter().map(|p| p.time))
            .chain(resource.logs.iter().map(|l| l.time));
        for time in times {
            assert!(time <= MAX_EVENT_TIME, "an event time past 2262: {time}");
            let (lo, hi) = resource.seen.expect("an observation outside any seen range");
            assert!(lo <= time && time <= hi, "{time} outside seen {lo}..={hi}");
        }
        if let Some((lo, hi)) = resource.seen {
            assert!(lo <= hi && hi <= MAX_EVENT_TIME, "seen {lo}..={hi}");
        }
    }
}
