//! Numbers as bytes, for what the engine packs in its own memory (`packed`, `Sketch::pack_into`):
//! unsigned varints, zigzagged signed ones, real numbers to the bit, and the error for bytes
//! that do not read back.

/// Bytes that do not read back as what was packed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("packed aggregate unreadable: {0}")]
pub struct Unreadable(pub &'static str);

/// Appends `value` as a little-endian base-128 varint: 7 bits a byte, the high bit set on every
/// byte but the last.
pub fn put_u64(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a varint written by `put_u64`, advancing `input` past it.
pub fn get_u64(input: &mut &[u8]) -> Result<u64, Unreadable> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or(Unreadable("a number cut short"))?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Unreadable("a number longer than 64 bits"))
}

/// Appends a signed `value`, zigzagged so that small magnitudes of either sign take one byte.
pub fn put_i64(out: &mut Vec<u8>, value: i64) {
    put_u64(out, ((value << 1) ^ (value >> 63)) as u64);
}

pub fn get_i64(input: &mut &[u8]) -> Result<i64, Unreadable> {
    let z = get_u64(input)?;
    Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
}

pub fn get_i32(input: &mut &[u8]) -> Result<i32, Unreadable> {
    i32::try_from(get_i64(input)?).map_err(|_| Unreadable("an index out of range"))
}

pub fn get_u32(input: &mut &[u8]) -> Result<u32, Unreadable> {
    u32::try_from(get_u64(input)?).map_err(|_| Unreadable("a count out of range"))
}

/// Appends `value`'s bits as they are (little-endian): a real number reads back to the bit.
pub fn put_f64(out: &mut Vec<u8>, value: f64) {
    out.extend_from_slice(&value.to_bits().to_le_bytes());
}

pub fn get_f64(input: &mut &[u8]) -> Result<f64, Unreadable> {
    let (bytes, rest) = input
        .split_first_chunk::<8>()
        .ok_or(Unreadable("a real number cut short"))?;
    *input = rest;
    Ok(f64::from_bits(u64::from_le_bytes(*bytes)))
}

pub fn get_u8(input: &mut &[u8]) -> Result<u8, Unreadable> {
    let (&byte, rest) = input.split_first().ok_or(Unreadable("a flag cut short"))?;
    *input = rest;
    Ok(byte)
}

/// A length of items of at least `each` bytes apiece, checked against what is left to read, so
/// that unreadable bytes cannot ask for a huge allocation.
pub fn get_len(input: &mut &[u8], each: usize) -> Result<usize, Unreadable> {
    let len = usize::try_from(get_u64(input)?).map_err(|_| Unreadable("a length out of range"))?;
    if len.saturating_mul(each) > input.len() {
        return Err(Unreadable("a length past the end"));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_back_as_written() {
        let mut out = Vec::new();
        let unsigned = [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX];
        let signed = [0, -1, 1, -64, 64, i64::MIN, i64::MAX];
        let reals = [
            0.0,
            -0.0,
            1.5,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
        ];
        for v in unsigned {
            put_u64(&mut out, v);
        }
        for v in signed {
            put_i64(&mut out, v);
        }
        for v in reals {
            put_f64(&mut out, v);
        }
        let mut input = &out[..];
        for v in unsigned {
            assert_eq!(get_u64(&mut input), Ok(v));
        }
        for v in signed {
            assert_eq!(get_i64(&mut input), Ok(v));
        }
        for v in reals {
            assert_eq!(get_f64(&mut input).map(f64::to_bits), Ok(v.to_bits()));
        }
        assert!(input.is_empty());
        // One byte for small counts, either sign.
        let mut one = Vec::new();
        put_u64(&mut one, 127);
        put_i64(&mut one, -64);
        assert_eq!(one.len(), 2);
    }

    #[test]
    fn cut_short_or_out_of_range_is_unreadable_not_a_panic() {
        let mut out = Vec::new();
        put_u64(&mut out, 1 << 40);
        assert!(get_u64(&mut &out[..3]).is_err());
        assert!(get_i32(&mut &out[..]).is_err());
        assert!(get_f64(&mut &[1u8, 2, 3][..]).is_err());
        assert!(get_u64(&mut &[0xffu8; 11][..]).is_err());
        // A length that asks for more than is there.
        let mut len = Vec::new();
        put_u64(&mut len, 1 << 30);
        assert!(get_len(&mut &len[..], 1).is_err());
    }
}
