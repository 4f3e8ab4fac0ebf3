//! What the three signals' export requests share, read in place: the nesting of a request
//! (resources, scopes, items), resource attributes and `KeyValue`/`AnyValue`.
//!
//! Every OTLP export request nests the same way, with the same field numbers: the request repeats
//! `resource_<signal>` (1), each of which holds a `resource` (1) and repeats `scope_<signal>` (2),
//! each of which repeats its items (2): spans, metrics or log records. `read_request` walks that
//! nesting once for all three, and each signal's reader says how to count and observe an item.

use canaryd_engine::ResourceObservations;

use super::wire::{Fields, WireError};
use super::{AttrValue, Attributes, IdentityReader, NO_SERVICE_NAME, NormalizeOptions, Normalized};

/// Why an export request's protobuf was not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// It is not well-formed protobuf, or not OTLP: what is wrong, and in which message.
    #[error("in {within}: {error}")]
    Wire { within: &'static str, error: WireError },
    /// It holds more items than `max_items_per_request`: reading stopped at the first past the
    /// limit, before it was read.
    #[error("more than {limit} items (max_items_per_request)")]
    TooManyItems { limit: u64 },
}

/// Names a wire error by the message it was found in.
pub(super) fn within(within: &'static str) -> impl Fn(WireError) -> DecodeError {
    move |error| DecodeError::Wire { within, error }
}

/// The items a request may still hold (`max_items_per_request`), taken as each is reached and
/// before it is read: a request of millions of tiny items is refused once past the limit, having
/// read no more than the limit allows. (Counting every item first, in a pass of its own, took 4%
/// of the daemon's CPU under load: the pass reached each item's first bytes ahead of the read,
/// from another core's cache.)
struct ItemBudget {
    left: u64,
    limit: u64,
}

impl ItemBudget {
    fn take(&mut self, items: u64) -> Result<(), DecodeError> {
        self.left = self
            .left
            .checked_sub(items)
            .ok_or(DecodeError::TooManyItems { limit: self.limit })?;
        Ok(())
    }
}

/// The message names of one signal's nesting, for errors.
pub(super) struct Nesting {
    pub request: &'static str,
    pub resource: &'static str,
    pub scope: &'static str,
}

/// One signal's items, read from their encoding.
pub(super) trait ItemReader<'a> {
    /// How many items (spans, data points, log records) `item` holds, to reject them by count
    /// when their resource has no `service.name`.
    fn count(&mut self, item: &'a [u8]) -> Result<u64, DecodeError>;

    /// How many items `item` holds as the wire frames them, read before it is, for the request's
    /// item limit: one, but for a metric (its data points, every data field's).
    fn on_wire(&self, _item: &'a [u8]) -> Result<u64, DecodeError> {
        Ok(1)
    }

    /// Reads `item` into `obs`, rejecting in `out` what the engine cannot use; returns how many
    /// items were accepted.
    fn observe(
        &mut self,
        item: &'a [u8],
        options: &NormalizeOptions,
        obs: &mut ResourceObservations,
        out: &mut Normalized,
    ) -> Result<u64, DecodeError>;
}

/// Reads an export request: each resource's identity, then its items through `items`.
pub(super) fn read_request<'a>(
    buf: &'a [u8],
    nesting: &Nesting,
    options: &NormalizeOptions,
    items: &mut impl ItemReader<'a>,
) -> Result<Normalized, DecodeError> {
    let mut out = Normalized::default();
    let reader = IdentityReader { options };
    let mut resource = ResourceScratch::default();
    let mut budget = ItemBudget {
        left: options.max_items_per_request,
        limit: options.max_items_per_request,
    };
    for field in Fields::new(buf) {
        let (number, value) = field.map_err(within(nesting.request))?;
        if number == 1 {
            let bytes = value.bytes(number).map_err(within(nesting.request))?;
            let scratch = &mut resource;
            read_resource_items(bytes, nesting, &reader, scratch, items, &mut budget, &mut out)?;
        }
    }
    Ok(out)
}

/// Buffers reused from resource to resource, so a request allocates them once.
#[derive(Default)]
struct ResourceScratch<'a> {
    attributes: Vec<KeyValueView<'a>>,
    scopes: Vec<&'a [u8]>,
}

fn read_resource_items<'a>(
    buf: &'a [u8],
    nesting: &Nesting,
    reader: &IdentityReader<'_>,
    scratch: &mut ResourceScratch<'a>,
    items: &mut impl ItemReader<'a>,
    budget: &mut ItemBudget,
    out: &mut Normalized,
) -> Result<(), DecodeError> {
    scratch.attributes.clear();
    scratch.scopes.clear();
    // The resource may come after the items on the wire; they are read once it is known.
    for field in Fields::new(buf) {
        let (number, value) = field.map_err(within(nesting.resource))?;
        match number {
            // A message field given twice is merged: the attributes of both count.
            1 => read_resource(
                value.bytes(number).map_err(within(nesting.resource))?,
                &mut scratch.attributes,
            )?,
            2 => scratch
                .scopes
                .push(value.bytes(number).map_err(within(nesting.resource))?),
            _ => {}
        }
    }
    let identity = reader.read(&scratch.attributes[..], &mut out.truncated);
    let Some((identity, instance)) = identity else {
        let mut rejected = 0;
        for scope in &scratch.scopes {
            for item in scope_items(scope, nesting) {
                let item = item?;
                budget.take(items.on_wire(item)?)?;
                rejected += items.count(item)?;
            }
        }
        out.reject(NO_SERVICE_NAME, rejected);
        return Ok(());
    };
    let mut obs = ResourceObservations::new(identity);
    obs.instance = instance;
    let mut accepted = 0;
    for scope in &scratch.scopes {
        for item in scope_items(scope, nesting) {
            let item = item?;
            budget.take(items.on_wire(item)?)?;
            accepted += items.observe(item, reader.options, &mut obs, out)?;
        }
    }
    if accepted > 0 {
        out.accepted += accepted;
        out.batch.resources.push(obs);
    }
    Ok(())
}

/// The items (field 2) of a scope message.
fn scope_items<'a>(
    scope: &'a [u8],
    nesting: &Nesting,
) -> impl Iterator<Item = Result<&'a [u8], DecodeError>> {
    let within = within(nesting.scope);
    Fields::new(scope).filter_map(move |field| match field {
        Ok((2, value)) => Some(value.bytes(2).map_err(&within)),
        Ok(_) => None,
        Err(e) => Some(Err(within(e))),
    })
}

fn read_resource<'a>(buf: &'a [u8], attributes: &mut Vec<KeyValueView<'a>>) -> Result<(), DecodeError> {
    for field in Fields::new(buf) {
        let (number, value) = field.map_err(within("Resource"))?;
        if number == 1 {
            let kv = KeyValueView::read(value.bytes(number).map_err(within("Resource"))?)
                .map_err(within("a resource attribute"))?;
            attributes.push(kv);
        }
    }
    Ok(())
}

/// An attribute, its key and value borrowed from the request. The key is compared as bytes and
/// not checked for UTF-8 (`key_str` checks it where it is kept); a string value is checked.
#[derive(Clone, Copy, Debug)]
pub(super) struct KeyValueView<'a> {
    pub key: &'a [u8],
    pub value: Option<AttrValue<'a>>,
}

impl<'a> KeyValueView<'a> {
    pub fn read(buf: &'a [u8]) -> Result<Self, WireError> {
        let mut kv = KeyValueView {
            key: b"",
            value: None,
        };
        for field in Fields::new(buf) {
            match field? {
                (1, value) => kv.key = value.bytes(1)?,
                // A second AnyValue merges into the first: an empty one leaves the value as it was.
                (2, value) => {
                    if let Some(read) = read_any_value(value.bytes(2)?)? {
                        kv.value = Some(read);
                    }
                }
                _ => {}
            }
        }
        Ok(kv)
    }

    /// An attribute whose value is read only when `wanted` says its key is one that
    /// normalization looks up; any other's value is `AttrValue::Unread`, its framing checked but
    /// not its contents. Most of a span's attributes are never looked up (a user agent, a port, a
    /// stack trace), and reading each value, UTF-8 check included, was a sixth of what the daemon
    /// spent on a span (BENCHMARKS.md, ingest throughput). A request that prost accepts reads the
    /// same either way; one that prost refuses only for what lies inside such a value is read.
    #[inline]
    pub fn read_if(buf: &'a [u8], wanted: impl Fn(&[u8]) -> bool) -> Result<Self, WireError> {
        let (key, has_value) = match key_then_value(buf) {
            Some(found) => found,
            None => key_field_by_field(buf)?,
        };
        if wanted(key) {
            return Self::read(buf);
        }
        Ok(KeyValueView {
            key,
            value: has_value.then_some(AttrValue::Unread),
        })
    }

    /// The key as text: protobuf strings are UTF-8, and prost refuses a key that is not.
    pub fn key_str(&self) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.key).map_err(|_| WireError::InvalidUtf8(1))
    }
}

/// The key of a `KeyValue` as every SDK writes one: the key (field 1) and then, when there is
/// one, the value (field 2), each once, each length in at most two bytes, nothing else; and
/// whether a value is there. `None` for any other encoding, which `read_if` then reads field by
/// field: what this returns is what that reading would.
#[inline(always)]
fn key_then_value(buf: &[u8]) -> Option<(&[u8], bool)> {
    /// A length of one or two bytes, and what follows it.
    #[inline(always)]
    fn length(buf: &[u8]) -> Option<(usize, &[u8])> {
        match buf {
            [low, rest @ ..] if *low < 0x80 => Some((usize::from(*low), rest)),
            [low, high, rest @ ..] if *high < 0x80 => {
                Some((usize::from(low & 0x7f) | usize::from(*high) << 7, rest))
            }
            _ => None,
        }
    }
    let [0x0a, rest @ ..] = buf else { return None };
    let (key_len, rest) = length(rest)?;
    let (key, rest) = rest.split_at_checked(key_len)?;
    match rest {
        [] => Some((key, false)),
        [0x12, rest @ ..] => {
            let (value_len, rest) = length(rest)?;
            (rest.len() == value_len).then_some((key, true))
        }
        _ => None,
    }
}

/// The key of a `KeyValue` in any encoding protobuf allows (fields in any order, repeated,
/// unknown ones between), its value's framing checked; and whether a value is there.
fn key_field_by_field(buf: &[u8]) -> Result<(&[u8], bool), WireError> {
    let mut key: &[u8] = b"";
    let mut has_value = false;
    for field in Fields::new(buf) {
        match field? {
            (1, value) => key = value.bytes(1)?,
            (2, value) => {
                value.bytes(2)?;
                has_value = true;
            }
            _ => {}
        }
    }
    Ok((key, has_value))
}

/// An `AnyValue`: the last of its oneof fields on the wire wins, as in prost.
fn read_any_value(buf: &[u8]) -> Result<Option<AttrValue<'_>>, WireError> {
    let mut read = None;
    for field in Fields::new(buf) {
        let (number, value) = field?;
        read = Some(match number {
            1 => AttrValue::Str(value.str(number)?),
            2 => AttrValue::Bool(value.varint(number)? != 0),
            // int64 on the wire is the two's-complement u64.
            3 => AttrValue::Int(value.varint(number)? as i64),
            4 => AttrValue::Double(f64::from_bits(value.fixed64(number)?)),
            // Bytes, arrays, maps, a string by index: set, but not read.
            5..=8 => AttrValue::Other,
            // A field this version of OTLP does not know leaves the value as it was.
            _ => continue,
        });
    }
    Ok(read)
}

impl Attributes for [KeyValueView<'_>] {
    fn get(&self, key: &str) -> Option<AttrValue<'_>> {
        let value = self
            .iter()
            .find(|kv| kv.key == key.as_bytes())
            .and_then(|kv| kv.value);
        debug_assert!(
            value != Some(AttrValue::Unread),
            "attribute {key:?} looked up but left unread: add it to the keys its reader reads"
        );
        value
    }
}

/// For the readers' tests: requests mutated at random (bytes flipped, cut, repeated, inserted)
/// never panic a reader; whenever prost accepts one, so does the reader, and it reads the same
/// as from prost's own re-encoding of it (canonical order, merged, unknown fields dropped). What
/// the fields mean is each reader's own tests' business.
#[cfg(test)]
pub(super) fn assert_mutations_read_as_prost_reads<R: prost::Message + Default>(
    base: &[u8],
    read: fn(&[u8], &NormalizeOptions) -> Result<Normalized, DecodeError>,
) {
    use crate::testdata::Rng;

    let options = NormalizeOptions::default();
    let mut rng = Rng::new(11);
    let (mut accepted_by_prost, mut refused_by_prost) = (0, 0);
    for _ in 0..3_000 {
        let mut buf = base.to_vec();
        for _ in 0..=rng.below(3) {
            let at = rng.below(buf.len() as u64) as usize;
            match rng.below(4) {
                0 => buf[at] ^= 1 << rng.below(8),
                1 => buf.truncate(at),
                2 => {
                    let end = (at + 1 + rng.below(16) as usize).min(buf.len());
                    let chunk = buf[at..end].to_vec();
                    buf.splice(at..at, chunk);
                }
                _ => buf.insert(at, rng.below(256) as u8),
            }
            if buf.is_empty() {
                break;
            }
        }
        let ours = read(&buf, &options);
        match R::decode(&buf[..]) {
            Ok(decoded) => {
                accepted_by_prost += 1;
                let ours = ours.unwrap_or_else(|e| panic!("prost reads {buf:?}, the reader does not: {e}"));
                let reencoded = read(&decoded.encode_to_vec(), &options).expect("prost's encoding reads");
                assert_eq!(ours, reencoded, "{buf:?}");
            }
            Err(_) => refused_by_prost += 1,
        }
    }
    // Both outcomes were exercised.
    assert!(
        accepted_by_prost > 100 && refused_by_prost > 100,
        "{accepted_by_prost} {refused_by_prost}"
    );
}

/// For the readers' tests: field `number` holding `bytes` (a message, a string), appended to
/// `out` as protobuf frames it.
#[cfg(test)]
pub(super) fn length_delimited(number: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(number << 3 | 2);
    prost::encoding::encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// For the readers' tests: a request of one resource (`prod`, `shop`, version `1`) whose one
/// scope holds one item (a span, a metric or a log record) given as raw bytes. The three
/// signals nest alike, so one request serves them all.
#[cfg(test)]
pub(super) fn request_with_item(item: &[u8]) -> Vec<u8> {
    use prost::Message as _;

    let mut scope = Vec::new();
    length_delimited(2, item, &mut scope);
    let mut resource = Vec::new();
    length_delimited(
        1,
        &crate::testdata::resource("prod", "shop", "1").encode_to_vec(),
        &mut resource,
    );
    length_delimited(2, &scope, &mut resource);
    let mut request = Vec::new();
    length_delimited(1, &resource, &mut request);
    request
}

#[cfg(test)]
mod key_value_tests {
    use super::*;
    use crate::testdata::Rng;
    use prost::Message as _;

    /// Wherever the short way to an attribute's key reads one, reading field by field reads the
    /// same, and an attribute wanted reads whole: on attributes as SDKs write them (keys and values short and long, values of every
    /// kind, none) and on those bytes mutated (flipped, cut, grown, fields repeated).
    #[test]
    fn the_short_way_to_a_key_reads_what_field_by_field_reads() {
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
        let mut rng = Rng::new(5);
        let (mut short, mut long) = (0, 0);
        for _ in 0..20_000 {
            let text = |rng: &mut Rng| "k".repeat(rng.below(300) as usize);
            let value = match rng.below(4) {
                0 => None,
                1 => Some(Value::StringValue(text(&mut rng))),
                2 => Some(Value::IntValue(rng.next_u64() as i64)),
                _ => Some(Value::BoolValue(true)),
            };
            let attribute = KeyValue {
                key: text(&mut rng),
                value: (rng.below(8) > 0).then_some(AnyValue { value }),
                ..KeyValue::default()
            };
            let mut buf = attribute.encode_to_vec();
            if rng.below(2) == 0 && !buf.is_empty() {
                let at = rng.below(buf.len() as u64) as usize;
                match rng.below(3) {
                    0 => buf[at] ^= 1 << rng.below(8),
                    1 => buf.truncate(at),
                    _ => {
                        let chunk = buf[at..].to_vec();
                        buf.extend(chunk);
                    }
                }
            }
            match key_then_value(&buf) {
                Some(found) => {
                    short += 1;
                    assert_eq!(key_field_by_field(&buf).ok(), Some(found), "{buf:?}");
                    let read = KeyValueView::read(&buf).map(|kv| (kv.key, kv.value));
                    let wanted = KeyValueView::read_if(&buf, |_| true).map(|kv| (kv.key, kv.value));
                    assert_eq!(read, wanted, "{buf:?}");
                }
                None => long += 1,
            }
        }
        assert!(short > 5_000 && long > 1_000, "{short} {long}");
    }
}
