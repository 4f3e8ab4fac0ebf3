//! Normalization: OTLP export requests in, the engine's observations out.
//!
//! This is the only place (with the receivers that call it) that knows protobuf types; what it
//! returns is `canaryd_engine` types. It is a pure function of the request and `NormalizeOptions`:
//! no state, no IO, so it runs on blocking threads in parallel and is tested with plain values.
//!
//! Identity follows the contract: app = `service.name` (prefixed `namespace/` when
//! `service.namespace` is set), env = `deployment.environment.name` or `deployment.environment`
//! (else `default`), version = the configured attribute (else `unknown`). A resource without
//! `service.name`, and an item the engine cannot use (no timestamp, malformed ids, a histogram
//! whose buckets do not match its bounds), is rejected and counted for OTLP `partial_success`;
//! the rest of the request is kept. Strings from clients are stripped of control characters and
//! cut to `max_attribute_value_len`; event times past 2262 are rejected.

mod common;
pub mod count;
mod json;
mod logs;
mod metrics;
mod traces;
mod wire;

pub use common::DecodeError;
pub use json::{JsonError, logs_json, metrics_json, traces_json};
pub use wire::WireError;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use canaryd_engine::{Batch, Identity};

pub use logs::{logs, logs_protobuf};
pub use metrics::{metrics, metrics_protobuf};
pub use traces::{traces, traces_protobuf};

/// Settings of normalization, from the daemon's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalizeOptions {
    /// Requests holding more items (spans, data points, log records) are refused before decoding.
    pub max_items_per_request: u64,
    /// Resource attribute naming the version.
    pub version_attribute: String,
    /// Span attribute naming a request's cohort; none: cohorts are not read.
    pub cohort_attribute: Option<String>,
    /// Longer attribute values are cut to this many bytes (at a character boundary).
    pub max_attribute_value_len: usize,
    /// At most this many point attributes (the first by key) identify a metric series.
    pub max_series_attributes: usize,
}

/// Ten times the OpenTelemetry Collector's default batch (8,192): a large but honest export fits.
pub const DEFAULT_MAX_ITEMS_PER_REQUEST: u64 = 100_000;

impl Default for NormalizeOptions {
    fn default() -> Self {
        NormalizeOptions {
            max_items_per_request: DEFAULT_MAX_ITEMS_PER_REQUEST,
            version_attribute: "service.version".into(),
            cohort_attribute: Some("canary.cohort".into()),
            max_attribute_value_len: 256,
            max_series_attributes: 8,
        }
    }
}

/// One export request, normalized.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Normalized {
    pub batch: Batch,
    /// Items (spans, data points, log records) kept.
    pub accepted: u64,
    /// Items refused, for `partial_success`.
    pub rejected: u64,
    /// Why items were refused, counted per reason.
    pub rejections: BTreeMap<&'static str, u64>,
    /// Attribute values cut to the length cap, and metric attributes left out of series keys.
    pub truncated: u64,
    /// Valid items with nothing to observe (metric points flagged `NO_RECORDED_VALUE`): neither
    /// accepted (they never reach the engine) nor rejected.
    pub skipped: u64,
    /// Metric series keys this request's reading forgot, to keep a thread's kept keys within
    /// their bounds (each is made again when its series comes again).
    pub series_keys_forgotten: u64,
}

impl Normalized {
    fn reject(&mut self, reason: &'static str, n: u64) {
        if n > 0 {
            self.rejected += n;
            *self.rejections.entry(reason).or_default() += n;
        }
    }

    /// The `partial_success.error_message`: each reason with its count, or `None` when nothing was
    /// rejected.
    pub fn error_message(&self, items: &str) -> Option<String> {
        if self.rejected == 0 {
            return None;
        }
        let reasons: Vec<String> = self
            .rejections
            .iter()
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        Some(format!(
            "{} {items} rejected: {}",
            self.rejected,
            reasons.join("; ")
        ))
    }
}

/// The reason given when a resource has no `service.name`.
const NO_SERVICE_NAME: &str = "from a resource without service.name";

/// The latest event time accepted: `i64::MAX` nanoseconds, 2262-04-11T23:47:16Z, the end of the
/// signed 64-bit nanosecond range that OTLP's own SDKs and the engine's arithmetic allow for.
/// Anything later is garbage (or an attempt to overflow a clock), not telemetry.
pub const MAX_EVENT_TIME: u64 = i64::MAX as u64;

/// Whether `time` (nanoseconds since the epoch) lies beyond `MAX_EVENT_TIME`.
fn beyond_horizon(time: u64) -> bool {
    time > MAX_EVENT_TIME
}

/// Reads identity from resource attributes, cutting long values; `None` without `service.name`.
struct IdentityReader<'a> {
    options: &'a NormalizeOptions,
}

impl IdentityReader<'_> {
    fn read<A: Attributes + ?Sized>(
        &self,
        attrs: &A,
        truncated: &mut u64,
    ) -> Option<(Identity, Option<Arc<str>>)> {
        let max = self.options.max_attribute_value_len;
        // Cleaned and cut, and `None` when nothing is left.
        let mut read = |key: &str| {
            text_attr(attrs, key)
                .map(|s| cut_to(&s, max, truncated))
                .filter(|s| !s.is_empty())
        };
        let name = read("service.name")?;
        let app = match read("service.namespace") {
            Some(ns) => format!("{ns}/{name}"),
            None => name,
        };
        let env = read("deployment.environment.name")
            .or_else(|| read("deployment.environment"))
            .unwrap_or_else(|| "default".to_owned());
        let version = read(&self.options.version_attribute).unwrap_or_else(|| "unknown".to_owned());
        let instance = text_attr(attrs, "service.instance.id").map(|s| Arc::from(cut_to(&s, max, truncated)));
        Some((Identity::new(&env, &app, &version), instance))
    }
}

/// The names one request's observations carry (operations, downstreams, exception types,
/// cohorts): each distinct text is cleaned, cut and allocated once a request, then shared. A
/// span's name is a lookup, not an allocation, and the engine's thread, which drops the batch,
/// frees a block for each distinct name instead of one for each span. Per request, not per
/// thread: a name shared across requests would have its count moved between the receiving
/// threads and the engine's for every span.
#[derive(Default)]
struct Names {
    /// By the text as read: the name it became, and whether that cut it. The texts as read
    /// live while the request is read (the scratch holding them goes with it), so what they
    /// hold is bounded by the request's own bytes; looking a name up by its cleaned and cut text
    /// instead cleans every span's name again, which cost 5% of the daemon's CPU on the load
    /// bench.
    known: std::collections::HashMap<Box<str>, (Arc<str>, bool), foldhash::fast::RandomState>,
    /// Where `METHOD route` is put together before it is looked up.
    joined: String,
}

impl Names {
    /// `text` as `cut_to` makes it, shared; a cut counts in `truncated` at each use, as before.
    fn name(&mut self, text: &str, max: usize, truncated: &mut u64) -> Arc<str> {
        if let Some((name, cut)) = self.known.get(text) {
            *truncated += u64::from(*cut);
            return name.clone();
        }
        let before = *truncated;
        let name: Arc<str> = Arc::from(cut_to(text, max, truncated));
        self.known
            .insert(text.into(), (name.clone(), *truncated > before));
        name
    }

    /// `first second`, as `name` makes it.
    fn joined(&mut self, first: &str, second: &str, max: usize, truncated: &mut u64) -> Arc<str> {
        let mut joined = std::mem::take(&mut self.joined);
        joined.clear();
        joined.push_str(first);
        joined.push(' ');
        joined.push_str(second);
        let name = self.name(&joined, max, truncated);
        self.joined = joined;
        name
    }
}

/// `s` without control characters, cut to at most `max` bytes at a character boundary; counts the
/// cut in `truncated`. Control characters have no place in names, and the store joins names with
/// one (U+001F) to key a baseline's seasonal slots: a name carrying it could pose as another.
fn cut_to(s: &str, max: usize, truncated: &mut u64) -> String {
    cut_owned(Cow::Borrowed(s), max, truncated)
}

/// `cut_to` of a string that may already be owned: one that needs no change is kept as it is,
/// without a copy.
fn cut_owned(s: Cow<'_, str>, max: usize, truncated: &mut u64) -> String {
    let s = if has_control(&s) {
        Cow::Owned(s.chars().filter(|c| !c.is_control()).collect())
    } else {
        s
    };
    if s.len() <= max {
        return s.into_owned();
    }
    *truncated += 1;
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Whether `s` holds a control character; printable ASCII, what names nearly always are, is
/// told apart a byte at a time.
fn has_control(s: &str) -> bool {
    !s.bytes().all(|b| (0x20..0x7f).contains(&b)) && s.chars().any(char::is_control)
}

/// An attribute's value as normalization reads it, in place.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AttrValue<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
    Double(f64),
    /// Bytes, arrays, maps: values canaryd does not read.
    Other,
    /// A value the reader skipped, as its key is none that normalization looks up
    /// (`KeyValueView::read_if`): neither its type nor its contents were looked at.
    Unread,
}

/// A list of attributes, looked up by key: the first with the key counts.
trait Attributes {
    fn get(&self, key: &str) -> Option<AttrValue<'_>>;
}

/// An attribute's value as text: strings as they are, scalars printed.
fn text_attr<'a, A: Attributes + ?Sized>(attrs: &'a A, key: &str) -> Option<Cow<'a, str>> {
    attrs.get(key).and_then(value_text)
}

fn value_text(value: AttrValue<'_>) -> Option<Cow<'_, str>> {
    match value {
        AttrValue::Str(s) => Some(Cow::Borrowed(s)),
        AttrValue::Int(i) => Some(Cow::Owned(i.to_string())),
        AttrValue::Bool(b) => Some(Cow::Owned(b.to_string())),
        AttrValue::Double(d) => Some(Cow::Owned(d.to_string())),
        AttrValue::Other | AttrValue::Unread => None,
    }
}

/// An attribute's value as an integer, accepting integers written as strings.
fn int_attr<A: Attributes + ?Sized>(attrs: &A, key: &str) -> Option<i64> {
    match attrs.get(key)? {
        AttrValue::Int(i) => Some(i),
        AttrValue::Str(s) => s.trim().parse().ok(),
        AttrValue::Double(d) if d.fract() == 0.0 => Some(d as i64),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders for OTLP values in normalization tests.
    use opentelemetry_proto::tonic::resource::v1::Resource;

    pub use crate::testdata::{kv, kv_int};

    pub fn resource(attrs: &[(&str, &str)]) -> Option<Resource> {
        Some(Resource {
            attributes: attrs.iter().map(|(k, v)| kv(k, v)).collect(),
            ..Resource::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::resource;
    use super::*;

    /// The scenario generator's batches survive the trip through OTLP and the normalizer: the
    /// daemon sees the requests, calls, exceptions and counter points the engine's own
    /// simulations are fed, with their cohorts.
    #[test]
    fn a_simulated_batch_reads_back_as_the_same_observations() {
        use canaryd_engine::simulate::{Fault, Service, Traffic};
        let service = Service {
            warmup_s: 10,
            fault_at_s: 0,
            batch_s: 10,
            cohorts: vec![("beta".into(), 0.3)],
            ..Service::new(3, Fault::NewException(0.5))
        };
        let options = NormalizeOptions::default();
        let mut ids = 0;
        for chunk in Traffic::new(&service, "shop").take(3) {
            let (traces, metrics) = crate::testdata::otlp_of_batch(&chunk.batch, &mut ids);
            let mut read = super::traces(&traces, &options).expect("traces").batch;
            if let Some(metrics) = metrics {
                let points = super::metrics(&metrics, &options).expect("metrics").batch;
                read.resources.extend(points.resources);
            }
            for sent in &chunk.batch.resources {
                let of = |r: &canaryd_engine::ResourceObservations| r.identity == sent.identity;
                let got: Vec<_> = read.resources.iter().filter(|r| of(r)).collect();
                let requests: Vec<_> = got.iter().flat_map(|r| &r.requests).collect();
                assert_eq!(requests.len(), sent.requests.len());
                for (a, b) in requests.iter().zip(&sent.requests) {
                    assert_eq!(
                        (&a.operation, a.time, a.duration_ns, a.error, &a.cohort),
                        (&b.operation, b.time, b.duration_ns, b.error, &b.cohort)
                    );
                }
                let calls: Vec<_> = got
                    .iter()
                    .flat_map(|r| &r.calls)
                    .map(|c| (&c.downstream, c.time, &c.cohort))
                    .collect();
                let sent_calls: Vec<_> = sent
                    .calls
                    .iter()
                    .map(|c| (&c.downstream, c.time, &c.cohort))
                    .collect();
                assert_eq!(calls, sent_calls);
                // Trace ids are the encoder's own (the simulator's are all zero).
                let exception = |e: &canaryd_engine::ExceptionObservation| {
                    (
                        e.exception_type.clone(),
                        e.operation.clone(),
                        e.time,
                        e.cohort.clone(),
                    )
                };
                let exceptions: Vec<_> = got.iter().flat_map(|r| &r.exceptions).map(exception).collect();
                assert_eq!(
                    exceptions,
                    sent.exceptions.iter().map(exception).collect::<Vec<_>>()
                );
                let points: Vec<_> = got
                    .iter()
                    .flat_map(|r| &r.metric_points)
                    .map(|p| (p.time, &p.value))
                    .collect();
                let sent_points: Vec<_> = sent.metric_points.iter().map(|p| (p.time, &p.value)).collect();
                assert_eq!(points, sent_points);
            }
        }
        assert!(ids > 0);
    }

    fn identity_of(attrs: &[(&str, &str)], options: &NormalizeOptions) -> Option<String> {
        let mut truncated = 0;
        let reader = IdentityReader { options };
        // The attributes as the readers see them: encoded, then read in place.
        let encoded: Vec<Vec<u8>> = resource(attrs)
            .map(|r| r.attributes.iter().map(prost::Message::encode_to_vec).collect())
            .unwrap_or_default();
        let views: Vec<common::KeyValueView<'_>> = encoded
            .iter()
            .map(|kv| common::KeyValueView::read(kv).expect("reads"))
            .collect();
        let (id, _) = reader.read(&views[..], &mut truncated)?;
        Some(id.to_string())
    }

    #[test]
    fn identity_follows_the_contract() {
        let o = NormalizeOptions::default();
        let check = |attrs: &[(&str, &str)], want: Option<&str>| {
            assert_eq!(identity_of(attrs, &o).as_deref(), want, "{attrs:?}");
        };
        check(&[("service.name", "shop")], Some("default/shop@unknown"));
        check(
            &[
                ("service.name", "shop"),
                ("service.namespace", "retail"),
                ("service.version", "1.2"),
            ],
            Some("default/retail/shop@1.2"),
        );
        check(
            &[("service.name", "shop"), ("deployment.environment", "staging")],
            Some("staging/shop@unknown"),
        );
        check(
            &[
                ("service.name", "shop"),
                ("deployment.environment", "old"),
                ("deployment.environment.name", "prod"),
            ],
            Some("prod/shop@unknown"),
        );
        check(&[("service.version", "1")], None);
        check(&[("service.name", "")], None);
    }

    #[test]
    fn the_version_attribute_is_configurable() {
        let o = NormalizeOptions {
            version_attribute: "app.build".into(),
            ..NormalizeOptions::default()
        };
        let id = identity_of(
            &[
                ("service.name", "shop"),
                ("service.version", "1"),
                ("app.build", "b7"),
            ],
            &o,
        );
        assert_eq!(id.as_deref(), Some("default/shop@b7"));
    }

    #[test]
    fn long_values_are_cut_at_a_character_boundary() {
        let mut truncated = 0;
        assert_eq!(cut_to("héllo", 2, &mut truncated), "h");
        assert_eq!(cut_to("hello", 5, &mut truncated), "hello");
        assert_eq!(truncated, 1);
    }

    #[test]
    fn a_name_met_again_is_the_same_name_and_its_cut_counts_again() {
        let mut names = Names::default();
        let mut truncated = 0;
        let first = names.name("GET /a\u{1f}bcdef", 6, &mut truncated);
        let again = names.name("GET /a\u{1f}bcdef", 6, &mut truncated);
        assert_eq!(&*first, "GET /a");
        assert!(Arc::ptr_eq(&first, &again), "one allocation for the text");
        assert_eq!(truncated, 2, "each use cut counts, as without sharing");
        let joined = names.joined("GET", "/a\u{1f}bcdef", 6, &mut truncated);
        assert!(Arc::ptr_eq(&first, &joined), "`METHOD route` found as its text");
        assert_eq!(truncated, 3);
        // The text as read is the key: another text cleaned or cut to the same name is looked up
        // apart, and whether it was cut counts for itself.
        let clean = names.name("GET /a", 6, &mut truncated);
        assert_eq!((&*clean, truncated), ("GET /a", 3));
        assert!(!Arc::ptr_eq(&first, &clean));
    }

    #[test]
    fn control_characters_are_stripped_from_names() {
        let mut truncated = 0;
        assert_eq!(cut_to("GET /a\u{1f}v2\n", 256, &mut truncated), "GET /av2");
        assert_eq!(cut_to("\u{1f}\u{1f}abcdef", 3, &mut truncated), "abc");
        assert_eq!(truncated, 1, "only the length cut counts as truncation");
        let o = NormalizeOptions::default();
        // The separator of a baseline's series name cannot be smuggled in through identity.
        assert_eq!(
            identity_of(
                &[
                    ("service.name", "shop\u{1f}v1"),
                    ("deployment.environment.name", "pr\tod"),
                    ("service.version", "\u{1f}"),
                ],
                &o
            )
            .as_deref(),
            Some("prod/shopv1@unknown")
        );
        assert_eq!(identity_of(&[("service.name", "\u{0}\u{1f}")], &o), None);
    }
}
