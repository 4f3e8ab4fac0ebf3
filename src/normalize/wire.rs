//! The protobuf wire format, read in place: fields of a message as borrowed slices of the buffer.
//!
//! The trace normalizer reads spans through this instead of decoding whole prost messages, so a
//! request costs no allocation per attribute: strings stay in the request's buffer until the
//! normalizer copies the few it keeps. Every field's framing is checked (a truncated or overlong
//! field, a bad varint or wire type is an error, as it is for prost); the contents of fields the
//! caller skips are not looked at.

/// Why a buffer is not a well-formed protobuf message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the message ends inside a field")]
    Truncated,
    #[error("a varint is longer than ten bytes")]
    VarintOverflow,
    #[error("field number 0 is not valid")]
    FieldZero,
    #[error("wire type {0} is not valid")]
    BadWireType(u8),
    #[error("an end-group marker for field {0} without its start")]
    UnmatchedEndGroup(u32),
    #[error("field {field} has wire type {found}, expected {expected}")]
    UnexpectedWireType {
        field: u32,
        found: &'static str,
        expected: &'static str,
    },
    #[error("field {0} is not valid UTF-8")]
    InvalidUtf8(u32),
    #[error("groups are nested deeper than {MAX_GROUP_DEPTH}")]
    GroupsTooDeep,
}

/// Prost's own recursion limit, applied to the (deprecated, never used by OTLP) groups skipped.
const MAX_GROUP_DEPTH: usize = 100;

/// One field's value, borrowed from the buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    /// Length-delimited: bytes, a string or an embedded message.
    Bytes(&'a [u8]),
    /// A (skipped) group.
    Group,
}

impl<'a> Value<'a> {
    fn kind(&self) -> &'static str {
        match self {
            Value::Varint(_) => "varint",
            Value::Fixed64(_) => "fixed64",
            Value::Fixed32(_) => "fixed32",
            Value::Bytes(_) => "length-delimited",
            Value::Group => "group",
        }
    }

    fn unexpected(&self, field: u32, expected: &'static str) -> WireError {
        WireError::UnexpectedWireType {
            field,
            found: self.kind(),
            expected,
        }
    }

    /// A varint field (int32, int64, uint32, uint64, bool, enum).
    pub fn varint(self, field: u32) -> Result<u64, WireError> {
        match self {
            Value::Varint(v) => Ok(v),
            other => Err(other.unexpected(field, "varint")),
        }
    }

    /// A fixed64 field (fixed64, sfixed64, double).
    pub fn fixed64(self, field: u32) -> Result<u64, WireError> {
        match self {
            Value::Fixed64(v) => Ok(v),
            other => Err(other.unexpected(field, "fixed64")),
        }
    }

    /// A length-delimited field (bytes or an embedded message).
    pub fn bytes(self, field: u32) -> Result<&'a [u8], WireError> {
        match self {
            Value::Bytes(b) => Ok(b),
            other => Err(other.unexpected(field, "length-delimited")),
        }
    }

    /// A string field, checked to be UTF-8 as protobuf requires.
    pub fn str(self, field: u32) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.bytes(field)?).map_err(|_| WireError::InvalidUtf8(field))
    }
}

impl Value<'_> {
    /// A repeated fixed64 field (fixed64, sfixed64), packed or one value per field, as protobuf
    /// lets either come: its values appended to `out`.
    pub fn repeated_fixed64(self, field: u32, out: &mut Vec<u64>) -> Result<(), WireError> {
        self.repeated_eight_bytes(field, out, u64::from_le_bytes)
    }

    /// A repeated double field, packed or one value per field: its values appended to `out`.
    pub fn repeated_double(self, field: u32, out: &mut Vec<f64>) -> Result<(), WireError> {
        self.repeated_eight_bytes(field, out, f64::from_le_bytes)
    }

    fn repeated_eight_bytes<T>(
        self,
        field: u32,
        out: &mut Vec<T>,
        from: fn([u8; 8]) -> T,
    ) -> Result<(), WireError> {
        match self {
            Value::Fixed64(v) => out.push(from(v.to_le_bytes())),
            Value::Bytes(packed) => {
                if packed.len() % 8 != 0 {
                    return Err(WireError::Truncated);
                }
                out.reserve(packed.len() / 8);
                out.extend(
                    packed
                        .chunks_exact(8)
                        .map(|b| from([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
                );
            }
            other => return Err(other.unexpected(field, "fixed64 or packed")),
        }
        Ok(())
    }

    /// A repeated varint field (uint64, int64...), packed or one value per field: its values
    /// appended to `out`.
    pub fn repeated_varint(self, field: u32, out: &mut Vec<u64>) -> Result<(), WireError> {
        match self {
            Value::Varint(v) => out.push(v),
            Value::Bytes(packed) => {
                let mut values = Fields::new(packed);
                while !values.buf.is_empty() {
                    out.push(values.varint()?);
                }
            }
            other => return Err(other.unexpected(field, "varint or packed")),
        }
        Ok(())
    }
}

/// The fields of one message, in the order they are on the wire.
pub struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Fields { buf }
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, WireError> {
        // Most varints on the wire (keys, lengths, enums) are a single byte.
        if let Some((&byte, rest)) = self.buf.split_first()
            && byte < 0x80
        {
            self.buf = rest;
            return Ok(u64::from(byte));
        }
        self.varint_slow()
    }

    #[cold]
    fn varint_slow(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for (i, &byte) in self.buf.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                // The tenth byte may carry only the top bit of a u64; prost refuses more.
                if i == 9 && byte > 1 {
                    return Err(WireError::VarintOverflow);
                }
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err(if self.buf.len() < 10 {
            WireError::Truncated
        } else {
            WireError::VarintOverflow
        })
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A field's number and wire type.
    #[inline]
    fn key(&mut self) -> Result<(u32, u8), WireError> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return Err(WireError::VarintOverflow);
        }
        let field = (key >> 3) as u32;
        if field == 0 {
            return Err(WireError::FieldZero);
        }
        Ok((field, (key & 7) as u8))
    }

    #[inline(always)]
    fn value(&mut self, field: u32, wire_type: u8) -> Result<Value<'a>, WireError> {
        Ok(match wire_type {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(
                self.take(8)?.try_into().map_err(|_| WireError::Truncated)?,
            )),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| WireError::Truncated)?;
                Value::Bytes(self.take(len)?)
            }
            3 => {
                self.skip_group(field)?;
                Value::Group
            }
            4 => return Err(WireError::UnmatchedEndGroup(field)),
            5 => Value::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().map_err(|_| WireError::Truncated)?,
            )),
            other => return Err(WireError::BadWireType(other)),
        })
    }

    /// Skips a group's fields up to its end marker, nested groups included.
    #[cold]
    #[inline(never)]
    fn skip_group(&mut self, field: u32) -> Result<(), WireError> {
        let mut open = vec![field];
        while let Some(&innermost) = open.last() {
            if open.len() > MAX_GROUP_DEPTH {
                return Err(WireError::GroupsTooDeep);
            }
            let (f, wire_type) = self.key()?;
            match wire_type {
                3 => open.push(f),
                4 if f == innermost => {
                    open.pop();
                }
                4 => return Err(WireError::UnmatchedEndGroup(f)),
                _ => {
                    self.value(f, wire_type)?;
                }
            }
        }
        Ok(())
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), WireError>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let field = self
            .key()
            .and_then(|(field, wire_type)| Ok((field, self.value(field, wire_type)?)));
        if field.is_err() {
            // Stop after an error: the rest of the buffer cannot be framed.
            self.buf = &[];
        }
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every field of `buf`, or the first error.
    fn fields(buf: &[u8]) -> Result<Vec<(u32, Value<'_>)>, WireError> {
        Fields::new(buf).collect()
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct Sample {
        #[prost(uint64, tag = "1")]
        varint: u64,
        #[prost(fixed64, tag = "2")]
        fixed64: u64,
        #[prost(string, tag = "3")]
        text: String,
        #[prost(fixed32, tag = "4")]
        fixed32: u32,
        #[prost(int32, tag = "536870911")]
        last_field: i32,
    }

    #[test]
    fn reads_what_prost_writes() {
        let sample = Sample {
            varint: u64::MAX,
            fixed64: 0x0102_0304_0506_0708,
            text: "héllo".into(),
            fixed32: 7,
            last_field: -1,
        };
        let buf = sample.encode_to_vec();
        let got = fields(&buf).expect("well-formed");
        assert_eq!(
            got,
            vec![
                (1, Value::Varint(u64::MAX)),
                (2, Value::Fixed64(0x0102_0304_0506_0708)),
                (3, Value::Bytes("héllo".as_bytes())),
                (4, Value::Fixed32(7)),
                // A negative int32 is sign-extended to ten bytes on the wire.
                (536_870_911, Value::Varint(u64::MAX)),
            ]
        );
        assert_eq!(got[2].1.str(3), Ok("héllo"));
        assert_eq!(got[4].1.varint(536_870_911).map(|v| v as i32), Ok(-1));
    }

    #[test]
    fn malformed_framing_is_an_error_as_it_is_for_prost() {
        let cases: [(&[u8], WireError); 7] = [
            // A string field claiming 5 bytes with 2 left.
            (&[0x1a, 5, b'a', b'b'], WireError::Truncated),
            // A varint that never ends.
            (&[0x08, 0x80, 0x80], WireError::Truncated),
            (
                &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                WireError::VarintOverflow,
            ),
            (&[0x00, 1], WireError::FieldZero),
            (&[0x0e], WireError::BadWireType(6)),
            (&[0x0c], WireError::UnmatchedEndGroup(1)),
            (&[0x09, 1, 2, 3], WireError::Truncated),
        ];
        for (buf, want) in cases {
            assert_eq!(fields(buf), Err(want.clone()), "{buf:?}");
            assert!(Sample::decode(buf).is_err(), "prost accepts {buf:?}");
        }
    }

    #[test]
    fn groups_are_skipped_with_their_nested_fields() {
        // Field 5 group { field 1 varint 3, field 6 group { } }, then field 1 varint 9.
        let buf = [0x2b, 0x08, 3, 0x33, 0x34, 0x2c, 0x08, 9];
        assert_eq!(fields(&buf), Ok(vec![(5, Value::Group), (1, Value::Varint(9))]));
        // A group closed by another field's end marker.
        assert_eq!(fields(&[0x2b, 0x34]), Err(WireError::UnmatchedEndGroup(6)));
    }

    #[test]
    fn a_field_of_the_wrong_wire_type_is_named() {
        let (field, value) = fields(&[0x08, 1]).expect("well-formed")[0];
        assert_eq!(
            value.bytes(field),
            Err(WireError::UnexpectedWireType {
                field: 1,
                found: "varint",
                expected: "length-delimited"
            })
        );
        let (field, value) = fields(&[0x0a, 1, 0xff]).expect("well-formed")[0];
        assert_eq!(value.str(field), Err(WireError::InvalidUtf8(1)));
    }
}
